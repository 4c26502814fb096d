import Foundation
import Synchronization
import LifeboatFS
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

/// Finalisation progress: bytes of the VM's disks already in hot storage.
public struct FinalisationProgress: Codable, Sendable {
    public struct Disk: Codable, Sendable {
        public var name: String
        public var done: UInt64
        public var total: UInt64
        /// waiting, copying, switching (seeded; the guest's writes follow, then the pivot), hot, stalled
        public var phase: String
    }

    public var disks: [Disk]
    public var bytesDone: UInt64 { disks.reduce(0) { $0 + $1.done } }
    public var bytesTotal: UInt64 { disks.reduce(0) { $0 + $1.total } }
    /// Who finalises, in which step, and whether it is alive (while Finalizing).
    public struct Finaliser: Codable, Sendable {
        public var pid: Int32?
        /// starting, seeding, seeded, copying writes, pivoting, merging, finished
        public var step: String?
        public var disk: String?
        public var health: FinaliserHealth
    }

    public var finaliser: Finaliser?
    /// Bytes per second since the copies started.
    public var rate: Double?
    /// Seconds left at that rate.
    public var eta: Double?
}

/// What a failback did.
public struct FailbackReport: Codable, Sendable {
    public var machine: String
    /// Points taken of the recovery VM: while it ran, then after it was shut down.
    public var points: [String]
    public var restores: [RestoreResult]
    public var bytesWritten: Int { restores.reduce(0) { $0 + $1.bytesWritten } }
    public var diskBytes: Int { restores.reduce(0) { $0 + $1.size } }
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
        try QemuUser.checkReach(hot)
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

