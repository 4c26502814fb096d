import Foundation
import LifeboatBase
import LifeboatFS
import LifeboatReplication
import LifeboatRepository
import LifeboatVirt
#if canImport(Glibc)
import Glibc
#endif

/// Domain type of recovery VMs.
public enum VirtType: String, Sendable, CaseIterable {
    case kvm, qemu, auto

    /// Parses a setting, with a sentence for a wrong one.
    public static func parse(_ text: String, what: String) throws -> VirtType {
        guard let value = VirtType(rawValue: text) else {
            throw LifeboatError(.invalidArgument, "\(what) '\(text)' is not one of kvm, qemu, auto")
        }
        return value
    }

    /// kvm when /dev/kvm opens and libvirt offers it, and this host is not itself a guest
    /// (nested KVM can exist and still fail: guests stop with "emulation failure");
    /// qemu (software emulation) otherwise. Say `kvm` explicitly to use nested KVM.
    func resolved(offersKVM: () -> Bool) -> String {
        switch self {
        case .kvm: return "kvm"
        case .qemu: return "qemu"
        case .auto:
            let fd = open("/dev/kvm", O_RDWR | O_CLOEXEC)
            guard fd >= 0 else { return "qemu" }
            close(fd)
            let cpuinfo = (try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8)) ?? ""
            let nested = cpuinfo.split(separator: "\n").contains { $0.hasPrefix("flags") && $0.split(separator: " ").contains("hypervisor") }
            return !nested && offersKVM() ? "kvm" : "qemu"
        }
    }
}

/// Where recovery VMs run and what they are built from.
public struct RecoverySettings: Sendable {
    /// libvirt connection URI.
    public var connectURI: String
    /// Hot storage folder.
    public var hotDirectory: String
    /// Domain and network templates.
    public var templates: Templates
    /// Host-wide domain type; a machine's own setting wins over `.auto`.
    public var virtType: VirtType
    /// Where lifeboat mounts the repository for recovery VMs when no mount with allow_other exists.
    public var runDirectory: String
    /// Re-runs lifeboat for its helpers: the mount QEMU reads from, the finaliser.
    public var launcher: SelfLauncher
    /// Who acts, recorded in history: a console user's name, or the Unix user running the CLI.
    public var user: String?

    public init(connectURI: String = Connection.uri(), hotDirectory: String = "/var/lib/lifeboat/hot",
                templates: Templates, virtType: VirtType = .auto, runDirectory: String = "/run/lifeboat",
                launcher: SelfLauncher = SelfLauncher()) {
        self.connectURI = connectURI
        self.hotDirectory = hotDirectory
        self.templates = templates
        self.virtType = virtType
        self.runDirectory = runDirectory
        self.launcher = launcher
    }
}

/// Recovery servers of one repository on this host: test failover, failover, failback, status.
public final class Recovery: Sendable {
    public static let testNetworkName = "lifeboat-test"

    public let repository: Repository
    public let settings: RecoverySettings
    public let hot: HotStorage
    /// Opened on first use and shared by every thread using this Recovery (libvirt connections
    /// are thread-safe); the lock guards only opening it again when it died.
    private let cachedConnection = Locked<Connection?>(nil)

    public init(repository: Repository, settings: RecoverySettings) {
        self.repository = repository
        self.settings = settings
        self.hot = HotStorage(root: settings.hotDirectory, user: settings.user)
    }

    /// The same recovery servers, acting for `user` (recorded in history), with a libvirt connection of its own.
    public func acting(for user: String?) -> Recovery {
        var settings = self.settings
        settings.user = user
        return Recovery(repository: repository, settings: settings)
    }

    /// Refuses `command` on `name` before any work starts, with the state machine's sentence,
    /// when the machine is unknown or its recovery server is in a state that does not allow it.
    public func preflight(_ command: RecoveryCommand, machine name: String) throws {
        _ = try repository.machine(name)
        let state = try reconciledState(name, record: try hot.record(name))
        _ = try StateMachine.check(command, machine: name, state: state)
    }

