import LifeboatBase
#if canImport(Glibc)
import Glibc
#endif

/// Reads a disk index a page at a time, so that opening a disk of any size costs one header
/// read, and reading a block costs at most one 4 KiB index read.
///
/// The index's trailing checksum is not checked here (that needs the whole file); a damaged id
/// still cannot yield wrong bytes, because every chunk read is checked against its id.
public final class IndexReader: Sendable {
    public let chunkSize: Int
    public let diskSize: Int
    public let count: Int
    private let file: PosixFile?
    /// Every id, for an index read whole (a sealed one: it opens only whole).
    private let whole: [ChunkID]?
    private let pages = Locked<[Int: [ChunkID]]>([:])
    private static let idsPerPage = 128
    private static let maxPages = 1024  // 4 MiB of ids: 128 GiB of disk at 1 MiB chunks

    init(path: String) throws {
        let file: PosixFile
        do { file = try PosixFile(path: path, flags: O_RDONLY) } catch {
            throw LifeboatError(.damaged, "index \(path) cannot be read (\(error)): the point is damaged")
        }
        self.file = file
        self.whole = nil
        var header = [UInt8](repeating: 0, count: 32)
        let n = try? header.withUnsafeMutableBytes { try file.read(into: $0, at: 0) }
        func u64(_ offset: Int) -> Int {
            header.withUnsafeBytes { Int(UInt64(littleEndian: $0.loadUnaligned(fromByteOffset: offset, as: UInt64.self))) }
        }
        guard n == 32, Array(header[0..<8]) == DiskIndex.magic else {
            throw LifeboatError(.damaged, "index \(path) is damaged (bad header)")
        }
        (chunkSize, diskSize, count) = (u64(8), u64(16), u64(24))
        guard chunkSize > 0, count == DiskIndex.chunkCount(diskSize: diskSize, chunkSize: chunkSize),
              (try? file.size()) == 64 + count * 32 else {
            throw LifeboatError(.damaged, "index \(path) is damaged (wrong length)")
        }
    }

    /// A reader of an index read whole.
    init(_ index: DiskIndex) {
        (chunkSize, diskSize, count) = (index.chunkSize, index.diskSize, index.ids.count)
        (file, whole) = (nil, index.ids)
    }

    /// The distinct ids of the first `limit` chunks that are not holes (one read of that part of the index).
    public func ids(limit: Int) throws -> [ChunkID] {
        if let whole { return DiskIndex.distinct(whole.prefix(limit)) }
        guard let file else { return [] }
        let n = min(limit, count)
        let bytes: [UInt8]
        do { bytes = try [UInt8](filling: n * 32) { try file.read(into: $0, at: 32) } } catch {
            throw LifeboatError(.damaged, "index \(file.path) cannot be read (\(error))")
        }
        guard bytes.count == n * 32 else { throw LifeboatError(.damaged, "index \(file.path) is damaged (short read)") }
        return DiskIndex.distinct(bytes.withUnsafeBytes { raw in
            (0..<n).map { ChunkID(bytes: UnsafeRawBufferPointer(rebasing: raw[($0 * 32)..<($0 * 32 + 32)])) }
        })
    }

    /// The id of chunk `i` if its page of the index is in memory (no read), else nil.
    public func cachedID(at i: Int) -> ChunkID? {
        precondition(i >= 0 && i < count)
        if let whole { return whole[i] }
        return pages.withLock { $0[i / Self.idsPerPage] }.map { $0[i % Self.idsPerPage] }
    }

    /// The id of chunk `i` (zero for a hole).
    public func id(at i: Int) throws -> ChunkID {
        if let id = cachedID(at: i) { return id }
        guard let file else { throw LifeboatError(.damaged, "index of \(count) chunks has no chunk \(i)") }
        let page = i / Self.idsPerPage
        let first = page * Self.idsPerPage
        let n = min(Self.idsPerPage, count - first)
        var bytes = [UInt8](repeating: 0, count: n * 32)
        let got: Int
        do { got = try bytes.withUnsafeMutableBytes { try file.read(into: $0, at: 32 + first * 32) } } catch {
            throw LifeboatError(.damaged, "index \(file.path) cannot be read (\(error))")
        }
        guard got == n * 32 else { throw LifeboatError(.damaged, "index \(file.path) is damaged (short read)") }
        let ids = bytes.withUnsafeBytes { raw in
            (0..<n).map { ChunkID(bytes: UnsafeRawBufferPointer(rebasing: raw[($0 * 32)..<($0 * 32 + 32)])) }
        }
        pages.withLock { pages in
            if pages.count >= Self.maxPages { pages.removeAll(keepingCapacity: true) }
            pages[page] = ids
        }
        return ids[i % Self.idsPerPage]
    }
}

extension Repository {
    /// A lazy reader of one disk's index in a recovery point.
    public func indexReader(_ point: RecoveryPoint, disk: String) throws -> IndexReader {
        if sealsManifests { return IndexReader(try index(point, disk: disk)) }
        return try IndexReader(path: indexPath(point.machine, point.id, disk: disk))
    }

    /// One recovery point, read from its own point.json only.
    /// - Throws: `.notFound` when the point does not exist (or was pruned).
    public func loadPoint(_ machine: String, _ id: String) throws -> RecoveryPoint {
        guard !id.hasPrefix("."), !id.contains("/"), FileSystem.exists(pointPath(machine, id) + "/point.json") else {
            throw LifeboatError(.notFound, "machine \(machine) has no recovery point \(id)")
        }
        return try decodeManifest(RecoveryPoint.self, "machines/\(machine)/points/\(id)/point.json")
    }

    /// True when the point exists (is not pruned), without reading it.
    public func hasPoint(_ machine: String, _ id: String) -> Bool {
        !id.hasPrefix(".") && !id.contains("/") && FileSystem.exists(pointPath(machine, id) + "/point.json")
    }

    /// The bytes of a point's point.json (opened, when the repository seals manifests).
    public func pointManifest(_ machine: String, _ id: String) throws -> [UInt8] {
        try readManifest("machines/\(machine)/points/\(id)/point.json")
    }

    /// Names of protected machines, without reading their settings.
    public func machineNames() throws -> [String] {
        try FileSystem.list(machinesPath).filter { !$0.hasPrefix(".") && FileSystem.exists(machinePath($0) + "/machine.json") }.sorted()
    }

    /// Ids of a machine's points, without reading them.
    public func pointIDs(_ machine: String) throws -> [String] {
        try FileSystem.list(pointsPath(machine)).filter { !$0.hasPrefix(".") }.sorted()
    }
}
