internal import CFuse
import Foundation
import LifeboatBase
import LifeboatRepository
import SystemPackage
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// A mounted libfuse file system (high-level API). The only file that touches libfuse.
///
/// The `FuseFileSystem` travels to the callbacks as libfuse's `private_data`: retained at
/// `init`, read unretained in every callback, released in `close()`.
public final class FuseSession {
    private var fuse: OpaquePointer?
    private var arguments: [UnsafeMutablePointer<CChar>?]
    private var operations = fuse_operations()
    private let context: Unmanaged<FileSystemBox>
    public let mountpoint: String

    /// Mounts `fileSystem` at `mountpoint`, read-only.
    /// - Parameter options: extra `-o` options (for example `allow_other`, `default_permissions`).
    /// - Throws: `.io` when libfuse cannot mount (its reason is printed on stderr by libfuse).
    public init(fileSystem: any FuseFileSystem, mountpoint: String, fsname: String, options: [String]) throws {
        self.mountpoint = mountpoint
        let all = (["ro", "fsname=\(fsname)", "subtype=lifeboat"] + options).joined(separator: ",")
        arguments = ["lifeboat", "-o", all].map { (text: String) in strdup(text) } + [nil]
        context = Unmanaged.passRetained(FileSystemBox(fileSystem))
        Trampolines.install(&operations)
        var args = fuse_args(argc: Int32(arguments.count - 1), argv: arguments.withUnsafeMutableBufferPointer { $0.baseAddress }, allocated: 0)
        guard let fuse = lifeboat_fuse_new(&args, &operations, context.toOpaque()) else {
            context.release()
            arguments.forEach { free($0) }
            throw LifeboatError(.io, "cannot start the FUSE file system (options \(all))")
        }
        self.fuse = fuse
        guard fuse_mount(fuse, mountpoint) == 0 else {
            fuse_destroy(fuse)
            self.fuse = nil
            context.release()
            arguments.forEach { free($0) }
            throw LifeboatError(.io, "cannot mount a FUSE file system on \(mountpoint): is /dev/fuse there and are you root?")
        }
    }

    /// Serves requests on `threads` threads until the file system is unmounted, or until
    /// SIGINT, SIGTERM or SIGHUP (then it unmounts itself).
    /// - Parameter busyPoll: the longest the thread that waits for the next request spins on
    ///   `/dev/fuse` after a reply before it sleeps (`RequestLoop`); zero never spins.
    public func run(threads: Int, busyPoll: Duration = .zero) throws {
        guard let fuse else { return }
        // Frames come and go by the thousand: freed heap memory is kept for the next ones rather
        // than given back and faulted in again (page faults were 7% of a random-read run's samples).
        _ = c_mallopt(-1, 256 << 20)   // M_TRIM_THRESHOLD (<malloc.h>, which Glibc's module leaves out)
        _ = c_mallopt(-3, 4 << 20)     // M_MMAP_THRESHOLD
        let session = fuse_get_session(fuse)!
        guard fuse_set_signal_handlers(session) == 0 else { throw LifeboatError(.io, "cannot set FUSE signal handlers") }
        defer { fuse_remove_signal_handlers(session) }
        try RequestLoop(session: session, busyPoll: busyPoll).run(threads: max(1, threads))
    }

    /// Unmounts (if still mounted) and frees everything. Idempotent.
    public func close() {
        guard let fuse else { return }
        fuse_unmount(fuse)
        fuse_destroy(fuse)
        self.fuse = nil
        context.release()
        arguments.forEach { free($0) }
        arguments = []
    }

    deinit { close() }
}

