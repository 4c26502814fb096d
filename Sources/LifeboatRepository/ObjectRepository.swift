import Crypto
import Foundation
import LifeboatBase
import LifeboatS3
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// Where one stored chunk sits in a pack object.
struct PackLocation: Sendable, Equatable {
    let pack: String
    let offset: Int
    let length: Int
}

/// A pack's index object: which chunks the pack holds and where (docs/FORMAT.md, "Object storage").
///
/// `LBPACK1\0` | entry count (u64 LE) | entries: chunk id (32) | offset (u64 LE) | stored length (u32 LE) |
/// SHA-256 of everything before it.
struct PackIndex: Sendable {
    static let magic = Array("LBPACK1\0".utf8)
    static let entrySize = 32 + 8 + 4
    var entries: [(id: ChunkID, offset: Int, length: Int)] = []

    func encoded() -> [UInt8] {
        var bytes = Self.magic
        bytes.reserveCapacity(16 + entries.count * Self.entrySize + 32)
        withUnsafeBytes(of: UInt64(entries.count).littleEndian) { bytes += $0 }
        for entry in entries {
            bytes += entry.id.bytes
            withUnsafeBytes(of: UInt64(entry.offset).littleEndian) { bytes += $0 }
            withUnsafeBytes(of: UInt32(entry.length).littleEndian) { bytes += $0 }
        }
        bytes += SHA256.hash(data: bytes)
        return bytes
    }

    init() {}

    init(decoding bytes: [UInt8], name: String) throws {
        let damaged = LifeboatError(.damaged, "pack index \(name) is damaged: remove it at the target and sync again")
        guard bytes.count >= 16 + 32, Array(bytes[0..<8]) == Self.magic,
              Array(SHA256.hash(data: bytes[0..<(bytes.count - 32)])) == Array(bytes[(bytes.count - 32)...]) else { throw damaged }
        try bytes.withUnsafeBytes { raw in
            // The bucket is not trusted: every number is checked before it is used.
            let declared = UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
            guard declared == UInt64((raw.count - 48) / Self.entrySize), (raw.count - 48) % Self.entrySize == 0 else { throw damaged }
            let count = Int(declared)
            entries.reserveCapacity(count)
            for i in 0..<count {
                let at = 16 + i * Self.entrySize
                let id = ChunkID(bytes: UnsafeRawBufferPointer(rebasing: raw[at..<(at + 32)]))
                let offset = UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: at + 32, as: UInt64.self))
                let length = Int(UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: at + 40, as: UInt32.self)))
                guard offset < 1 << 40, length > 0 else { throw damaged }
                entries.append((id, Int(offset), length))
            }
        }
    }
}

/// A repository kept in an S3 bucket under a prefix: the same manifests as a local repository
/// under the same names, and chunks in pack objects (`packs/ab/HASH.pack`, each with its index
/// `packs/ab/HASH.idx`) instead of one file each. Written by `Repository.sync`; read through a
/// local mirror of its manifests (`Repository.open(remote:)`).
public final class ObjectRepository: Sendable {
    public let location: S3Location
    public let client: S3Client
    /// Local folder for what is kept between runs: the pack indexes, the manifests, fetched chunks.
    public let cacheRoot: String

    /// What reading the bucket's manifests found wrong: altered, swapped or vanished points (verify reports them).
    public var problems: [String] { found.withLock { $0 } }
    private let found = Locked<[String]>([])

    func report(_ problem: String) { found.withLock { $0.append(problem) } }

    /// Bytes the chunks kept in the cache folder may take (nil: half the free space there when
    /// opened, at most 64 GiB); the least recently used go first.
    public let cacheSize: Int?

    public init(location: S3Location, settings: S3Settings, cacheRoot: String? = nil, cacheSize: Int? = nil) throws {
        self.location = location
        self.client = S3Client(settings: settings, bucket: location.bucket)
        self.cacheRoot = cacheRoot ?? Self.defaultCacheRoot(location, settings)
        self.cacheSize = cacheSize
        try FileSystem.makeDirectories(self.cacheRoot + "/packs")
    }

    /// `/var/cache/lifeboat/s3/HASH`, one folder per endpoint, bucket and prefix.
    static func defaultCacheRoot(_ location: S3Location, _ settings: S3Settings) -> String {
        let name = SHA256.hash(data: Data("\(settings.endpoint)|\(location.bucket)|\(location.prefix)".utf8)).prefix(8)
            .map { String($0, radix: 16).count == 1 ? "0" + String($0, radix: 16) : String($0, radix: 16) }.joined()
        let base = ProcessInfo.processInfo.environment["LIFEBOAT_CACHE"] ?? "/var/cache/lifeboat"
        return base + "/s3/" + name
    }