    /// Points of this repository's machines taken the way `lifeboat backup` takes them (a planned
    /// failover's final point, failback's points).
    public var replication: Replication {
        var replication = Replication(repository: repository, hotDirectory: settings.hotDirectory,
                                      runDirectory: settings.runDirectory, defaultConnectURI: settings.connectURI)
        replication.launcher = settings.launcher
        return replication
    }

    /// The test VM's domain name.
    public static func testDomainName(_ machine: String) -> String { "lifeboat-test-" + machine }

    /// The libvirt connection, opened on first use.
    public func connection() throws -> Connection {
        do {
            return try cachedConnection.withLock { cached in
                if let cached, cached.isAlive { return cached }
                let connection = try Connection(uri: settings.connectURI)
                cached = connection
                return connection
            }
        } catch let error as LibvirtError {
            throw LifeboatError(.unsupported,
                "libvirt is not reachable at \(settings.connectURI) (\(error.message)): start it with 'virtlogd -d && libvirtd -d' (or 'systemctl start libvirtd'), or give --connect URI",
                cause: error)
        }
    }

    /// Runs a libvirt call, turning its error into a sentence about `what`.
    func virt<T>(_ what: String, _ body: () throws -> T) throws -> T {
        do {
            return try body()
        } catch let error as LibvirtError {
            throw LifeboatError(.io, "\(what): \(error.message)", cause: error)
        } catch let error as TemplateError {
            throw LifeboatError(.invalidArgument, error.description, cause: error)
        }
    }

    // MARK: - The FUSE mount recovery VMs read from

    /// The repository's FUSE mount that QEMU may read (allow_other), started when there is none.
    func ensureMount() throws -> String {
        let _lock = try hot.sharedLock()
        defer { withExtendedLifetime(_lock) {} }
        if let entry = Mounts.lifeboatMountEntry(of: repository.root) {
            guard entry.allowsOther else {
                throw LifeboatError(.invalidState,
                    "the repository is mounted at \(entry.mountpoint) without --allow-other, so QEMU (user libvirt-qemu) cannot read it: unmount it (lifeboat unmount \(entry.mountpoint)) or remount it with --allow-other")
            }
            return entry.mountpoint
        }
        let path = ownMountPath()
        try FileSystem.makeDirectories(path)
        _ = try Mounts.start(repository, at: path, launcher: settings.launcher, cacheSize: 512 << 20, allowOther: true, threads: 8)
        return path
    }

    /// The mount point lifeboat uses when it mounts the repository itself.
    func ownMountPath() -> String {
        settings.runDirectory + "/mount-" + String(repository.config.id.prefix(12))
    }

    /// Unmounts lifeboat's own mount when no recovery server still reads from it.
    /// - Returns: the mount point released, if any.
    func releaseMountIfUnused(except machine: String) -> String? {
        guard let _lock = try? hot.sharedLock() else { return nil }
        defer { withExtendedLifetime(_lock) {} }
        let path = ownMountPath()
        guard Mounts.isMounted(path) else { return nil }
        let users = hot.records().filter { $0.machine != machine && $0.state.usesMount && $0.mount == path }
        guard users.isEmpty else { return nil }
        do {
            try Mounts.unmount(path)
            rmdir(path)
            unlink(Mounts.daemonLogPath(for: path))   // a clean end: the daemon's log has nothing left to tell
            return path
        } catch {
            return nil   // still busy (a browse, a person): left mounted; the next release tries again
        }
    }

    // MARK: - Helpers shared by drills and failovers

    /// The point a command names: an id, 'latest', or nil for latest.
    func resolvePoint(_ machine: String, _ id: String?) throws -> RecoveryPoint {
        _ = try repository.machine(machine)
        let points = try repository.points(machine)
        guard !points.isEmpty else {
            throw LifeboatError(.notFound, "\(machine) has no recovery points yet: take a backup first (lifeboat backup \(machine))")
        }
        return try repository.point(machine, id)
    }