/// Serves a session's requests on several threads, with as few threads waiting on `/dev/fuse`
/// as keeps up with the requests. libfuse's own loop keeps every idle thread blocked in `read`,
/// and each request wakes one of them: on a VM whose idle vCPUs halt, a woken thread takes
/// 25-35 µs to run (`perf sched`, docs/MOUNT.md), a fifth of a cold 4 KiB read at queue depth 1.
///
/// Here a thread that has served a request reads the next one itself when one is queued, or
/// when no other thread is reading; otherwise it waits on a condition, away from the device. At
/// queue depth 1 one thread then serves every request, and between them it spins (polls the
/// device without sleeping) before it sleeps in `epoll_wait`, as QEMU's event loop polls
/// (`poll-max-ns`). The spin adapts: it doubles (from 4 µs, up to `busyPoll`) when a request
/// came soon after the thread fell asleep, and halves when the device stayed quiet for longer
/// than `busyPoll`, so that an idle mount, or one read now and then, does not spin.
///
/// Requests in flight together are seen when one is taken while another is being served and a
/// third is queued; for the next 10 ms every idle thread then sleeps on the device (each in its
/// own epoll with EPOLLEXCLUSIVE, so that a request wakes one of them, as libfuse's blocked
/// `read`s do) and nobody spins. A request that is about to wait for the disk or a decode
/// (`willBlock()`), or that is not a read, wakes a waiting thread to read meanwhile.
final class RequestLoop: @unchecked Sendable {
    // @unchecked: `reading`, `inService`, `finished`, `failure` and `concurrentUntil` are only
    // touched under `state`.
    private let session: OpaquePointer
    private let maxSpin: Int64                // nanoseconds
    private let window = Atomic<Int64>(0)     // nanoseconds a reader spins now
    private let state = NSCondition()
    private var reading = 0                   // threads in `receive`
    private var finished = false              // unmounted, exited or failed
    private var failure: Int32 = 0            // -errno of a failed read of the device
    private var concurrentUntil: Int64 = 0    // monotonic nanoseconds
    private var inService = 0                 // requests taken and not yet answered
    private let lastReply = Atomic<Int64>(0)  // monotonic nanoseconds
    private let done = DispatchGroup()
    private static let concurrency: Int64 = 10_000_000
    /// The loop whose request the calling thread serves, else nil.
    private static let serving: pthread_key_t = {
        var key = pthread_key_t()
        precondition(pthread_key_create(&key, nil) == 0, "no thread-specific key left")
        return key
    }()

    init(session: OpaquePointer, busyPoll: Duration) {
        self.session = session
        let (seconds, attoseconds) = busyPoll.components
        maxSpin = max(0, seconds * 1_000_000_000 + attoseconds / 1_000_000_000)
    }

    /// Called by a read's handler before it waits for the disk, a decode or another thread's
    /// load: makes sure a thread reads the device meanwhile (wakes a waiting one if none does),
    /// so that another client's request is not held up behind this one. Costs a thread-specific
    /// lookup when called again in the same request, or outside one.
    static func willBlock() {
        guard let opaque = pthread_getspecific(serving) else { return }
        pthread_setspecific(serving, nil)
        Unmanaged<RequestLoop>.fromOpaque(opaque).takeUnretainedValue().keepReading()
    }