        let point: RecoveryPoint
        if options.planned {
            try checkSourceIdle(machine, force: options.force)
            report("planned failover: taking the final recovery point of \(name)")
            point = try repository.backup(name)
            hot.record(name, HistoryEvent(event: "backup", state: .standby, point: point.id, detail: "final point before a planned failover"))
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
        record.sourceDisks = Dictionary(uniqueKeysWithValues: machine.disks.map { ($0.name, $0.path) })
        record.bridge = options.bridge ?? (options.network == nil ? machine.bridge : nil)
        record.network = record.bridge == nil ? (options.network ?? machine.network ?? Self.productionNetworkName) : nil
        record.phase = "starting"
        try hot.save(record)
        do {
            try bootFromPoint(&record, point: point, gateway: machine.gateway.flatMap(IPv4.init), report: report)
        } catch {
            // Nothing of the machine ran yet: undo, back to Standby.
            _ = try? tearDown(name, record: record)
            var standby = ServerRecord(machine: name, state: .standby, repository: repository.root)
            standby.since = Date()
            try? hot.save(standby)
            _ = releaseMountIfUnused(except: name)
            hot.record(name, HistoryEvent(event: "failover", state: .standby, point: point.id, detail: "failed and undone: \(error)"))
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
        try FileSystem.makeDirectories(folder)
        chmod(folder, 0o755)
        record.disks = []
        for (index, disk) in point.disks.enumerated() {
            let backing = "\(mount)/\(name)/\(point.id)/\(disk.name).raw"
            guard FileSystem.exists(backing) else {
                throw LifeboatError(.notFound, "the FUSE mount \(mount) does not serve \(backing): is it a mount of another repository?")
            }
            let overlay = folder + "/\(disk.name).qcow2"
            let final = folder + "/\(disk.name).raw"
            unlink(final)
            try createOverlay(overlay, backing: backing)
            record.disks.append(HotDisk(name: disk.name, target: Self.target(index), path: overlay, backing: backing,
                                        size: disk.size, final: final, seeded: false))
        }
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
        if !FileSystem.exists(console) { _ = FileManager.default.createFile(atPath: console, contents: nil) }
        QemuUser.give(console, mode: 0o640)
        try startDomain(record, interface: interface, console: console)
        report(String(format: "VM %@ running (%@, %d vCPU, %d MiB) on %@", name, record.virtType ?? "?", record.vcpus ?? 1,
                      record.memoryMiB ?? 0, record.bridge.map { "bridge " + $0 } ?? record.network ?? "?"))
    }

    /// Defines (persistently) and starts the domain from the record's disks.
    func startDomain(_ record: ServerRecord, interface: DomainParameters.Interface, console: String) throws {
        let name = record.machine
        let parameters = DomainParameters(
            name: name, type: record.virtType ?? "qemu", vcpus: record.vcpus ?? 1, memoryMiB: record.memoryMiB ?? 512,
            title: "lifeboat recovery VM of \(name)",
            description: "Failover of \(name) from recovery point \(record.point ?? "?"). Managed by lifeboat: see lifeboat status \(name)",
            disks: record.disks.map { .init(target: $0.target, file: $0.path, format: $0.path.hasSuffix(".raw") ? "raw" : "qcow2", backingFile: $0.backing) },
            interfaces: [interface], consoleLog: console)
        let xml = try virt("rendering the domain") { try settings.templates.render(Templates.domain, parameters) }
        let connection = try connection()
        let domain = try virt("defining the VM \(name)") { try connection.defineDomain(xml: xml) }
        try virt("starting the VM \(name)") { try domain.start() }
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

    // MARK: - finalisation
    //
    // Per disk, while the guest runs on overlay.qcow2 -> FUSE disk:
    //  1. seed: lifeboat writes the point's disk into DISK.raw straight from the repository (the
    //     parallel restore path: every core, whole chunks, holes skipped, fsync at the end);
    //  2. shallow block copy of the overlay (only what the guest wrote) onto DISK.top.qcow2, whose
    //     backing file is DISK.raw, then pivot: the FUSE disk is no longer in the chain;
    //  3. active block commit of DISK.top.qcow2 into DISK.raw, then pivot: DISK.raw stands alone.
    // Each step can be repeated after a crash: the live domain XML says which image the guest is on.

    /// Moves finalisation on by the block-job steps (seeding is done by `seed`): starts the next
    /// job of each seeded disk, pivots jobs that have caught up, restarts the VM when `restart` and
    /// it is not running, and completes the failover (FailedOver) once every disk is hot.
    /// - Returns: the record afterwards.
    @discardableResult
    public func advance(_ name: String, restart: Bool = false) throws -> ServerRecord {
        try advance(name, restart: restart, heartbeat: nil)
    }

    @discardableResult
    func advance(_ name: String, restart: Bool, heartbeat: Heartbeat?) throws -> ServerRecord {
        guard var record = try hot.record(name), record.state == .finalizing else {
            return try hot.record(name) ?? ServerRecord(machine: name, state: .standby, repository: repository.root)
        }
        let connection = try connection()
        var domain = try virt("looking up \(name)") { try connection.domain(named: name) }
        if domain == nil || !((try? domain!.state().isActive) ?? false) {
            guard restart else { return record }
            // The host or QEMU went away: the images in the record hold every write the guest
            // made; boot from them again.
            if record.disks.contains(where: { $0.backing?.hasSuffix(".raw") == true && !FileSystem.exists($0.backing!) }) {
                let mount = try ensureMount()
                if let old = record.mount, mount != old {
                    throw LifeboatError(.invalidState, "the repository is now mounted at \(mount), not \(old): cancel-failover and fail over again")
                }
            }
            if let domain { try virt("starting the VM \(name)") { try domain.start() } } else {
                let interface: DomainParameters.Interface = record.bridge.map { .init(bridge: $0, mac: record.mac ?? "") }
                    ?? .init(network: record.network ?? Self.productionNetworkName, mac: record.mac ?? "")
                if let network = record.network {
                    _ = try ensureProductionNetwork(network, machine: name, mac: record.mac ?? "", ip: record.interface, gateway: nil)
                }
                try startDomain(record, interface: interface, console: hot.machineDirectory(name) + "/console.log")
            }
            domain = try connection.domain(named: name)
            hot.record(name, HistoryEvent(event: "resume", state: .finalizing, point: record.point, detail: "VM \(name) started again from its hot storage"))
        }
        guard let domain else { return record }
        let live = (try? domain.xml()) ?? ""
        for index in record.disks.indices where !record.disks[index].isHot {
            let disk = record.disks[index]
            guard let final = disk.final else { continue }
            let top = Self.topImage(final)
            let source = Self.diskSource(in: live, target: disk.target)
            let job = try? domain.blockJob(disk: disk.target)
            if source == final {
                record.disks[index].path = final
                record.disks[index].backing = nil
                try hot.save(record)
                unlink(top)
            } else if source == top {
                record.disks[index].path = top
                record.disks[index].backing = final
                if disk.path != top {
                    try hot.save(record)
                    unlink(disk.path)
                }
                if let job {
                    heartbeat?.set(job.ready ? "pivoting" : "merging", disk: disk.name)
                    if job.ready, (try? domain.abortBlockJob(disk: disk.target, pivot: true)) != nil {
                        record.disks[index].path = final
                        record.disks[index].backing = nil
                        try hot.save(record)
                        unlink(top)
                    }
                } else {
                    heartbeat?.set("merging", disk: disk.name)
                    try virt("merging the guest's writes into \(final)") { try domain.blockCommitActive(disk: disk.target) }
                }
            } else if disk.seeded == true {
                if let job {
                    heartbeat?.set(job.ready ? "pivoting" : "copying writes", disk: disk.name)
                    if job.ready, (try? domain.abortBlockJob(disk: disk.target, pivot: true)) != nil {
                        let overlay = disk.path
                        record.disks[index].path = top
                        record.disks[index].backing = final
                        try hot.save(record)
                        unlink(overlay)
                    }
                } else {
                    heartbeat?.set("copying writes", disk: disk.name)
                    unlink(top)
                    let result = try ChildProcess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", final, "-F", "raw", top])
                    guard result.status == 0 else { throw LifeboatError(.io, "cannot create \(top) over \(final): \(result.stderr)") }
                    QemuUser.give(top)
                    let xml = "<disk type='file'><driver type='qcow2'/><source file='\(Self.xmlEscaped(top))'/>"
                        + "<backingStore type='file'><format type='raw'/><source file='\(Self.xmlEscaped(final))'/><backingStore/></backingStore></disk>"
                    try virt("moving the guest's writes of \(disk.name) onto its hot disk") {
                        try domain.blockCopy(disk: disk.target, destinationXML: xml, shallow: true, reuseExisting: true)
                    }
                }
            }
        }
        try hot.save(record)
        if record.disks.allSatisfy(\.isHot) {
            record.state = .failedOver
            record.since = Date()
            record.mount = nil
            try hot.save(record)
            try? domain.setAutostart(true)
            heartbeat?.set("finished")
            repository.release(name, by: "failover")
            _ = releaseMountIfUnused(except: name)
            hot.record(name, HistoryEvent(event: "finalised", state: .failedOver, point: record.point,
                                          detail: "every disk is in hot storage (\(record.disks.map(\.path).joined(separator: ", "))); the backup is no longer needed"))
        }
        return record
    }

    static func topImage(_ final: String) -> String {
        (final.hasSuffix(".raw") ? String(final.dropLast(4)) : final) + ".top.qcow2"
    }

    static func xmlEscaped(_ text: String) -> String {
        text.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "'", with: "&apos;")
            .replacingOccurrences(of: "<", with: "&lt;")
    }

    /// Writes every disk that is not seeded yet into its hot raw file, straight from the repository,
    /// at `record.bandwidth` (re-read while it runs, so `resume` can lift it). Another process
    /// already seeding (the lock is taken) makes this return at once.
    /// - Returns: true when it seeded something.
    @discardableResult
    public func seed(_ name: String) throws -> Bool {
        try seed(name, heartbeat: nil)
    }

    /// - Parameter oneDisk: seed one disk and return, so that its block jobs start (`advance`)
    ///   while the next disk is seeded.
    @discardableResult
    func seed(_ name: String, heartbeat: Heartbeat?, oneDisk: Bool = false) throws -> Bool {
        guard let record = try hot.record(name), record.state == .finalizing,
              record.disks.contains(where: { $0.seeded != true && !$0.isHot }),
              let pointID = record.point else { return false }
        let lockPath = hot.machineDirectory(name) + "/.seed.lock"
        guard let lock = try FileLock(path: lockPath, mode: .exclusive, wait: false) else { return false }
        defer { withExtendedLifetime(lock) {} }
        let point = try repository.point(name, pointID)
        // A seeder that was killed left its half-written temporary file behind: it starts over.
        let folder = hot.disksDirectory(name)
        for file in (try? FileSystem.list(folder)) ?? [] where FileSystem.isStaleTemporary(file) {
            FileSystem.remove(folder + "/" + file)
        }
        var seededAny = false
        for disk in record.disks where disk.seeded != true && !disk.isHot {
            guard let final = disk.final else { continue }
            let meter = ProgressMeter(limit: Int(record.bandwidth ?? 0))
            heartbeat?.set("seeding", disk: disk.name, meter: meter)
            let finished = Atomic<Bool>(false)
            // `resume` lifts a bandwidth limit by changing the record: follow it.
            let follower = Thread { [hot] in
                while !finished.load(ordering: .relaxed) {
                    if let limit = (try? hot.record(name))?.flatMap({ $0.bandwidth }) { meter.setLimit(Int(limit)) } else { meter.setLimit(0) }
                    Thread.sleep(forTimeInterval: 0.5)
                }
            }
            follower.start()
            defer { finished.store(true, ordering: .relaxed) }
            _ = try repository.restore(point, disk: disk.name, to: final, progress: meter)
            finished.store(true, ordering: .relaxed)
            heartbeat?.set("seeded", disk: disk.name)
            QemuUser.give(final)
            // Record it under the machine's lock, on a fresh copy of the record.
            let machineLock = try waitForLock(name)
            if var current = try hot.record(name), current.state == .finalizing, current.point == pointID,
               let index = current.disks.firstIndex(where: { $0.name == disk.name }) {
                current.disks[index].seeded = true
                try hot.save(current)
            }
            withExtendedLifetime(machineLock) {}
            seededAny = true
            if oneDisk { break }
        }
        return seededAny
    }

    /// The machine's lock, waiting up to a minute for another command to finish.
    func waitForLock(_ name: String) throws -> FileLock {
        let deadline = Date().addingTimeInterval(60)
        while true {
            do { return try hot.lock(name) } catch let error as LifeboatError where error.code == .busy && Date() < deadline {
                Thread.sleep(forTimeInterval: 0.2)
            }
        }
    }

    /// The `<source file=…>` of the disk with target `target` in a domain XML.
    static func diskSource(in xml: String, target: String) -> String? {
        for block in xml.components(separatedBy: "<disk ").dropFirst() {
            let body = block.components(separatedBy: "</disk>").first ?? block
            guard body.contains("<target dev='\(target)'") else { continue }
            guard let range = body.range(of: "<source file='") else { return nil }
            let rest = body[range.upperBound...]
            return rest.firstIndex(of: "'").map { String(rest[..<$0]) }
        }
        return nil
    }

    /// Finalisation progress of `name`: the finaliser's published progress for the disk it
    /// seeds, whole disks for those already seeded or hot, and how the finaliser is doing.
    public func finalisation(_ name: String) -> FinalisationProgress? {
        guard let record = try? hot.record(name), record.state == .finalizing || record.state == .failedOver else { return nil }
        let (beat, health) = finaliser(name)
        var disks: [FinalisationProgress.Disk] = []
        var rate: Double? = nil
        for disk in record.disks {
            let size = UInt64(disk.size)
            if disk.isHot {
                disks.append(.init(name: disk.name, done: size, total: size, phase: "hot"))
            } else if disk.seeded == true {
                disks.append(.init(name: disk.name, done: size, total: size, phase: "switching"))
            } else if let beat, beat.step == "seeding", beat.disk == disk.name, health != .gone {
                let done = beat.done ?? 0
                disks.append(.init(name: disk.name, done: done, total: size, phase: health == .working ? "copying" : "stalled"))
                let elapsed = beat.updated.timeIntervalSince(beat.stepSince)
                if elapsed > 0.5 { rate = Double(done) / elapsed }
            } else {
                disks.append(.init(name: disk.name, done: 0, total: size, phase: health == .working ? "waiting" : "stalled"))
            }
        }
        var progress = FinalisationProgress(disks: disks)
        if record.state == .finalizing {
            progress.finaliser = beat.map { .init(pid: $0.pid, step: $0.step, disk: $0.disk, health: health) }
                ?? .init(pid: nil, step: nil, disk: nil, health: .gone)
        }
        if let rate, rate > 0 {
            progress.rate = rate
            progress.eta = Double(progress.bytesTotal - min(progress.bytesTotal, progress.bytesDone)) / rate
        }
        return progress
    }

    /// Resumes a failover or a failback that was interrupted: restarts the VM and its copies as
    /// needed (Finalizing), or goes on with the failback (FailingBack).
    public func resume(_ name: String) throws -> ServerRecord {
        let lock = try hot.lock(name)
        defer { withExtendedLifetime(lock) {} }
        let record = try hot.record(name)
        let state = try reconciledState(name, record: record)
        _ = try StateMachine.check(.resume, machine: name, state: state)
        if var record, record.state == .finalizing, let bandwidth = record.bandwidth, bandwidth > 0 {
            // Resuming means "finish now": lift a bandwidth limit.
            record.bandwidth = nil   // a seeding process re-reads it within half a second
            try hot.save(record)
        }
        let resumed = try advance(name, restart: true)
        if resumed.state == .finalizing && finaliser(name).health != .working { announceFinaliser(name) }
        return resumed
    }

    /// Advances finalisation until the failover is complete (or cancelled, or changed by another
    /// command), calling `progress` about twice a second. Holds the machine's lock only for each step.
    public func waitForFinalisation(_ name: String, progress: @escaping @Sendable (FinalisationProgress) -> Void = { _ in }) throws -> ServerRecord {
        let heartbeat = Heartbeat(path: finaliserPath(name))
        heartbeat.start()
        defer {
            heartbeat.set("finished")
            heartbeat.stop()
        }
        let done = Atomic<Bool>(false)
        let reporter = Thread { [self] in
            while !done.load(ordering: .relaxed) {
                if let now = finalisation(name) { progress(now) }
                Thread.sleep(forTimeInterval: 0.5)
            }
        }
        reporter.start()
        defer { done.store(true, ordering: .relaxed) }
        while true {
            do {
                let lock = try hot.lock(name)
                let record = try advance(name, restart: false, heartbeat: heartbeat)
                withExtendedLifetime(lock) {}
                if record.state != .finalizing { return record }
            } catch let error as LifeboatError where error.code == .busy {
                // another command works on the machine: look again shortly
            }
            // Block jobs are looked at every 25 ms once a disk is seeded: each disk waits on two
            // of them and each look is a few ms, while 0.1 s looks added about 0.3 s (measured).
            if try !seed(name, heartbeat: heartbeat, oneDisk: true) { Thread.sleep(forTimeInterval: 0.025) }
        }
    }

    // MARK: - cancel, change point, commit

    /// Throws the VM and everything it wrote away: domain, hot disks, network reservation; Standby.
    public func cancelFailover(_ name: String) throws {
        let lock = try hot.lock(name)
        defer { withExtendedLifetime(lock) {} }
        _ = try? advance(name)
        guard let record = try hot.record(name) else {
            _ = try StateMachine.check(.cancelFailover, machine: name, state: .standby)
            return
        }
        _ = try StateMachine.check(.cancelFailover, machine: name, state: record.state)
        try tearDown(name, record: record)
        var standby = ServerRecord(machine: name, state: .standby, repository: repository.root)
        standby.since = Date()
        try hot.save(standby)
        _ = releaseMountIfUnused(except: name)
        hot.record(name, HistoryEvent(event: "cancel-failover", state: .standby, point: record.point,
                                      detail: "VM \(name) destroyed, its hot disks deleted: everything it wrote since the failover is gone"))
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
        let lock = try hot.lock(name)
        defer { withExtendedLifetime(lock) {} }
        _ = try? advance(name)
        guard var record = try hot.record(name) else {
            _ = try StateMachine.check(.changePoint, machine: name, state: .standby)
            throw LifeboatError(.invalidState, "\(name) is in Standby")
        }
        _ = try StateMachine.check(.changePoint, machine: name, state: record.state)
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
        let lock = try hot.lock(name)
        defer { withExtendedLifetime(lock) {} }
        _ = try? advance(name)
        guard var record = try hot.record(name) else {
            _ = try StateMachine.check(.commit, machine: name, state: .standby)
            throw LifeboatError(.invalidState, "\(name) is in Standby")
        }
        _ = try StateMachine.check(.commit, machine: name, state: record.state)
        var machine = try repository.machine(name)
        if record.sourceDisks == nil { record.sourceDisks = Dictionary(uniqueKeysWithValues: machine.disks.map { ($0.name, $0.path) }) }
        for index in machine.disks.indices {
            if let disk = record.disks.first(where: { $0.name == machine.disks[index].name }) { machine.disks[index].path = disk.path }
        }
        try repository.save(machine)
        record.state = .committed
        record.since = Date()
        try hot.save(record)
        hot.record(name, HistoryEvent(event: "commit", state: .committed, point: record.point,
                                      detail: "the failover is final; backups of \(name) now read \(record.disks.map(\.path).joined(separator: ", "))"))
        return machine
    }

    // MARK: - failback

    /// Sends the recovery VM's changes back to the original disks and makes the source live again:
    /// a point of the running VM, shutdown, a last point, in-place restore (only differing chunks
    /// written) onto the original paths or `targets` (disk name -> path), then Standby.
    public func failback(_ name: String, targets: [String: String] = [:], shutdownTimeout: TimeInterval = 120,
                         report: (String) -> Void = { _ in }) throws -> FailbackReport {
        let lock = try hot.lock(name)
        defer { withExtendedLifetime(lock) {} }
        _ = try? advance(name)
        guard var record = try hot.record(name) else {
            _ = try StateMachine.check(.failback, machine: name, state: .standby)
            throw LifeboatError(.invalidState, "\(name) is in Standby")
        }
        _ = try StateMachine.check(.failback, machine: name, state: record.state)
        var machine = try repository.machine(name)
        let originals = record.sourceDisks ?? Dictionary(uniqueKeysWithValues: machine.disks.map { ($0.name, $0.path) })
        for key in targets.keys where originals[key] == nil {
            throw LifeboatError(.invalidArgument, "\(name) has no disk \(key): its disks are \(originals.keys.sorted().joined(separator: ", "))")
        }
        let hotDisks = Dictionary(uniqueKeysWithValues: record.disks.map { ($0.name, $0.path) })
        record.state = .failingBack
        record.since = Date()
        record.phase = "failing back"
        try hot.save(record)
        hot.record(name, HistoryEvent(event: "failback", state: .failingBack, point: record.point, detail: "started"))

        var points: [String] = []
        let domain = try? connection().domain(named: name)
        if let domain, (try? domain.state().isActive) == true {
            report("taking a recovery point of the running VM \(name)")
            let live = try repository.backup(name, sources: hotDisks)
            points.append(live.id)
            hot.record(name, HistoryEvent(event: "backup", state: .failingBack, point: live.id, detail: "point of the running recovery VM (incremental)"))
            report("shutting \(name) down")
            try? domain.shutdown()
            let deadline = Date().addingTimeInterval(shutdownTimeout)
            while Date() < deadline, (try? domain.state().isActive) == true { Thread.sleep(forTimeInterval: 0.2) }
            if (try? domain.state().isActive) == true {
                report("the guest did not shut down within \(Int(shutdownTimeout)) s: stopping it")
                try virt("stopping \(name)") { try domain.destroy() }
            }
        }
        report("taking the last recovery point of \(name)")
        let last = try repository.backup(name, sources: hotDisks)
        points.append(last.id)
        hot.record(name, HistoryEvent(event: "backup", state: .failingBack, point: last.id, detail: "last point, VM shut down"))

        var restores: [RestoreResult] = []
        for disk in last.disks {
            let target = targets[disk.name] ?? originals[disk.name] ?? disk.path
            report("restoring \(disk.name) onto \(target)")
            let result = try repository.restore(last, disk: disk.name, to: target)
            restores.append(result)
        }
        for index in machine.disks.indices {
            let disk = machine.disks[index].name
            machine.disks[index].path = targets[disk] ?? originals[disk] ?? machine.disks[index].path
        }
        try repository.save(machine)
        try tearDown(name, record: record)
        var standby = ServerRecord(machine: name, state: .standby, repository: repository.root)
        standby.since = Date()
        try hot.save(standby)
        let result = FailbackReport(machine: name, points: points, restores: restores)
        hot.record(name, HistoryEvent(event: "failed-back", state: .standby, point: last.id, detail: String(
            format: "restored onto %@: %lld bytes written of %lld (%.2f%%); the source is live again",
            restores.map(\.path).joined(separator: ", "), Int64(result.bytesWritten), Int64(result.diskBytes),
            result.diskBytes > 0 ? 100 * Double(result.bytesWritten) / Double(result.diskBytes) : 0)))
        return result
    }

    /// Refuses (unless `force`) while another process has one of the machine's disk files open.
    func checkSourceIdle(_ machine: Machine, force: Bool) throws {
        guard !force else { return }
        for disk in machine.disks {
            let users = Self.processes(using: disk.path)
            if !users.isEmpty {
                throw LifeboatError(.busy,
                    "disk \(disk.path) of \(machine.name) is open in process \(users.map(String.init).joined(separator: ", ")): shut the source machine down first (a planned failover takes a final backup of stopped disks), or give --force")
            }
        }
    }

    /// PIDs with `path` open, from /proc/*/fd.
    static func processes(using path: String) -> [Int32] {
        let target = (try? FileManager.default.destinationOfSymbolicLink(atPath: path)).map {
            $0.hasPrefix("/") ? $0 : (path as NSString).deletingLastPathComponent + "/" + $0
        } ?? path
        var pids: [Int32] = []
        for entry in (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? [] {
            guard let pid = Int32(entry), pid != getpid() else { continue }
            let fds = "/proc/\(entry)/fd"
            for fd in (try? FileManager.default.contentsOfDirectory(atPath: fds)) ?? [] {
                if (try? FileManager.default.destinationOfSymbolicLink(atPath: fds + "/" + fd)) == target {
                    pids.append(pid)
                    break
                }
            }
        }
        return pids
    }
}
