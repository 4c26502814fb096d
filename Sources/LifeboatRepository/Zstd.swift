internal import CZstd
import LifeboatBase

/// What zstd said when it refused.
public struct ZstdError: Error, Sendable, CustomStringConvertible {
    public let description: String
}

/// zstd compression parameters: a level and the overrides that tune it (0 = the level's own).
struct ZstdParameters: Sendable, Equatable {
    var level: Int32
    var strategy: Int32 = 0
    var windowLog: Int32 = 0
    var hashLog: Int32 = 0
    var chainLog: Int32 = 0
    var searchLog: Int32 = 0
    var minMatch: Int32 = 0
    var targetLength: Int32 = 0

    /// Every parameter of `level`'s row for inputs of `sourceSize` bytes, spelled out. zstd picks
    /// a row by the input's size plus a dictionary's: pinning it keeps a compressor with a large
    /// dictionary on the row measured for 64 KiB frames.
    static func pinned(level: Int32, sourceSize: Int) -> ZstdParameters {
        let row = ZSTD_getCParams(Int32(level), UInt64(sourceSize), 0)
        return ZstdParameters(level: level, strategy: Int32(row.strategy.rawValue), windowLog: Int32(row.windowLog),
                              hashLog: Int32(row.hashLog), chainLog: Int32(row.chainLog), searchLog: Int32(row.searchLog),
                              minMatch: Int32(row.minMatch), targetLength: Int32(row.targetLength))
    }

    fileprivate var overrides: [(ZSTD_cParameter, Int32)] {
        [(ZSTD_c_strategy, strategy), (ZSTD_c_windowLog, windowLog), (ZSTD_c_hashLog, hashLog), (ZSTD_c_chainLog, chainLog),
         (ZSTD_c_searchLog, searchLog), (ZSTD_c_minMatch, minMatch), (ZSTD_c_targetLength, targetLength)].filter { $0.1 != 0 }
    }
}

/// A trained zstd dictionary, ready for compressing (its bytes, loaded into each context once)
/// and for decompressing (a digested `ZSTD_DDict`, shared by all threads).
final class ZstdDictionary: @unchecked Sendable {
    // @unchecked: both are immutable after init; zstd allows one DDict to be used by many threads.
    let bytes: [UInt8]
    fileprivate let digested: OpaquePointer

    init(bytes: [UInt8]) throws {
        self.bytes = bytes
        guard let ddict = bytes.withUnsafeBytes({ ZSTD_createDDict($0.baseAddress, $0.count) }) else {
            throw ZstdError(description: "not a zstd dictionary")
        }
        digested = ddict
    }

    deinit { ZSTD_freeDDict(digested) }

    /// Trains a dictionary of at most `capacity` bytes on `samples` (zstd's fastCover trainer).
    /// - Throws: `ZstdError` when the samples are too few or too alike to train on.
    static func train(samples: [[UInt8]], capacity: Int) throws -> [UInt8] {
        var joined = [UInt8]()
        joined.reserveCapacity(samples.reduce(0) { $0 + $1.count })
        for sample in samples { joined += sample }
        let sizes = samples.map { Int($0.count) }
        var dictionary = [UInt8](repeating: 0, count: capacity)
        let n = dictionary.withUnsafeMutableBytes { out in
            joined.withUnsafeBytes { input in
                ZDICT_trainFromBuffer(out.baseAddress, out.count, input.baseAddress, sizes, UInt32(sizes.count))
            }
        }
        if ZDICT_isError(n) != 0 { throw ZstdError(description: String(cString: ZDICT_getErrorName(n))) }
        dictionary.removeLast(dictionary.count - n)
        return dictionary
    }
}

/// zstd compression with reusable contexts, safe to call from many threads at once.
///
/// Contexts are expensive to create (hundreds of KiB of tables), so each call borrows one from
/// a small pool and gives it back. A compressor made with a dictionary loads it into each of its
/// contexts once (zstd digests it at the first frame and keeps it); frames compressed against a
/// prefix (other frames' plaintext) use a pool of their own, since a prefix clears a dictionary.
/// The corresponding C functions are `ZSTD_compress2` and `ZSTD_decompressDCtx`.
final class Zstd: @unchecked Sendable {
    let parameters: ZstdParameters
    let dictionary: ZstdDictionary?
    // OpaquePointer is not Sendable; the pool hands each context to one thread at a time.
    private struct Handle: @unchecked Sendable { let pointer: OpaquePointer }