    /// Serves on `threads` threads until the session is unmounted or exits (a signal).
    func run(threads: Int) throws {
        let fd = fuse_session_fd(session)
        guard fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) == 0 else {
            throw LifeboatError(.io, "cannot make /dev/fuse non-blocking: \(Errno(rawValue: errno).description)")
        }
        for _ in 0..<threads {
            done.enter()
            let thread = Thread { [self] in serve(); done.leave() }
            thread.stackSize = 8 << 20   // what libfuse's threads get (the default pthread stack)
            thread.name = "lifeboat-fuse"
            thread.start()
        }
        done.wait()
        if failure < 0 { throw LifeboatError(.io, "the FUSE loop failed: \(Errno(rawValue: -failure).description)") }
    }

    /// One thread: reads a request (or waits while another thread reads), serves it.
    private func serve() {
        var buffer = fuse_buf()
        defer { free(buffer.mem) }
        // This thread's sleep on the device: with EPOLLEXCLUSIVE a request wakes one sleeper, not all.
        let sleeper = epoll_create1(Int32(EPOLL_CLOEXEC))
        defer { if sleeper >= 0 { Glibc.close(sleeper) } }
        if sleeper >= 0 {
            var event = epoll_event(events: EPOLLIN.rawValue | EPOLLEXCLUSIVE.rawValue, data: epoll_data(fd: fuse_session_fd(session)))
            _ = epoll_ctl(sleeper, EPOLL_CTL_ADD, fuse_session_fd(session), &event)
        }
        var served = false
        state.lock()
        while true {
            if served { inService -= 1 }
            // Requests coming together: every idle thread sleeps on the device (one is woken per
            // request, as in libfuse's loop); one at a time: one reads, the others wait here
            // unless a request is queued already.
            if !finished && reading > 0 && Self.now() >= concurrentUntil && !queued() { state.wait() }
            if finished { state.unlock(); return }
            reading += 1
            let spin = Self.now() >= concurrentUntil
            state.unlock()
            let result = receive(into: &buffer, spin: spin, sleeper: sleeper)
            state.lock()
            reading -= 1
            served = false
            if result == -EAGAIN { continue }
            guard result > 0 else {
                finished = true
                if result < 0 { failure = result }
                state.broadcast()
                state.unlock()
                return
            }
            // Another request being served as this one is taken, and a third queued: they come
            // together. (Served alone does not say it: the thread that answered the last one may
            // not have counted it out yet, when the client's next request is taken.)
            let now = Self.now()
            if inService > 0 && queued() { concurrentUntil = now + Self.concurrency }
            inService += 1
            served = true
            let read = Self.isRead(buffer)
            // Someone reads next while this one is served: when requests come together, and
            // before a request other than a read (it may wait; a read says so, `willBlock()`).
            if reading == 0 && (!read || now < concurrentUntil) { state.signal() }
            state.unlock()
            if read {
                pthread_setspecific(Self.serving, Unmanaged.passUnretained(self).toOpaque())
                fuse_session_process_buf(session, &buffer)
                pthread_setspecific(Self.serving, nil)
            } else {
                fuse_session_process_buf(session, &buffer)
            }
            lastReply.store(Self.now(), ordering: .relaxed)
            state.lock()
        }
    }

    /// Wakes a waiting thread to read the device if none reads it.
    private func keepReading() {
        state.lock()
        if reading == 0 { state.signal() }
        state.unlock()
    }

    /// True when a request waits on the device.
    private func queued() -> Bool {
        var ready = pollfd(fd: fuse_session_fd(session), events: Int16(POLLIN), revents: 0)
        return poll(&ready, 1, 0) > 0
    }

    /// FUSE_READ (15): a request starts with its length and its opcode (two UInt32, fuse_in_header).
    private static func isRead(_ buffer: fuse_buf) -> Bool {
        guard buffer.flags.rawValue & FUSE_BUF_IS_FD.rawValue == 0, buffer.size >= 8, let mem = buffer.mem else { return false }
        return mem.loadUnaligned(fromByteOffset: 4, as: UInt32.self) == 15
    }

    /// Reads the next request: its size, 0 once unmounted or exited, or -errno. Spins first
    /// (polls the device without sleeping) while within `window` of the last reply.
    private func receive(into buffer: inout fuse_buf, spin: Bool, sleeper: Int32) -> Int32 {
        guard spin && maxSpin > 0 else { return read(into: &buffer, sleeper: sleeper) }
        let since = lastReply.load(ordering: .relaxed)
        let window = window.load(ordering: .relaxed)
        while !queued() && Self.now() - since < window && fuse_session_exited(session) == 0 { sched_yield() }
        // Caught spinning, or asleep: then how soon the request came sizes the next spins.
        let sleeps = !queued()
        let result = read(into: &buffer, sleeper: sleeper)
        if sleeps && result > 0 { adapt(gap: Self.now() - lastReply.load(ordering: .relaxed)) }
        return result
    }

    /// Reads the (non-blocking) device, sleeping in `epoll_wait` while it has nothing; libfuse's
    /// signal handler only sets the session's exit flag, which a sleeper sees within the timeout.
    /// Gives -EAGAIN when it woke for a request another thread took while requests no longer
    /// come together and another thread reads: the caller then waits away from the device.
    private func read(into buffer: inout fuse_buf, sleeper: Int32) -> Int32 {
        var woke = false
        while fuse_session_exited(session) == 0 {
            let result = fuse_session_receive_buf(session, &buffer)
            if result != -EAGAIN && result != -EINTR { return result }
            if result == -EAGAIN {
                if woke && state.withLock({ reading > 1 && Self.now() >= concurrentUntil }) { return -EAGAIN }
                woke = true
                if sleeper >= 0 {
                    var event = epoll_event()
                    _ = epoll_wait(sleeper, &event, 1, 500)
                } else {
                    var ready = pollfd(fd: fuse_session_fd(session), events: Int16(POLLIN), revents: 0)
                    _ = poll(&ready, 1, 500)
                }
            }
        }
        return 0
    }

    /// After a sleep: a request that came within `maxSpin` of the last reply would have been
    /// caught by spinning longer; a longer quiet spell means spinning was wasted.
    private func adapt(gap: Int64) {
        let now = window.load(ordering: .relaxed)
        window.store(gap <= maxSpin ? min(maxSpin, max(4_000, now * 2)) : (now < 8_000 ? 0 : now / 2), ordering: .relaxed)
    }

    /// Monotonic nanoseconds (as Progress times its work).
    private static func now() -> Int64 { Int64(DispatchTime.now().uptimeNanoseconds) }
}

