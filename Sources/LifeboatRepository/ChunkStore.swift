#if canImport(Glibc)
import Glibc
#endif
import LifeboatBase
import SystemPackage
import Foundation
import Synchronization

/// Where stored chunks live. The local directory store is the only one today; the protocol is
/// the seam for shared or object storage later.
protocol ChunkStore: Sendable {
    func contains(_ id: ChunkID) -> Bool
    /// Every stored chunk id; also removes temporary files left by dead writers.
    func all() throws -> Set<ChunkID>
    /// Stores a chunk under its id. Visible only once whole; not yet durable (see `sync`).
    func write(_ id: ChunkID, _ bytes: UnsafeRawBufferPointer) throws
    func read(_ id: ChunkID) throws -> [UInt8]
    /// Reads a chunk into `buffer` (4 KiB-aligned, its size a multiple of 4 KiB, at least the
    /// chunk's size), around the page cache where the file system allows; returns its length.
    /// For reads of many chunks once (restore): no copy into the page cache and out again.
    func readDirect(_ id: ChunkID, into buffer: UnsafeMutableRawBufferPointer) throws -> Int
    /// Opens a stored chunk for reading parts of it.
    func open(_ id: ChunkID) throws -> PosixFile
    /// Removes a chunk; returns the bytes it took.
    func remove(_ id: ChunkID) throws -> Int
    /// Makes every chunk written so far durable.
    func sync() throws
    /// Writes a new version of a stored chunk (the same plaintext, encoded anew) under a
    /// temporary name; returns that name for `replace`. Not yet durable.
    func stage(_ id: ChunkID, _ bytes: UnsafeRawBufferPointer) throws -> String
    /// Puts a staged version in place of the chunk, in one step: readers see the old or the new file.
    func replace(_ id: ChunkID, with staged: String) throws
    /// Bytes `range` of a stored chunk `storedSize` bytes long, when the store fetches a part for
    /// less than the whole chunk (a bucket: a range GET of one frame); nil: read it from `open`.
    func readPart(_ id: ChunkID, _ range: Range<Int>, storedSize: Int) throws -> [UInt8]?
    /// Gets chunks a sequential reader will want next, the way the store does that best. Best effort.
    func fetchAhead(_ ids: [ChunkID])
    /// The distinct chunks of `ids` (not holes) in the order to read them, in runs that one
    /// request fetches (`fetchRun`), for a store that reads neighbours together (a bucket's
    /// packs); nil: read them one at a time, in their order.
    func readRuns(_ ids: [ChunkID]) -> [[ChunkID]]?
    /// The stored bytes of the chunks of one run of `readRuns` (those it leaves out are read one by one).
    func fetchRun(_ ids: [ChunkID]) throws -> [ChunkID: [UInt8]]
    /// Drops a copy the store keeps of a chunk that did not decode (a cache's), so that the next
    /// read gets it from where it lives; false when there is no such copy (the chunk is damaged).
    func forget(_ id: ChunkID) -> Bool
}

extension ChunkStore {
    func readPart(_ id: ChunkID, _ range: Range<Int>, storedSize: Int) throws -> [UInt8]? { nil }
    func fetchAhead(_ ids: [ChunkID]) {}
    func readRuns(_ ids: [ChunkID]) -> [[ChunkID]]? { nil }
    func fetchRun(_ ids: [ChunkID]) throws -> [ChunkID: [UInt8]] { [:] }
    func forget(_ id: ChunkID) -> Bool { false }
}

/// `chunks/ab/abcd…`: one file per chunk, in 256 folders by the first byte of the id.
final class LocalChunkStore: ChunkStore {
    let root: String

    init(root: String) { self.root = root }

    static func create(root: String) throws {
        try FileSystem.makeDirectory(root)
        for i in 0..<256 { try FileSystem.makeDirectory(root + "/" + hexByte(i)) }
    }

    private static func hexByte(_ i: Int) -> String {
        let s = String(i, radix: 16)
        return s.count == 1 ? "0" + s : s
    }

    func path(_ id: ChunkID) -> String {
        let hex = id.hex
        return root + "/" + hex.prefix(2) + "/" + hex
    }

    func contains(_ id: ChunkID) -> Bool { FileSystem.exists(path(id)) }

    func all() throws -> Set<ChunkID> {
        var ids = Set<ChunkID>()
        for i in 0..<256 {
            let dir = root + "/" + Self.hexByte(i)
            for name in try FileSystem.list(dir) {
                if let id = ChunkID(hex: name) {
                    ids.insert(id)
                } else if FileSystem.isStaleTemporary(name) {
                    FileSystem.remove(dir + "/" + name)
                }
            }
        }
        return ids
    }