    public var description: String { location.description }

    func key(_ path: String) -> String { location.prefix + path }

    // MARK: Manifests

    /// A manifest as it is stored in the bucket: in an encrypted repository sealed with AES-256-GCM
    /// under the repository key, bound to its key in the bucket (a manifest moved to another
    /// point's name does not open); otherwise as it is.
    static func seal(_ bytes: [UInt8], name: String, keys: RepositoryKeys?) throws -> [UInt8] {
        try keys?.seal(bytes, context: "lifeboat-object:\(name)") ?? bytes
    }

    /// - Throws: `.damaged` naming the object when it does not authenticate.
    func unseal(_ stored: [UInt8], name: String, keys: RepositoryKeys?) throws -> [UInt8] {
        guard let keys else { return stored }
        guard let plain = keys.open(stored, context: "lifeboat-object:\(name)") else {
            throw LifeboatError(.damaged, "\(location.description)\(name) is damaged or was altered (it does not authenticate under the repository key)")
        }
        return plain
    }

    /// The target's config.json, or nil when there is no repository there yet.
    func configBytes() throws -> [UInt8]? { try client.get(key("config.json")) }

    // MARK: Pack indexes

    /// Every chunk the bucket's packs hold, from the cached pack indexes, after one listing of
    /// `packs/` (1,000 names a request): indexes new at the target are fetched once, those gone
    /// from it dropped. No request per chunk.
    func loadPackIndexes() throws -> [ChunkID: PackLocation] {
        let listed = try client.list(prefix: key("packs/"))
        let packs = Set(listed.filter { $0.key.hasSuffix(".pack") }.map { String($0.key.dropFirst(location.prefix.count).dropLast(5)) })
        let indexed = listed.filter { $0.key.hasSuffix(".idx") }.map { String($0.key.dropFirst(location.prefix.count).dropLast(4)) }
        let cacheFolder = cacheRoot + "/packs"
        let cached = Set(try FileSystem.list(cacheFolder))
        var locations: [ChunkID: PackLocation] = [:]
        for pack in indexed where packs.contains(pack) {
            let cacheName = pack.replacingOccurrences(of: "/", with: "-")
            let bytes: [UInt8]
            if cached.contains(cacheName), let local = FileSystem.contents(cacheFolder + "/" + cacheName) {
                bytes = local
            } else {
                guard let fetched = try client.get(key(pack + ".idx")) else { continue }
                bytes = fetched
                try FileSystem.writeAtomically(bytes, to: cacheFolder + "/" + cacheName)
            }
            for entry in try PackIndex(decoding: bytes, name: key(pack + ".idx")).entries {
                locations[entry.id] = PackLocation(pack: pack, offset: entry.offset, length: entry.length)
            }
        }
        let current = Set(indexed.map { $0.replacingOccurrences(of: "/", with: "-") })
        for name in cached where !current.contains(name) { FileSystem.remove(cacheFolder + "/" + name) }
        return locations
    }

    /// The chunks of the pack indexes this host has cached, without asking the bucket.
    func cachedPackIndexes() throws -> [ChunkID: PackLocation] {
        var locations: [ChunkID: PackLocation] = [:]
        for name in try FileSystem.list(cacheRoot + "/packs") where name.hasPrefix("packs-") {
            guard let bytes = FileSystem.contents(cacheRoot + "/packs/" + name) else { continue }
            let pack = name.split(separator: "-").joined(separator: "/")
            for entry in try PackIndex(decoding: bytes, name: key(pack + ".idx")).entries {
                locations[entry.id] = PackLocation(pack: pack, offset: entry.offset, length: entry.length)
            }
        }
        return locations
    }

    /// Writes a pack and then its index (a pack without an index is never read: a sync killed
    /// between the two sends the pack's chunks again). Named by the SHA-256 of its bytes.
    func putPack(_ bytes: [UInt8], index: PackIndex, retainUntil: Date?) throws -> String {
        let hash = SignatureV4.payloadHash(bytes)
        let pack = "packs/" + hash.prefix(2) + "/" + hash
        try client.put(key(pack + ".pack"), bytes, retainUntil: retainUntil)
        let indexBytes = index.encoded()
        try client.put(key(pack + ".idx"), indexBytes, retainUntil: retainUntil)
        try FileSystem.writeAtomically(indexBytes, to: cacheRoot + "/packs/" + pack.replacingOccurrences(of: "/", with: "-"))
        return pack
    }

