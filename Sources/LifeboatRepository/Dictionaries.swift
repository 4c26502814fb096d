import Crypto
import Foundation
import LifeboatBase
import Synchronization

/// Repository files that are not chunks but say something of their content (a dictionary is
/// made of plaintext; the compaction tables hash it): sealed with the chunk key in an encrypted
/// repository, checked by a SHA-256 otherwise. Either way a damaged file is told apart.
///
/// File: an 8-byte magic, then AES-256-GCM nonce | ciphertext | tag (associated data: the
/// magic and the file's purpose), or the bytes followed by their SHA-256.
enum SealedFile {
    static func encode(_ bytes: [UInt8], magic: [UInt8], purpose: String, keys: RepositoryKeys?) throws -> [UInt8] {
        precondition(magic.count == 8)
        guard let keys else { return magic + bytes + Array(SHA256.hash(data: bytes)) }
        let box = try AES.GCM.seal(bytes, using: keys.encryption, authenticating: magic + Array(purpose.utf8))
        return magic + Array(box.combined!)
    }

    /// - Throws: `.damaged` naming `path` when the file is not whole or not this repository's.
    static func decode(_ file: [UInt8], magic: [UInt8], purpose: String, keys: RepositoryKeys?, path: String) throws -> [UInt8] {
        guard file.count >= 8 + 32, Array(file[0..<8]) == magic else {
            throw LifeboatError(.damaged, "\(path) is damaged (bad header)")
        }
        let body = file[8...]
        guard let keys else {
            let bytes = Array(body.dropLast(32))
            guard Array(SHA256.hash(data: bytes)) == Array(body.suffix(32)) else {
                throw LifeboatError(.damaged, "\(path) is damaged (checksum mismatch)")
            }
            return bytes
        }
        do {
            return Array(try AES.GCM.open(try AES.GCM.SealedBox(combined: body), using: keys.encryption,
                                          authenticating: magic + Array(purpose.utf8)))
        } catch {
            throw LifeboatError(.damaged, "\(path) is damaged (authentication failed)")
        }
    }

    static func read(_ path: String, magic: [UInt8], purpose: String, keys: RepositoryKeys?) throws -> [UInt8] {
        try decode(try PosixFile.openForReading(path, what: "file").readAll(), magic: magic, purpose: purpose, keys: keys, path: path)
    }

    static func write(_ bytes: [UInt8], to path: String, magic: [UInt8], purpose: String, keys: RepositoryKeys?) throws {
        try FileSystem.writeAtomically(try encode(bytes, magic: magic, purpose: purpose, keys: keys), to: path)
    }
}

/// `dictionaries/N`: zstd dictionaries trained on the repository's own data by `compact`,
/// numbered from 1, never changed or removed (frames of mode 2 name theirs). Loaded once each.
final class DictionaryShelf: Sendable {
    let root: String
    private let keys: RepositoryKeys?
    private let loaded = Locked<[UInt32: ZstdDictionary]>([:])
    private static let magic = Array("LBDICT1\0".utf8)

    init(root: String, keys: RepositoryKeys?) {
        self.root = root
        self.keys = keys
    }

    private func path(_ number: UInt32) -> String { root + "/\(number)" }
    private static func purpose(_ number: UInt32) -> String { "dictionary \(number)" }

    /// - Throws: `.damaged` when the dictionary is missing or damaged (every frame using it is then unreadable).
    func dictionary(_ number: UInt32) throws -> ZstdDictionary {
        if let known = loaded.withLock({ $0[number] }) { return known }
        guard FileSystem.exists(path(number)) else {
            throw LifeboatError(.damaged, "dictionary \(number) is missing from the repository (\(path(number)))")
        }
        let bytes = try SealedFile.read(path(number), magic: Self.magic, purpose: Self.purpose(number), keys: keys)
        let dictionary: ZstdDictionary
        do { dictionary = try ZstdDictionary(bytes: bytes) } catch {
            throw LifeboatError(.damaged, "\(path(number)) is damaged (\(error))")
        }
        loaded.withLock { $0[number] = dictionary }
        return dictionary
    }

    /// The numbers of the stored dictionaries, oldest first.
    func numbers() -> [UInt32] {
        ((try? FileSystem.list(root)) ?? []).compactMap { UInt32($0) }.sorted()
    }

    /// Stores a new dictionary durably and returns its number.
    func add(_ bytes: [UInt8]) throws -> UInt32 {
        if !FileSystem.exists(root) { try FileSystem.makeDirectory(root) }
        let number = (numbers().last ?? 0) + 1
        try SealedFile.write(bytes, to: path(number), magic: Self.magic, purpose: Self.purpose(number), keys: keys)
        return number
    }
}
