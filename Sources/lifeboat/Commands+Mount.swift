import ArgumentParser
import Foundation
import LifeboatBase
import LifeboatFS
import LifeboatRepository
#if canImport(Glibc)
import Glibc
#endif

extension Lifeboat {
    struct Mount: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Serve every recovery point's disks as read-only files through FUSE.",
            discussion: "MOUNTPOINT/NAME/ID/DISK.raw, MOUNTPOINT/NAME/ID/point.json, MOUNTPOINT/NAME/latest -> ID.")
        @OptionGroup var repository: RepositoryOptions
        @Argument var mountpoint: String
        @Flag(help: "Serve in this process until SIGINT/SIGTERM (default: return once mounted, serve in the background).")
        var foreground = false
        @Option(help: "Bytes of decoded chunk frames to keep in memory.")
        var cacheSize = 256 << 20
        @Flag(help: "Let the user libvirt runs QEMU as (its group in qemu.conf) read the disks, besides root.")
        var allowOther = false
        @Option(help: "Threads serving requests.")
        var threads = 8
        @Option(help: ArgumentHelp("Longest spin, in microseconds, of the thread waiting for the next request before it sleeps (0: never spin).",
                                   valueName: "microseconds"))
        var busyPoll = Mounts.defaultBusyPoll

        func run() throws {
            // The frame cache maps this much address space at once (docs/MOUNT.md).
            guard (1 << 20)...(1 << 40) ~= cacheSize else {
                throw LifeboatError(.invalidArgument, "--cache-size \(cacheSize) is out of range: give bytes from 1 MiB (1048576) to 1 TiB")
            }
            guard 0...100_000 ~= busyPoll else {
                throw LifeboatError(.invalidArgument, "--busy-poll \(busyPoll) is out of range: give microseconds from 0 (never spin) to 100000")
            }
            let path = Mounts.canonical(mountpoint)
            try Mounts.checkMountpoint(path)
            if repository.passwordStdin || foreground {
                let repo = try repository.open()
                try MountService.serve(repo, at: path, cacheSize: cacheSize, allowOther: allowOther, threads: threads,
                                       busyPoll: busyPoll)
            } else {
                let (repo, password) = try repository.openKeepingPassword()
                let started = try Mounts.start(repo, at: path, launcher: SelfLauncher(password: password), cacheSize: cacheSize,
                                               allowOther: allowOther, threads: threads, busyPoll: busyPoll)
                print("mounted \(repo.root) at \(path) (pid \(started.pid), log \(started.log))")
            }
        }
    }

    struct Unmount: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Unmount a lifeboat mount; its server process exits.")
        @Argument var mountpoint: String

        func run() throws {
            guard let entry = Mounts.entry(at: mountpoint), entry.type == "fuse.lifeboat" else {
                throw LifeboatError(.notFound, "\(mountpoint) is not a lifeboat mount")
            }
            try Mounts.unmount(mountpoint)
            print("unmounted \(mountpoint)")
        }
    }

    struct Browse: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Mount a recovery point's file systems read-only under DIR/DISK/pN for browsing.")
        @OptionGroup var repository: RepositoryOptions
        @Argument var name: String
        @Option(help: "Point id or 'latest'.") var point = "latest"
        @Argument var dir: String
        @OptionGroup var output: OutputOptions

        func run() throws {
            let (repo, password) = try repository.openKeepingPassword()
            let point = try repo.point(name, point)
            let dir = Mounts.canonical(dir)
            // A mount the user made is shared; otherwise this browse serves the disks itself.
            let shared = Mounts.lifeboatMount(of: repo.root).flatMap { $0.hasSuffix("/" + Browser.privateMountName) ? nil : $0 }
            let volumes = try Browser.browse(point, dir: dir, fuseMount: shared, repository: repo, launcher: SelfLauncher(password: password))
            if output.json { return try JSON.print(volumes) }
            for volume in volumes {
                let what = "\(volume.disk) \(volume.partition)" + (volume.type.map { " (\($0))" } ?? "")
                if let path = volume.path {
                    print("mounted     \(what) at \(path)")
                } else {
                    print("not mounted \(what): \(volume.problem ?? "unknown")")
                }
            }
            print("browsing \(name) point \(point.id) under \(dir); undo with: lifeboat unbrowse \(dir)")
        }
    }

    struct Unbrowse: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Undo a browse: unmount, detach loop devices, release the FUSE mount.")
        @Argument var dir: String

        func run() throws {
            try Browser.unbrowse(Mounts.canonical(dir))
            print("unbrowsed \(dir)")
        }
    }
}

/// Starting and running the FUSE server.
enum MountService {
    /// Serves in this process until unmounted or signalled.
    static func serve(_ repo: Repository, at path: String, cacheSize: Int, allowOther: Bool, threads: Int,
                      busyPoll: Int = Mounts.defaultBusyPoll) throws {
        let access = RecoveryPointFileSystem.Access(uid: 0, gid: allowOther ? QemuUser.gid() : 0)
        let fs = try RecoveryPointFileSystem(repository: repo, cacheSize: cacheSize, access: access) { line in
            Terminal.writeError("\(Format.time(Date())) \(line)\n")
        }
        var options = ["default_permissions"]
        if allowOther { options.append("allow_other") }
        let session = try FuseSession(fileSystem: fs, mountpoint: path, fsname: Mounts.fsname(for: repo.root), options: options)
        Terminal.writeError("\(Format.time(Date())) serving \(repo.root) at \(path)\n")
        defer { session.close() }
        try session.run(threads: threads, busyPoll: .microseconds(busyPoll))
        Terminal.writeError("\(Format.time(Date())) unmounted \(path)\n")
        repo.remote?.recordRequests()
    }
}
