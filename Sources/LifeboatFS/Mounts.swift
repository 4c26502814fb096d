import Foundation
import LifeboatBase
import LifeboatRepository
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// One line of /proc/self/mountinfo.
public struct MountEntry: Sendable, Equatable {
    public var mountpoint: String
    public var type: String
    public var source: String
    /// Per-superblock options (for FUSE: user_id, group_id, default_permissions, allow_other).
    public var superOptions: String = ""

    /// True for a FUSE mount other users (QEMU under libvirt) may read.
    public var allowsOther: Bool { superOptions.split(separator: ",").contains("allow_other") }
}

/// Mounts of this host, and starting and stopping lifeboat's own FUSE mounts.
public enum Mounts {
    /// Current mounts, read from /proc/self/mountinfo.
    public static func all() -> [MountEntry] {
        guard let text = try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8) else { return [] }
        return text.split(separator: "\n").compactMap { line in
            let fields = line.split(separator: " ", omittingEmptySubsequences: false).map(String.init)
            guard let dash = fields.firstIndex(of: "-"), fields.count > dash + 2, fields.count > 4 else { return nil }
            return MountEntry(mountpoint: unescape(fields[4]), type: fields[dash + 1], source: unescape(fields[dash + 2]),
                              superOptions: fields.count > dash + 3 ? fields[dash + 3] : "")
        }
    }

    /// mountinfo escapes space, tab, newline and backslash as \ooo.
    static func unescape(_ text: String) -> String {
        guard text.contains("\\") else { return text }
        var out = [UInt8]()
        let bytes = Array(text.utf8)
        var i = 0
        while i < bytes.count {
            if bytes[i] == 0x5c, i + 3 < bytes.count, let value = UInt8(String(decoding: bytes[(i + 1)...(i + 3)], as: UTF8.self), radix: 8) {
                out.append(value)
                i += 4
            } else {
                out.append(bytes[i])
                i += 1
            }
        }
        return String(decoding: out, as: UTF8.self)
    }

    public static func entry(at path: String) -> MountEntry? {
        let target = canonical(path)
        return all().last { $0.mountpoint == target }
    }

    public static func isMounted(_ path: String) -> Bool { entry(at: path) != nil }

    /// The log of the mount daemon serving `mountpoint` (kept while it runs, and after a failure).
    public static func daemonLogPath(for mountpoint: String) -> String {
        "/run/lifeboat/mount" + mountpoint.replacingOccurrences(of: "/", with: "_") + ".log"
    }

    /// The fsname lifeboat gives the FUSE mount of a repository.
    public static func fsname(for repository: String) -> String { "lifeboat:" + canonical(repository) }

    /// The lifeboat FUSE mount of this repository, if one exists.
    public static func lifeboatMountEntry(of repository: String) -> MountEntry? {
        let name = fsname(for: repository)
        return all().first { $0.type == "fuse.lifeboat" && $0.source == name }
    }

    /// A lifeboat FUSE mount of this repository, if one exists.
    public static func lifeboatMount(of repository: String) -> String? {
        lifeboatMountEntry(of: repository)?.mountpoint
    }

    public static func canonical(_ path: String) -> String {
        guard let resolved = realpath(path, nil) else { return path }
        defer { free(resolved) }
        return String(cString: resolved)
    }

    /// Checks that `path` can take a new mount.
    public static func checkMountpoint(_ path: String) throws {
        var st = stat()
        guard stat(path, &st) == 0 else {
            throw LifeboatError(.notFound, "mount point \(path) does not exist: create it with mkdir first")
        }
        guard (st.st_mode & S_IFMT) == S_IFDIR else {
            throw LifeboatError(.invalidArgument, "mount point \(path) is not a directory: give an empty directory")
        }
        if let existing = entry(at: path) {
            throw LifeboatError(.alreadyExists, "\(path) is already a mount point (\(existing.type)): unmount it or choose another directory")
        }
    }

    /// Unmounts `path`, waiting until it is gone.
    /// - Throws: `.busy` when something still uses it.
    public static func unmount(_ path: String, lazy: Bool = false) throws {
        let target = canonical(path)
        guard isMounted(target) else {
            throw LifeboatError(.notFound, "\(path) is not mounted")
        }
        if umount2(target, lazy ? Int32(MNT_DETACH) : 0) != 0 {
            let error = Errno(rawValue: errno)
            if error == .resourceBusy {
                throw LifeboatError(.busy, "\(path) is busy: a process, loop device or VM still uses it (stop it, or unbrowse / stop-test first)")
            }
            throw LifeboatError(.io, "cannot unmount \(path): \(error)")
        }
        for _ in 0..<200 where isMounted(target) { usleep(10_000) }
    }

    /// Microseconds a mount's request loop may spin between requests (docs/MOUNT.md, "The request loop").
    public static let defaultBusyPoll = 300

    /// Starts `lifeboat mount --foreground` as a daemon and returns once the mount is there.
    /// - Throws: with the daemon's last log line when it exits first or the mount never appears.
    public static func start(_ repo: Repository, at path: String, launcher: SelfLauncher, cacheSize: Int, allowOther: Bool,
                             threads: Int, busyPoll: Int = defaultBusyPoll) throws -> (pid: pid_t, log: String) {
        try checkMountpoint(path)
        let log = daemonLogPath(for: path)
        try? FileManager.default.createDirectory(atPath: (log as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        var arguments = ["mount", path, "--foreground"] + repo.commandLineArguments
            + ["--cache-size", "\(cacheSize)", "--threads", "\(threads)", "--busy-poll", "\(busyPoll)"]
        if allowOther { arguments.append("--allow-other") }
        let daemon = try launcher.start(arguments, log: log)
        return (try waitForDaemon(daemon, log: log, mountpoint: path), log)
    }

    /// Waits until `daemon` mounted at `mountpoint`; its last log line when it exited first.
    static func waitForDaemon(_ daemon: ChildProcess.Detached, log: String, mountpoint: String, timeout: TimeInterval = 30) throws -> pid_t {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if isMounted(mountpoint) { return daemon.pid }
            if daemon.hasExited {
                throw LifeboatError(.io, lastLine(of: log) ?? "the mount process exited before mounting (see \(log))")
            }
            usleep(20_000)
        }
        kill(daemon.pid, SIGTERM)
        throw LifeboatError(.io, "the mount did not appear at \(mountpoint) within \(Int(timeout)) s (see \(log))")
    }

    static func lastLine(of path: String) -> String? {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { return nil }
        return text.split(separator: "\n").last.map { line in
            var text = String(line)
            if text.hasPrefix("lifeboat: ") { text.removeFirst("lifeboat: ".count) }
            return text
        }
    }
}
