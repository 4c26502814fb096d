import Foundation
import LifeboatBase
import LifeboatFS
import LifeboatReplication
import LifeboatRepository
import LifeboatVirt
#if canImport(Glibc)
import Glibc
#endif

/// What a failover is asked to do; nil fields come from the machine's settings.
public struct FailoverOptions: Sendable {
    public var point: String?
    /// The source is reachable: refuse while its disks are open (unless `force`), take a final backup, fail over from it.
    public var planned: Bool
    public var force: Bool
    public var vcpus: Int?
    public var memoryMiB: Int?
    public var ip: String?
    /// A libvirt network name (or, with `bridge`, a host bridge).
    public var network: String?
    public var bridge: String?
    /// Copy bandwidth limit in bytes per second (nil: none).
    public var bandwidth: UInt64?
    /// Source network -> production network, for the NICs of a machine protected with --domain
    /// (a NIC whose network is not named goes to `network`).
    public var networkMap: [String: String] = [:]

    public init(point: String? = nil, planned: Bool = false, force: Bool = false, vcpus: Int? = nil, memoryMiB: Int? = nil,
                ip: String? = nil, network: String? = nil, bridge: String? = nil, bandwidth: UInt64? = nil) {
        self.point = point
        self.planned = planned
        self.force = force
        self.vcpus = vcpus
        self.memoryMiB = memoryMiB
        self.ip = ip
        self.network = network
        self.bridge = bridge
        self.bandwidth = bandwidth
    }
}

extension Recovery {
    /// The network lifeboat creates from the production template when the machine names none.
    public static let productionNetworkName = "lifeboat-prod"

    // MARK: - failover

    /// Fails `name` over: its recovery VM (domain `name`) boots on the production network from a
    /// qcow2 overlay over the point's FUSE disk, at once, and block copies start moving every byte
    /// into standalone raw hot disks while it runs (Finalizing). `advance` pivots each disk onto
    /// its hot copy when the copy has caught up; then the VM no longer needs the backup (FailedOver).
    /// - Returns: the record after the VM started.
    public func failover(_ name: String, _ options: FailoverOptions, report: (String) -> Void = { _ in }) throws -> ServerRecord {
        let started = Date()
        var machine = try repository.machine(name)
        try hot.checkReachableByQemu()
        let lock = try hot.lock(name)
        defer { withExtendedLifetime(lock) {} }
        let state = try reconciledState(name, record: try hot.record(name))
        _ = try StateMachine.check(.failover, machine: name, state: state)
        let vcpus = options.vcpus ?? machine.vcpus
        let memory = options.memoryMiB ?? machine.memoryMiB
        try checkResources(vcpus: vcpus, memoryMiB: memory)
        let ip = try (options.ip ?? machine.ip).map { try Interface4.parse($0, what: options.ip != nil ? "--ip" : "the IP of \(name)") }
        guard let mac = machine.macs.first else {
            throw LifeboatError(.invalidArgument, "\(name) has no MAC address: set one with lifeboat configure \(name) --mac")
        }
        if let existing = try virt("looking up domain \(name)", { try connection().domain(named: name) }) {
            let running = (try? existing.state().isActive) == true
            throw LifeboatError(.alreadyExists,
                "a libvirt domain named \(name) already exists on this host (\(running ? "running" : "defined")): is it the source machine? Shut it down and undefine it (virsh undefine \(name)) before failing over here")
        }
        let virtType = try virtType(for: machine)
        for (source, target) in options.networkMap.sorted(by: { $0.key < $1.key }) {
            let found = try virt("looking up network \(target)") { try connection().network(named: target) }
            guard found != nil else {
                throw LifeboatError(.notFound, "network \(target) (given for \(source) in --network-map) does not exist on this host: create it (virsh net-define) or map \(source) to another network")
            }
        }

        let point: RecoveryPoint
        if options.planned {
            try checkSourceIdle(machine, force: options.force)
            report("planned failover: taking the final recovery point of \(name)")
            point = try takePoint(name, using: replication).point
            machine = try repository.machine(name)
        } else {
            point = try resolvePoint(name, options.point)
        }

        var record = ServerRecord(machine: name, state: .finalizing, repository: repository.root)
        record.point = point.id
        record.pointTime = point.time
        record.vm = name
        record.ip = ip?.address.description
        record.prefix = ip?.prefix
        record.mac = mac
        record.vcpus = vcpus
        record.memoryMiB = memory
        record.virtType = virtType
        record.bandwidth = options.bandwidth
        record.rememberSource(machine)
        record.bridge = options.bridge ?? (options.network == nil ? machine.bridge : nil)
        record.network = record.bridge == nil ? (options.network ?? machine.network ?? Self.productionNetworkName) : nil
        record.networkMap = options.networkMap.isEmpty ? nil : options.networkMap
        record.phase = "starting"
        try hot.save(record)
        do {
            try bootFromPoint(&record, point: point, gateway: machine.gateway.flatMap(IPv4.init), report: report)
        } catch {
            // Nothing of the machine ran yet: undo, back to Standby.
            _ = try? tearDown(name, record: record)
            _ = releaseMountIfUnused(except: name)
            try? backToStandby(name, event: "failover", point: point.id, detail: "failed and undone: \(error)")
            throw error
        }
        record.phase = nil
        try hot.save(record)
        hot.record(name, HistoryEvent(event: "failover", state: .finalizing, point: point.id, detail: String(
            format: "%@VM %@ running after %.1f s on %@; finalising into %@", options.planned ? "planned: " : "", name,
            Date().timeIntervalSince(started), record.bridge.map { "bridge " + $0 } ?? record.network ?? "?", hot.disksDirectory(name))))
        announceFinaliser(name)   // this process, until the finaliser it starts takes over
        return record
    }

