import Crypto
import LifeboatBase
import _CryptoExtras
import Foundation

/// The two secrets of an encrypted repository: one encrypts chunks (AES-256-GCM), one names
/// them (HMAC-SHA-256). Both come from the master key wrapped in config.json.
struct RepositoryKeys: Sendable {
    let encryption: SymmetricKey
    let id: SymmetricKey
    /// The repository seals its manifests (its key says so: `KeyWrapping`).
    var sealedManifests = false

    init(master: [UInt8], sealedManifests: Bool = false) {
        precondition(master.count == 64)
        self.sealedManifests = sealedManifests
        encryption = SymmetricKey(data: master[0..<32])
        id = SymmetricKey(data: master[32..<64])
    }

    /// `bytes` sealed with AES-256-GCM under the chunk key, bound to `context` (what the bytes are and where they belong).
    func seal(_ bytes: [UInt8], context: String) throws -> [UInt8] {
        Array(try AES.GCM.seal(bytes, using: encryption, authenticating: Array(context.utf8)).combined!)
    }

    /// What `seal` sealed; nil when it does not authenticate under this key and `context`.
    func open(_ stored: [UInt8], context: String) -> [UInt8]? {
        guard let box = try? AES.GCM.SealedBox(combined: stored),
              let plain = try? AES.GCM.open(box, using: encryption, authenticating: Array(context.utf8)) else { return nil }
        return Array(plain)
    }
}

/// A frame of a stored chunk: the chunk's id and the frame's number.
public struct FrameReference: Hashable, Sendable {
    public let chunk: ChunkID
    public let frame: Int

    public init(chunk: ChunkID, frame: Int) {
        self.chunk = chunk
        self.frame = frame
    }
}

/// Gives the plaintext of a frame that another frame was compressed against (see `ChunkCodec`).
/// Such a frame never refers to others itself: whoever decodes one passes no reader.
public typealias ReferenceReader = (FrameReference) throws -> [UInt8]

/// Where the frames of one stored chunk are, read from its header and frame table and checked
/// against the chunk id. Lets a reader fetch and decode one frame without the rest.
public struct ChunkLayout: Sendable {
    public let id: ChunkID
    public let rawLength: Int
    public let frameSize: Int
    /// Per frame: byte range in the stored chunk, and the digest of its plaintext.
    let frames: [(range: Range<Int>, digest: ChunkID)]
    let compressed: Bool
    let encrypted: Bool
    /// 1: frames are bare zstd frames (or plain when as long as their plaintext); 2: every frame
    /// starts with its mode (see `ChunkCodec`).
    let version: UInt8
    /// Written by `compact`, which does not rewrite it again.
    public let compacted: Bool
    /// The inode of the file it was read from (0: not known). `compact` replaces chunk files
    /// under the same name: a reader holding a layout checks that it still describes the file.
    public internal(set) var inode: UInt64 = 0

    public var frameCount: Int { frames.count }
    public func storedRange(ofFrame k: Int) -> Range<Int> { frames[k].range }
    public func rawLength(ofFrame k: Int) -> Int { min(frameSize, rawLength - k * frameSize) }
    /// Bytes of the header and frame table.
    var tableEnd: Int { ChunkCodec.headerSize + frames.count * ChunkCodec.tableEntrySize }
    /// Bytes of the stored chunk file it describes.
    var storedSize: Int { frames.last?.range.upperBound ?? tableEnd }
}