    /// One stored chunk, with one range GET (retried while the endpoint does not answer, for
    /// the client's retry time). A read that fails is noted for `status` until one works again.
    func chunk(_ id: ChunkID, at location: PackLocation) throws -> [UInt8] {
        try bytes(location.offset..<(location.offset + location.length), ofPack: location.pack, for: "chunk \(id.hex)")
    }

    /// Bytes `range` of a pack, with one range GET (several neighbouring chunks, or one frame of one).
    func bytes(_ range: Range<Int>, ofPack pack: String, for what: String) throws -> [UInt8] {
        let bytes: [UInt8]?
        do {
            bytes = try client.get(key(pack + ".pack"), range: range)
        } catch {
            let failure = ReadFailure(time: Date(), message: "\(error)")
            try? FileSystem.writeAtomically(Array((try? JSONEncoder.lifeboat.encode(failure)) ?? Data()), to: readFailurePath, syncDirectory: false)
            throw error
        }
        guard let bytes else {
            throw LifeboatError(.damaged, "\(what) is missing from the repository: its pack \(key(pack)).pack is gone")
        }
        if FileSystem.exists(readFailurePath) { FileSystem.remove(readFailurePath) }
        return bytes
    }

    /// A read from the bucket that failed (the endpoint gone, say), as the last reader on this host saw it.
    public struct ReadFailure: Codable, Sendable {
        public var time: Date
        public var message: String
    }

    var readFailurePath: String { cacheRoot + "/read-failure.json" }

    /// Adds this process's requests to the totals kept in the cache folder (`requests.json`),
    /// for benchmarks and the curious: what reading from the bucket cost.
    public func recordRequests() {
        let path = cacheRoot + "/requests.json"
        guard let lock = try? FileLock(path: cacheRoot + "/requests.lock", mode: .exclusive, wait: true) else { return }
        var total = FileSystem.contents(path).flatMap { try? JSONDecoder.lifeboat.decode(S3Counts.self, from: Data($0)) } ?? S3Counts()
        total.add(client.requestCounts)
        try? FileSystem.writeAtomically(Array((try? JSONEncoder.lifeboat.encode(total)) ?? Data()), to: path, syncDirectory: false)
        withExtendedLifetime(lock) {}
    }

    /// The last failed read of this host's readers (mounts, drills, finalisers), until a read works again.
    public var lastReadFailure: ReadFailure? {
        FileSystem.contents(readFailurePath).flatMap { try? JSONDecoder.lifeboat.decode(ReadFailure.self, from: Data($0)) }
    }
}

/// Chunks of an object repository, read with range GETs: a chunk, one frame of it (`readPart`),
/// or neighbours in a pack (`fetchAhead`, `readRuns`). What mounts read is kept in a local
/// cache folder (whole chunks, and frames as `ID@OFFSET`); whole-chunk reads (restore, verify)
/// are not. Read-only: everything that writes chunks refuses.
final class PackChunkStore: ChunkStore {
    let remote: ObjectRepository
    let locations: [ChunkID: PackLocation]
    let cache: String
    /// The bound on the cached chunks' bytes, and what they take now (kept in step as chunks come and go).
    let cacheLimit: Int
    private let cachedBytes: Locked<Int>

    init(remote: ObjectRepository, locations: [ChunkID: PackLocation]) throws {
        self.remote = remote
        self.locations = locations
        self.cache = remote.cacheRoot + "/chunks"
        try FileSystem.makeDirectories(cache)
        var fs = statvfs()
        let free = statvfs(cache, &fs) == 0 ? Int(fs.f_bavail) * Int(fs.f_frsize) : 1 << 30
        cacheLimit = remote.cacheSize ?? min(free / 2, 64 << 30)
        var total = 0
        for name in try FileSystem.list(cache) {
            var st = stat()
            if stat(cache + "/" + name, &st) == 0 { total += Int(st.st_size) }
        }
        cachedBytes = Locked(total)
    }

