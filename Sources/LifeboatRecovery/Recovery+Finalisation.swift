import Foundation
import LifeboatBase
import Synchronization
import LifeboatFS
import LifeboatRepository
import LifeboatVirt
#if canImport(Glibc)
import Glibc
#endif

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

extension Recovery {
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
        var sources: [String: String] = [:]
        for disk in (try? DomainDisk.disks(inDomainXML: live)) ?? [] where sources[disk.target] == nil { sources[disk.target] = disk.source }
        for index in record.disks.indices where !record.disks[index].isHot {
            let disk = record.disks[index]
            guard let final = disk.final else { continue }
            let top = DiskFinalisation.topImage(final)
            let source = sources[disk.target]
            let job = (try? domain.blockJob(disk: disk.target)).flatMap { $0 }
            var finalisation = DiskFinalisation()
            let actions = finalisation.observe(guestOn: source == final ? .final : source == top ? .top : .overlay,
                                               job: job.map { $0.ready ? .ready : .running }, seeded: disk.seeded == true)
            if finalisation.phase != .hot && finalisation.phase != .seeding { heartbeat?.set(finalisation.phase.step, disk: disk.name) }
            perform: for action in actions {
                switch action {
                case .adoptTop:
                    let previous = record.disks[index].path
                    record.disks[index].path = top
                    record.disks[index].backing = final
                    if previous != top {
                        try hot.save(record)
                        unlink(previous)
                    }
                case .adoptFinal:
                    record.disks[index].path = final
                    record.disks[index].backing = nil
                    try hot.save(record)
                    unlink(top)
                case .createTop:
                    try createOverlay(top, backing: final)
                case .blockCopy:
                    try virt("moving the guest's writes of \(disk.name) onto its hot disk") {
                        try domain.blockCopy(disk: disk.target, destinationXML: DomainDisk.qcow2OverRawXML(image: top, backing: final),
                                             shallow: true, reuseExisting: true)
                    }
                case .pivot:
                    // libvirt may refuse for a moment (the job not quite ready): the next look tries again.
                    guard (try? domain.abortBlockJob(disk: disk.target, pivot: true)) != nil else { break perform }
                case .commit:
                    try virt("merging the guest's writes into \(final)") { try domain.blockCommitActive(disk: disk.target) }
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

}
