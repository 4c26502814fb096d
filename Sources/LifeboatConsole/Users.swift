import LifeboatBase
import _CryptoExtras
import Crypto
import Foundation
import LifeboatRepository
import Synchronization

/// What a console user may do: a viewer sees everything and changes nothing, an operator also
/// acts on machines and plans, an admin also manages users.
public enum ConsoleRole: String, Codable, Sendable, CaseIterable, Comparable {
    case viewer, `operator`, admin

    var rank: Int { ConsoleRole.allCases.firstIndex(of: self)! }
    public static func < (lhs: ConsoleRole, rhs: ConsoleRole) -> Bool { lhs.rank < rhs.rank }
}

/// A console login. The password is kept only as a salted scrypt hash, with its parameters,
/// so they can be raised later without breaking older entries.
public struct ConsoleUser: Codable, Sendable, Equatable {
    public struct PasswordHash: Codable, Sendable, Equatable {
        public var kdf: String
        /// log2 of scrypt's N (rounds).
        public var logN: Int
        public var r: Int
        public var p: Int
        public var salt: String
        public var hash: String
    }

    public var name: String
    public var role: ConsoleRole
    public var created: Date
    public var password: PasswordHash

    /// What `lifeboat users --json` and GET /api/v1/users show: never the hash.
    public struct Listing: Codable, Sendable {
        public var name: String
        public var role: ConsoleRole
        public var created: Date
    }
    public var listing: Listing { Listing(name: name, role: role, created: created) }
}

/// The console's users, in one JSON file readable by root only (`HOT/.console/users.json`).
/// Every change is written to a temporary file and renamed into place.
public struct UserStore: Sendable {
    public let path: String
    /// The file as last read, kept while its inode, size and modification time stay the same
    /// (every request checks its user: a stat, not a read).
    private let cache = Cache()
    private final class Cache: Sendable {
        let entry = Locked<(key: [Int], users: [ConsoleUser])?>(nil)
    }
    /// scrypt N = 2^15, r = 8, p = 1: 32 MiB and about 0.1 s per check on this host's cores.
    public static let logN = 15

    public init(path: String) { self.path = path }

    /// `HOT/.console/users.json`.
    public init(hotDirectory: String) { self.init(path: hotDirectory + "/.console/users.json") }

    private struct File: Codable { var users: [ConsoleUser] }

    public func users() throws -> [ConsoleUser] {
        var info = stat()
        guard stat(path, &info) == 0 else { return [] }
        let key = [Int(info.st_ino), Int(info.st_size), info.st_mtim.tv_sec, info.st_mtim.tv_nsec]
        if let entry = cache.entry.withLock({ $0 }), entry.key == key { return entry.users }
        guard let bytes = FileSystem.contents(path) else { return [] }
        do {
            let users = try JSONDecoder.lifeboat.decode(File.self, from: Data(bytes)).users
            cache.entry.withLock { $0 = (key, users) }
            return users
        } catch {
            throw LifeboatError(.damaged, "the console's user file \(path) cannot be read (\(error)): restore it, or remove it and add users again")
        }
    }

    public func user(_ name: String) throws -> ConsoleUser? { try users().first { $0.name == name } }

    /// Adds `name`, or changes its role and password when it exists.
    public func add(_ name: String, role: ConsoleRole, password: String) throws -> ConsoleUser {
        guard Self.validName(name) else {
            throw LifeboatError(.invalidArgument, "user name '\(name)' is not allowed: use 1 to 64 letters, digits, '.', '_' or '-'")
        }
        guard password.count >= 8 else {
            throw LifeboatError(.invalidArgument, "the password for \(name) is too short: give at least 8 characters")
        }
        var list = try users()
        let user = ConsoleUser(name: name, role: role, created: list.first { $0.name == name }?.created ?? Date(),
                               password: try Self.hash(password))
        list.removeAll { $0.name == name }
        list.append(user)
        try save(list.sorted { $0.name < $1.name })
        return user
    }

    public func remove(_ name: String) throws {
        var list = try users()
        guard list.contains(where: { $0.name == name }) else {
            throw LifeboatError(.notFound, "no console user \(name): see 'lifeboat users'")
        }
        list.removeAll { $0.name == name }
        try save(list)
    }

    /// The user when `password` is theirs, else nil. Takes as long for an unknown name as for a
    /// known one, so timing does not tell which names exist.
    public func verify(_ name: String, password: String) throws -> ConsoleUser? {
        let user = try self.user(name)
        let stored = user?.password ?? Self.decoy
        let derived = try Self.derive(password, stored)
        let expected = Data(base64Encoded: stored.hash) ?? Data()
        guard let user, equalInConstantTime(derived, expected) else { return nil }
        return user
    }

    /// The folder of a console file (HOT/.console): made when missing, root's alone (0700).
    static func prepareFolder(of path: String) throws {
        let folder = (path as NSString).deletingLastPathComponent
        try FileSystem.makeDirectories(FileSystem.parent(of: folder))
        try FileSystem.makeDirectory(folder, mode: 0o700)
        chmod(folder, 0o700)
    }

    static func validName(_ name: String) -> Bool {
        !name.isEmpty && name.count <= 64 && name.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || "._-".contains($0)) }
    }

    static func hash(_ password: String) throws -> ConsoleUser.PasswordHash {
        var entry = ConsoleUser.PasswordHash(kdf: "scrypt", logN: logN, r: 8, p: 1, salt: Data(secureRandomBytes(16)).base64EncodedString(),
                                             hash: "")
        entry.hash = try derive(password, entry).base64EncodedString()
        return entry
    }

    /// Checked against when the name is unknown.
    static let decoy = ConsoleUser.PasswordHash(kdf: "scrypt", logN: logN, r: 8, p: 1, salt: "AAAAAAAAAAAAAAAAAAAAAA==", hash: "")

    static func derive(_ password: String, _ entry: ConsoleUser.PasswordHash) throws -> Data {
        guard entry.kdf == "scrypt", (10...20).contains(entry.logN), let salt = Data(base64Encoded: entry.salt) else {
            throw LifeboatError(.unsupported, "unknown password hash '\(entry.kdf)' (logN \(entry.logN)) in the console's user file: set the password again with 'lifeboat user add'")
        }
        let key = try KDF.Scrypt.deriveKey(from: Array(password.utf8), salt: salt, outputByteCount: 32,
                                           rounds: 1 << entry.logN, blockSize: entry.r, parallelism: entry.p)
        return key.withUnsafeBytes { Data($0) }
    }

    private func save(_ list: [ConsoleUser]) throws {
        try Self.prepareFolder(of: path)
        let data = try JSONEncoder.lifeboat.encode(File(users: list))
        try FileSystem.writeAtomically(Array(data), to: path)   // mode 0600
    }
}