    /// Keeps a fetched chunk in the cache folder; the least recently used chunks go when the
    /// folder would pass its bound (a chunk open elsewhere stays readable until closed).
    private func keep(_ bytes: [UInt8], at path: String) throws {
        try FileSystem.writeAtomically(bytes, to: path, syncDirectory: false, durable: false)
        let total = cachedBytes.withLock { $0 += bytes.count; return $0 }
        guard total > cacheLimit else { return }
        var entries: [(path: String, used: Int, size: Int)] = []
        for name in try FileSystem.list(cache) where !name.hasPrefix(".") {
            var st = stat()
            if stat(cache + "/" + name, &st) == 0 {
                entries.append((cache + "/" + name, st.st_mtim.tv_sec * 1_000_000_000 + st.st_mtim.tv_nsec, Int(st.st_size)))
            }
        }
        let measured = entries.reduce(0) { $0 + $1.size }   // other processes share the folder: count what is there
        var over = measured - cacheLimit * 8 / 10
        var freed = 0
        for entry in entries.sorted(by: { $0.used < $1.used }) where over > 0 && entry.path != path {
            if unlink(entry.path) == 0 { over -= entry.size; freed += entry.size }
        }
        cachedBytes.withLock { $0 = max(0, measured - freed) }
    }

    private func cachePath(_ id: ChunkID) -> String { cache + "/" + id.hex }

    private func location(_ id: ChunkID) throws -> PackLocation {
        guard let location = locations[id] else {
            throw LifeboatError(.damaged, "chunk \(id.hex) is missing from the repository at \(remote.description): no pack holds it")
        }
        return location
    }

    func contains(_ id: ChunkID) -> Bool { locations[id] != nil }

    func all() throws -> Set<ChunkID> { Set(locations.keys) }

    func read(_ id: ChunkID) throws -> [UInt8] {
        let location = try location(id)
        if let cached = FileSystem.contents(cachePath(id)), cached.count == location.length { return cached }
        return try remote.chunk(id, at: location)
    }

    func readDirect(_ id: ChunkID, into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        let bytes = try read(id)
        guard bytes.count < buffer.count else { throw LifeboatError(.damaged, "chunk \(id.hex) is damaged: longer than a chunk") }
        bytes.withUnsafeBytes { buffer.copyMemory(from: $0) }
        return bytes.count
    }

    /// Largest range GET of neighbouring chunks when reading ahead.
    static let aheadSpan = 16 << 20

    /// One frame's stored bytes with a range GET of just them (a cold random read of a served
    /// disk takes a 64 KiB frame, not its 1 MiB chunk), kept in the cache folder as `ID@OFFSET`.
    /// Nil when the chunk is cached whole (read from there) or `storedSize` is not what the
    /// bucket holds (a stale layout: the chunk is read whole).
    func readPart(_ id: ChunkID, _ range: Range<Int>, storedSize: Int) throws -> [UInt8]? {
        let whole = cachePath(id)
        guard let location = locations[id], !FileSystem.exists(whole), location.length == storedSize,
              !range.isEmpty, range.upperBound <= storedSize else { return nil }
        let path = whole + "@" + String(range.lowerBound)
        if let cached = FileSystem.contents(path), cached.count == range.count {
            utimes(path, nil)
            return cached
        }
        let bytes = try remote.bytes((location.offset + range.lowerBound)..<(location.offset + range.upperBound),
                                     ofPack: location.pack, for: "chunk \(id.hex)")
        try? keep(bytes, at: path)   // a cache that cannot be written costs the next read a GET, not this one its bytes
        return bytes
    }

    /// Drops what the cache folder holds of a chunk (it did not decode: a file a crash left
    /// wrong), so that the next read fetches it from the bucket.
    func forget(_ id: ChunkID) -> Bool {
        var dropped = false
        for name in (try? FileSystem.list(cache)) ?? [] where name == id.hex || name.hasPrefix(id.hex + "@") {
            dropped = unlink(cache + "/" + name) == 0 || dropped
        }
        return dropped
    }

    /// Fetches the chunks of `ids` not cached yet with few range GETs (`readRuns`), and keeps
    /// each in the cache folder, where `open` finds it.
    /// At most a quarter of the cache folder's bound at a time, so that what it fetched is not
    /// evicted before the reader gets there.
    func fetchAhead(_ ids: [ChunkID]) {
        var budget = cacheLimit / 4
        for run in readRuns(ids) ?? [] where budget > 0 {   // (fetchRun skips a chunk cached whole)
            for (id, bytes) in (try? fetchRun(run)) ?? [:] {
                try? keep(bytes, at: cachePath(id))
                budget -= bytes.count
            }
        }
    }

