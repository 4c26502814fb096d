import Foundation
import LifeboatBase
import LifeboatFS
import LifeboatRepository
#if canImport(Glibc)
import Glibc
#endif

/// One disk of a recovery VM.
public struct HotDisk: Codable, Sendable, Equatable {
    /// The disk's name in the machine (and the recovery point).
    public var name: String
    /// Guest device: vda, vdb, …
    public var target: String
    /// The qcow2 image QEMU writes to, in hot storage.
    public var path: String
    /// The recovery point's disk served by FUSE, while the image still depends on it.
    public var backing: String?
    /// Size of the disk in bytes.
    public var size: Int
    /// Failover: the standalone raw hot disk the copy goes to (becomes `path` at the pivot).
    public var final: String?
    /// True once `final` holds the point's disk, written from the repository (the bulk of finalisation).
    public var seeded: Bool?

    /// True once the disk no longer needs the backup.
    public var isHot: Bool { backing == nil }
}

/// A recovery server's state as last written by lifeboat (`HOT/NAME/server.json`).
/// `status` checks it against libvirt, the mounts and the files before reporting it.
public struct ServerRecord: Codable, Sendable {
    public var machine: String
    public var state: ServerState
    public var since: Date
    /// The repository the point comes from.
    public var repository: String
    public var point: String?
    public var pointTime: Date?
    public var vm: String?
    public var network: String?
    /// The VM's address, without prefix.
    public var ip: String?
    /// The prefix length of `ip`'s subnet.
    public var prefix: Int?
    public var mac: String?
    public var vcpus: Int?
    public var memoryMiB: Int?
    public var virtType: String?
    public var disks: [HotDisk]
    /// The FUSE mount the VM reads from.
    public var mount: String?
    /// The drill being run (TestingFailover).
    public var drill: String?
    /// Set while a command is part-way: "starting", "stopping", …; nil when settled.
    public var phase: String?
    /// Failover: a host bridge instead of a libvirt network.
    public var bridge: String?
    /// Failover: lifeboat created the production network (and removes it when no VM uses it).
    public var createdNetwork: Bool?
    /// Failover: copy bandwidth limit in bytes per second.
    public var bandwidth: UInt64?
    /// Failover: the point's own disk paths (disk name -> path), where failback restores to.
    public var sourceDisks: [String: String]?
    /// Their formats where not raw (disk name -> qcow2): failback writes guest bytes in that format.
    public var sourceFormats: [String: String]?
    /// The libvirt domain the machine was before the failover (protect --domain), and its URI:
    /// after commit the recovery VM is the protected domain; failback makes this one it again.
    public var sourceDomain: String?
    /// Failover: source network -> network, for a domain machine's NICs.
    public var networkMap: [String: String]?
    /// Failback: its --to targets and --start, kept so that a resumed failback does the same.
    public var failbackTargets: [String: String]?
    public var failbackStart: Bool?
    public var sourceConnectURI: String?

    /// `ip` with its prefix.
    var interface: Interface4? {
        guard let ip, let address = IPv4(ip) else { return nil }
        return Interface4(address: address, prefix: prefix ?? 24)
    }

    public init(machine: String, state: ServerState, repository: String) {
        self.machine = machine
        self.state = state
        self.since = Date()
        self.repository = repository
        self.disks = []
    }
}

/// Local fast storage for recovery VM disks and the recovery servers' records:
///
/// ```
/// HOT/NAME/server.json         ServerRecord
/// HOT/NAME/.lock               one command at a time per machine
/// HOT/NAME/test/DISK.qcow2     drill overlays (deleted by stop-test)
/// HOT/NAME/drills/ID/          drill.json, console.log, check.log, screenshot.png
/// HOT/NAME/disks/DISK.qcow2     failover overlay over the point's disk (until the pivot)
/// HOT/NAME/disks/DISK.raw       failover hot disk: the copy, then the VM's standalone disk
/// HOT/NAME/console.log          the failed-over VM's serial console
/// HOT/NAME/history.jsonl        every step with its time
/// ```
public struct HotStorage: Sendable {
    public let root: String

    /// Who acts through this storage, written into history events.
    public var user: String?

    public init(root: String, user: String? = nil) {
        self.user = user
        self.root = root
    }

    public func machineDirectory(_ name: String) -> String { root + "/" + name }
    public func recordPath(_ name: String) -> String { machineDirectory(name) + "/server.json" }
    /// The machine's lock: held by any command that changes its recovery server.
    func lockPath(_ name: String) -> String { machineDirectory(name) + "/.lock" }
    public func testDirectory(_ name: String) -> String { machineDirectory(name) + "/test" }
    public func drillsDirectory(_ name: String) -> String { machineDirectory(name) + "/drills" }
    public func drillDirectory(_ name: String, _ id: String) -> String { drillsDirectory(name) + "/" + id }
    public func disksDirectory(_ name: String) -> String { machineDirectory(name) + "/disks" }