    /// Holds the point, mounts, makes the overlays and names the hot disks, joins the production
    /// network, defines and starts the domain; finalisation (`seed`, `advance`) follows.
    /// Used by failover and change-point.
    func bootFromPoint(_ record: inout ServerRecord, point: RecoveryPoint, gateway: IPv4?, report: (String) -> Void) throws {
        let name = record.machine
        repository.release(name, by: "failover")
        try repository.hold(name, point: point.id, by: "failover")   // read until every disk is hot
        let mount = try ensureMount()
        record.mount = mount
        let folder = hot.disksDirectory(name)
        record.disks = []
        record.disks = try makeOverlays(of: point, machine: name, mount: mount, in: folder, finals: true)
        try hot.save(record)
        report("overlays in \(folder) over point \(point.id)")

        let interface: DomainParameters.Interface
        if let bridge = record.bridge {
            interface = .init(bridge: bridge, mac: record.mac ?? "")
        } else {
            let network = record.network ?? Self.productionNetworkName
            record.createdNetwork = try ensureProductionNetwork(network, machine: name, mac: record.mac ?? "",
                                                                ip: record.interface,
                                                                gateway: gateway) || (record.createdNetwork ?? false)
            interface = .init(network: network, mac: record.mac ?? "")
        }
        try hot.save(record)
        let console = hot.machineDirectory(name) + "/console.log"
        try startDomain(record, interface: interface, console: console, report: report)
        report(String(format: "VM %@ running (%@, %d vCPU, %d MiB) on %@", name, record.virtType ?? "?", record.vcpus ?? 1,
                      record.memoryMiB ?? 0, record.bridge.map { "bridge " + $0 } ?? record.network ?? "?"))
    }

    /// Defines (persistently) and starts the domain from the record's disks.
    func startDomain(_ record: ServerRecord, interface: DomainParameters.Interface, console: String, report: (String) -> Void = { _ in }) throws {
        let name = record.machine
        let point = try record.point.flatMap { id in try repository.points(name).first { $0.id == id } }
        try defineAndStart(name: name, type: record.virtType ?? "qemu", vcpus: record.vcpus ?? 1, memoryMiB: record.memoryMiB ?? 512,
                           title: "lifeboat recovery VM of \(name)",
                           description: "Failover of \(name) from recovery point \(record.point ?? "?"). Managed by lifeboat: see lifeboat status \(name)",
                           disks: record.disks, interfaces: [interface], console: console, point: point,
                           networkMap: record.networkMap ?? [:], machine: try? repository.machine(name), report: report)
    }