    /// Chunks cached whole come first, one each (read from the cache folder); the others in
    /// pack order, in runs of neighbours one range GET fetches: the same pack, gaps under
    /// 256 KiB (not worth a request of their own), at most 16 MiB.
    func readRuns(_ ids: [ChunkID]) -> [[ChunkID]]? {
        var cached: [[ChunkID]] = []
        var fetched: [(id: ChunkID, location: PackLocation)] = []
        var seen = Set<ChunkID>()
        for id in ids where !id.isZero && seen.insert(id).inserted {
            if let location = locations[id], !FileSystem.exists(cachePath(id)) { fetched.append((id, location)) } else { cached.append([id]) }
        }
        fetched.sort { ($0.location.pack, $0.location.offset) < ($1.location.pack, $1.location.offset) }
        var runs = cached
        var run: [(id: ChunkID, location: PackLocation)] = []
        for entry in fetched {
            if let first = run.first, let last = run.last,
               last.location.pack != entry.location.pack
                || entry.location.offset - (last.location.offset + last.location.length) > 256 << 10
                || entry.location.offset + entry.location.length - first.location.offset > Self.aheadSpan {
                runs.append(run.map(\.id))
                run.removeAll()
            }
            run.append(entry)
        }
        if !run.isEmpty { runs.append(run.map(\.id)) }
        return runs
    }

    /// One range GET for a run of `readRuns` (nothing for a chunk cached whole: it is read from there).
    /// (The pack indexes come from the bucket: entries of one run that overlap, or are of
    /// another pack, are not trusted to stay inside what arrived.)
    func fetchRun(_ ids: [ChunkID]) throws -> [ChunkID: [UInt8]] {
        let located = ids.compactMap { id in locations[id].map { (id: id, location: $0) } }
        guard let first = located.first, located.count > 1 || !FileSystem.exists(cachePath(first.id)) else { return [:] }
        let start = located.map(\.location.offset).min()!, end = located.map { $0.location.offset + $0.location.length }.max()!
        guard located.allSatisfy({ $0.location.pack == first.location.pack }), end - start <= 2 * Self.aheadSpan else {
            throw LifeboatError(.damaged, "the pack indexes of \(remote.description) place chunks \(first.id.hex) … in more than one pack or far apart: remove the cache folder's packs/ and try again")
        }
        let bytes = try remote.bytes(start..<end, ofPack: first.location.pack, for: located.count == 1 ? "chunk \(first.id.hex)" : "\(located.count) chunks")
        var result: [ChunkID: [UInt8]] = [:]
        for (id, location) in located {
            let from = location.offset - start
            guard from >= 0, from + location.length <= bytes.count else { continue }   // read one by one, and named there
            result[id] = Array(bytes[from..<(from + location.length)])
        }
        return result
    }

    func open(_ id: ChunkID) throws -> PosixFile {
        let path = cachePath(id)
        let location = try location(id)
        // (Cache files are written without fsync: one cut short by a crash is fetched again.)
        if let file = try? PosixFile(path: path, flags: O_RDONLY), (try? file.size()) == location.length {
            utimes(path, nil)   // used now: evicted last
            return file
        }
        let bytes = try remote.chunk(id, at: location)
        try? keep(bytes, at: path)
        if let file = try? PosixFile(path: path, flags: O_RDONLY), (try? file.size()) == location.length { return file }
        // Evicted at once by another reader of the folder: an unnamed file of its own serves this read.
        do {
            let file = try PosixFile(path: cache, flags: O_TMPFILE | O_RDWR, mode: 0o600)
            try bytes.withUnsafeBytes { try file.write($0, at: 0) }
            return file
        } catch {
            throw LifeboatError.io(error, "cannot keep chunk \(id.hex) in", cache)
        }
    }

    private func readOnly() -> LifeboatError {
        LifeboatError(.unsupported, "\(remote.description) is an off-site copy and lifeboat only reads it: change a local repository and run 'lifeboat sync'")
    }

    func write(_ id: ChunkID, _ bytes: UnsafeRawBufferPointer) throws { throw readOnly() }
    func remove(_ id: ChunkID) throws -> Int { throw readOnly() }
    func sync() throws { throw readOnly() }
    func stage(_ id: ChunkID, _ bytes: UnsafeRawBufferPointer) throws -> String { throw readOnly() }
    func replace(_ id: ChunkID, with staged: String) throws { throw readOnly() }
}
