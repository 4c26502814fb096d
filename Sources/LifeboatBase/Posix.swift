import Foundation
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

// The repository's one choke point for POSIX calls: every call retries EINTR and turns
// a failure into `Errno`, which callers wrap into a `LifeboatError` naming the path.

private let SEEK_DATA: CInt = 3  // <unistd.h> under _GNU_SOURCE, which Swift's Glibc module omits
private let SEEK_HOLE: CInt = 4

@_silgen_name("syncfs") private func c_syncfs(_ fd: CInt) -> CInt
/// Linux open flags Glibc's Swift overlay leaves out (they need _GNU_SOURCE): O_DIRECT (I/O
/// around the page cache) and O_TMPFILE (a file without a name until `linkat` gives it one).
#if arch(arm64)
package let O_DIRECT: CInt = 0o200000
#else
package let O_DIRECT: CInt = 0o40000
#endif
package let O_TMPFILE: CInt = 0o20000000 | O_DIRECTORY
@_silgen_name("sync_file_range") private func c_sync_file_range(_ fd: CInt, _ offset: Int64, _ count: Int64, _ flags: CUnsignedInt) -> CInt
private let SYNC_FILE_RANGE_WRITE: CUnsignedInt = 2

@inline(__always)
package func retryingErrno<T: FixedWidthInteger>(_ body: () -> T) throws -> T {
    while true {
        let result = body()
        if result >= 0 { return result }
        let code = Errno(rawValue: errno)
        if code == .interrupted { continue }
        throw code
    }
}

/// An open file descriptor that closes itself.
package final class PosixFile: @unchecked Sendable {
    // @unchecked: the descriptor is immutable after init; pread/pwrite on one fd are thread-safe.
    package let fd: CInt
    package let path: String

    package init(path: String, flags: CInt, mode: mode_t = 0o644) throws {
        self.path = path
        self.fd = try retryingErrno { open(path, flags | O_CLOEXEC, mode) }
    }

    deinit { close(fd) }

    package static func openForReading(_ path: String, what: String) throws -> PosixFile {
        do { return try PosixFile(path: path, flags: O_RDONLY) } catch {
            throw LifeboatError.io(error, "cannot open \(what)", path)
        }
    }

    /// Reads exactly `buffer.count` bytes at `offset` unless the file ends first; returns bytes read.
    package func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int) throws -> Int {
        var done = 0
        while done < buffer.count {
            let n = try retryingErrno {
                pread(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset + done))
            }
            if n == 0 { break }
            done += n
        }
        return done
    }

    package func write(_ buffer: UnsafeRawBufferPointer, at offset: Int) throws {
        var done = 0
        while done < buffer.count {
            let n = try retryingErrno {
                pwrite(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset + done))
            }
            done += n
        }
    }

    package func readAll() throws -> [UInt8] {
        let size = try self.size()
        return try [UInt8](filling: size) { try read(into: $0, at: 0) }
    }

    package func sync() throws { _ = try retryingErrno { fsync(fd) } }

    package func syncFileSystem() throws { _ = try retryingErrno { c_syncfs(fd) } }

    /// Starts writing the file's dirty pages back without waiting, so a later `syncfs` has
    /// little left to do. Best effort.
    package func startWriteback() { _ = c_sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE) }

    package func truncate(to size: Int) throws { _ = try retryingErrno { ftruncate(fd, off_t(size)) } }

    package func stat() throws -> Glibc.stat {
        var st = Glibc.stat()
        _ = try retryingErrno { fstat(fd, &st) }
        return st
    }

    /// Size in bytes; for block devices, the device size.
    package func size() throws -> Int {
        let st = try stat()
        if (st.st_mode & S_IFMT) == S_IFBLK {
            let end = try retryingErrno { lseek(fd, 0, SEEK_END) }
            return Int(end)
        }
        return Int(st.st_size)
    }

    /// The byte ranges holding data, from SEEK_DATA/SEEK_HOLE; `nil` when the file
    /// system cannot tell (then every byte counts as data).
    package func dataRanges(size: Int) -> [Range<Int>]? {
        var ranges: [Range<Int>] = []
        var offset = 0
        while offset < size {
            let start = lseek(fd, off_t(offset), SEEK_DATA)
            if start < 0 {
                if errno == ENXIO { break }  // no more data after offset
                return nil
            }
            let end = lseek(fd, start, SEEK_HOLE)
            if end < 0 { return nil }
            let upper = min(Int(end), size)
            if Int(start) < upper { ranges.append(Int(start)..<upper) }
            offset = Int(end)
        }
        return ranges
    }

    /// Asks the kernel to start reading `range` into the page cache now (does not wait).
    package func prefetch(_ range: Range<Int>) {
        _ = posix_fadvise(fd, off_t(range.lowerBound), off_t(range.count), POSIX_FADV_WILLNEED)
    }

    package func advise(sequential: Bool) {
        _ = posix_fadvise(fd, 0, 0, sequential ? POSIX_FADV_SEQUENTIAL : POSIX_FADV_RANDOM)
    }
}

