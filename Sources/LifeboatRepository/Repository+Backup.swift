import Foundation
import LifeboatBase
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
        try requireLocal("backup")
        let machine = try self.machine(name)
        let chunkSize = self.chunkSize(of: machine)
        progress.setLimit((machine.bandwidth ?? 0) << 20)
        return try writePoint(name, chunkSize: chunkSize, now: now) { previous, known, staging, id in
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
            var disks: [PointDisk] = []
            var consistent = true
            var bytesRead = 0
            for source in sources {
                let before = try? source.file.stat()
                let file = source.file
                let dataRanges = file.dataRanges(size: source.size)
                file.advise(sequential: true)
                // Read ahead of the workers so that they rarely wait for the disk; only data is
                // read ahead: asking for a hole would fill the page cache with zeros.
                let prefetch: @Sendable (Range<Int>) -> Void = { range in
                    guard let dataRanges else { return file.prefetch(range) }
                    for data in Self.dataRanges(dataRanges, overlapping: range) { file.prefetch(data) }
                }
                // Read around the page cache where the file system allows: no copy into it, no
                // page allocated per 4 KiB; the disk then needs several reads in flight at once,
                // which more workers than cores give (they wait for the disk, not for a core).
                let direct = try? PosixFile(path: source.disk.path, flags: O_RDONLY | O_DIRECT)
                let input = ChunkInput(size: source.size, ranges: dataRanges, base: nil, prefetch: direct == nil ? prefetch : nil,
                                       openReader: { FileReader(file: file, direct: direct, path: source.disk.path) },
                                       workers: direct == nil ? nil : Self.directReadWorkers)
                let (index, disk, read) = try backupDisk(source.disk.name, path: source.disk.path, input: input, chunkSize: chunkSize,
                                                         known: known, progress: progress)
                let after = try? source.file.stat()
                if let before, let after, (before.st_mode & S_IFMT) == S_IFREG,
                   before.st_mtim.tv_sec != after.st_mtim.tv_sec || before.st_mtim.tv_nsec != after.st_mtim.tv_nsec
                    || before.st_size != after.st_size {
                    consistent = false
                }
                disks.append(disk)
                bytesRead += read
                try writeDiskFiles(index, disk: disk.name, machine: name, previous: previous, id: id, into: staging)
            }
            return PointDraft(disks: disks, bytesRead: bytesRead, consistency: consistent ? "consistent" : "changed-during-backup")
        }
    }

    /// Takes a recovery point from disks read through `BlockReader`s (a libvirt backup's NBD
    /// exports, say), reading only each capture's `ranges`: the chunks they do not touch come
    /// from the capture's `base` index (the previous point: changed-block tracking) or are holes.
    /// Same guarantees as `backup`: nothing is visible until everything is durable.
    /// - Parameters:
    ///   - details: what the point says of itself (consistency, how it was read and why).
    ///   - checkBeforeCommit: called after every chunk is read and before the point is made
    ///     visible; throwing there (the source's job vanished, say) leaves no point.
    public func backup(_ name: String, captures: [DiskCapture], details: PointDetails, progress: ProgressMeter = ProgressMeter(),
                       now: Date = Date(), checkBeforeCommit: () throws -> Void = {}) throws -> RecoveryPoint {
        try requireLocal("backup")
        let machine = try self.machine(name)
        let chunkSize = self.chunkSize(of: machine)
        progress.setLimit((machine.bandwidth ?? 0) << 20)
        return try writePoint(name, chunkSize: chunkSize, now: now) { previous, known, staging, id in
            progress.start(total: captures.reduce(0) { $0 + $1.size })
            var disks: [PointDisk] = []
            var bytesRead = 0
            for capture in captures {
                if let base = capture.base, base.chunkSize != chunkSize || base.diskSize != capture.size {
                    throw LifeboatError(.invalidArgument, "the base index of disk \(capture.name) does not match its size: take a full point")
                }
                let input = ChunkInput(size: capture.size, ranges: capture.ranges, base: capture.base, prefetch: nil,
                                       openReader: capture.openReader)
                let (index, disk, read) = try backupDisk(capture.name, path: capture.origin, input: input, chunkSize: chunkSize,
                                                         known: known, progress: progress)
                Trace.mark("disk \(capture.name) read")
                disks.append(disk)
                bytesRead += read
                try writeDiskFiles(index, disk: disk.name, machine: name, previous: previous, id: id, into: staging)
            }
            try checkBeforeCommit()
            var draft = PointDraft(disks: disks, bytesRead: bytesRead, consistency: details.consistency)
            draft.details = details
            return draft
        }
    }

    /// What a point's disks came to, before the point is written.
    struct PointDraft {
        var disks: [PointDisk]
        var bytesRead: Int
        var consistency: String
        var details: PointDetails? = nil
    }

    /// The locking, staging and commit every point shares: `makeDisks` writes the indexes into
    /// `staging`; the point becomes visible only once every chunk and index is durable.
    private func writePoint(_ name: String, chunkSize: Int, now: Date,
                            makeDisks: (_ previous: RecoveryPoint?, _ known: ChunkSet, _ staging: String, _ id: String) throws -> PointDraft) throws -> RecoveryPoint {
        let started = Date()   // (the callers have read the machine: it exists)
        let machineLock = try FileLock.exclusive(machinePath(name) + "/backup.lock") {
            "a backup of machine \(name) is already running\($0): wait for it to finish"
        }
        let repoLock = try repositoryLock(.shared, wait: true)
        try upgradeFormat()
        let previous = try points(name).last
        let known = ChunkSet(store: store)
        Trace.mark("locks, previous point, known chunks")
        let pointsDir = pointsPath(name)
        let staging = pointsDir + "/" + FileSystem.temporaryName()
        // Chosen before the disks are read: a sealed manifest is bound to its point's name.
        // (Never the id of a pruned point: its note would excuse this one's deletion.)
        let pruned = (try? FileSystem.list(machinePath(name) + "/pruned")) ?? []
        let id = Self.pointID(for: now, existing: Set(try FileSystem.list(pointsDir) + pruned))
        try FileSystem.makeDirectory(staging)
        do {
            var draft = try makeDisks(previous, known, staging, id)
            Trace.mark("disks read and stored")
            for index in draft.disks.indices {
                if let old = previous?.disks.first(where: { $0.name == draft.disks[index].name }), old.size != draft.disks[index].size {
                    draft.disks[index].previousSize = old.size
                }
            }
            var point = RecoveryPoint(
                id: id, machine: name, time: now,
                consistency: draft.consistency, parent: previous?.id,
                chunkSize: chunkSize, disks: draft.disks, bytesRead: draft.bytesRead,
                seconds: Date().timeIntervalSince(started))
            if let details = draft.details {
                point.readMode = details.readMode
                point.note = details.note
                point.checkpoint = details.checkpoint
                point.domainUUID = details.domainUUID
                point.hardware = details.hardware
                for (file, bytes) in details.attachments.sorted(by: { $0.key < $1.key }) {
                    try writeFile(try codec.sealFile(bytes, name: "\(name)/\(point.id)/\(file)"), staging + "/" + file)
                }
            }
            try writeFile(try sealManifest(Array(try JSONEncoder.lifeboat.encode(point)), name: "machines/\(name)/points/\(id)/point.json"),
                          staging + "/point.json")
            try store.sync()  // every chunk the point names is durable before the point is visible
            Trace.mark("synced")
            try FileSystem.rename(staging, pointsDir + "/" + point.id)
            try FileSystem.syncDirectory(pointsDir)
            withExtendedLifetime((machineLock, repoLock)) {}
            return point
        } catch {
            FileSystem.removeTree(staging)
            throw error
        }
    }

    /// Writes a disk's index and its layouts file (entries for the chunks the parent's file
    /// described are taken from it) into a point being assembled.
    private func writeDiskFiles(_ index: DiskIndex, disk: String, machine: String, previous: RecoveryPoint?,
                                id: String, into staging: String) throws {
        try writeFile(try sealManifest(index.encoded(), name: indexName(machine, id, disk: disk)), staging + "/" + disk + ".idx")
        Trace.mark("disk \(disk): index written")
        let carried = previous.map { storedTables(layoutsName(machine, $0.id, disk: disk)) } ?? []
        try writeLayouts(of: index.distinctIDs(limit: DiskLayouts.limit), carrying: carried,
                         name: layoutsName(machine, id, disk: disk), at: staging + "/" + disk + ".layouts")
        Trace.mark("disk \(disk): layouts written (\(carried.count) carried from the parent point)")
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

    /// Where `backupDisk` gets a disk's bytes.
    struct ChunkInput {
        var size: Int
        /// Sorted, disjoint byte ranges that hold data (nil: all of it); chunks overlapping none
        /// come from `base` or are holes.
        var ranges: [Range<Int>]?
        var base: DiskIndex?
        /// Called with the byte range the workers will need next (files: read ahead).
        var prefetch: (@Sendable (Range<Int>) -> Void)?
        var openReader: @Sendable () throws -> any BlockReader
        /// Worker threads (nil: one more than cores).
        var workers: Int? = nil
    }

    /// Workers of a backup that reads with O_DIRECT: eight 1 MiB reads in flight read this
    /// host's disk at 1.4 GB/s where three read at 0.36 GB/s (fio, cold), and compression keeps
    /// the cores busy meanwhile.
    static let directReadWorkers = max(8, System.coreCount + 1)

    private func backupDisk(_ name: String, path: String, input: ChunkInput, chunkSize: Int, known: ChunkSet,
                            progress: ProgressMeter) throws -> (DiskIndex, PointDisk, Int) {
        let size = input.size
        let count = DiskIndex.chunkCount(diskSize: size, chunkSize: chunkSize)
        let dataRanges = input.ranges
        let base = input.base
        let ids = SlotArray(count: count, initial: ChunkID.zero)
        let newBytes = Atomic<Int>(0), storedBytes = Atomic<Int>(0), dataBytes = Atomic<Int>(0), readBytes = Atomic<Int>(0)
        let work = ParallelWork(count: count, threads: input.workers)
        let codec = self.codec, store = self.store, references = self.references
        let window = 32 << 20
        let chunksPerWindow = max(1, window / chunkSize)
        let prefetch = input.prefetch
        prefetch?(0..<min(size, window))
        let openReader = input.openReader
        try work.run { work in
            let reader = try openReader()
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: chunkSize, alignment: 4096)
            let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: codec.scratchSize(chunkSize: chunkSize), alignment: 64)
            defer { buffer.deallocate(); scratch.deallocate() }
            while let i = work.take() {
                let offset = i * chunkSize
                let length = min(chunkSize, size - offset)
                var moved = 0   // bytes read for this chunk: they count against the machine's bandwidth
                defer {
                    readBytes.add(moved, ordering: .relaxed)
                    progress.add(length, moved: moved)
                }
                if let prefetch, i % chunksPerWindow == 0, offset + window < size {
                    prefetch((offset + window)..<min(size, offset + 2 * window))
                }
                if let dataRanges, !Self.overlaps(dataRanges, offset..<(offset + length)) {
                    // Unchanged since the base point (or never written): reuse its chunk.
                    if let base, base.ids[i] != ChunkID.zero {
                        ids[i] = base.ids[i]
                        dataBytes.add(length, ordering: .relaxed)
                    }
                    continue
                }
                let chunk = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<length])
                let parts = dataRanges.map { Self.dataRanges($0, overlapping: offset..<(offset + length)) }
                if let parts, let base, !base.ids[i].isZero, parts.reduce(0, { $0 + $1.count }) < length {
                    // Changed-block tracking touched part of a chunk the base point holds: only the
                    // frames it touched are read, hashed and compressed; the others are the stored ones.
                    let patched = try Self.patch(base.ids[i], parts: parts, offset: offset, chunk: chunk, reader: reader,
                                                 codec: codec, store: store, known: known, scratch: scratch, references: references)
                    moved = patched.read
                    guard let id = patched.id else { continue }
                    ids[i] = id
                    dataBytes.add(length, ordering: .relaxed)
                    if let stored = patched.stored {
                        newBytes.add(length, ordering: .relaxed)
                        storedBytes.add(stored, ordering: .relaxed)
                    }
                    continue
                }
                if let parts, parts.reduce(0, { $0 + $1.count }) < length {
                    // Only part of the chunk is to be read: the rest is what the base point holds
                    // there (changed-block tracking: unchanged blocks), or zeros (unallocated).
                    if let base, !base.ids[i].isZero {
                        let id = base.ids[i]
                        let n = try store.read(id).withUnsafeBytes { try codec.decode($0, id: id, into: chunk, references: references) }
                        guard n == length else { throw LifeboatError(.damaged, "chunk \(id.hex) of the previous point has the wrong length: take a full point") }
                    } else {
                        chunk.initializeMemory(as: UInt8.self, repeating: 0)
                    }
                    for part in parts {
                        let piece = UnsafeMutableRawBufferPointer(rebasing: chunk[(part.lowerBound - offset)..<(part.upperBound - offset)])
                        let n = try reader.read(into: piece, at: part.lowerBound)
                        moved += n
                        guard n == piece.count else {
                            throw LifeboatError(.io, "disk \(path) shrank while being read: take the backup again")
                        }
                    }
                } else {
                    let n = try reader.read(into: chunk, at: offset)
                    moved = n
                    guard n == length else {
                        throw LifeboatError(.io, "disk \(path) shrank while being read: take the backup again")
                    }
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
        let pointDisk = PointDisk(name: name, path: path, size: size,
                                  dataBytes: dataBytes.load(ordering: .relaxed), newBytes: newBytes.load(ordering: .relaxed),
                                  storedBytes: storedBytes.load(ordering: .relaxed), previousSize: nil)
        return (index, pointDisk, readBytes.load(ordering: .relaxed))
    }

    /// The chunk at `offset` made from the stored chunk `baseID` with `parts` (absolute byte
    /// ranges inside it) read anew: the frames they touch are decoded, overwritten, hashed and
    /// compressed; the others keep their stored bytes and digests. Returns the new id (nil when
    /// the chunk is now all zeros: a hole), the bytes read, and the stored size when it was new.
    static func patch(_ baseID: ChunkID, parts: [Range<Int>], offset: Int, chunk: UnsafeMutableRawBufferPointer,
                      reader: any BlockReader, codec: ChunkCodec, store: any ChunkStore, known: ChunkSet,
                      scratch: UnsafeMutableRawBufferPointer, references: ReferenceReader?) throws -> (id: ChunkID?, read: Int, stored: Int?) {
        let old = try store.read(baseID)
        return try old.withUnsafeBytes { stored in
            let layout = try codec.layout(stored, id: baseID, storedSize: stored.count)
            guard layout.rawLength == chunk.count else {
                throw LifeboatError(.damaged, "chunk \(baseID.hex) of the previous point has the wrong length: take a full point")
            }
            let frameSize = codec.frameSize
            var changed = [Bool](repeating: false, count: layout.frameCount)
            var covered = [Int](repeating: 0, count: layout.frameCount)
            for part in parts {
                for k in ((part.lowerBound - offset) / frameSize)...((part.upperBound - 1 - offset) / frameSize) {
                    changed[k] = true
                    let frame = (offset + k * frameSize)..<(offset + k * frameSize + layout.rawLength(ofFrame: k))
                    covered[k] += part.clamped(to: frame).count
                }
            }
            // A frame only partly rewritten keeps the rest of its old bytes.
            for k in changed.indices where changed[k] && covered[k] < layout.rawLength(ofFrame: k) {
                _ = try codec.decodeFrame(k, of: layout, stored: UnsafeRawBufferPointer(rebasing: stored[layout.storedRange(ofFrame: k)]),
                                          into: UnsafeMutableRawBufferPointer(rebasing: chunk[(k * frameSize)...]), references: references)
            }
            var read = 0
            for part in parts {
                let piece = UnsafeMutableRawBufferPointer(rebasing: chunk[(part.lowerBound - offset)..<(part.upperBound - offset)])
                let n = try reader.read(into: piece, at: part.lowerBound)
                read += n
                guard n == piece.count else { throw LifeboatError(.io, "a disk shrank while being read: take the point again") }
            }
            let data = UnsafeRawBufferPointer(chunk)
            var digests = layout.frames.map(\.digest)
            for k in changed.indices where changed[k] { digests[k] = codec.frameDigest(k, of: data) }
            let empty = digests.indices.allSatisfy { digests[$0] == codec.zeroDigest(length: layout.rawLength(ofFrame: $0)) }
            if empty { return (nil, read, nil) }
            let id = codec.id(ofDigests: digests)
            guard known.insert(id) else { return (id, read, nil) }
            let encoded = try codec.encode(patching: layout, stored: stored, data: data, changed: changed, id: id, digests: digests,
                                           scratch: scratch, references: references)
            do { try store.write(id, encoded) } catch {
                known.remove(id)
                throw error
            }
            return (id, read, encoded.count)
        }
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

/// Which chunks a point's workers must store, shared by them: a chunk is asked of the store
/// (one stat) the first time a worker meets it, so an incremental point costs nothing per chunk
/// the repository holds (listing a store of millions of chunks would take seconds).
final class ChunkSet: Sendable {
    private let claimed = Locked(Set<ChunkID>())
    private let store: any ChunkStore

    init(store: any ChunkStore) { self.store = store }

    /// Claims `id`; true when neither the store nor another worker has it (the caller must then store it).
    func insert(_ id: ChunkID) -> Bool {
        guard claimed.withLock({ $0.insert(id).inserted }) else { return false }
        return !store.contains(id)
    }

    /// Gives up a claim whose chunk could not be stored.
    func remove(_ id: ChunkID) { _ = claimed.withLock { $0.remove(id) } }
}

/// Reads a disk for a backup worker; each worker opens its own.
public protocol BlockReader: AnyObject {
    /// Reads `buffer.count` bytes at `offset`. - Returns: bytes read (fewer only at the end).
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int) throws -> Int
}