/// Turns plaintext chunks into stored chunk files and back, and names them.
///
/// A chunk is cut into frames of `frameSize` bytes, each compressed (and encrypted) on its own,
/// so that reading 4 KiB of a disk decodes one frame, not the whole chunk. The id is a two-level
/// hash: `H(H(frame 0) | H(frame 1) | …)` with H = SHA-256, or HMAC-SHA-256 under the id key in
/// an encrypted repository; it depends on the plaintext alone, so equal chunks share one id.
///
/// Stored chunk: a 16-byte header, a frame table, then the frames.
/// Header: `"LBCK" | version | flags | log2(frame size) | 0 | raw length (u32 LE) | frame count (u32 LE)`.
/// Flags: bit 0 = frames are zstd, bit 1 = AES-256-GCM (each frame: nonce | ciphertext | tag,
/// with the chunk id and frame number as associated data), bit 2 = compacted. Table: per frame,
/// stored length (u32 LE) and plaintext digest (32 bytes).
///
/// Version 2 frames (version 1, still read, had bare zstd frames, plain when not smaller) start
/// with their mode: 0 plain bytes; 1 a zstd frame; 2 a u32 LE dictionary number, then a zstd
/// frame compressed with that repository dictionary; 3 a count n (1-4) and n references (chunk
/// id, u16 LE frame number), then a zstd frame compressed against the referenced frames'
/// plaintext, concatenated (a prefix: what dedups 4 KiB-aligned copies of files that fixed
/// chunks miss). A referenced frame never has mode 3 itself, so a read costs at most one level
/// of references. Modes 1 and 2 with bit 7 set: the plaintext went through `X86Filter` before
/// compression (x86 code: call and jump targets made absolute). Encrypted, the mode and
/// references are inside the sealed body.
final class ChunkCodec: Sendable {
    static let headerSize = 16
    static let tableEntrySize = 36
    static let magic: [UInt8] = Array("LBCK".utf8)
    static let version: UInt8 = 2
    private static let flagZstd: UInt8 = 1
    private static let flagEncrypted: UInt8 = 2
    private static let flagCompacted: UInt8 = 4
    private static let sealOverhead = 12 + 16
    static let maxReferences = 4
    private static let referenceSize = 32 + 2

    enum Mode: UInt8 {
        case plain = 0, zstd = 1, dictionary = 2, references = 3
    }
    /// Set in the mode byte of a frame whose plaintext was filtered (see `X86Filter`).
    static let filtered: UInt8 = 0x80

    let zstd: Zstd
    let keys: RepositoryKeys?
    let frameSize: Int
    /// The repository's trained dictionaries (frames of mode 2).
    let dictionaries: DictionaryShelf?
    /// The digest of a whole frame of zeros (a frame that holds nothing).
    let zeroFrameDigest: ChunkID

    init(compression: RepositoryConfig.Compression, frameSize: Int, keys: RepositoryKeys?, dictionaries: DictionaryShelf? = nil) {
        zstd = Zstd(level: Int32(compression.level), hashLog: Int32(compression.hashLog ?? 0),
                    chainLog: Int32(compression.chainLog ?? 0), minMatch: Int32(compression.minMatch ?? 0))
        self.keys = keys
        self.frameSize = frameSize
        self.dictionaries = dictionaries
        zeroFrameDigest = Self.digest([UInt8](repeating: 0, count: frameSize), keys: keys)
    }

    private func digest(_ data: UnsafeRawBufferPointer) -> ChunkID { Self.digest(data, keys: keys) }

    private static func digest(_ data: some DataProtocol, keys: RepositoryKeys?) -> ChunkID {
        if let keys {
            return HMAC<SHA256>.authenticationCode(for: data, using: keys.id).withUnsafeBytes { ChunkID(bytes: $0) }
        }
        return SHA256.hash(data: data).withUnsafeBytes { ChunkID(bytes: $0) }
    }

    private func frameCount(_ length: Int) -> Int { max(1, (length + frameSize - 1) / frameSize) }

    func frame(_ k: Int, of data: UnsafeRawBufferPointer) -> UnsafeRawBufferPointer {
        UnsafeRawBufferPointer(rebasing: data[(k * frameSize)..<min(data.count, (k + 1) * frameSize)])
    }

    /// The id of a plaintext chunk.
    func id(of data: UnsafeRawBufferPointer) -> ChunkID {
        id(ofDigests: frameDigests(of: data))
    }

    /// The digest of each frame of a plaintext chunk (what its id and frame table are made of).
    func frameDigests(of data: UnsafeRawBufferPointer) -> [ChunkID] {
        (0..<frameCount(data.count)).map { digest(frame($0, of: data)) }
    }

