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

    var isEncrypted: Bool { keys != nil }

    /// The id of a plaintext chunk.
    func id(of data: UnsafeRawBufferPointer) -> ChunkID {
        if let keys {
            let mac = HMAC<SHA256>.authenticationCode(for: data, using: keys.id)
            return mac.withUnsafeBytes { ChunkID(bytes: $0) }
        }
        return SHA256.hash(data: data).withUnsafeBytes { ChunkID(bytes: $0) }
    }

    /// Encodes a chunk for storage: compressed when that saves space, then encrypted if the repository is.
    func encode(_ data: UnsafeRawBufferPointer, id: ChunkID) throws -> [UInt8] {
        let bound = Zstd.bound(data.count)
        var body = [UInt8](repeating: 0, count: bound)
        var flags: UInt8 = 0
        let compressed = try body.withUnsafeMutableBytes { out in try zstd.compress(data, into: out) }
        if compressed < data.count {
            body.removeLast(bound - compressed)
            flags |= Self.flagZstd
        } else {
            body = Array(data)
        }
        if keys != nil { flags |= Self.flagEncrypted }
        var header = Self.header(flags: flags, rawLength: data.count, payloadLength: 0)
        let payload: [UInt8]
        if let keys {
            let payloadLength = 12 + body.count + 16
            header = Self.header(flags: flags, rawLength: data.count, payloadLength: payloadLength)
            let box = try AES.GCM.seal(body, using: keys.encryption, authenticating: header + id.bytes)
            payload = Array(box.combined!)
        } else {
            header = Self.header(flags: flags, rawLength: data.count, payloadLength: body.count)
            payload = body
        }
        return header + payload
    }

    /// Decodes a stored chunk into `output` (at least the chunk's raw length) and checks that
    /// its content matches `id`. Returns the plaintext length.
    func decode(_ stored: [UInt8], id: ChunkID, into output: UnsafeMutableRawBufferPointer) throws -> Int {
        func damaged(_ why: String) -> LifeboatError {
            LifeboatError(.damaged, "chunk \(id.hex) is damaged: \(why)")
        }
        guard stored.count >= Self.headerSize, Array(stored[0..<4]) == Self.magic, stored[4] == 1 else {
            throw damaged("bad header")
        }
        let flags = stored[5]
        let rawLength = Int(Self.readU32(stored, 8))
        let payloadLength = Int(Self.readU32(stored, 12))
        guard stored.count == Self.headerSize + payloadLength, rawLength <= output.count else {
            throw damaged("wrong length")
        }
        var body = Array(stored[Self.headerSize...])
        if flags & Self.flagEncrypted != 0 {
            guard let keys else { throw damaged("encrypted chunk in an unencrypted repository") }
            do {
                let box = try AES.GCM.SealedBox(combined: body)
                body = Array(try AES.GCM.open(box, using: keys.encryption, authenticating: Array(stored[0..<Self.headerSize]) + id.bytes))
            } catch {
                throw damaged("authentication failed")
            }
        } else if keys != nil {
            throw damaged("unencrypted chunk in an encrypted repository")
        }
        let length: Int
        if flags & Self.flagZstd != 0 {
            do {
                length = try body.withUnsafeBytes { input in
                    try zstd.decompress(input, into: UnsafeMutableRawBufferPointer(rebasing: output[0..<rawLength]))
                }
            } catch {
                throw damaged("cannot decompress (\(error))")
            }
        } else {
            guard body.count == rawLength else { throw damaged("wrong length") }
            body.withUnsafeBytes { output.copyMemory(from: $0) }
            length = body.count
        }
        guard length == rawLength else { throw damaged("wrong length after decompression") }
        guard self.id(of: UnsafeRawBufferPointer(rebasing: output[0..<length])) == id else {
            throw damaged("content does not match its id")
        }
        return length
    }

    private static func header(flags: UInt8, rawLength: Int, payloadLength: Int) -> [UInt8] {
        var header = magic + [1, flags, 0, 0]
        header += withUnsafeBytes(of: UInt32(rawLength).littleEndian, Array.init)
        header += withUnsafeBytes(of: UInt32(payloadLength).littleEndian, Array.init)
        return header
    }

    static func readU32(_ bytes: [UInt8], _ offset: Int) -> UInt32 {
        UInt32(bytes[offset]) | UInt32(bytes[offset + 1]) << 8 | UInt32(bytes[offset + 2]) << 16 | UInt32(bytes[offset + 3]) << 24
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