    /// False once the file system refused O_TMPFILE (NFS, say): chunks go through temporary names.
    private let unnamedFiles = Atomic<Bool>(true)

    /// The chunk is written into an unnamed file in its folder and linked under its id once whole:
    /// a killed writer leaves nothing behind, so a point need not look for dead writers' files.
    func write(_ id: ChunkID, _ bytes: UnsafeRawBufferPointer) throws {
        let final = path(id)
        if unnamedFiles.load(ordering: .relaxed) {
            do {
                let file = try PosixFile(path: FileSystem.parent(of: final), flags: O_TMPFILE | O_WRONLY, mode: 0o600)
                try file.write(bytes, at: 0)
                file.startWriteback()
                // The same chunk stored meanwhile by another writer is the same bytes: done either way.
                if linkat(AT_FDCWD, "/proc/self/fd/\(file.fd)", AT_FDCWD, final, AT_SYMLINK_FOLLOW) != 0 && errno != EEXIST {
                    throw Errno(rawValue: errno)
                }
                return
            } catch let error as Errno where [.notSupported, .isDirectory, .invalidArgument].contains(error) {
                unnamedFiles.store(false, ordering: .relaxed)
            } catch {
                throw LifeboatError.io(error, "cannot write chunk", final)
            }
        }
        try replace(id, with: try stage(id, bytes))
    }

    func stage(_ id: ChunkID, _ bytes: UnsafeRawBufferPointer) throws -> String {
        let tmp = FileSystem.parent(of: path(id)) + "/" + FileSystem.temporaryName()
        do {
            let file = try PosixFile(path: tmp, flags: O_WRONLY | O_CREAT | O_EXCL, mode: 0o600)
            try file.write(bytes, at: 0)
            file.startWriteback()
        } catch {
            unlink(tmp)
            throw LifeboatError.io(error, "cannot write chunk", tmp)
        }
        return tmp
    }

    func replace(_ id: ChunkID, with staged: String) throws {
        do { try FileSystem.rename(staged, path(id)) } catch {
            unlink(staged)
            throw error
        }
    }

    /// False once the file system refused O_DIRECT (tmpfs, say).
    private let directReads = Atomic<Bool>(true)

    func readDirect(_ id: ChunkID, into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        let path = path(id)
        var length: Int? = nil
        if directReads.load(ordering: .relaxed) {
            do {
                length = try PosixFile(path: path, flags: O_RDONLY | O_DIRECT).read(into: buffer, at: 0)
            } catch let error as Errno where error == .invalidArgument {
                directReads.store(false, ordering: .relaxed)   // through the page cache from now on
            } catch let error as Errno where error == .noSuchFileOrDirectory {
                throw LifeboatError(.damaged, "chunk \(id.hex) is missing from the repository (\(path))")
            } catch {
                throw LifeboatError.io(error, "cannot read chunk", path)
            }
        }
        if length == nil {
            let file = try open(id)
            do { length = try file.read(into: buffer, at: 0) } catch { throw LifeboatError.io(error, "cannot read chunk", path) }
        }
        guard let length, length < buffer.count else { throw LifeboatError(.damaged, "chunk \(id.hex) is damaged: longer than a chunk") }
        return length
    }

    func read(_ id: ChunkID) throws -> [UInt8] {
        do { return try open(id).readAll() } catch let error as LifeboatError { throw error } catch {
            throw LifeboatError.io(error, "cannot read chunk", path(id))
        }
    }

    func open(_ id: ChunkID) throws -> PosixFile {
        let path = path(id)
        do {
            return try PosixFile(path: path, flags: O_RDONLY)
        } catch {
            if (error as? Errno) == .noSuchFileOrDirectory {
                throw LifeboatError(.damaged, "chunk \(id.hex) is missing from the repository (\(path))")
            }
            throw LifeboatError.io(error, "cannot read chunk", path)
        }
    }

    func remove(_ id: ChunkID) throws -> Int {
        let path = path(id)
        var st = stat()
        let size = lstat(path, &st) == 0 ? Int(st.st_blocks) * 512 : 0
        if unlink(path) != 0 && errno != ENOENT {
            throw LifeboatError.io(Errno(rawValue: errno), "cannot remove chunk", path)
        }
        return size
    }

    func sync() throws {
        do {
            try PosixFile(path: root, flags: O_RDONLY | O_DIRECTORY).syncFileSystem()
        } catch {
            throw LifeboatError.io(error, "cannot sync", root)
        }
    }
}
