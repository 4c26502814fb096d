import Foundation
import LifeboatBase
import LifeboatFS
import LifeboatNBD
import LifeboatRepository
import LifeboatVirt
#if canImport(Glibc)
import Glibc
#endif

/// What one point of a domain leaves on the host while it is read, and takes away at the end
/// whatever happened: the backup job, the NBD socket folder, the scratch files, qemu-nbd servers,
/// and the new checkpoint when the point was not written.
final class BackupSession {
    let machine: String
    let domain: Domain?
    /// HOT/NAME/backup: the scratch files of the running backup.
    let scratchDirectory: String
    /// RUN/backup-NAME: QEMU binds its NBD socket here (a folder owned by QEMU's user).
    let socketDirectory: String
    var socket: String { socketDirectory + "/nbd.sock" }
    private var checkpoint: String?
    private var committedPoint = false
    private var servers: [ImageExport] = []
    private var guardian: ChildProcess.Detached?

    init(replication: Replication, machine: String, domain: Domain?) throws {
        self.machine = machine
        self.domain = domain
        scratchDirectory = replication.hotDirectory + "/" + machine + "/backup"
        socketDirectory = replication.runDirectory + "/backup-" + machine
        Self.removeLeftovers(scratch: scratchDirectory, sockets: socketDirectory)
        do {
            try FileSystem.makeDirectories(scratchDirectory)
            try FileSystem.makeDirectories(socketDirectory)
        } catch {
            throw LifeboatError(.io, "cannot prepare the backup of \(machine): \(error)")
        }
        chmod(replication.hotDirectory, 0o755)
        chmod(replication.hotDirectory + "/" + machine, 0o755)
        chmod(scratchDirectory, 0o755)
        if let ids = QemuUser.ids() { chown(socketDirectory, ids.uid, ids.gid) }
        chmod(socketDirectory, 0o755)
    }

    /// A killed lifeboat left these: they belong to no running job now.
    static func removeLeftovers(scratch: String, sockets: String) {
        // qemu-nbd servers a killed point left (they would keep the images locked).
        for file in (try? FileSystem.list(sockets)) ?? [] where file.hasSuffix(".pid") {
            if let text = try? String(contentsOfFile: sockets + "/" + file, encoding: .utf8),
               let pid = pid_t(text.trimmingCharacters(in: .whitespacesAndNewlines)), pid > 1 {
                kill(pid, SIGKILL)
            }
        }
        FileSystem.removeTree(scratch)
        FileSystem.removeTree(sockets)
    }

    /// The `<domainbackup>` of a pull-mode backup of `disks` (incremental from a checkpoint).
    func backupXML(disks: [DomainDisk], incrementalFrom base: String?) -> String {
        LibvirtXML.pullBackup(socket: socket, disks: disks.map { ($0.target, scratchDirectory + "/" + $0.target + ".scratch") },
                              incrementalFrom: base)
    }

    /// From here on `end` thaws the guest, aborts the backup job and deletes `checkpoint` (unless
    /// the point was written), and a guard process does the same should this process be killed first.
    func watch(checkpoint: String?, connectURI: String, launcher: SelfLauncher?) {
        self.checkpoint = checkpoint
        guard let domain, let launcher else { return }
        let spec = BackupGuard(pid: getpid(), domain: domain.name, connectURI: connectURI, checkpoint: checkpoint,
                               scratchDirectory: scratchDirectory, socketDirectory: socketDirectory)
        guardian = try? launcher.start(spec.arguments, log: "/dev/null", passPassword: false)
    }

    /// The point is written: its checkpoint stays.
    func committed() { committedPoint = true }

    /// Opens an NBD connection to `export` of the job's server (or of `socket`).
    func connect(export: String, contexts: [String], socket: String? = nil) throws -> NBDConnection {
        try nbd("connecting to the backup export \(export)") {
            try NBDConnection(socket: socket ?? self.socket, export: export, contexts: contexts)
        }
    }

    /// Runs an NBD call, turning its error into a sentence.
    func nbd<T>(_ what: String, _ body: () throws -> T) throws -> T {
        do { return try body() } catch let error as NBDError {
            throw LifeboatError(.io, "\(what) of \(machine): \(error.message) (the backup job may be gone: libvirtd restarted, or the guest was destroyed)")
        }
    }

    /// Serves a shut-off domain's image (or a disk-file machine's) read-only with qemu-nbd, in its own format.
    /// - Returns: the socket.
    func serveImage(_ disk: DomainDisk) throws -> String {
        let image = DiskImage(path: disk.source, format: disk.format, virtualSize: 0, isBlockDevice: disk.type == "block")
        do {
            let server = try ImageExport(image, name: disk.target, in: socketDirectory)
            servers.append(server)
            return server.socket
        } catch let error as LifeboatError {
            throw LifeboatError(.io, "disk \(disk.target) of \(machine): \(error.message) (is a VM using it?)")
        }
    }

    /// Takes everything away; the point's checkpoint too, unless the point was written.
    func end() {
        if let guardian { kill(guardian.pid, SIGKILL) }   // this process cleans up itself
        if let domain {
            try? domain.abortJob()
            if let checkpoint, !committedPoint { try? domain.deleteCheckpoint(checkpoint) }
        }
        for server in servers { server.stop() }
        Self.removeLeftovers(scratch: scratchDirectory, sockets: socketDirectory)
    }
}

/// What a guard process needs to clean up after a point whose process died (SIGKILL, a crash):
/// the backup job, the point's checkpoint, the scratch files and the socket folder.
public struct BackupGuard: Sendable {
    public var pid: Int32
    public var domain: String
    public var connectURI: String
    public var checkpoint: String?
    public var scratchDirectory: String
    public var socketDirectory: String

    public init(pid: Int32, domain: String, connectURI: String, checkpoint: String?, scratchDirectory: String, socketDirectory: String) {
        self.pid = pid
        self.domain = domain
        self.connectURI = connectURI
        self.checkpoint = checkpoint
        self.scratchDirectory = scratchDirectory
        self.socketDirectory = socketDirectory
    }

    /// The arguments of `lifeboat backup-guard` that rebuild this guard.
    public var arguments: [String] {
        ["backup-guard", "--pid", "\(pid)", "--domain", domain, "--connect", connectURI, "--scratch", scratchDirectory,
         "--sockets", socketDirectory] + (checkpoint.map { ["--checkpoint", $0] } ?? [])
    }

    /// Waits until process `pid` is gone, then takes away what its point left. Killed instead
    /// (SIGKILL) when the point's process ends the point itself.
    public func watch() {
        while FileSystem.isRunning(pid) { usleep(200_000) }
        if let connection = try? Connection(uri: connectURI), let domain = try? connection.domain(named: domain) {
            _ = try? domain.thawFileSystems()   // killed between freeze and thaw: the guest must not stay frozen
            // The job may still be starting (libvirt answers "backup job data missing" then): abort
            // until libvirt says no job runs.
            let deadline = Date().addingTimeInterval(15)
            repeat {
                try? domain.abortJob()
                if domain.jobState() == .none { break }
                usleep(200_000)
            } while Date() < deadline
            if let checkpoint { try? domain.deleteCheckpoint(checkpoint) }
        }
        BackupSession.removeLeftovers(scratch: scratchDirectory, sockets: socketDirectory)
    }
}
