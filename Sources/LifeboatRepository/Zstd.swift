internal import CZstd
import Synchronization

/// What zstd said when it refused.
public struct ZstdError: Error, Sendable, CustomStringConvertible {
    public let description: String
}

/// zstd compression with reusable contexts, safe to call from many threads at once.
///
/// Contexts are expensive to create (hundreds of KiB of tables), so each call borrows one from
/// a small pool and gives it back. The corresponding C functions are `ZSTD_compressCCtx` and
/// `ZSTD_decompressDCtx`.
final class Zstd: Sendable {
    let level: Int32
    // OpaquePointer is not Sendable; the pool hands each context to one thread at a time.
    private struct Handle: @unchecked Sendable { let pointer: OpaquePointer }
    private let compressors = Mutex<[Handle]>([])
    private let decompressors = Mutex<[Handle]>([])

    init(level: Int32) { self.level = level }

    deinit {
        compressors.withLock { $0.forEach { ZSTD_freeCCtx($0.pointer) } }
        decompressors.withLock { $0.forEach { ZSTD_freeDCtx($0.pointer) } }
    }

    static func bound(_ size: Int) -> Int { ZSTD_compressBound(size) }

    /// Compresses `input` into `output`; returns the compressed size.
    func compress(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) throws(ZstdError) -> Int {
        let context = compressors.withLock { $0.popLast() } ?? Handle(pointer: ZSTD_createCCtx())
        defer { compressors.withLock { $0.append(context) } }
        let result = ZSTD_compressCCtx(context.pointer, output.baseAddress, output.count, input.baseAddress, input.count, level)
        try Self.check(result)
        return result
    }

    /// Decompresses a whole frame into `output`; returns the decompressed size.
    func decompress(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) throws(ZstdError) -> Int {
        let context = decompressors.withLock { $0.popLast() } ?? Handle(pointer: ZSTD_createDCtx())
        defer { decompressors.withLock { $0.append(context) } }
        let result = ZSTD_decompressDCtx(context.pointer, output.baseAddress, output.count, input.baseAddress, input.count)
        try Self.check(result)
        return result
    }

    private static func check(_ code: Int) throws(ZstdError) {
        if ZSTD_isError(code) != 0 {
            throw ZstdError(description: String(cString: ZSTD_getErrorName(code)))
        }
    }
}