    /// Checks that QEMU, running as `user` (uid, gid), can reach hot storage: every folder from /
    /// down to it (those that exist) must let that user through (search permission).
    /// - Throws: `.invalidArgument` naming the first folder that stops it and the command that fixes it.
    func checkReachable(user name: String, uid: uid_t, gid: gid_t) throws {
        guard uid != 0 else { return }
        var groups = [gid_t](repeating: 0, count: 64)
        var count = Int32(groups.count)
        if getgrouplist(name, gid, &groups, &count) < 0 { count = 0 }
        let memberOf = Set(groups.prefix(Int(max(count, 0)))).union([gid])
        var folder = ""
        for part in Mounts.canonical(root).split(separator: "/") {
            folder += "/" + part
            var st = stat()
            guard stat(folder, &st) == 0 else { break }   // created later, mode 0755
            let mode = st.st_mode
            let through = st.st_uid == uid ? mode & S_IXUSR != 0 : memberOf.contains(st.st_gid) ? mode & S_IXGRP != 0 : mode & S_IXOTH != 0
            if !through {
                throw LifeboatError(.invalidArgument, String(format:
                    "hot storage %@ is out of QEMU's reach: libvirt runs QEMU as %@, which may not enter %@ (mode %04o): run chmod o+x %@, or choose --hot under another folder",
                    root, name, folder, Int(mode & 0o7777), folder))
            }
        }
    }

    /// Creates the folders (mode 0755: QEMU, running as its own user, must reach the images).
    func prepare(_ name: String) throws {
        for path in [root, machineDirectory(name), drillsDirectory(name)] {
            try FileSystem.makeDirectories(path)
            chmod(path, 0o755)
        }
    }

    public func record(_ name: String) throws -> ServerRecord? {
        let path = recordPath(name)
        guard FileSystem.exists(path) else { return nil }
        do {
            return try JSONDecoder.lifeboat.decode(ServerRecord.self, from: Data(contentsOf: URL(fileURLWithPath: path)))
        } catch {
            throw LifeboatError(.damaged, "cannot read the recovery server record \(path): \(error); remove it once nothing of NAME runs")
        }
    }

    public func save(_ record: ServerRecord) throws {
        try prepare(record.machine)
        try FileSystem.writeAtomically(Array(try JSONEncoder.lifeboat.encode(record)), to: recordPath(record.machine))
    }

    /// Records of every machine with a folder here.
    public func records() -> [ServerRecord] {
        ((try? FileSystem.list(root)) ?? []).sorted().compactMap { try? record($0) }
    }

    /// Takes the machine's lock, or says who holds it.
    func lock(_ name: String) throws -> FileLock {
        try prepare(name)
        return try Self.exclusiveLock(lockPath(name), busy: "is working on \(name)")
    }

    /// Takes the lock at `path` without waiting and records our pid in it; when another process
    /// holds it, says "another lifeboat command (pid N) \(busy): wait for it to finish".
    static func exclusiveLock(_ path: String, busy: String) throws -> FileLock {
        try FileLock.exclusive(path) { "another lifeboat command\($0) \(busy): wait for it to finish" }
    }

    /// A lock over the shared FUSE mount and the test network, held briefly while they are
    /// set up or released, so two drills starting at once do not both create them.
    func sharedLock() throws -> FileLock {
        try FileSystem.makeDirectories(root)
        guard let lock = try FileLock(path: root + "/.shared.lock", mode: .exclusive, wait: true) else {
            throw LifeboatError(.busy, "cannot lock \(root)/.shared.lock")
        }
        return lock
    }

    public func drills(_ name: String) -> [Drill] {
        let folder = drillsDirectory(name)
        return ((try? FileSystem.list(folder)) ?? []).sorted().compactMap { id in
            try? JSONDecoder.lifeboat.decode(Drill.self, from: Data(contentsOf: URL(fileURLWithPath: folder + "/" + id + "/drill.json")))
        }
    }

    func save(_ drill: Drill) throws {
        let folder = drillDirectory(drill.machine, drill.id)
        try FileSystem.makeDirectories(folder)
        try FileSystem.writeAtomically(Array(try JSONEncoder.lifeboat.encode(drill)), to: folder + "/drill.json")
    }
}

/// One test failover and what came of it.
public struct Drill: Codable, Sendable {
    public enum Result: String, Codable, Sendable { case running, passed, failed }

    public var id: String
    public var machine: String
    public var point: String
    public var pointTime: Date
    public var started: Date
    public var ended: Date?
    public var result: Result
    /// Why it failed (nil when it passed).
    public var reason: String?
    public var vm: String
    public var network: String
    public var ip: String?
    public var vcpus: Int
    public var memoryMiB: Int
    public var virtType: String
    public var bootPattern: String
    /// The console line that matched.
    public var bootLine: String?
    /// Seconds from the command to the VM running, to the boot line, to the end of the check.
    public var secondsToRunning: Double?
    public var secondsToBootLine: Double?
    public var secondsToCheckEnd: Double?
    public var check: String?
    public var checkStatus: Int32?
    public var consoleLog: String
    public var checkLog: String?
    public var screenshot: String?
}

extension ServerRecord {
    /// Remembers what the machine was before its failover: disk paths and formats, its domain.
    mutating func rememberSource(_ machine: Machine) {
        sourceDisks = Dictionary(uniqueKeysWithValues: machine.disks.map { ($0.name, $0.path) })
        sourceFormats = Dictionary(uniqueKeysWithValues: machine.disks.map { ($0.name, $0.format ?? "raw") })
        sourceDomain = machine.domain
        sourceConnectURI = machine.connectURI
    }
}
