import Dispatch
import Foundation
import LifeboatBase
import LifeboatRepository
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

private let SEEK_DATA: Int32 = 3  // <unistd.h> under _GNU_SOURCE
private let SEEK_HOLE: Int32 = 4

/// The whole repository as files:
/// ```
/// /NAME/latest -> ID
/// /NAME/ID/point.json
/// /NAME/ID/DISK.raw     read-only, exact size, random access, holes answer SEEK_HOLE
/// ```
/// Listings are read from the repository on every call, so points taken after mounting appear
/// and pruned ones disappear. Disk reads go offset -> index entry -> chunk frame (cached) -> bytes.
public final class RecoveryPointFileSystem: FuseFileSystem {
    public struct Access: Sendable {
        /// Owner and group of every file; group members (the user QEMU runs as) may read.
        public var uid: UInt32
        public var gid: UInt32
        public init(uid: UInt32, gid: UInt32) { (self.uid, self.gid) = (uid, gid) }
    }

    let repository: Repository
    let cache: FrameCache
    let access: Access
    private let handles = Locked<(next: UInt64, open: [UInt64: OpenFile])>((1, [:]))
    private let points = Locked<[String: RecoveryPoint]>([:])
    private let readahead = DispatchQueue(label: "lifeboat.readahead", attributes: .concurrent)
    private let readaheadSlots = DispatchSemaphore(value: 6)
    private let fetchingAhead = DispatchQueue(label: "lifeboat.fetch-ahead", attributes: .concurrent)
    private let fetchAheadSlots = DispatchSemaphore(value: 2)
    private let log: @Sendable (String) -> Void

    /// - Parameters:
    ///   - cacheSize: bytes of decoded frames to keep in memory.
    ///   - log: where read errors are reported (one line each).
    public init(repository: Repository, cacheSize: Int, access: Access, log: @escaping @Sendable (String) -> Void) throws {
        self.repository = repository
        self.cache = try FrameCache(repository: repository, capacity: cacheSize)
        self.access = access
        self.log = log
    }

    enum Node {
        case root
        case machine(String)
        case latest(String)
        case point(String, String)
        case manifest(String, String)
        case disk(String, String, String)
    }

    private func node(_ path: String) throws -> Node {
        let parts = path.split(separator: "/").map(String.init)
        if parts.contains(where: { $0.hasPrefix(".") }) { throw Errno.noSuchFileOrDirectory }
        switch parts.count {
        case 0: return .root
        case 1: return .machine(parts[0])
        case 2: return parts[1] == "latest" ? .latest(parts[0]) : .point(parts[0], parts[1])
        case 3:
            if parts[2] == "point.json" { return .manifest(parts[0], parts[1]) }
            guard parts[2].hasSuffix(".raw") else { throw Errno.noSuchFileOrDirectory }
            return .disk(parts[0], parts[1], String(parts[2].dropLast(4)))
        default: throw Errno.noSuchFileOrDirectory
        }
    }

    /// A point by id; cached, since points never change, but checked to still exist.
    private func point(_ machine: String, _ id: String) throws -> RecoveryPoint {
        let key = machine + "/" + id
        do {
            if let known = points.withLock({ $0[key] }) {
                guard repository.hasPoint(machine, id) else {   // pruned since
                    points.withLock { $0[key] = nil }
                    throw Errno.noSuchFileOrDirectory
                }
                return known
            }
            let point = try repository.loadPoint(machine, id)
            points.withLock { $0[key] = point }
            return point
        } catch let error as LifeboatError where error.code == .notFound || error.code == .invalidArgument {
            throw Errno.noSuchFileOrDirectory
        }
    }

    private func latest(_ machine: String) throws -> String {
        guard let id = try ids(machine).last else { throw Errno.noSuchFileOrDirectory }
        return id
    }

    private func ids(_ machine: String) throws -> [String] {
        do { return try repository.pointIDs(machine) } catch { throw Errno.noSuchFileOrDirectory }
    }

    private func directory(_ modified: Date = Date(timeIntervalSince1970: 0)) -> FileAttributes {
        FileAttributes(kind: .directory, size: 4096, permissions: 0o550, uid: access.uid, gid: access.gid, modified: modified)
    }

    public func attributes(of path: String) throws -> FileAttributes {
        switch try node(path) {
        case .root:
            return directory()
        case .machine(let name):
            guard try repository.machineNames().contains(name) else { throw Errno.noSuchFileOrDirectory }
            return directory()
        case .latest(let name):
            let id = try latest(name)
            return FileAttributes(kind: .symlink, size: id.utf8.count, permissions: 0o777, uid: access.uid, gid: access.gid,
                                  modified: try point(name, id).time)
        case .point(let name, let id):
            return directory(try point(name, id).time)
        case .manifest(let name, let id):
            let point = try point(name, id)
            let size = try repository.pointManifest(name, id).count
            return FileAttributes(kind: .file, size: size, permissions: 0o440, uid: access.uid, gid: access.gid, modified: point.time)
        case .disk(let name, let id, let disk):
            let point = try point(name, id)
            guard let d = point.disks.first(where: { $0.name == disk }) else { throw Errno.noSuchFileOrDirectory }
            return FileAttributes(kind: .file, size: d.size, permissions: 0o440, uid: access.uid, gid: access.gid, modified: point.time)
        }
    }