    /// Creates (when missing) and starts the production network; reserves the IP for the MAC.
    /// - Returns: true when lifeboat created the network.
    func ensureProductionNetwork(_ name: String, machine: String, mac: String, ip: Interface4?, gateway: IPv4?) throws -> Bool {
        let _lock = try hot.sharedLock()
        defer { withExtendedLifetime(_lock) {} }
        let connection = try connection()
        var created = false
        var network = try virt("looking up network \(name)") { try connection.network(named: name) }
        if network == nil {
            guard let ip else {
                throw LifeboatError(.invalidArgument,
                    "network \(name) does not exist and \(machine) has no IP to build it around: create it in libvirt, give --network or --bridge, or set --ip")
            }
            let host = ip.bridgeAddress(gateway: gateway, vm: ip.address)
            let parameters = Self.networkParameters(name: name, host: host, avoiding: ip.address)
            let xml = try virt("rendering the production network") { try settings.templates.render(Templates.productionNetwork, parameters) }
            network = try virt("creating the production network \(name) (\(host.subnet))") { try connection.defineNetwork(xml: xml) }
            created = true
        }
        guard let network else { throw LifeboatError(.io, "network \(name) vanished") }
        if !(try virt("reading network \(name)") { try network.isActive() }) {
            try virt("starting network \(name)") { try network.start() }
        }
        if let ip {
            try? network.updateDHCPHost(Self.hostEntry(mac: mac, ip: nil, machine: machine), remove: true)
            // A network without DHCP (static addresses) takes no reservation: the guest keeps its own.
            try? network.updateDHCPHost(Self.hostEntry(mac: mac, ip: ip.address, machine: machine))
        }
        return created
    }

    // MARK: - cancel, change point, commit

    /// The opening every action on a failed-over machine shares: the machine's lock (held while
    /// the returned lock lives), finalisation moved on as far as libvirt allows, and the record,
    /// whose state must allow `command` (else the state machine's sentence).
    func beginTransition(_ command: RecoveryCommand, _ name: String) throws -> (lock: FileLock, record: ServerRecord) {
        let lock = try hot.lock(name)
        _ = try? advance(name)
        guard let record = try hot.record(name) else {
            _ = try StateMachine.check(command, machine: name, state: .standby)
            throw LifeboatError(.invalidState, "\(name) is in Standby")
        }
        _ = try StateMachine.check(command, machine: name, state: record.state)
        return (lock, record)
    }

    /// The one way back to Standby: a fresh record, and the step in history.
    func backToStandby(_ name: String, event: String, point: String?, detail: String) throws {
        var standby = ServerRecord(machine: name, state: .standby, repository: repository.root)
        standby.since = Date()
        try hot.save(standby)
        hot.record(name, HistoryEvent(event: event, state: .standby, point: point, detail: detail))
    }

    /// Throws the VM and everything it wrote away: domain, hot disks, network reservation; Standby.
    public func cancelFailover(_ name: String) throws {
        let (lock, record) = try beginTransition(.cancelFailover, name)
        defer { withExtendedLifetime(lock) {} }
        try tearDown(name, record: record)
        _ = releaseMountIfUnused(except: name)
        try backToStandby(name, event: "cancel-failover", point: record.point,
                          detail: "VM \(name) destroyed, its hot disks deleted: everything it wrote since the failover is gone")
    }

    /// Removes the failed-over VM, its hot disks and its network reservation.
    func tearDown(_ name: String, record: ServerRecord) throws {
        _ = try removeDomain(name)
        repository.release(name, by: "failover")
        FileSystem.removeTree(hot.disksDirectory(name))
        releaseProductionNetwork(record)
    }

