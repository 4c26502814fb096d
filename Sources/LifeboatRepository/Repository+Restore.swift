import Foundation
import LifeboatBase
import Synchronization
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// What restoring one disk did.
public struct RestoreResult: Sendable, Codable {
    public var disk: String
    public var path: String
    public var size: Int
    /// Bytes written to the target; for an existing target, only the chunks that differed.
    public var bytesWritten: Int
    /// True when the target existed and was updated in place.
    public var inPlace: Bool
}

extension Repository {
    /// Writes one disk of a recovery point to `path`.
    ///
    /// A new file is written under a temporary name with holes for zero chunks, then renamed.
    /// An existing file or block device of the same size is updated in place: every chunk is
    /// read and compared first, and only chunks that differ are written (failback relies on this).
    /// An existing regular file of another size is resized first.
    /// - Throws: `.damaged` naming the chunk and its disk offset when a chunk cannot be read back.
    public func restore(_ point: RecoveryPoint, disk: String, to path: String, progress: ProgressMeter = ProgressMeter()) throws -> RestoreResult {
        guard point.disks.contains(where: { $0.name == disk }) else {
            let names = point.disks.map(\.name).joined(separator: ", ")
            throw LifeboatError(.notFound, "recovery point \(point.id) of \(point.machine) has no disk \(disk): its disks are \(names)")
        }
        let index = try self.index(point, disk: disk)
        progress.start(total: index.diskSize)
        var st = stat()
        if stat(path, &st) == 0 {
            let kind = st.st_mode & S_IFMT
            guard kind == S_IFREG || kind == S_IFBLK else {
                throw LifeboatError(.invalidArgument, "restore target \(path) is neither a regular file nor a block device")
            }
            let file: PosixFile
            do { file = try PosixFile(path: path, flags: O_RDWR) } catch { throw LifeboatError.io(error, "cannot open restore target", path) }
            let size = try file.size()
            if size != index.diskSize {
                guard kind == S_IFREG else {
                    throw LifeboatError(.invalidArgument, "block device \(path) holds \(size) bytes but disk \(disk) needs \(index.diskSize): use a device of that size")
                }
                do { try file.truncate(to: index.diskSize) } catch { throw LifeboatError.io(error, "cannot resize", path) }
            }
            let target = FileTarget(file: file, direct: nil)
            let written = try write(index, disk: disk, path: path, compareFirst: true, progress: progress) { target }
            do { try file.sync() } catch { throw LifeboatError.io(error, "cannot sync", path) }
            return RestoreResult(disk: disk, path: path, size: index.diskSize, bytesWritten: written, inPlace: true)
        }
        let dir = FileSystem.parent(of: path)
        if !FileSystem.isDirectory(dir) {
            // Made with its parents, as restic makes its target; a path that exists and is not a
            // folder is refused.
            if FileSystem.exists(dir) {
                throw LifeboatError(.invalidArgument, "restore target \(dir) exists and is not a folder: give a folder, or a new path")
            }
            do { try FileSystem.makeDirectories(dir) } catch {
                throw LifeboatError(.io, "cannot create the restore folder \(dir) (\(error)): check the path and its permissions")
            }
        }
        let tmp = dir + "/" + FileSystem.temporaryName()
        do {
            let file = try PosixFile(path: tmp, flags: O_RDWR | O_CREAT | O_EXCL, mode: 0o600)
            do { try file.truncate(to: index.diskSize) } catch { throw LifeboatError.io(error, "cannot create", path) }
            // Whole chunks go around the page cache: no copy into it, no lock on the file held
            // during that copy (two workers spun on it), and nothing left to flush at the end.
            // A file system without O_DIRECT (tmpfs) gets buffered writes.
            let direct = try? PosixFile(path: tmp, flags: O_WRONLY | O_DIRECT)
            let target = FileTarget(file: file, direct: direct)
            let written = try write(index, disk: disk, path: path, compareFirst: false, progress: progress) { target }
            do { try file.sync() } catch { throw LifeboatError.io(error, "cannot sync", path) }
            try FileSystem.rename(tmp, path)
            return RestoreResult(disk: disk, path: path, size: index.diskSize, bytesWritten: written, inPlace: false)
        } catch {
            unlink(tmp)
            throw LifeboatError.io(error, "cannot write", path)
        }
    }

    /// Writes one disk of a point through a `BlockWriter` of another kind than a file: an NBD
    /// export of an image in its own format (failback into a qcow2 original). Every chunk is read
    /// and compared first: only chunks that differ are written.
    /// - Parameters:
    ///   - size: the target's size in guest bytes: it must be the disk's.
    ///   - open: a writer for one worker thread.
    public func restore(_ point: RecoveryPoint, disk: String, through open: @escaping @Sendable () throws -> any BlockWriter,
                        size: Int, describedAs path: String, progress: ProgressMeter = ProgressMeter()) throws -> RestoreResult {
        guard point.disks.contains(where: { $0.name == disk }) else {
            throw LifeboatError(.notFound, "recovery point \(point.id) of \(point.machine) has no disk \(disk)")
        }
        let index = try self.index(point, disk: disk)
        guard size == index.diskSize else {
            throw LifeboatError(.invalidArgument, "\(path) holds \(size) guest bytes but disk \(disk) needs \(index.diskSize): resize it (qemu-img resize) first")
        }
        progress.start(total: index.diskSize)
        let written = try write(index, disk: disk, path: path, compareFirst: true, progress: progress, open: open)
        return RestoreResult(disk: disk, path: path, size: index.diskSize, bytesWritten: written, inPlace: true)
    }