    public func list(_ path: String) throws -> [String] {
        switch try node(path) {
        case .root:
            do { return try repository.machineNames() } catch { throw Errno.ioError }
        case .machine(let name):
            let ids = try ids(name)
            return ids.isEmpty ? [] : ids + ["latest"]
        case .point(let name, let id):
            return ["point.json"] + (try point(name, id)).disks.map { $0.name + ".raw" }
        default:
            throw Errno.notDirectory
        }
    }

    public func link(_ path: String) throws -> String {
        guard case .latest(let name) = try node(path) else { throw Errno.invalidArgument }
        return try latest(name)
    }

    /// Disks are served with direct I/O: the page cache would cost a second copy of every byte
    /// and a page allocation per 4 KiB (measured: 8.2 s vs 3.6 s for a 4 GiB sequential read);
    /// the frame cache keeps what is read repeatedly.
    public func open(_ path: String) throws -> OpenedFile {
        let file: OpenFile
        switch try node(path) {
        case .manifest(let name, let id):
            _ = try point(name, id)
            file = .bytes(try repository.pointManifest(name, id))
        case .disk(let name, let id, let diskName):
            let point = try point(name, id)
            guard point.disks.contains(where: { $0.name == diskName }) else { throw Errno.noSuchFileOrDirectory }
            do {
                let disk = DiskFile(index: try repository.indexReader(point, disk: diskName), label: "\(name)/\(id)/\(diskName).raw")
                file = .disk(disk)
                if repository.remote != nil { cache.adoptLayouts(repository.storedLayouts(point, disk: diskName)) }
                warmLayouts(of: disk, point: point, name: diskName)
            } catch {
                log("cannot open \(name)/\(id)/\(diskName).raw: \(error)")
                throw Errno.ioError
            }
        case .root, .machine, .point: throw Errno.isDirectory
        case .latest: throw Errno.invalidArgument
        }
        let handle = handles.withLock { state in
            let handle = state.next
            state.next += 1
            state.open[handle] = file
            return handle
        }
        if case .disk = file { return OpenedFile(handle: handle, directIO: true) }
        return OpenedFile(handle: handle, directIO: false)
    }

    public func close(_ handle: UInt64) {
        _ = handles.withLock { $0.open.removeValue(forKey: handle) }
    }

    private func file(_ handle: UInt64) throws -> OpenFile {
        guard let file = handles.withLock({ $0.open[handle] }) else { throw Errno.badFileDescriptor }
        return file
    }