package enum FileSystem {
    package static func exists(_ path: String) -> Bool { access(path, F_OK) == 0 }

    /// The bytes of a small file, or nil when it cannot be read.
    package static func contents(_ path: String) -> [UInt8]? {
        try? PosixFile(path: path, flags: O_RDONLY).readAll()
    }

    /// Refuses, in one line naming `what` and what to do, a disk path that is missing, a folder,
    /// neither a file nor a block device, or unreadable. - Returns: true for a block device.
    @discardableResult
    package static func checkDisk(_ path: String, what: String = "disk") throws -> Bool {
        var st = stat()
        guard stat(path, &st) == 0 else {
            throw LifeboatError(.notFound, "\(what) \(path) does not exist: give the path of an image file (raw or qcow2) or a block device")
        }
        let kind = st.st_mode & S_IFMT
        if kind == S_IFDIR {
            throw LifeboatError(.invalidArgument, "\(what) \(path) is a directory: give an image file (raw or qcow2) or a block device")
        }
        guard kind == S_IFREG || kind == S_IFBLK else {
            throw LifeboatError(.invalidArgument, "\(what) \(path) is neither a regular file nor a block device")
        }
        guard access(path, R_OK) == 0 else {
            throw LifeboatError(.io, "\(what) \(path) is not readable: run as root or fix its permissions")
        }
        return kind == S_IFBLK
    }

    package static func isBlockDevice(_ path: String) -> Bool {
        var st = stat()
        return stat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFBLK
    }

    package static func isDirectory(_ path: String) -> Bool {
        var st = stat()
        return stat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFDIR
    }

    package static func makeDirectory(_ path: String, mode: mode_t = 0o700) throws {
        if mkdir(path, mode) != 0 && errno != EEXIST {
            throw LifeboatError.io(Errno(rawValue: errno), "cannot create directory", path)
        }
    }

    package static func makeDirectories(_ path: String) throws {
        var current = path.hasPrefix("/") ? "" : "."
        for part in path.split(separator: "/") {
            current += "/" + part
            if !isDirectory(current) { try makeDirectory(current, mode: 0o755) }
        }
    }

    /// Names in a directory, without "." and "..".
    package static func list(_ path: String) throws -> [String] {
        guard let dir = opendir(path) else {
            throw LifeboatError.io(Errno(rawValue: errno), "cannot list", path)
        }
        defer { closedir(dir) }
        var names: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(cString: raw.bindMemory(to: CChar.self).baseAddress!)
            }
            if name != "." && name != ".." { names.append(name) }
        }
        return names
    }

    package static func syncDirectory(_ path: String) throws {
        do {
            let dir = try PosixFile(path: path, flags: O_RDONLY | O_DIRECTORY)
            try dir.sync()
        } catch {
            throw LifeboatError.io(error, "cannot sync directory", path)
        }
    }

    package static func rename(_ from: String, _ to: String) throws {
        if Glibc.rename(from, to) != 0 {
            throw LifeboatError.io(Errno(rawValue: errno), "cannot rename \(from) to", to)
        }
    }

    package static func remove(_ path: String) { unlink(path) }

    /// Removes a directory tree (no symlink following). Errors are ignored: used for clean-up.
    package static func removeTree(_ path: String) {
        var st = stat()
        guard lstat(path, &st) == 0 else { return }
        if (st.st_mode & S_IFMT) == S_IFDIR {
            for name in (try? list(path)) ?? [] { removeTree(path + "/" + name) }
            rmdir(path)
        } else {
            unlink(path)
        }
    }

    /// Writes `bytes` to `path` atomically: temporary name, fsync, rename, fsync of the directory.
    /// - Parameter durable: false for a cache's files: no fsync (after a crash a file may be
    ///   there short or empty; its reader checks its length).
    package static func writeAtomically(_ bytes: [UInt8], to path: String, syncDirectory: Bool = true, durable: Bool = true) throws {
        let dir = parent(of: path)
        let tmp = dir + "/" + temporaryName()
        do {
            let file = try PosixFile(path: tmp, flags: O_WRONLY | O_CREAT | O_EXCL, mode: 0o600)
            try bytes.withUnsafeBytes { raw in try file.write(raw, at: 0) }
            if durable { try file.sync() }
        } catch {
            unlink(tmp)
            throw LifeboatError.io(error, "cannot write", path)
        }
        do { try rename(tmp, path) } catch { unlink(tmp); throw error }
        if syncDirectory { try FileSystem.syncDirectory(dir) }
    }

    package static func parent(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        return slash == path.startIndex ? "/" : String(path[..<slash])
    }

    /// `.tmp-PID-RANDOM`: the PID lets clean-up tell a live writer's files from a dead one's.
    package static func temporaryName() -> String {
        ".tmp-\(getpid())-\(String(UInt64.random(in: 0...UInt64.max), radix: 36))"
    }

    /// True for a temporary name whose writing process is gone.
    package static func isStaleTemporary(_ name: String) -> Bool {
        guard name.hasPrefix(".tmp-") else { return false }
        let parts = name.split(separator: "-")
        guard parts.count >= 3, let pid = pid_t(parts[1]) else { return true }
        if pid == getpid() { return false }
        return !isRunning(pid)
    }

    /// True when process `pid` exists and is not a zombie (a dead process that nobody reaped:
    /// where PID 1 does not reap orphans, a killed daemon stays one).
    package static func isRunning(_ pid: pid_t) -> Bool {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8) else {
            return kill(pid, 0) == 0 || errno == EPERM   // no /proc: ask the kernel
        }
        guard let close = stat.lastIndex(of: ")"), stat.distance(from: close, to: stat.endIndex) > 2 else { return false }
        return stat[stat.index(close, offsetBy: 2)] != "Z"
    }
}

