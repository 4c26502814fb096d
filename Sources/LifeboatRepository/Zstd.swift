internal import CZstd
import Synchronization

/// What zstd said when it refused.
public struct ZstdError: Error, Sendable, CustomStringConvertible {
    public let description: String
}

/// zstd compression with reusable contexts, safe to call from many threads at once.
///
/// Contexts are expensive to create (hundreds of KiB of tables), so each call borrows one from
/// a small pool and gives it back. The corresponding C functions are `ZSTD_compress2` and
/// `ZSTD_decompressDCtx`.
final class Zstd: @unchecked Sendable {
    let level: Int32
    let tuning: [(ZSTD_cParameter, Int32)]
    // OpaquePointer is not Sendable; the pool hands each context to one thread at a time.
    private struct Handle: @unchecked Sendable { let pointer: OpaquePointer }
    // The tuple array is immutable after init.

    private let compressors = Mutex<[Handle]>([])
    private let decompressors = Mutex<[Handle]>([])

    /// - Parameters:
    ///   - tuning: optional overrides of hash log, chain log and minimum match (0 = the level's own).
    init(level: Int32, hashLog: Int32 = 0, chainLog: Int32 = 0, minMatch: Int32 = 0) {
        self.level = level
        self.tuning = [(ZSTD_c_hashLog, hashLog), (ZSTD_c_chainLog, chainLog), (ZSTD_c_minMatch, minMatch)].filter { $0.1 != 0 }
    }

    private func makeCompressor() throws -> Handle {
        let context = ZSTD_createCCtx()!
        try Self.check(ZSTD_CCtx_setParameter(context, ZSTD_c_compressionLevel, level))
        for (parameter, value) in tuning { try Self.check(ZSTD_CCtx_setParameter(context, parameter, value)) }
        return Handle(pointer: context)
    }

    deinit {
        compressors.withLock { $0.forEach { ZSTD_freeCCtx($0.pointer) } }
        decompressors.withLock { $0.forEach { ZSTD_freeDCtx($0.pointer) } }
    }

    static func bound(_ size: Int) -> Int { ZSTD_compressBound(size) }

    /// Compresses `input` into `output`; returns the compressed size.
    func compress(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) throws -> Int {
        let pooled = compressors.withLock { $0.popLast() }
        let context = try pooled ?? makeCompressor()
        defer { compressors.withLock { $0.append(context) } }
        let result = ZSTD_compress2(context.pointer, output.baseAddress, output.count, input.baseAddress, input.count)
        try Self.check(result)
        return result
    }

    /// Decompresses a whole frame into `output`; returns the decompressed size.
    func decompress(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) throws -> Int {
        let context = decompressors.withLock { $0.popLast() } ?? Handle(pointer: ZSTD_createDCtx())
        defer { decompressors.withLock { $0.append(context) } }
        let result = ZSTD_decompressDCtx(context.pointer, output.baseAddress, output.count, input.baseAddress, input.count)
        try Self.check(result)
        return result
    }

    private static func check(_ code: Int) throws {
        if ZSTD_isError(code) != 0 {
            throw ZstdError(description: String(cString: ZSTD_getErrorName(code)))
        }
    }
}