    public func read(_ handle: UInt64, into buffer: UnsafeMutableRawBufferPointer, at offset: Int) throws -> Int {
        switch try file(handle) {
        case .bytes(let bytes):
            guard offset < bytes.count else { return 0 }
            let n = min(buffer.count, bytes.count - offset)
            bytes.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[offset..<(offset + n)])) }
            return n
        case .disk(let disk):
            let n = try read(disk, into: buffer, at: offset)
            if disk.isSequential(offset, n) { startReadahead(disk, from: offset + n) }
            return n
        }
    }

    private func read(_ disk: DiskFile, into buffer: UnsafeMutableRawBufferPointer, at offset: Int) throws -> Int {
        let index = disk.index
        guard offset < index.diskSize else { return 0 }
        let end = min(index.diskSize, offset + buffer.count)
        let frameSize = repository.config.frameSize
        var position = offset
        while position < end {
            let chunk = position / index.chunkSize
            let inChunk = position - chunk * index.chunkSize
            let frame = inChunk / frameSize
            let inFrame = inChunk - frame * frameSize
            let frameEnd = min(end, chunk * index.chunkSize + (frame + 1) * frameSize)
            let out = UnsafeMutableRawBufferPointer(rebasing: buffer[(position - offset)..<(frameEnd - offset)])
            let id = try disk.id(chunk)
            if id.isZero {
                out.initializeMemory(as: UInt8.self, repeating: 0)   // a hole: no I/O
            } else {
                let copied: Bool
                do {
                    copied = try cache.withFrame(frame, of: id) { bytes in
                        guard inFrame + out.count <= bytes.count else { return false }
                        out.copyMemory(from: UnsafeRawBufferPointer(rebasing: bytes[inFrame..<(inFrame + out.count)]))
                        return true
                    }
                } catch {
                    log("read error in \(disk.label) at offset \(position): \(error)")
                    throw Errno.ioError
                }
                guard copied else {
                    log("read error in \(disk.label) at offset \(position): chunk \(id.hex) is shorter than the index says")
                    throw Errno.ioError
                }
            }
            position = frameEnd
        }
        return end - offset
    }

    /// Reads the layouts of an opened disk's chunks in the background: a recovery VM reads its
    /// disk at random, one request at a time, and each first read of a chunk would otherwise
    /// wait for its header before its frame (measured in docs/MOUNT.md). The point's
    /// DISK.layouts gives most of them in one read; the rest are read from the chunks' headers.
    private func warmLayouts(of disk: DiskFile, point: RecoveryPoint, name: String) {
        let cache = self.cache, repository = self.repository
        let thread = Thread {
            guard let ids = try? disk.index.ids(limit: 1 << 16) else { return }
            cache.warmLayouts(ids) { repository.storedLayouts(point, disk: name) }
        }
        thread.name = "lifeboat-layouts"
        thread.start()
    }

    /// Loads the next frames of a sequential reader in the background, a few at a time.
    private func startReadahead(_ disk: DiskFile, from offset: Int) {
        // Whole chunks, one read each, a few chunks ahead of the reader, on several threads.
        let chunkSize = disk.index.chunkSize
        // From a bucket further ahead: each fetch waits a round trip, and spans more chunks.
        let window = (repository.remote == nil ? 8 : 32) * chunkSize
        let start = (offset / chunkSize) * chunkSize
        guard let range = disk.claimReadahead(start..<min(disk.index.diskSize, start + window)) else { return }
        let frames = (chunkSize + repository.config.frameSize - 1) / repository.config.frameSize
        let ids = ((range.lowerBound / chunkSize)..<((range.upperBound + chunkSize - 1) / chunkSize)).compactMap { chunk in
            (try? disk.id(chunk)).flatMap { $0.isZero ? nil : $0 }
        }
        let decode: @Sendable () -> Void = { [self] in
            for id in ids {
                guard readaheadSlots.wait(timeout: .now()) == .success else { return }
                readahead.async { [self] in
                    defer { readaheadSlots.signal() }
                    cache.prefetch(id, frames: frames)
                }
            }
        }
        guard repository.remote != nil else { return decode() }
        // From a bucket: the window's chunks first come in a few large range GETs, then are
        // decoded; two windows at a time per mount (each is up to 32 MiB in flight).
        fetchingAhead.async { [self] in
            fetchAheadSlots.wait()
            repository.fetchAhead(ids)
            fetchAheadSlots.signal()
            decode()
        }
    }

    public func seek(_ handle: UInt64, to offset: Int, whence: Int32) throws -> Int {
        guard case .disk(let disk) = try file(handle) else { throw Errno.invalidArgument }
        let index = disk.index
        guard offset >= 0, offset < index.diskSize else { throw Errno.noSuchAddressOrDevice }
        var chunk = offset / index.chunkSize
        switch whence {
        case SEEK_DATA:
            while chunk < index.count, try disk.id(chunk).isZero { chunk += 1 }
            guard chunk < index.count else { throw Errno.noSuchAddressOrDevice }
            return max(offset, chunk * index.chunkSize)
        case SEEK_HOLE:
            while chunk < index.count, !(try disk.id(chunk).isZero) { chunk += 1 }
            return min(index.diskSize, max(offset, chunk * index.chunkSize))
        default:
            throw Errno.invalidArgument
        }
    }
}

/// What an open file handle serves.
enum OpenFile: Sendable {
    case bytes([UInt8])
    case disk(DiskFile)
}

/// One open disk: its index, and where its reader was, to spot sequential reads.
final class DiskFile: Sendable {
    let index: IndexReader
    let label: String
    private let cursor = Locked<(nextOffset: Int, readaheadEnd: Int)>((0, 0))

    init(index: IndexReader, label: String) {
        self.index = index
        self.label = label
    }

    func id(_ chunk: Int) throws -> ChunkID {
        if let id = index.cachedID(at: chunk) { return id }
        RequestLoop.willBlock()   // a read of the index
        do { return try index.id(at: chunk) } catch { throw Errno.ioError }
    }

    /// True when this read continues the previous one.
    func isSequential(_ offset: Int, _ count: Int) -> Bool {
        cursor.withLock { cursor in
            defer { cursor.nextOffset = offset + count }
            return offset == cursor.nextOffset && offset > 0
        }
    }

    /// The part of `range` not yet read ahead, claimed for reading ahead; nil when there is none.
    func claimReadahead(_ range: Range<Int>) -> Range<Int>? {
        cursor.withLock { cursor in
            let start = max(range.lowerBound, cursor.readaheadEnd)
            guard start < range.upperBound, range.upperBound - start >= range.count / 2 else { return nil }
            cursor.readaheadEnd = range.upperBound
            return start..<range.upperBound
        }
    }
}
