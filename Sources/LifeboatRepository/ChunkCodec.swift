import Crypto
import _CryptoExtras
import Foundation

/// The two secrets of an encrypted repository: one encrypts chunks (AES-256-GCM), one names
/// them (HMAC-SHA-256). Both come from the master key wrapped in config.json.
struct RepositoryKeys: Sendable {
    let encryption: SymmetricKey
    let id: SymmetricKey

    init(master: [UInt8]) {
        precondition(master.count == 64)
        encryption = SymmetricKey(data: master[0..<32])
        id = SymmetricKey(data: master[32..<64])
    }
}

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

    public var frameCount: Int { frames.count }
    public func storedRange(ofFrame k: Int) -> Range<Int> { frames[k].range }
    public func rawLength(ofFrame k: Int) -> Int { min(frameSize, rawLength - k * frameSize) }
}

/// Turns plaintext chunks into stored chunk files and back, and names them.
///
/// A chunk is cut into frames of `frameSize` bytes, each compressed (and encrypted) on its own,
/// so that reading 4 KiB of a disk decodes one frame, not the whole chunk. The id is a two-level
/// hash: `H(H(frame 0) | H(frame 1) | …)` with H = SHA-256, or HMAC-SHA-256 under the id key in
/// an encrypted repository; it depends on the plaintext alone, so equal chunks share one id.
///
/// Stored chunk: a 16-byte header, a frame table, then the frames.
/// Header: `"LBCK" | version 1 | flags | log2(frame size) | 0 | raw length (u32 LE) | frame count (u32 LE)`.
/// Flags: bit 0 = frames are zstd (a frame whose stored size equals its raw size is stored plain),
/// bit 1 = AES-256-GCM (each frame: nonce | ciphertext | tag, with the chunk id and frame number
/// as associated data). Table: per frame, stored length (u32 LE) and plaintext digest (32 bytes).
final class ChunkCodec: Sendable {
    static let headerSize = 16
    static let tableEntrySize = 36
    static let magic: [UInt8] = Array("LBCK".utf8)
    private static let flagZstd: UInt8 = 1
    private static let flagEncrypted: UInt8 = 2
    private static let sealOverhead = 12 + 16

    let zstd: Zstd
    let keys: RepositoryKeys?
    let frameSize: Int
    /// The digest of a whole frame of zeros (a frame that holds nothing).
    let zeroFrameDigest: ChunkID