    func id(ofDigests digests: [ChunkID]) -> ChunkID {
        var table = [UInt8]()
        table.reserveCapacity(digests.count * 32)
        for d in digests { table += d.bytes }
        return table.withUnsafeBytes { digest($0) }
    }

    /// Bytes one frame can take when stored, at most (mode and references included).
    var storedFrameBound: Int {
        max(Zstd.bound(frameSize), frameSize) + 2 + Self.maxReferences * Self.referenceSize + Self.sealOverhead
    }

    /// Bytes of scratch space `encode` needs for a chunk of `chunkSize`.
    func scratchSize(chunkSize: Int) -> Int {
        let frames = frameCount(chunkSize)
        return Self.headerSize + frames * Self.tableEntrySize + storedFrameBound * frames
    }

    /// Encodes a chunk for storage into `scratch` (see `scratchSize`). Returns the stored bytes, inside `scratch`.
    /// - Parameter digests: `frameDigests(of: data)`, when the caller has them already.
    func encode(_ data: UnsafeRawBufferPointer, id: ChunkID, digests: [ChunkID]? = nil,
                scratch: UnsafeMutableRawBufferPointer) throws -> UnsafeRawBufferPointer {
        let digests = digests ?? frameDigests(of: data)
        return try assemble(rawLength: data.count, id: id, digests: digests, compacted: false, scratch: scratch) { k, out in
            try seal(writeBody(frame(k, of: data), into: out, compressor: zstd, dictionary: nil), in: out, id: id, frame: k)
        }
    }

    /// Encodes a chunk whose frames' bodies `body(k, out)` writes into `out` (returning their
    /// length; see `writeBody`), marked as compacted. Returns the stored bytes, inside `scratch`.
    func encodeCompacted(rawLength: Int, id: ChunkID, digests: [ChunkID], scratch: UnsafeMutableRawBufferPointer,
                         body: (Int, UnsafeMutableRawBufferPointer) throws -> Int) throws -> UnsafeRawBufferPointer {
        try assemble(rawLength: rawLength, id: id, digests: digests, compacted: true, scratch: scratch) { k, out in
            try seal(body(k, out), in: out, id: id, frame: k)
        }
    }

    /// Encodes a chunk that differs from the stored chunk `layout` only in the frames marked
    /// `changed`, whose new plaintext is in `data` (the other frames of `data` are not read):
    /// only those are compressed; the others are taken as stored (unencrypted), or opened and
    /// sealed again under the new id (encrypted: the id is their associated data). A changed-block
    /// point that touched one 64 KiB frame of a chunk compresses 64 KiB, not the whole chunk.
    /// A kept frame that refers to other frames is decoded and compressed anew, so that only
    /// `compact` makes references (and records them for `gc`).
    /// - Parameters:
    ///   - digests: the new chunk's frame digests (the old ones for unchanged frames).
    ///   - references: reads the frames the old chunk's frames refer to.
    func encode(patching layout: ChunkLayout, stored: UnsafeRawBufferPointer, data: UnsafeRawBufferPointer, changed: [Bool],
                id: ChunkID, digests: [ChunkID], scratch: UnsafeMutableRawBufferPointer,
                references: ReferenceReader?) throws -> UnsafeRawBufferPointer {
        precondition(layout.rawLength == data.count && changed.count == layout.frameCount)
        return try assemble(rawLength: data.count, id: id, digests: digests, compacted: false, scratch: scratch) { k, out in
            if changed[k] { return try seal(writeBody(frame(k, of: data), into: out, compressor: zstd, dictionary: nil), in: out, id: id, frame: k) }
            let old = UnsafeRawBufferPointer(rebasing: stored[layout.storedRange(ofFrame: k)])
            if layout.version >= 2, keys == nil, old.first != Mode.references.rawValue {
                out.copyMemory(from: old)
                return old.count
            }
            let body = try open(old, id: layout.id, frame: k)
            return try body.withUnsafeBytes { body in
                if layout.version == 1 {
                    // A bare frame of the first format gets its mode in front.
                    out[0] = body.count == layout.rawLength(ofFrame: k) ? Mode.plain.rawValue : Mode.zstd.rawValue
                    UnsafeMutableRawBufferPointer(rebasing: out[1...]).copyMemory(from: body)
                    return try seal(1 + body.count, in: out, id: id, frame: k)
                }
                if body.first != Mode.references.rawValue {
                    out.copyMemory(from: body)
                    return try seal(body.count, in: out, id: id, frame: k)
                }
                let plain = try [UInt8](filling: layout.rawLength(ofFrame: k)) {
                    try decodeFrame(k, of: layout, stored: old, into: $0, references: references)
                }
                return try plain.withUnsafeBytes {
                    try seal(writeBody($0, into: out, compressor: zstd, dictionary: nil), in: out, id: id, frame: k)
                }
            }
        }
    }