/// An advisory lock (flock) on a file; released when the object goes away or the process dies.
package final class FileLock {
    private let file: PosixFile

    package enum Mode { case shared, exclusive }

    /// Returns nil when `wait` is false and someone else holds a conflicting lock.
    package init?(path: String, mode: Mode, wait: Bool) throws {
        do { file = try PosixFile(path: path, flags: O_RDWR | O_CREAT, mode: 0o600) } catch {
            throw LifeboatError.io(error, "cannot open lock file", path)
        }
        var operation = mode == .shared ? LOCK_SH : LOCK_EX
        if !wait { operation |= LOCK_NB }
        while flock(file.fd, operation) != 0 {
            if errno == EINTR { continue }
            if errno == EWOULDBLOCK { return nil }
            throw LifeboatError.io(Errno(rawValue: errno), "cannot lock", path)
        }
    }

    /// Takes the exclusive lock at `path` without waiting and records our pid in it.
    /// - Parameter busy: the message when another process holds it, given " (pid N)" (or "" when
    ///   the holder is not known) to put after the holder's name.
    /// - Throws: `.busy` with that message.
    package static func exclusive(_ path: String, busy: (_ owner: String) -> String) throws -> FileLock {
        guard let lock = try FileLock(path: path, mode: .exclusive, wait: false) else {
            throw LifeboatError(.busy, busy(owner(of: path).map { " (pid \($0))" } ?? ""))
        }
        lock.recordOwner()
        return lock
    }

    /// Records the holder's PID in the lock file, for the message a second process prints.
    package func recordOwner() {
        let text = Array("\(getpid())\n".utf8)
        try? file.truncate(to: 0)
        text.withUnsafeBytes { raw in try? file.write(raw, at: 0) }
    }

    package static func owner(of path: String) -> String? {
        guard let file = try? PosixFile(path: path, flags: O_RDONLY), let bytes = try? file.readAll() else { return nil }
        let text = String(decoding: bytes, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        return text.isEmpty ? nil : text
    }

    /// The pid of the process holding a flock on `path`, read from /proc/locks without taking
    /// the lock (taking it, even for an instant, could make that process's next attempt fail).
    /// - Returns: nil when nobody holds it (or the file does not exist).
    package static func holder(of path: String) -> pid_t? {
        var st = stat()
        guard stat(path, &st) == 0, let table = try? String(contentsOfFile: "/proc/locks", encoding: .utf8) else { return nil }
        let dev = UInt64(st.st_dev)
        let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & ~UInt64(0xfff))
        let minor = (dev & 0xff) | ((dev >> 12) & ~UInt64(0xff))
        let id = String(format: "%02x:%02x:%llu", major, minor, UInt64(st.st_ino))
        // "1: FLOCK  ADVISORY  WRITE 1234 00:1f:5678 0 EOF"; waiters carry "->" and hold nothing.
        for line in table.split(separator: "\n") where !line.contains("->") {
            let fields = line.split(separator: " ")
            guard fields.count >= 6, fields[1] == "FLOCK", fields[5] == id else { continue }
            return pid_t(fields[4])
        }
        return nil
    }

    deinit { flock(file.fd, LOCK_UN) }
}


extension Array where Element == UInt8 {
    /// Up to `capacity` bytes that `fill` writes (returning how many), without zeroing them first:
    /// frames and chunks read or decoded on every disk read need no memset before they are overwritten.
    package init(filling capacity: Int, _ fill: (UnsafeMutableRawBufferPointer) throws -> Int) rethrows {
        try self.init(unsafeUninitializedCapacity: capacity) { buffer, count in
            count = 0
            let n = try fill(UnsafeMutableRawBufferPointer(buffer))
            precondition(n <= capacity)
            count = n
        }
    }
}

/// `count` bytes from the system's secure generator (keys, salts, session tokens).
package func secureRandomBytes(_ count: Int) -> [UInt8] {
    var generator = SystemRandomNumberGenerator()
    return (0..<count).map { _ in UInt8(truncatingIfNeeded: generator.next()) }
}

/// Equal byte strings, compared in time that does not depend on where they differ.
package func equalInConstantTime(_ a: some Collection<UInt8>, _ b: some Collection<UInt8>) -> Bool {
    guard a.count == b.count else { return false }
    return zip(a, b).reduce(UInt8(0)) { $0 | ($1.0 ^ $1.1) } == 0
}
