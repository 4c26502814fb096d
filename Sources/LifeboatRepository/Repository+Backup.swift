import Foundation
import SystemPackage
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

extension Repository {
    /// Takes a recovery point of all of a machine's disks.
    ///
    /// Every disk is read in fixed-size chunks on all cores; holes (SEEK_DATA/SEEK_HOLE) and
    /// all-zero chunks are recorded as holes and never stored; chunks the repository already
    /// has are not stored again. The point becomes visible only once every chunk and index is
    /// durable: a backup that is killed or fails leaves the repository as it was, less some
    /// unreferenced chunks that `gc` removes.
    /// - Parameters:
    ///   - progress: advanced by the bytes of disk covered.
    ///   - sources: disk name -> path to read instead of the machine's own (a failed-over machine's
    ///     hot disks, for failback).
    /// - Throws: `.busy` when another backup of the machine runs; `.noSpace` when the repository fills up.
    public func backup(_ name: String, progress: ProgressMeter = ProgressMeter(), now: Date = Date(),
                       sources overrides: [String: String] = [:]) throws -> RecoveryPoint {
        let machine = try self.machine(name)
        let started = Date()
        let lockPath = machinePath(name) + "/backup.lock"
        guard let machineLock = try FileLock(path: lockPath, mode: .exclusive, wait: false) else {
            let owner = FileLock.owner(of: lockPath).map { " (pid \($0))" } ?? ""
            throw LifeboatError(.busy, "a backup of machine \(name) is already running\(owner): wait for it to finish")
        }
        machineLock.recordOwner()
        let repoLock = try repositoryLock(.shared, wait: true)

        let previous = try points(name).last
        var sources: [(disk: MachineDisk, file: PosixFile, size: Int)] = []
        for configured in machine.disks {
            let disk = MachineDisk(name: configured.name, path: overrides[configured.name] ?? configured.path)
            try DiskSource.check(path: disk.path)
            let file = try PosixFile.openForReading(disk.path, what: "disk")
            let size: Int
            do { size = try file.size() } catch { throw LifeboatError.io(error, "cannot read size of disk", disk.path) }
            sources.append((disk, file, size))
        }
        progress.start(total: sources.reduce(0) { $0 + $1.size })

        let known = ChunkSet(try store.all())
        let pointsDir = pointsPath(name)
        let staging = pointsDir + "/" + FileSystem.temporaryName()
        try FileSystem.makeDirectory(staging)
        do {
            var disks: [PointDisk] = []
            var consistent = true
            var bytesRead = 0
            for source in sources {
                let before = try? source.file.stat()
                let (index, disk, read) = try backupDisk(source.disk, file: source.file, size: source.size,
                                                          known: known, progress: progress)
                let after = try? source.file.stat()
                if let before, let after, (before.st_mode & S_IFMT) == S_IFREG,
                   before.st_mtim.tv_sec != after.st_mtim.tv_sec || before.st_mtim.tv_nsec != after.st_mtim.tv_nsec
                    || before.st_size != after.st_size {
                    consistent = false
                }
                var pointDisk = disk
                if let old = previous?.disks.first(where: { $0.name == disk.name }), old.size != disk.size {
                    pointDisk.previousSize = old.size
                }
                disks.append(pointDisk)
                bytesRead += read
                try writeFile(index.encoded(), staging + "/" + disk.name + ".idx")
            }
            let point = RecoveryPoint(
                id: Self.pointID(for: now, existing: Set(try FileSystem.list(pointsDir))), machine: name, time: now,
                consistency: consistent ? "consistent" : "changed-during-backup", parent: previous?.id,
                chunkSize: config.chunkSize, disks: disks, bytesRead: bytesRead,
                seconds: Date().timeIntervalSince(started))
            try writeFile(Array(try JSONEncoder.lifeboat.encode(point)), staging + "/point.json")
            try store.sync()  // every chunk the point names is durable before the point is visible
            try FileSystem.rename(staging, pointsDir + "/" + point.id)
            try FileSystem.syncDirectory(pointsDir)
            withExtendedLifetime((machineLock, repoLock)) {}
            return point
        } catch {
            FileSystem.removeTree(staging)
            throw error
        }
    }

    private func writeFile(_ bytes: [UInt8], _ path: String) throws {
        do {
            let file = try PosixFile(path: path, flags: O_WRONLY | O_CREAT | O_EXCL, mode: 0o600)
            try bytes.withUnsafeBytes { raw in try file.write(raw, at: 0) }
            try file.sync()
        } catch {
            throw LifeboatError.io(error, "cannot write", path)
        }
    }

    /// Point ids sort by time: `YYYYMMDD-HHMMSS` in UTC, with a suffix if that second is taken (drill ids too).
    package static func pointID(for date: Date, existing: Set<String>) -> String {
        let formatter = DateFormatter()
        formatter.locale = Locale(identifier: "en_US_POSIX")
        formatter.timeZone = TimeZone(identifier: "UTC")
        formatter.dateFormat = "yyyyMMdd-HHmmss"
        let base = formatter.string(from: date)
        var id = base
        var n = 2
        while existing.contains(id) { id = "\(base)-\(n)"; n += 1 }
        return id
    }