    /// Header, frame table and the frames that `body(k, out)` writes (returning their length).
    private func assemble(rawLength: Int, id: ChunkID, digests: [ChunkID], compacted: Bool, scratch: UnsafeMutableRawBufferPointer,
                          body: (Int, UnsafeMutableRawBufferPointer) throws -> Int) throws -> UnsafeRawBufferPointer {
        let count = frameCount(rawLength)
        var flags = Self.flagZstd
        if keys != nil { flags |= Self.flagEncrypted }
        if compacted { flags |= Self.flagCompacted }
        for i in 0..<4 { scratch[i] = Self.magic[i] }
        scratch[4] = Self.version
        scratch[5] = flags
        scratch[6] = UInt8(frameSize.trailingZeroBitCount)
        scratch[7] = 0
        scratch.storeBytes(of: UInt32(rawLength).littleEndian, toByteOffset: 8, as: UInt32.self)
        scratch.storeBytes(of: UInt32(count).littleEndian, toByteOffset: 12, as: UInt32.self)
        var offset = Self.headerSize + count * Self.tableEntrySize
        for k in 0..<count {
            let length = try body(k, UnsafeMutableRawBufferPointer(rebasing: scratch[offset...]))
            let entry = Self.headerSize + k * Self.tableEntrySize
            scratch.storeBytes(of: UInt32(length).littleEndian, toByteOffset: entry, as: UInt32.self)
            digests[k].write(to: UnsafeMutableRawBufferPointer(rebasing: scratch[(entry + 4)..<(entry + 36)]))
            offset += length
        }
        return UnsafeRawBufferPointer(rebasing: scratch[0..<offset])
    }

    /// Writes a frame's body into `out`: its mode, the dictionary number, and the frame
    /// compressed by `compressor`; or the plain bytes when compression would not make it smaller.
    /// Returns the body's length.
    /// - Parameter filter: run frames that look like x86 code through `X86Filter` first.
    func writeBody(_ plain: UnsafeRawBufferPointer, into out: UnsafeMutableRawBufferPointer, compressor: Zstd,
                   dictionary: UInt32?, filter: Bool = false) throws -> Int {
        var head = 1
        out[0] = Mode.zstd.rawValue
        if let dictionary {
            out[0] = Mode.dictionary.rawValue
            out.storeBytes(of: dictionary.littleEndian, toByteOffset: 1, as: UInt32.self)
            head = 5
        }
        let n: Int
        if filter && X86Filter.looksLikeCode(plain) {
            out[0] |= Self.filtered
            var filtered = [UInt8](plain)
            filtered.withUnsafeMutableBytes { X86Filter.encode($0) }
            n = try filtered.withUnsafeBytes { try compressor.compress($0, into: UnsafeMutableRawBufferPointer(rebasing: out[head...])) }
        } else {
            n = try compressor.compress(plain, into: UnsafeMutableRawBufferPointer(rebasing: out[head...]))
        }
        if head + n < 1 + plain.count { return head + n }
        out[0] = Mode.plain.rawValue
        UnsafeMutableRawBufferPointer(rebasing: out[1...]).copyMemory(from: plain)
        return 1 + plain.count
    }