    /// - Parameter open: the target for one worker thread (a file is shared; an NBD export gets a connection each).
    private func write(_ index: DiskIndex, disk: String, path: String, compareFirst: Bool, progress: ProgressMeter,
                       open: @escaping @Sendable () throws -> any BlockWriter) throws -> Int {
        let written = Atomic<Int>(0)
        // From a bucket: chunks in pack order, neighbours fetched together (`readRuns`), each
        // written wherever the disk has it; holes last. Elsewhere: chunk by chunk, in disk order.
        let runs = compareFirst ? nil : store.readRuns(index.ids)
        var positions: [ChunkID: [Int]] = [:]
        if runs != nil { for (i, id) in index.ids.enumerated() { positions[id, default: []].append(i) } }
        // (Runs hold up to 16 MiB each twice over while they are split: four at a time.)
        let work = ParallelWork(count: runs.map { $0.count + 1 } ?? index.ids.count, threads: runs == nil ? Self.directReadWorkers : 4)
        let codec = self.codec, store = self.store, references = self.references
        try work.run { [positions] work in
            let current = UnsafeMutableRawBufferPointer.allocate(byteCount: index.chunkSize, alignment: 4096)
            let wanted = UnsafeMutableRawBufferPointer.allocate(byteCount: index.chunkSize, alignment: 4096)
            // Stored chunks are read once each: around the page cache (room for one more block,
            // so that a chunk that fills it whole is told from a damaged, longer one).
            let storedSize = (codec.scratchSize(chunkSize: index.chunkSize) + 4096) / 4096 * 4096
            let stored = UnsafeMutableRawBufferPointer.allocate(byteCount: storedSize, alignment: 4096)
            defer { current.deallocate(); wanted.deallocate(); stored.deallocate() }
            let file = try open()
            /// Writes chunk `i` of the disk (its stored bytes `fetched` when a run brought them).
            func one(_ i: Int, fetched: [UInt8]?) throws {
                let offset = i * index.chunkSize
                let length = index.length(ofChunk: i)
                let id = index.ids[i]
                var moved = !id.isZero
                defer { progress.add(length, data: moved) }
                if compareFirst {
                    let have = UnsafeMutableRawBufferPointer(rebasing: current[0..<length])
                    do { _ = try file.read(into: have, at: offset) } catch { throw LifeboatError.io(error, "cannot read", path) }
                    let matches = id.isZero ? UnsafeRawBufferPointer(have).isAllZero : codec.id(of: UnsafeRawBufferPointer(have)) == id
                    if matches { moved = false; return }
                } else if id.isZero {
                    return  // a hole in the new file
                }
                let out = UnsafeMutableRawBufferPointer(rebasing: wanted[0..<length])
                if id.isZero {
                    out.initializeMemory(as: UInt8.self, repeating: 0)
                } else {
                    do {
                        let n: Int
                        if let fetched {
                            n = try fetched.withUnsafeBytes { try codec.decode($0, id: id, into: out, references: references) }
                        } else {
                            let storedLength = try store.readDirect(id, into: stored)
                            n = try codec.decode(UnsafeRawBufferPointer(rebasing: stored[0..<storedLength]), id: id, into: out, references: references)
                        }
                        guard n == length else { throw LifeboatError(.damaged, "chunk \(id.hex) has the wrong length") }
                    } catch let error as LifeboatError {
                        throw LifeboatError(.damaged, "\(error.message) (disk \(disk) at offset \(offset)); nothing wrong was written: try another point")
                    }
                }
                do { try file.write(UnsafeRawBufferPointer(out), at: offset) } catch { throw LifeboatError.io(error, "cannot write", path) }
                written.add(length, ordering: .relaxed)
            }
            while let w = work.take() {
                guard let runs else { try one(w, fetched: nil); continue }
                guard w < runs.count else {
                    for i in positions[ChunkID.zero] ?? [] { try one(i, fetched: nil) }
                    continue
                }
                let fetched = try store.fetchRun(runs[w])
                for id in runs[w] {
                    for i in positions[id] ?? [] { try one(i, fetched: fetched[id]) }
                }
            }
            do { try file.flush() } catch { throw LifeboatError.io(error, "cannot flush", path) }
        }
        return written.load(ordering: .relaxed)
    }
}

/// Where a restore writes, one per worker thread: a file, a block device, an NBD export.
public protocol BlockWriter: BlockReader {
    /// Writes all of `buffer` at `offset`.
    func write(_ buffer: UnsafeRawBufferPointer, at offset: Int) throws
    /// Makes every write so far durable (a file is synced by the caller: nothing to do).
    func flush() throws
}

extension BlockWriter {
    public func flush() throws {}
}

/// A file or block device as a restore target; whole 4 KiB blocks go through `direct` (the same
/// file opened with O_DIRECT) when there is one.
final class FileTarget: BlockWriter, @unchecked Sendable {
    // @unchecked: pread and pwrite on shared descriptors are safe from any thread.
    let file: PosixFile
    let direct: PosixFile?

    init(file: PosixFile, direct: PosixFile?) {
        self.file = file
        self.direct = direct
    }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int) throws -> Int {
        try file.read(into: buffer, at: offset)
    }

    func write(_ buffer: UnsafeRawBufferPointer, at offset: Int) throws {
        try (buffer.count % 4096 == 0 ? direct ?? file : file).write(buffer, at: offset)
    }
}