    private func backupDisk(_ disk: MachineDisk, file: PosixFile, size: Int, known: ChunkSet,
                            progress: ProgressMeter) throws -> (DiskIndex, PointDisk, Int) {
        let chunkSize = config.chunkSize
        let count = DiskIndex.chunkCount(diskSize: size, chunkSize: chunkSize)
        let dataRanges = file.dataRanges(size: size)
        file.advise(sequential: true)
        let ids = SlotArray(count: count, initial: ChunkID.zero)
        let newBytes = Atomic<Int>(0), storedBytes = Atomic<Int>(0), dataBytes = Atomic<Int>(0), readBytes = Atomic<Int>(0)
        let work = ParallelWork(count: count)
        let codec = self.codec, store = self.store
        // Read ahead of the workers so that they rarely wait for the disk: every `window` bytes,
        // ask for the window that starts `window` ahead.
        let window = 32 << 20
        let chunksPerWindow = max(1, window / chunkSize)
        // Only data is read ahead: asking for a hole would fill the page cache with zeros.
        let prefetch: @Sendable (Range<Int>) -> Void = { range in
            guard let dataRanges else { return file.prefetch(range) }
            for data in Self.dataRanges(dataRanges, overlapping: range) { file.prefetch(data) }
        }
        prefetch(0..<min(size, window))
        try work.run { work in
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: chunkSize, alignment: 4096)
            let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: codec.scratchSize(chunkSize: chunkSize), alignment: 64)
            defer { buffer.deallocate(); scratch.deallocate() }
            while let i = work.take() {
                let offset = i * chunkSize
                let length = min(chunkSize, size - offset)
                defer { progress.add(length) }
                if i % chunksPerWindow == 0, offset + window < size {
                    prefetch((offset + window)..<min(size, offset + 2 * window))
                }
                if let dataRanges, !Self.overlaps(dataRanges, offset..<(offset + length)) { continue }
                let chunk = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<length])
                let n: Int
                do { n = try file.read(into: chunk, at: offset) } catch {
                    throw LifeboatError.io(error, "cannot read disk", disk.path)
                }
                readBytes.add(n, ordering: .relaxed)
                guard n == length else {
                    throw LifeboatError(.io, "disk \(disk.path) shrank while being read: take the backup again")
                }
                let data = UnsafeRawBufferPointer(chunk)
                if data.isAllZero { continue }
                dataBytes.add(length, ordering: .relaxed)
                let digests = codec.frameDigests(of: data)   // hashed once: for the id and the frame table
                let id = codec.id(ofDigests: digests)
                ids[i] = id
                if known.insert(id) {
                    let encoded = try codec.encode(data, id: id, digests: digests, scratch: scratch)
                    do { try store.write(id, encoded) } catch {
                        known.remove(id)
                        throw error
                    }
                    newBytes.add(length, ordering: .relaxed)
                    storedBytes.add(encoded.count, ordering: .relaxed)
                }
            }
        }
        let index = DiskIndex(chunkSize: chunkSize, diskSize: size, ids: ids.array)
        let pointDisk = PointDisk(name: disk.name, path: disk.path, size: size,
                                  dataBytes: dataBytes.load(ordering: .relaxed), newBytes: newBytes.load(ordering: .relaxed),
                                  storedBytes: storedBytes.load(ordering: .relaxed), previousSize: nil)
        return (index, pointDisk, readBytes.load(ordering: .relaxed))
    }

    /// True when `range` overlaps any of the sorted, disjoint `ranges`.
    static func overlaps(_ ranges: [Range<Int>], _ range: Range<Int>) -> Bool {
        let first = firstEnding(after: range.lowerBound, in: ranges)
        return first < ranges.count && ranges[first].lowerBound < range.upperBound
    }

    /// The parts of the sorted, disjoint `ranges` that lie inside `range`.
    static func dataRanges(_ ranges: [Range<Int>], overlapping range: Range<Int>) -> [Range<Int>] {
        var parts: [Range<Int>] = []
        var i = firstEnding(after: range.lowerBound, in: ranges)
        while i < ranges.count, ranges[i].lowerBound < range.upperBound {
            parts.append(max(ranges[i].lowerBound, range.lowerBound)..<min(ranges[i].upperBound, range.upperBound))
            i += 1
        }
        return parts
    }

    /// Index of the first range whose upper bound is past `offset` (binary search).
    private static func firstEnding(after offset: Int, in ranges: [Range<Int>]) -> Int {
        var low = 0, high = ranges.count
        while low < high {
            let mid = (low + high) / 2
            if ranges[mid].upperBound <= offset { low = mid + 1 } else { high = mid }
        }
        return low
    }
}

/// The chunk ids the repository has, shared by the backup workers.
final class ChunkSet: Sendable {
    private let ids: Mutex<Set<ChunkID>>

    init(_ ids: Set<ChunkID>) { self.ids = Mutex(ids) }

    /// Claims `id`; true when it was not there (the caller must then store it).
    func insert(_ id: ChunkID) -> Bool { ids.withLock { $0.insert(id).inserted } }

    func remove(_ id: ChunkID) { _ = ids.withLock { $0.remove(id) } }
}