    init(compression: RepositoryConfig.Compression, frameSize: Int, keys: RepositoryKeys?) {
        zstd = Zstd(level: Int32(compression.level), hashLog: Int32(compression.hashLog ?? 0),
                    chainLog: Int32(compression.chainLog ?? 0), minMatch: Int32(compression.minMatch ?? 0))
        self.keys = keys
        self.frameSize = frameSize
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

    private func frame(_ k: Int, of data: UnsafeRawBufferPointer) -> UnsafeRawBufferPointer {
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

    /// Bytes of scratch space `encode` needs for a chunk of `chunkSize`.
    func scratchSize(chunkSize: Int) -> Int {
        let frames = frameCount(chunkSize)
        return Self.headerSize + frames * (Self.tableEntrySize + Self.sealOverhead) + max(Zstd.bound(frameSize), frameSize) * frames
    }

    /// Encodes a chunk for storage into `scratch` (see `scratchSize`). Returns the stored bytes, inside `scratch`.
    /// - Parameter digests: `frameDigests(of: data)`, when the caller has them already.
    func encode(_ data: UnsafeRawBufferPointer, id: ChunkID, digests: [ChunkID]? = nil,
                scratch: UnsafeMutableRawBufferPointer) throws -> UnsafeRawBufferPointer {
        let digests = digests ?? frameDigests(of: data)
        return try assemble(rawLength: data.count, id: id, digests: digests, scratch: scratch) { k, out in
            try compressAndSeal(frame(k, of: data), id: id, frame: k, into: out)
        }
    }

    /// Encodes a chunk that differs from the stored chunk `layout` only in the frames marked
    /// `changed`, whose new plaintext is in `data` (the other frames of `data` are not read):
    /// only those are compressed; the others are taken as stored (unencrypted), or opened and
    /// sealed again under the new id (encrypted: the id is their associated data). A changed-block
    /// point that touched one 64 KiB frame of a chunk compresses 64 KiB, not the whole chunk.
    /// - Parameter digests: the new chunk's frame digests (the old ones for unchanged frames).
    func encode(patching layout: ChunkLayout, stored: UnsafeRawBufferPointer, data: UnsafeRawBufferPointer, changed: [Bool],
                id: ChunkID, digests: [ChunkID], scratch: UnsafeMutableRawBufferPointer) throws -> UnsafeRawBufferPointer {
        precondition(layout.rawLength == data.count && changed.count == layout.frameCount)
        return try assemble(rawLength: data.count, id: id, digests: digests, scratch: scratch) { k, out in
            if changed[k] { return try compressAndSeal(frame(k, of: data), id: id, frame: k, into: out) }
            let old = UnsafeRawBufferPointer(rebasing: stored[layout.storedRange(ofFrame: k)])
            guard let keys else {
                out.copyMemory(from: old)
                return old.count
            }
            let body: Data
            do {
                body = try AES.GCM.open(try AES.GCM.SealedBox(combined: old), using: keys.encryption,
                                        authenticating: Self.frameAAD(id: layout.id, frame: k))
            } catch {
                throw LifeboatError(.damaged, "chunk \(layout.id.hex) is damaged: authentication failed in frame \(k)")
            }
            return try body.withUnsafeBytes { try seal($0, id: id, frame: k, into: out) }
        }
    }

    /// Header, frame table and the frames that `body(k, out)` writes (returning their length).
    private func assemble(rawLength: Int, id: ChunkID, digests: [ChunkID], scratch: UnsafeMutableRawBufferPointer,
                          body: (Int, UnsafeMutableRawBufferPointer) throws -> Int) throws -> UnsafeRawBufferPointer {
        let count = frameCount(rawLength)
        var flags = Self.flagZstd
        if keys != nil { flags |= Self.flagEncrypted }
        for i in 0..<4 { scratch[i] = Self.magic[i] }
        scratch[4] = 1
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

    /// A frame compressed (stored plain when that is not smaller), then sealed; returns its length.
    private func compressAndSeal(_ plain: UnsafeRawBufferPointer, id: ChunkID, frame k: Int,
                                 into out: UnsafeMutableRawBufferPointer) throws -> Int {
        var length = try zstd.compress(plain, into: out)
        if length >= plain.count {
            out.copyMemory(from: plain)
            length = plain.count
        }
        guard keys != nil else { return length }
        // Sealing returns a new buffer, copied over `out` only after it has read the body.
        return try seal(UnsafeRawBufferPointer(rebasing: out[0..<length]), id: id, frame: k, into: out)
    }

    /// Seals a frame's stored body under the id and frame number (encrypted repositories).
    private func seal(_ body: UnsafeRawBufferPointer, id: ChunkID, frame k: Int, into out: UnsafeMutableRawBufferPointer) throws -> Int {
        guard let keys else {
            out.copyMemory(from: body)
            return body.count
        }
        let box = try AES.GCM.seal(body, using: keys.encryption, authenticating: Self.frameAAD(id: id, frame: k))
        let combined = box.combined!
        combined.withUnsafeBytes { out.copyMemory(from: $0) }
        return combined.count
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
              bytes[2] == Self.magic[2], bytes[3] == Self.magic[3], bytes[4] == 1 else { throw damaged("bad header") }
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
                           compressed: flags & Self.flagZstd != 0, encrypted: flags & Self.flagEncrypted != 0)
    }

    /// Decodes frame `k` from its stored bytes into `output` and checks it. Returns the plaintext length.
    ///
    /// In an encrypted repository AES-GCM has authenticated the frame (bound to the chunk id and
    /// the frame number, the table to the id), so its plaintext digest is computed again only
    /// when `deep` (verify): that hash was a quarter of a restore's CPU time. Unencrypted frames
    /// always have their digest checked: it is their only check.
    func decodeFrame(_ k: Int, of layout: ChunkLayout, stored: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer,
                     deep: Bool = false) throws -> Int {
        let id = layout.id
        func damaged(_ why: String) -> LifeboatError { LifeboatError(.damaged, "chunk \(id.hex) is damaged: \(why) in frame \(k)") }
        let rawLength = layout.rawLength(ofFrame: k)
        guard output.count >= rawLength else { throw damaged("output too small") }
        let out = UnsafeMutableRawBufferPointer(rebasing: output[0..<rawLength])
        func unpack(_ body: UnsafeRawBufferPointer) throws -> Int {
            if body.count == rawLength {
                out.copyMemory(from: body)
                return rawLength
            }
            guard layout.compressed else { throw damaged("wrong length") }
            do { return try zstd.decompress(body, into: out) } catch { throw damaged("cannot decompress (\(error))") }
        }
        let length: Int
        if let keys {
            let plain: Data
            do {
                plain = try AES.GCM.open(try AES.GCM.SealedBox(combined: stored), using: keys.encryption,
                                         authenticating: Self.frameAAD(id: id, frame: k))
            } catch {
                throw damaged("authentication failed")
            }
            length = try plain.withUnsafeBytes { try unpack($0) }
        } else {
            length = try unpack(stored)
        }
        guard length == rawLength else { throw damaged("wrong length after decompression") }
        guard (keys != nil && !deep) || digest(UnsafeRawBufferPointer(out)) == layout.frames[k].digest else {
            throw damaged("content does not match its digest")
        }
        return length
    }

    /// Decodes a whole stored chunk into `output`, checking every frame (`deep`: see `decodeFrame`).
    /// Returns the plaintext length.
    func decode(_ stored: UnsafeRawBufferPointer, id: ChunkID, into output: UnsafeMutableRawBufferPointer, deep: Bool = false) throws -> Int {
        let layout = try self.layout(stored, id: id, storedSize: stored.count)
        guard output.count >= layout.rawLength else {
            throw LifeboatError(.damaged, "chunk \(id.hex) is damaged: longer than a chunk")
        }
        for k in 0..<layout.frameCount {
            let range = layout.storedRange(ofFrame: k)
            _ = try decodeFrame(k, of: layout, stored: UnsafeRawBufferPointer(rebasing: stored[range]),
                                into: UnsafeMutableRawBufferPointer(rebasing: output[(k * frameSize)...]), deep: deep)
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

    static func create(master: [UInt8], password: String) throws -> KeyWrapping {
        var wrapping = KeyWrapping(salt: Data(secureRandomBytes(16)).base64EncodedString(), logN: 15, r: 8, p: 1, wrappedKey: "")
        let key = try wrapping.derive(password)
        wrapping.wrappedKey = try AES.GCM.seal(master, using: key).combined!.base64EncodedString()
        return wrapping
    }

    func unwrap(password: String) throws -> [UInt8] {
        guard let box = Data(base64Encoded: wrappedKey), let sealed = try? AES.GCM.SealedBox(combined: box) else {
            throw LifeboatError(.damaged, "the repository's key in config.json is damaged")
        }
        guard let master = try? AES.GCM.open(sealed, using: try derive(password)), master.count == 64 else {
            throw LifeboatError(.authentication, "wrong password for this repository: check $LIFEBOAT_PASSWORD or --password-file")
        }
        return Array(master)
    }

    private func derive(_ password: String) throws -> SymmetricKey {
        guard kdf == "scrypt", let saltBytes = Data(base64Encoded: salt) else {
            throw LifeboatError(.unsupported, "unknown key derivation '\(kdf)' in config.json")
        }
        return try KDF.Scrypt.deriveKey(from: Array(password.utf8), salt: saltBytes, outputByteCount: 32,
                                        rounds: 1 << logN, blockSize: r, parallelism: p)
    }
}