    /// Writes a frame's body compressed against the plaintext of `references` (`prefix`, their
    /// bytes one after another) into `out`; returns its length.
    func writeBody(_ plain: UnsafeRawBufferPointer, into out: UnsafeMutableRawBufferPointer, compressor: Zstd,
                   references: [FrameReference], prefix: UnsafeRawBufferPointer) throws -> Int {
        precondition((1...Self.maxReferences).contains(references.count))
        out[0] = Mode.references.rawValue
        out[1] = UInt8(references.count)
        var head = 2
        for reference in references {
            reference.chunk.write(to: UnsafeMutableRawBufferPointer(rebasing: out[head..<(head + 32)]))
            out.storeBytes(of: UInt16(reference.frame).littleEndian, toByteOffset: head + 32, as: UInt16.self)
            head += Self.referenceSize
        }
        return head + (try compressor.compress(plain, into: UnsafeMutableRawBufferPointer(rebasing: out[head...]), prefix: prefix))
    }

    /// Seals a frame's body (the first `length` bytes of `out`) in place under the id and frame
    /// number (encrypted repositories); returns the stored length.
    private func seal(_ length: Int, in out: UnsafeMutableRawBufferPointer, id: ChunkID, frame k: Int) throws -> Int {
        guard let keys else { return length }
        // Sealing returns a new buffer, copied over `out` only after it has read the body.
        let box = try AES.GCM.seal(UnsafeRawBufferPointer(rebasing: out[0..<length]), using: keys.encryption,
                                   authenticating: Self.frameAAD(id: id, frame: k))
        let combined = box.combined!
        combined.withUnsafeBytes { out.copyMemory(from: $0) }
        return combined.count
    }

    /// The body of a stored frame: opened (authenticated and decrypted) in an encrypted repository.
    private func open(_ stored: UnsafeRawBufferPointer, id: ChunkID, frame k: Int) throws -> Data {
        guard let keys else { return Data(stored) }
        do {
            return try AES.GCM.open(try AES.GCM.SealedBox(combined: stored), using: keys.encryption,
                                    authenticating: Self.frameAAD(id: id, frame: k))
        } catch {
            throw LifeboatError(.damaged, "chunk \(id.hex) is damaged: authentication failed in frame \(k)")
        }
    }

    /// A small file of a point (its domain definition, NVRAM variables) as stored: sealed under
    /// the repository key and bound to `name` (machine/point/file) in an encrypted repository,
    /// as given otherwise.
    func sealFile(_ bytes: [UInt8], name: String) throws -> [UInt8] {
        try keys?.seal(bytes, context: "lifeboat-file:\(name)") ?? bytes
    }

    /// The bytes `sealFile` stored. - Throws: `.damaged` when they do not authenticate.
    func openFile(_ stored: [UInt8], name: String) throws -> [UInt8] {
        guard let keys else { return stored }
        guard let plain = keys.open(stored, context: "lifeboat-file:\(name)") else {
            throw LifeboatError(.damaged, "\(name) is damaged or was altered: authentication failed")
        }
        return plain
    }

    /// The digest of frame `k` of a plaintext chunk.
    func frameDigest(_ k: Int, of data: UnsafeRawBufferPointer) -> ChunkID { digest(frame(k, of: data)) }

    /// The digest of `length` zero bytes: a frame with it holds nothing.
    func zeroDigest(length: Int) -> ChunkID {
        length == frameSize ? zeroFrameDigest : Self.digest([UInt8](repeating: 0, count: length), keys: keys)
    }

    private static func frameAAD(id: ChunkID, frame: Int) -> [UInt8] {
        id.bytes + withUnsafeBytes(of: UInt32(frame).littleEndian, Array.init)
    }