/// A disk to back up through a `BlockReader`, with the ranges to read.
public struct DiskCapture: Sendable {
    public var name: String
    /// Where it comes from, in words (recorded as the point disk's path).
    public var origin: String
    public var size: Int
    /// Sorted, disjoint byte ranges to read; chunks that overlap none come from `base` or are holes.
    public var ranges: [Range<Int>]
    /// The previous point's index of this disk (changed-block tracking), or nil.
    public var base: DiskIndex?
    public var openReader: @Sendable () throws -> any BlockReader

    public init(name: String, origin: String, size: Int, ranges: [Range<Int>], base: DiskIndex?,
                openReader: @escaping @Sendable () throws -> any BlockReader) {
        self.name = name
        self.origin = origin
        self.size = size
        self.ranges = ranges
        self.base = base
        self.openReader = openReader
    }
}

/// What a point taken from captures says of itself.
public struct PointDetails: Sendable {
    /// application-consistent, crash-consistent …
    public var consistency: String
    /// full or incremental
    public var readMode: String
    /// Why it was read that way, disks added or removed …
    public var note: String?
    /// The libvirt checkpoint taken at the point's instant (the base of the next incremental).
    public var checkpoint: String?
    public var domainUUID: String?
    /// The source domain's hardware, from its definition.
    public var hardware: MachineHardware?
    /// Files kept with the point, sealed like chunks: domain.xml (the definition), nvram (UEFI variables).
    public var attachments: [String: [UInt8]] = [:]

    public init(consistency: String, readMode: String, note: String? = nil, checkpoint: String? = nil, domainUUID: String? = nil) {
        self.consistency = consistency
        self.readMode = readMode
        self.note = note
        self.checkpoint = checkpoint
        self.domainUUID = domainUUID
    }
}

/// A disk file read with pread; through `direct` (the file opened with O_DIRECT) where offset,
/// length and buffer are 4 KiB-aligned, else through the page cache.
final class FileReader: BlockReader {
    let file: PosixFile
    let direct: PosixFile?
    let path: String

    init(file: PosixFile, direct: PosixFile? = nil, path: String) {
        self.file = file
        self.direct = direct
        self.path = path
    }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int) throws -> Int {
        var through = file
        if let direct, offset % 4096 == 0, buffer.count % 4096 == 0, Int(bitPattern: buffer.baseAddress) % 4096 == 0 { through = direct }
        do { return try through.read(into: buffer, at: offset) } catch {
            throw LifeboatError.io(error, "cannot read disk", path)
        }
    }
}
