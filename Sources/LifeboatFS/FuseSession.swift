internal import CFuse
import Foundation
import LifeboatRepository
import SystemPackage
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

    /// Serves requests on up to `threads` threads until the file system is unmounted, or until
    /// SIGINT, SIGTERM or SIGHUP (then it unmounts itself).
    public func run(threads: Int) throws {
        guard let fuse else { return }
        // Frames come and go by the thousand: freed heap memory is kept for the next ones rather
        // than given back and faulted in again (page faults were 7% of a random-read run's samples).
        _ = c_mallopt(-1, 256 << 20)   // M_TRIM_THRESHOLD (<malloc.h>, which Glibc's module leaves out)
        _ = c_mallopt(-3, 4 << 20)     // M_MMAP_THRESHOLD
        let session = fuse_get_session(fuse)
        guard fuse_set_signal_handlers(session) == 0 else { throw LifeboatError(.io, "cannot set FUSE signal handlers") }
        defer { fuse_remove_signal_handlers(session) }
        let config = fuse_loop_cfg_create()
        defer { fuse_loop_cfg_destroy(config) }
        fuse_loop_cfg_set_max_threads(config, UInt32(threads))
        fuse_loop_cfg_set_idle_threads(config, UInt32(threads))
        let result = lifeboat_fuse_loop_mt(fuse, config)
        if result < 0 { throw LifeboatError(.io, "the FUSE loop failed: \(Errno(rawValue: -result).description)") }
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

/// Holds the file system for the C side (`private_data` must be a class pointer).
final class FileSystemBox {
    let fs: any FuseFileSystem
    init(_ fs: any FuseFileSystem) { self.fs = fs }
}

/// libfuse's callbacks: non-capturing functions that find the file system through
/// `fuse_get_context()` and turn every Swift error into `-errno` at the boundary.
private func fs() -> any FuseFileSystem {
    Unmanaged<FileSystemBox>.fromOpaque(fuse_get_context()!.pointee.private_data).takeUnretainedValue().fs
}

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
            }
            if let conn {
                conn.pointee.max_readahead = 1 << 20
            }
            return fuse_get_context()!.pointee.private_data
        }
        ops.getattr = { p, st, _ in
            do {
                let a = try fs().attributes(of: path(p))
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
        ops.readdir = { p, buf, filler, _, _, _ in
            do {
                let names = try fs().list(path(p))
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
                let opened = try fs().open(path(p))
                fi.pointee.fh = opened.handle
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
            if let fi { fs().close(fi.pointee.fh) }
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