/// Holds the file system for the C side (`private_data` must be a class pointer), and the path
/// of each open file and directory: with `nullpath_ok` libfuse does not work out the path of a
/// request on an open handle (a read, most of all), and passes none.
final class FileSystemBox {
    let fs: any FuseFileSystem
    let files = Locked<[UInt64: String]>([:])
    let directories = Locked<(next: UInt64, paths: [UInt64: String])>((1, [:]))
    init(_ fs: any FuseFileSystem) { self.fs = fs }
}

/// libfuse's callbacks: non-capturing functions that find the file system through
/// `fuse_get_context()` and turn every Swift error into `-errno` at the boundary.
private func box() -> FileSystemBox {
    Unmanaged<FileSystemBox>.fromOpaque(fuse_get_context()!.pointee.private_data).takeUnretainedValue()
}

private func fs() -> any FuseFileSystem { box().fs }

private func negativeErrno(_ error: any Error) -> Int32 {
    if let e = error as? Errno { return -e.rawValue }
    return -EIO
}

private func path(_ p: UnsafePointer<CChar>?) -> String { p.map { String(cString: $0) } ?? "/" }

private enum Trampolines {
    static func install(_ ops: inout fuse_operations) {
        ops.`init` = { conn, cfg in
            if let cfg {
                cfg.pointee.entry_timeout = 1      // points appear and go within a second
                cfg.pointee.attr_timeout = 1
                cfg.pointee.negative_timeout = 0
                cfg.pointee.kernel_cache = 1       // served files never change: keep their pages
                cfg.pointee.nullpath_ok = 1        // no path lookup per read (FileSystemBox keeps them)
            }
            if let conn {
                conn.pointee.max_readahead = 1 << 20
            }
            return fuse_get_context()!.pointee.private_data
        }
        ops.getattr = { p, st, fi in
            do {
                let a: FileAttributes
                if p == nil, let fi {   // fstat of an open file
                    guard let openPath = box().files.withLock({ $0[fi.pointee.fh] }) else { return -EBADF }
                    a = try fs().attributes(of: openPath)
                } else {
                    a = try fs().attributes(of: path(p))
                }
                var s = stat()
                switch a.kind {
                case .directory: s.st_mode = S_IFDIR | a.permissions; s.st_nlink = 2
                case .file: s.st_mode = S_IFREG | a.permissions; s.st_nlink = 1
                case .symlink: s.st_mode = S_IFLNK | 0o777; s.st_nlink = 1
                }
                s.st_size = off_t(a.size)
                s.st_blocks = blkcnt_t((a.size + 511) / 512)
                s.st_blksize = 65536
                s.st_uid = a.uid
                s.st_gid = a.gid
                let t = a.modified.timeIntervalSince1970
                s.st_mtim = timespec(tv_sec: Int(t), tv_nsec: Int((t - t.rounded(.down)) * 1e9))
                s.st_ctim = s.st_mtim
                s.st_atim = s.st_mtim
                st!.pointee = s
                return 0
            } catch { return negativeErrno(error) }
        }
        ops.readlink = { p, buf, size in
            do {
                let target = Array(try fs().link(path(p)).utf8CString)
                guard let buf, size > 0 else { return -EINVAL }
                let n = min(target.count, size)
                target.withUnsafeBufferPointer { buf.update(from: $0.baseAddress!, count: n) }
                buf[n - 1] = 0
                return 0
            } catch { return negativeErrno(error) }
        }
        ops.opendir = { p, fi in
            guard let fi else { return -EIO }
            let path = path(p)
            fi.pointee.fh = box().directories.withLock { directories in
                defer { directories.next += 1 }
                directories.paths[directories.next] = path
                return directories.next
            }
            return 0
        }
        ops.releasedir = { _, fi in
            if let fi { _ = box().directories.withLock { $0.paths.removeValue(forKey: fi.pointee.fh) } }
            return 0
        }
        ops.readdir = { p, buf, filler, _, fi, _ in
            do {
                let directory = p.map { String(cString: $0) } ?? fi.flatMap { fi in box().directories.withLock { $0.paths[fi.pointee.fh] } }
                guard let directory else { return -EBADF }
                let names = try fs().list(directory)
                guard let filler else { return -EIO }
                for name in [".", ".."] + names {
                    if filler(buf, name, nil, 0, fuse_fill_dir_flags(0)) != 0 { break }
                }
                return 0
            } catch { return negativeErrno(error) }
        }
        ops.open = { p, fi in
            guard let fi else { return -EIO }
            if fi.pointee.flags & O_ACCMODE != O_RDONLY { return -EROFS }
            do {
                let path = path(p)
                let opened = try fs().open(path)
                fi.pointee.fh = opened.handle
                box().files.withLock { $0[opened.handle] = path }
                if opened.directIO { fi.pointee.direct_io = 1 } else { fi.pointee.keep_cache = 1 }
                return 0
            } catch { return negativeErrno(error) }
        }
        ops.read = { _, buf, size, offset, fi in
            guard let fi, let buf else { return -EIO }
            do {
                return Int32(try fs().read(fi.pointee.fh, into: UnsafeMutableRawBufferPointer(start: buf, count: size), at: Int(offset)))
            } catch { return negativeErrno(error) }
        }
        ops.lseek = { _, offset, whence, fi in
            guard let fi else { return off_t(-EIO) }
            do { return off_t(try fs().seek(fi.pointee.fh, to: Int(offset), whence: whence)) } catch { return off_t(negativeErrno(error)) }
        }
        ops.release = { _, fi in
            if let fi {
                fs().close(fi.pointee.fh)
                _ = box().files.withLock { $0.removeValue(forKey: fi.pointee.fh) }
            }
            return 0
        }
        ops.statfs = { _, st in
            var s = statvfs()
            s.f_bsize = 4096
            s.f_frsize = 4096
            s.f_namemax = 255
            s.f_flag = UInt(ST_RDONLY)
            st?.pointee = s
            return 0
        }
        // Nothing is ever written through the mount.
        ops.write = { _, _, _, _, _ in -EROFS }
        ops.truncate = { _, _, _ in -EROFS }
        ops.chmod = { _, _, _ in -EROFS }
        ops.chown = { _, _, _, _ in -EROFS }
        ops.create = { _, _, _ in -EROFS }
        ops.mknod = { _, _, _ in -EROFS }
        ops.mkdir = { _, _ in -EROFS }
        ops.unlink = { _ in -EROFS }
        ops.rmdir = { _ in -EROFS }
        ops.symlink = { _, _ in -EROFS }
        ops.rename = { _, _, _ in -EROFS }
        ops.link = { _, _ in -EROFS }
        ops.utimens = { _, _, _ in -EROFS }
        ops.setxattr = { _, _, _, _, _ in -EROFS }
        ops.removexattr = { _, _ in -EROFS }
        ops.fallocate = { _, _, _, _, _ in -EROFS }
    }
}

@_silgen_name("mallopt") private func c_mallopt(_ parameter: CInt, _ value: CInt) -> CInt