    /// Parses and checks a chunk's header and frame table (`bytes` may hold more than that).
    /// - Throws: `.damaged` naming the chunk when the table does not hash to `id`.
    func layout(_ bytes: UnsafeRawBufferPointer, id: ChunkID, storedSize: Int) throws -> ChunkLayout {
        func damaged(_ why: String) -> LifeboatError { LifeboatError(.damaged, "chunk \(id.hex) is damaged: \(why)") }
        guard bytes.count >= Self.headerSize, bytes[0] == Self.magic[0], bytes[1] == Self.magic[1],
              bytes[2] == Self.magic[2], bytes[3] == Self.magic[3] else { throw damaged("bad header") }
        let version = bytes[4]
        guard version == 1 || version == 2 else {
            throw LifeboatError(.unsupported, "chunk \(id.hex) has format version \(version), newer than this lifeboat understands: upgrade lifeboat")
        }
        let flags = bytes[5]
        guard bytes[6] < 31, 1 << Int(bytes[6]) == frameSize else { throw damaged("frame size differs from the repository's") }
        let rawLength = Int(UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: 8, as: UInt32.self)))
        let count = Int(UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: 12, as: UInt32.self)))
        guard count == frameCount(rawLength), bytes.count >= Self.headerSize + count * Self.tableEntrySize else {
            throw damaged("bad frame table")
        }
        guard (flags & Self.flagEncrypted != 0) == (keys != nil) else {
            throw damaged(keys == nil ? "encrypted chunk in an unencrypted repository" : "unencrypted chunk in an encrypted repository")
        }
        var frames: [(range: Range<Int>, digest: ChunkID)] = []
        frames.reserveCapacity(count)
        var offset = Self.headerSize + count * Self.tableEntrySize
        for k in 0..<count {
            let entry = Self.headerSize + k * Self.tableEntrySize
            let length = Int(UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: entry, as: UInt32.self)))
            let digest = ChunkID(bytes: UnsafeRawBufferPointer(rebasing: bytes[(entry + 4)..<(entry + 36)]))
            frames.append((offset..<(offset + length), digest))
            offset += length
        }
        guard offset == storedSize else { throw damaged("wrong length") }
        guard self.id(ofDigests: frames.map(\.digest)) == id else { throw damaged("frame table does not match its id") }
        return ChunkLayout(id: id, rawLength: rawLength, frameSize: frameSize, frames: frames,
                           compressed: flags & Self.flagZstd != 0, encrypted: flags & Self.flagEncrypted != 0,
                           version: version, compacted: version >= 2 && flags & Self.flagCompacted != 0)
    }

    /// Decodes frame `k` from its stored bytes into `output` and checks it. Returns the plaintext length.
    ///
    /// In an encrypted repository AES-GCM has authenticated the frame (bound to the chunk id and
    /// the frame number, the table to the id), so its plaintext digest is computed again only
    /// when `deep` (verify): that hash was a quarter of a restore's CPU time. Unencrypted frames
    /// always have their digest checked: it is their only check.
    /// - Parameter references: reads the frames a frame of mode 3 was compressed against; nil
    ///   where no frame may refer to others (a referenced frame itself).
    func decodeFrame(_ k: Int, of layout: ChunkLayout, stored: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer,
                     deep: Bool = false, references: ReferenceReader?) throws -> Int {
        let id = layout.id
        func damaged(_ why: String) -> LifeboatError { LifeboatError(.damaged, "chunk \(id.hex) is damaged: \(why) in frame \(k)") }
        let rawLength = layout.rawLength(ofFrame: k)
        guard output.count >= rawLength else { throw damaged("output too small") }
        let out = UnsafeMutableRawBufferPointer(rebasing: output[0..<rawLength])
        func unpackFirstFormat(_ body: UnsafeRawBufferPointer) throws -> Int {
            if body.count == rawLength {
                out.copyMemory(from: body)
                return rawLength
            }
            guard layout.compressed else { throw damaged("wrong length") }
            do { return try Zstd.decompress(body, into: out) } catch { throw damaged("cannot decompress (\(error))") }
        }
        func unpack(_ body: UnsafeRawBufferPointer) throws -> Int {
            guard layout.version >= 2 else { return try unpackFirstFormat(body) }
            guard let first = body.first, let mode = Mode(rawValue: first & ~Self.filtered),
                  first & Self.filtered == 0 || mode == .zstd || mode == .dictionary else { throw damaged("unknown frame mode") }
            let n = try unpack(body, mode)
            if first & Self.filtered != 0 { X86Filter.decode(UnsafeMutableRawBufferPointer(rebasing: out[0..<n])) }
            return n
        }
        func unpack(_ body: UnsafeRawBufferPointer, _ mode: Mode) throws -> Int {
            switch mode {
            case .plain:
                guard body.count == 1 + rawLength else { throw damaged("wrong length") }
                out.copyMemory(from: UnsafeRawBufferPointer(rebasing: body[1...]))
                return rawLength
            case .zstd:
                do { return try Zstd.decompress(UnsafeRawBufferPointer(rebasing: body[1...]), into: out) } catch {
                    throw damaged("cannot decompress (\(error))")
                }
            case .dictionary:
                guard body.count > 5 else { throw damaged("wrong length") }
                let number = UInt32(littleEndian: body.loadUnaligned(fromByteOffset: 1, as: UInt32.self))
                guard let dictionaries else { throw damaged("needs dictionary \(number), which this reader lacks") }
                let dictionary = try dictionaries.dictionary(number)
                do { return try Zstd.decompress(UnsafeRawBufferPointer(rebasing: body[5...]), into: out, dictionary: dictionary) } catch {
                    throw damaged("cannot decompress with dictionary \(number) (\(error))")
                }
            case .references:
                let (targets, head) = try Self.references(in: body, damaged: damaged)
                guard let references else { throw damaged("refers to other frames, which a referenced frame may not") }
                var prefix = [UInt8]()
                prefix.reserveCapacity(targets.count * frameSize)
                for target in targets {
                    do { prefix += try references(target) } catch let error as LifeboatError {
                        throw LifeboatError(error.code, "chunk \(id.hex) frame \(k) refers to frame \(target.frame) of chunk \(target.chunk.hex), which cannot be read: \(error.message)")
                    }
                }
                do {
                    return try prefix.withUnsafeBytes {
                        try Zstd.decompress(UnsafeRawBufferPointer(rebasing: body[head...]), into: out, prefix: $0)
                    }
                } catch {
                    throw damaged("cannot decompress against the frames it refers to (\(error))")
                }
            }
        }
        let length: Int
        if keys != nil {
            length = try open(stored, id: id, frame: k).withUnsafeBytes { try unpack($0) }
        } else {
            length = try unpack(stored)
        }
        guard length == rawLength else { throw damaged("wrong length after decompression") }
        guard (keys != nil && !deep) || digest(UnsafeRawBufferPointer(out)) == layout.frames[k].digest else {
            throw damaged("content does not match its digest")
        }
        return length
    }

    /// The references of a mode-3 body and where its zstd frame starts.
    private static func references(in body: UnsafeRawBufferPointer, damaged: (String) -> LifeboatError) throws -> ([FrameReference], Int) {
        guard body.count >= 2, (1...maxReferences).contains(Int(body[1])), body.count > 2 + Int(body[1]) * referenceSize else {
            throw damaged("bad references")
        }
        var targets: [FrameReference] = []
        var head = 2
        for _ in 0..<Int(body[1]) {
            let chunk = ChunkID(bytes: UnsafeRawBufferPointer(rebasing: body[head..<(head + 32)]))
            targets.append(FrameReference(chunk: chunk, frame: Int(UInt16(littleEndian: body.loadUnaligned(fromByteOffset: head + 32, as: UInt16.self)))))
            head += referenceSize
        }
        return (targets, head)
    }

    /// The frames that frame `k` of a stored chunk refers to (none unless it has mode 3).
    func references(ofFrame k: Int, of layout: ChunkLayout, stored: UnsafeRawBufferPointer) throws -> [FrameReference] {
        guard layout.version >= 2 else { return [] }
        func damaged(_ why: String) -> LifeboatError { LifeboatError(.damaged, "chunk \(layout.id.hex) is damaged: \(why) in frame \(k)") }
        let body = try open(stored, id: layout.id, frame: k)
        return try body.withUnsafeBytes { body in
            guard body.first == Mode.references.rawValue else { return [] }
            return try Self.references(in: body, damaged: damaged).0
        }
    }

    /// Decodes a whole stored chunk into `output`, checking every frame (`deep`: see `decodeFrame`).
    /// Returns the plaintext length.
    func decode(_ stored: UnsafeRawBufferPointer, id: ChunkID, into output: UnsafeMutableRawBufferPointer, deep: Bool = false,
                references: ReferenceReader?) throws -> Int {
        let layout = try self.layout(stored, id: id, storedSize: stored.count)
        guard output.count >= layout.rawLength else {
            throw LifeboatError(.damaged, "chunk \(id.hex) is damaged: longer than a chunk")
        }
        for k in 0..<layout.frameCount {
            let range = layout.storedRange(ofFrame: k)
            _ = try decodeFrame(k, of: layout, stored: UnsafeRawBufferPointer(rebasing: stored[range]),
                                into: UnsafeMutableRawBufferPointer(rebasing: output[(k * frameSize)...]), deep: deep,
                                references: references)
        }
        return layout.rawLength
    }
}

