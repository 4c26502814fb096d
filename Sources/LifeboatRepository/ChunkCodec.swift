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

/// Turns plaintext chunks into stored chunk files and back, and names them.
///
/// A stored chunk is a 16-byte header followed by the payload:
/// `"LBCK" | version 1 | flags | 0 0 | raw length (u32 LE) | payload length (u32 LE)`.
/// Flags: bit 0 = zstd frame, bit 1 = AES-256-GCM (payload = nonce | ciphertext | tag,
/// with the header and the chunk id as associated data, so a chunk cannot be swapped for another).
final class ChunkCodec: Sendable {
    static let headerSize = 16
    static let magic: [UInt8] = Array("LBCK".utf8)
    private static let flagZstd: UInt8 = 1
    private static let flagEncrypted: UInt8 = 2

    let zstd: Zstd
    let keys: RepositoryKeys?

    init(compressionLevel: Int32, keys: RepositoryKeys?) {
        zstd = Zstd(level: compressionLevel)
        self.keys = keys
    }

    init(compression: RepositoryConfig.Compression, keys: RepositoryKeys?) {
        zstd = Zstd(level: Int32(compression.level), hashLog: Int32(compression.hashLog ?? 0),
                    chainLog: Int32(compression.chainLog ?? 0), minMatch: Int32(compression.minMatch ?? 0))
        self.keys = keys
    }

    var isEncrypted: Bool { keys != nil }

    /// The id of a plaintext chunk.
    func id(of data: UnsafeRawBufferPointer) -> ChunkID {
        if let keys {
            let mac = HMAC<SHA256>.authenticationCode(for: data, using: keys.id)
            return mac.withUnsafeBytes { ChunkID(bytes: $0) }
        }
        return SHA256.hash(data: data).withUnsafeBytes { ChunkID(bytes: $0) }
    }

    /// Bytes of scratch space `encode` needs for a chunk of `chunkSize`.
    static func scratchSize(chunkSize: Int) -> Int { headerSize + max(Zstd.bound(chunkSize), chunkSize) + 12 + 16 }

    /// Encodes a chunk for storage into `scratch` (see `scratchSize`): compressed when that
    /// saves space, then encrypted if the repository is. Returns the stored bytes, inside `scratch`.
    func encode(_ data: UnsafeRawBufferPointer, id: ChunkID, scratch: UnsafeMutableRawBufferPointer) throws -> UnsafeRawBufferPointer {
        let body = UnsafeMutableRawBufferPointer(rebasing: scratch[Self.headerSize...])
        var flags: UInt8 = 0
        var length = try zstd.compress(data, into: body)
        if length < data.count {
            flags |= Self.flagZstd
        } else {
            body.copyMemory(from: data)
            length = data.count
        }
        if let keys {
            flags |= Self.flagEncrypted
            Self.writeHeader(flags: flags, rawLength: data.count, payloadLength: 12 + length + 16, into: scratch)
            let aad = Array(UnsafeRawBufferPointer(rebasing: scratch[0..<Self.headerSize])) + id.bytes
            let box = try AES.GCM.seal(UnsafeRawBufferPointer(rebasing: body[0..<length]), using: keys.encryption, authenticating: aad)
            let combined = box.combined!
            combined.withUnsafeBytes { body.copyMemory(from: $0) }
            length = combined.count
        } else {
            Self.writeHeader(flags: flags, rawLength: data.count, payloadLength: length, into: scratch)
        }
        return UnsafeRawBufferPointer(rebasing: scratch[0..<(Self.headerSize + length)])
    }

    /// Decodes a stored chunk into `output` (at least the chunk's raw length) and checks that
    /// its content matches `id`. Returns the plaintext length.
    /// - Throws: `.damaged` naming the chunk.
    func decode(_ stored: UnsafeRawBufferPointer, id: ChunkID, into output: UnsafeMutableRawBufferPointer) throws -> Int {
        func damaged(_ why: String) -> LifeboatError {
            LifeboatError(.damaged, "chunk \(id.hex) is damaged: \(why)")
        }
        guard stored.count >= Self.headerSize, stored[0] == Self.magic[0], stored[1] == Self.magic[1],
              stored[2] == Self.magic[2], stored[3] == Self.magic[3], stored[4] == 1 else {
            throw damaged("bad header")
        }
        let flags = stored[5]
        let rawLength = Int(UInt32(littleEndian: stored.loadUnaligned(fromByteOffset: 8, as: UInt32.self)))
        let payloadLength = Int(UInt32(littleEndian: stored.loadUnaligned(fromByteOffset: 12, as: UInt32.self)))
        guard stored.count == Self.headerSize + payloadLength, rawLength <= output.count else {
            throw damaged("wrong length")
        }
        let payload = UnsafeRawBufferPointer(rebasing: stored[Self.headerSize...])
        let length: Int
        if flags & Self.flagEncrypted != 0 {
            guard let keys else { throw damaged("encrypted chunk in an unencrypted repository") }
            let plain: Data
            do {
                let box = try AES.GCM.SealedBox(combined: payload)
                plain = try AES.GCM.open(box, using: keys.encryption,
                                         authenticating: Array(UnsafeRawBufferPointer(rebasing: stored[0..<Self.headerSize])) + id.bytes)
            } catch {
                throw damaged("authentication failed")
            }
            length = try plain.withUnsafeBytes { try unpack($0, flags: flags, rawLength: rawLength, into: output, damaged) }
        } else {
            guard keys == nil else { throw damaged("unencrypted chunk in an encrypted repository") }
            length = try unpack(payload, flags: flags, rawLength: rawLength, into: output, damaged)
        }
        guard length == rawLength else { throw damaged("wrong length after decompression") }
        guard self.id(of: UnsafeRawBufferPointer(rebasing: output[0..<length])) == id else {
            throw damaged("content does not match its id")
        }
        return length
    }

    private func unpack(_ body: UnsafeRawBufferPointer, flags: UInt8, rawLength: Int, into output: UnsafeMutableRawBufferPointer,
                        _ damaged: (String) -> LifeboatError) throws -> Int {
        if flags & Self.flagZstd == 0 {
            guard body.count == rawLength else { throw damaged("wrong length") }
            output.copyMemory(from: body)
            return body.count
        }
        do {
            return try zstd.decompress(body, into: UnsafeMutableRawBufferPointer(rebasing: output[0..<rawLength]))
        } catch {
            throw damaged("cannot decompress (\(error))")
        }
    }

    private static func writeHeader(flags: UInt8, rawLength: Int, payloadLength: Int, into buffer: UnsafeMutableRawBufferPointer) {
        for i in 0..<4 { buffer[i] = magic[i] }
        buffer[4] = 1
        buffer[5] = flags
        buffer[6] = 0
        buffer[7] = 0
        buffer.storeBytes(of: UInt32(rawLength).littleEndian, toByteOffset: 8, as: UInt32.self)
        buffer.storeBytes(of: UInt32(payloadLength).littleEndian, toByteOffset: 12, as: UInt32.self)
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
        var salt = [UInt8](repeating: 0, count: 16)
        for i in salt.indices { salt[i] = UInt8.random(in: 0...255) }
        var wrapping = KeyWrapping(salt: Data(salt).base64EncodedString(), logN: 15, r: 8, p: 1, wrappedKey: "")
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