    private let compressors = Locked<[Handle]>([])
    private let prefixCompressors = Locked<[Handle]>([])
    private static let decompressors = Locked<[Handle]>([])

    init(_ parameters: ZstdParameters, dictionary: ZstdDictionary? = nil) {
        self.parameters = parameters
        self.dictionary = dictionary
    }

    /// A level with hash log, chain log and minimum match overrides (0 = the level's own).
    convenience init(level: Int32, hashLog: Int32 = 0, chainLog: Int32 = 0, minMatch: Int32 = 0) {
        self.init(ZstdParameters(level: level, hashLog: hashLog, chainLog: chainLog, minMatch: minMatch))
    }

    private func makeCompressor(withDictionary: Bool) throws -> Handle {
        let context = ZSTD_createCCtx()!
        try Self.check(ZSTD_CCtx_setParameter(context, ZSTD_c_compressionLevel, parameters.level))
        for (parameter, value) in parameters.overrides { try Self.check(ZSTD_CCtx_setParameter(context, parameter, value)) }
        // Readers know every frame's length: the frame header need not say it again.
        try Self.check(ZSTD_CCtx_setParameter(context, ZSTD_c_contentSizeFlag, 0))
        if withDictionary, let dictionary {
            try Self.check(dictionary.bytes.withUnsafeBytes { ZSTD_CCtx_loadDictionary(context, $0.baseAddress, $0.count) })
        }
        return Handle(pointer: context)
    }

    deinit {
        compressors.withLock { $0.forEach { ZSTD_freeCCtx($0.pointer) } }
        prefixCompressors.withLock { $0.forEach { ZSTD_freeCCtx($0.pointer) } }
    }

    static func bound(_ size: Int) -> Int { ZSTD_compressBound(size) }

    /// Compresses `input` into `output` (with the dictionary, if any); returns the compressed size.
    func compress(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) throws -> Int {
        let context = try compressors.withLock { $0.popLast() } ?? makeCompressor(withDictionary: true)
        defer { compressors.withLock { $0.append(context) } }
        let result = ZSTD_compress2(context.pointer, output.baseAddress, output.count, input.baseAddress, input.count)
        try Self.check(result)
        return result
    }

    /// Compresses `input` against `prefix` (raw content that a decoder must be given again).
    func compress(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer, prefix: UnsafeRawBufferPointer) throws -> Int {
        let context = try prefixCompressors.withLock { $0.popLast() } ?? makeCompressor(withDictionary: false)
        defer { prefixCompressors.withLock { $0.append(context) } }
        try Self.check(ZSTD_CCtx_refPrefix(context.pointer, prefix.baseAddress, prefix.count))
        let result = ZSTD_compress2(context.pointer, output.baseAddress, output.count, input.baseAddress, input.count)
        try Self.check(result)
        return result
    }

    /// Decompresses a whole frame into `output`; returns the decompressed size.
    /// - Parameters:
    ///   - dictionary: the dictionary the frame was compressed with.
    ///   - prefix: the raw content it was compressed against.
    static func decompress(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer,
                           dictionary: ZstdDictionary? = nil, prefix: UnsafeRawBufferPointer? = nil) throws -> Int {
        let context = decompressors.withLock { $0.popLast() } ?? Handle(pointer: ZSTD_createDCtx())
        defer { decompressors.withLock { $0.append(context) } }
        let result: Int
        if let dictionary {
            result = ZSTD_decompress_usingDDict(context.pointer, output.baseAddress, output.count, input.baseAddress, input.count,
                                                dictionary.digested)
        } else {
            if let prefix { try check(ZSTD_DCtx_refPrefix(context.pointer, prefix.baseAddress, prefix.count)) }
            result = ZSTD_decompressDCtx(context.pointer, output.baseAddress, output.count, input.baseAddress, input.count)
        }
        if ZSTD_isError(result) != 0, prefix != nil {
            // A prefix is used once; one left behind by a failed frame must not reach the next.
            _ = ZSTD_DCtx_reset(context.pointer, ZSTD_reset_session_and_parameters)
        }
        try check(result)
        return result
    }

    private static func check(_ code: Int) throws {
        if ZSTD_isError(code) != 0 {
            throw ZstdError(description: String(cString: ZSTD_getErrorName(code)))
        }
    }
}