/// Password-based wrapping of the master key (scrypt, then AES-256-GCM).
public struct KeyWrapping: Codable, Sendable {
    var kdf: String = "scrypt"
    var salt: String
    var logN: Int
    var r: Int
    var p: Int
    /// base64 of AES-GCM nonce | ciphertext | tag over the 64-byte master key.
    var wrappedKey: String

    /// What the wrapped key of a repository that seals its manifests is bound to: config.json is
    /// not authenticated, so a `format` lowered in it cannot turn the sealing off (readers go by
    /// the key, which only the password opens).
    static let sealedManifestsContext = Array("lifeboat-sealed-manifests".utf8)

    static func create(master: [UInt8], password: String, sealedManifests: Bool) throws -> KeyWrapping {
        var wrapping = KeyWrapping(salt: Data(secureRandomBytes(16)).base64EncodedString(), logN: 15, r: 8, p: 1, wrappedKey: "")
        let key = try wrapping.derive(password)
        wrapping.wrappedKey = try (sealedManifests ? AES.GCM.seal(master, using: key, authenticating: sealedManifestsContext)
                                                   : AES.GCM.seal(master, using: key)).combined!.base64EncodedString()
        return wrapping
    }

    /// The master key, and whether it was wrapped for a repository that seals its manifests.
    func unwrap(password: String) throws -> (master: [UInt8], sealedManifests: Bool) {
        guard let box = Data(base64Encoded: wrappedKey), let sealed = try? AES.GCM.SealedBox(combined: box) else {
            throw LifeboatError(.damaged, "the repository's key in config.json is damaged")
        }
        let key = try derive(password)
        if let master = try? AES.GCM.open(sealed, using: key), master.count == 64 { return (Array(master), false) }
        if let master = try? AES.GCM.open(sealed, using: key, authenticating: Self.sealedManifestsContext), master.count == 64 {
            return (Array(master), true)
        }
        throw LifeboatError(.authentication, "wrong password for this repository: check $LIFEBOAT_PASSWORD or --password-file")
    }

    private func derive(_ password: String) throws -> SymmetricKey {
        guard kdf == "scrypt", let saltBytes = Data(base64Encoded: salt) else {
            throw LifeboatError(.unsupported, "unknown key derivation '\(kdf)' in config.json")
        }
        return try KDF.Scrypt.deriveKey(from: Array(password.utf8), salt: saltBytes, outputByteCount: 32,
                                        rounds: 1 << logN, blockSize: r, parallelism: p)
    }
}