    func releaseProductionNetwork(_ record: ServerRecord) {
        guard let name = record.network, let connection = try? connection(),
              let network = try? connection.network(named: name) else { return }
        if let mac = record.mac { try? network.updateDHCPHost(Self.hostEntry(mac: mac, ip: nil, machine: record.machine), remove: true) }
        guard record.createdNetwork == true else { return }
        let others = hot.records().filter {
            $0.machine != record.machine && $0.network == name && $0.state != .standby && $0.state != .testingFailover
        }
        if others.isEmpty {
            try? network.destroy()
            try? network.undefine()
        }
    }

    /// Boots the VM again from another point; what it wrote since the failover is discarded.
    public func changePoint(_ name: String, to pointID: String, report: (String) -> Void = { _ in }) throws -> ServerRecord {
        let (lock, opened) = try beginTransition(.changePoint, name)
        defer { withExtendedLifetime(lock) {} }
        var record = opened
        let point = try resolvePoint(name, pointID)
        let machine = try repository.machine(name)
        let previous = record.point
        _ = try removeDomain(name)
        FileSystem.removeTree(hot.disksDirectory(name))
        record.state = .finalizing
        record.since = Date()
        record.point = point.id
        record.pointTime = point.time
        record.phase = "starting"
        try hot.save(record)
        try bootFromPoint(&record, point: point, gateway: machine.gateway.flatMap(IPv4.init), report: report)
        record.phase = nil
        try hot.save(record)
        hot.record(name, HistoryEvent(event: "change-point", state: .finalizing, point: point.id,
                                      detail: "VM \(name) restarted from point \(point.id) instead of \(previous ?? "?"); what it wrote since the failover was discarded"))
        announceFinaliser(name)
        return record
    }

    /// Makes the failover final: backups of `name` now read the recovery VM's hot disks.
    public func commit(_ name: String) throws -> Machine {
        let (lock, opened) = try beginTransition(.commit, name)
        defer { withExtendedLifetime(lock) {} }
        var record = opened
        var machine = try repository.machine(name)
        if record.sourceDisks == nil { record.rememberSource(machine) }
        for index in machine.disks.indices {
            if let disk = record.disks.first(where: { $0.name == machine.disks[index].name }) {
                machine.disks[index] = MachineDisk(name: disk.name, path: disk.path, format: disk.path.hasSuffix(".qcow2") ? "qcow2" : "raw")
            }
        }
        // Protection follows the machine: a domain machine's points now come from the recovery VM
        // (libvirt's backup API while it runs); the source domain is remembered for failback.
        var protected = record.disks.map(\.path).joined(separator: ", ")
        if machine.domain != nil, let vm = record.vm {
            // Its raw hot disks get qcow2 images on top, at one instant while it runs: their dirty
            // bitmaps make the recovery VM's points after the first incremental.
            let domain = try virt("looking up the recovery VM \(vm)") { try connection().domain(named: vm) }
            guard let domain else { throw LifeboatError(.notFound, "the recovery VM \(vm) is gone from libvirt: see lifeboat status \(name)") }
            let live = try virt("reading the disks of \(vm)") { try DomainDisk.disks(inDomainXML: try domain.xml()) }
            let overlays = live.filter { !$0.canHoldBitmaps }.map { (target: $0.target, file: hot.disksDirectory(name) + "/\($0.target).live.qcow2") }
            if !overlays.isEmpty {
                for overlay in overlays { unlink(overlay.file) }
                try virt("putting qcow2 images on the hot disks of \(vm)") { try domain.addOverlays(overlays) }
            }
            let now = try virt("reading the disks of \(vm)") { try DomainDisk.disks(inDomainXML: try domain.xml()) }
            machine.disks = now.map { MachineDisk(name: $0.target, path: $0.source, format: $0.format) }
            machine.domain = vm
            machine.connectURI = settings.connectURI
            protected = "the recovery VM \(vm) (libvirt domain, its disks \(now.map(\.source).joined(separator: ", "))); the next point is full, with dedup, then incremental"
        }
        try repository.save(machine)
        record.state = .committed
        record.since = Date()
        try hot.save(record)
        hot.record(name, HistoryEvent(event: "commit", state: .committed, point: record.point,
                                      detail: "the failover is final; points of \(name) now read \(protected)"))
        return machine
    }

}