    /// Checks vCPUs and memory against the host.
    func checkResources(vcpus: Int, memoryMiB: Int) throws {
        guard vcpus >= 1 else { throw LifeboatError(.invalidArgument, "--vcpus must be at least 1") }
        guard memoryMiB >= 32 else { throw LifeboatError(.invalidArgument, "--memory is in MiB and must be at least 32") }
        let host = try virt("reading the host's CPUs and memory") { try connection().hostInfo() }
        guard vcpus <= host.cpus else {
            throw LifeboatError(.invalidArgument, "\(vcpus) vCPUs is more than this host has (\(host.cpus)): give --vcpus \(host.cpus) or fewer")
        }
        guard memoryMiB <= host.memoryMiB else {
            throw LifeboatError(.invalidArgument, "\(memoryMiB) MiB of memory is more than this host has (\(host.memoryMiB) MiB): give a smaller --memory")
        }
    }

    /// The domain type for `machine`.
    func virtType(for machine: Machine) throws -> String {
        let setting = settings.virtType != .auto ? settings.virtType
            : try machine.virtType.map { try VirtType.parse($0, what: "the virt type of \(machine.name)") } ?? .auto
        return setting.resolved { (try? connection().offersKVM()) ?? false }
    }

    /// Destroys and undefines a domain if it exists.
    func removeDomain(_ name: String) throws -> Bool {
        try virt("removing the VM \(name)") {
            guard let domain = try connection().domain(named: name) else { return false }
            try domain.destroy()
            try domain.undefine()
            return true
        }
    }

    /// Waits until `regex` matches a line of the console log, the domain stops, or time runs out.
    /// Stops are seen from libvirt's lifecycle events (`events`), with a state poll as a fallback.
    func waitForBootLine(log: String, pattern: NSRegularExpression, domain: Domain, events: DomainEventWatch?,
                         deadline: Date, from start: Int = 0) -> (line: String?, problem: String?) {
        var offset = start
        var pending = ""
        var lastStateCheck = Date.distantPast
        while Date() < deadline {
            if let handle = FileHandle(forReadingAtPath: log) {
                handle.seek(toFileOffset: UInt64(offset))
                let data = handle.readDataToEndOfFile()
                try? handle.close()
                if !data.isEmpty {
                    offset += data.count
                    pending += String(decoding: data, as: UTF8.self)
                    // Console lines end in \r\n, one Character in Swift: split on any newline.
                    let lines = pending.split(omittingEmptySubsequences: false, whereSeparator: \.isNewline)
                    for line in lines {
                        let text = String(line)
                        if pattern.firstMatch(in: text, range: NSRange(text.startIndex..., in: text)) != nil {
                            return (text, nil)
                        }
                    }
                    pending = pending.last?.isNewline == true ? "" : String(lines.last ?? "")
                    if pending.count > 65536 { pending = String(pending.suffix(4096)) }
                }
            }
            if let stop = events?.stop {
                return (nil, "\(stop.description) before the boot line appeared")
            }
            if Date().timeIntervalSince(lastStateCheck) > 5 {
                lastStateCheck = Date()
                if let state = try? domain.state(), !state.isActive {
                    return (nil, "the VM stopped (\(state.rawValue)) before the boot line appeared")
                }
            }
            Thread.sleep(forTimeInterval: 0.1)
        }
        return (nil, nil)
    }
}

extension HotStorage {
    /// Throws when QEMU's user cannot reach this hot storage (checked before a drill or failover creates anything).
    func checkReachableByQemu() throws {
        guard let ids = QemuUser.ids() else { return }
        try checkReachable(user: QemuUser.userName(), uid: ids.uid, gid: ids.gid)
    }
}
