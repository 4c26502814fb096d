import Foundation
import LifeboatBase
import LifeboatFS
import LifeboatRepository
import LifeboatVirt

/// One machine's recovery server as `status` reports it: checked against libvirt, the mounts
/// and hot storage, not taken from the record alone.
public struct ServerStatus: Codable, Sendable {
    public var machine: String
    public var lastPoint: String?
    public var lastPointTime: Date?
    /// Seconds since the last point was taken.
    public var lastPointAge: Double?
    public var rpoSeconds: Int?
    /// lastPointAge / rpoSeconds: above 1 breaks the RPO.
    public var rpoRatio: Double?
    public var rpoCompliant: Bool?
    public var state: ServerState
    public var since: Date?
    public var point: String?
    public var vm: String?
    /// The domain's state in libvirt: running, shut-off, missing, unknown (libvirt unreachable).
    public var vmState: String?
    public var network: String?
    public var ip: String?
    public var disks: [HotDisk]
    /// Finalisation progress while Finalizing.
    public var finalisation: FinalisationProgress?
    /// How replication of the machine goes (points taken by the replication service).
    public var replication: ReplicationState?
    /// Work in progress right now (a command at work, the finaliser's step): nothing to do but wait.
    public var transition: String?
    /// The plan run the machine is part of right now (running, paused, or interrupted), in words.
    public var plan: String?
    /// What the machine's points read now, in words: the source domain, the recovery VM after
    /// commit, the disk files, or nothing while failed over and not committed.
    public var protected: String?
    /// The off-site copy as the last `lifeboat sync` of the machine left it (nil: never synced).
    public var offsite: OffsiteCopy?
    /// Seconds since the newest point at the off-site target was taken: the off-site RPO's measure.
    public var offsiteAge: Double?
    public var offsiteRPOCompliant: Bool?
    /// Things that do not match the state, each with what to do.
    public var problems: [String]
}

extension Recovery {
    /// Status of every machine of the repository (or just `only`).
    public func status(only: String? = nil) throws -> [ServerStatus] {
        let machines = try only.map { [try repository.machine($0)] } ?? repository.machines()
        let now = Date()
        var libvirtProblem: String? = nil
        var connection: Connection? = nil
        do { connection = try self.connection() } catch { libvirtProblem = "\(error)" }
        let runs = planRunsByMachine()
        return machines.map { machine in
            // Status reads the record, then libvirt, the lock and the finaliser, one after the
            // other: a command that ends in between leaves a record that is no longer true (its
            // phase still set, its lock already free). When that picture shows problems and the
            // record changed meanwhile, look again: only a picture that holds still is reported.
            var status = serverStatus(machine, now: now, connection: connection, libvirtProblem: libvirtProblem)
            for _ in 0..<3 where !status.problems.isEmpty {
                let before = FileSystem.contents(hot.recordPath(machine.name))
                Thread.sleep(forTimeInterval: 0.05)
                let again = serverStatus(machine, now: now, connection: connection, libvirtProblem: libvirtProblem)
                let stable = before == FileSystem.contents(hot.recordPath(machine.name)) && again.problems == status.problems
                status = again
                if stable { break }
            }
            if let (text, problem) = runs[machine.name] {
                status.plan = text
                if let problem { status.problems.append(problem) }
            }
            return status
        }
    }

    /// For each machine in a plan run that is under way, paused or interrupted: the run in words,
    /// and a problem when nobody executes a run that says it is running.
    func planRunsByMachine() -> [String: (String, String?)] {
        var found: [String: (String, String?)] = [:]
        for plan in plans() {
            guard let run = activeRun(plan.name) else { continue }
            let group = run.groups.first { $0.result == .running || $0.result == .pending }?.number
            var text = "plan \(plan.name) \(run.kind.rawValue) \(run.id): "
            var problem: String? = nil
            if run.result == .paused {
                text += "paused after group \((group ?? 1) - 1): \(run.nextStep)"
            } else if let pid = planRunnerAlive(plan.name) {
                text += "running" + (group.map { " group \($0) of \(run.groups.count)" } ?? "") + " (pid \(pid))"
            } else {
                text += "interrupted" + (group.map { " in group \($0)" } ?? "")
                problem = "plan \(plan.name)'s \(run.kind.rawValue) \(run.id) was interrupted (its lifeboat process stopped): "
                    + (run.kind == .drill ? "run lifeboat stop-test --plan \(plan.name)"
                       : "run lifeboat plan continue \(plan.name), or lifeboat cancel-failover --plan \(plan.name) --yes")
            }
            for machine in plan.machines { found[machine] = (text, problem) }
        }
        return found
    }

    /// One machine's status from one reading of its record.
    func serverStatus(_ machine: Machine, now: Date, connection: Connection?, libvirtProblem: String?) -> ServerStatus {
        let points = (try? repository.points(machine.name)) ?? []
        let last = points.last
        let record = try? hot.record(machine.name)
        var status = ServerStatus(machine: machine.name, lastPoint: last?.id, lastPointTime: last?.time,
                                  lastPointAge: last.map { now.timeIntervalSince($0.time) }, rpoSeconds: machine.rpoSeconds,
                                  state: record?.state ?? .standby, since: record?.since, point: record?.point, vm: record?.vm,
                                  network: record?.bridge.map { "bridge " + $0 } ?? record?.network, ip: record?.ip,
                                  disks: record?.disks ?? [], problems: [])
        status.replication = hot.replicationState(machine.name)
        status.protected = Self.protected(machine, state: status.state)
        if let replication = status.replication, replication.failures > 0 {
            status.problems.append("replication of \(machine.name) is failing (\(replication.failures) attempt(s)): "
                + (replication.lastError ?? "?") + (replication.nextAttempt.map { "; next attempt at \(Timestamp.format($0))" } ?? ""))
        }
        (status.rpoRatio, status.rpoCompliant) = RPORule.evaluate(rpoSeconds: machine.rpoSeconds, lastPointTime: last?.time, now: now)
        if let remote = repository.remote, let failure = remote.lastReadFailure {
            status.problems.append("reads from \(remote.description) are failing since \(Timestamp.format(failure.time)) (\(failure.message)): "
                + "what is not in the cache folder cannot be read (a VM gets I/O errors) until the endpoint answers again")
        }
        if let offsite = repository.offsiteCopy(machine.name) {
            status.offsite = offsite
            status.offsiteAge = offsite.newestPointTime.map { now.timeIntervalSince($0) }
            status.offsiteRPOCompliant = RPORule.evaluate(rpoSeconds: machine.rpoSeconds, lastPointTime: offsite.newestPointTime, now: now).compliant
            if let error = offsite.lastError {
                status.problems.append("the last sync of \(machine.name) to \(offsite.target) failed: \(error)")
            }
        }
        if let libvirtProblem {
            status.vmState = status.vm == nil ? nil : "unknown"
            if status.state != .standby { status.problems.append(libvirtProblem) }
            return status
        }
        reconcile(&status, record: record, connection: connection!)
        // The worst day starts here: the domain being protected is gone (its site was lost).
        func gone(_ domain: String) -> Bool {
            do { return try connection!.domain(named: domain) == nil } catch { return false }
        }
        if let domain = machine.domain, status.state == .standby || status.state == .committed,
           machine.connectURI == nil || machine.connectURI == settings.connectURI, gone(domain) {
            status.problems.append("domain \(domain), which \(machine.name)'s points read, is gone from libvirt at \(settings.connectURI): "
                + "fail over (lifeboat failover \(machine.name)) or define it again")
        }
        return status
    }

    /// Which VM (or which disk files) the machine's points read in `state`: protection follows
    /// the machine from the source to the recovery VM at commit, and back at failback.
    static func protected(_ machine: Machine, state: ServerState) -> String {
        switch state {
        case .standby, .testingFailover, .committed:
            let what = machine.domain.map { "domain \($0)" } ?? "disks " + machine.disks.map(\.path).joined(separator: ", ")
            return state == .committed ? "the recovery VM: " + what : what
        case .finalizing, .failedOver:
            return "nothing: failed over; points of the recovery VM start at commit"
        case .failingBack:
            return "nothing: failing back"
        }
    }

    /// Compares the record with libvirt, the overlays and the mount; fills vmState and problems.
    func reconcile(_ status: inout ServerStatus, record: ServerRecord?, connection: Connection) {
        let name = status.machine
        switch status.state {
        case .standby:
            let (testDomain, overlays) = testLeftovers(name)
            if testDomain != nil || overlays > 0 {
                status.state = .testingFailover
                status.vm = Self.testDomainName(name)
                status.vmState = testDomain.flatMap { try? $0.state().rawValue } ?? "missing"
                status.problems.append("an interrupted drill left \(testDomain != nil ? "the VM \(Self.testDomainName(name))" : "") \(overlays == 0 ? "" : "\(overlays) overlay(s)") behind: run lifeboat stop-test \(name)")
            }
        case .testingFailover, .finalizing, .failedOver, .committed, .failingBack:
            guard let vm = status.vm else { break }
            let domain = try? connection.domain(named: vm)
            let state = domain.flatMap { try? $0.state() }
            status.vmState = state?.rawValue ?? "missing"
            // A command at work on the machine (it holds the lock) or a living finaliser changes
            // files, the record and the VM step by step: what is in flux is a transition, not a
            // fault. Only a command or finaliser that is gone or stalled leaves work for a person.
            let busy = commandAtWork(name)
            if let busy {
                status.transition = "lifeboat (pid \(busy)) is at work on \(name)" + (record?.phase.map { " (\($0))" } ?? "")
            }
            var finaliserWorking = false
            if status.state == .finalizing, let progress = finalisation(name) {
                status.finalisation = progress
                let finaliser = progress.finaliser
                finaliserWorking = finaliser?.health == .working
                if finaliserWorking, let finaliser, busy == nil || busy == finaliser.pid {
                    status.transition = "finaliser (pid \(finaliser.pid ?? 0)) " + Self.describe(step: finaliser.step, disk: finaliser.disk)
                }
            }
            let undo = status.state == .testingFailover ? "lifeboat stop-test \(name)" : "lifeboat resume \(name) or lifeboat cancel-failover \(name)"
            guard busy == nil else { break }
            if let phase = record?.phase {
                status.problems.append("\(phase) did not finish (lifeboat was interrupted): run \(undo)")
            }
            if domain == nil {
                status.problems.append("the VM \(vm) does not exist (interrupted, or removed outside lifeboat): run \(undo)")
            } else if let state, !state.isActive, status.state != .failingBack {
                status.problems.append("the VM \(vm) is \(state.rawValue) (the guest stopped, or the host restarted): run \(undo)")
            }
            if !finaliserWorking {
                for disk in status.disks where !FileSystem.exists(disk.path) {
                    status.problems.append("the disk \(disk.path) is missing: run \(undo)")
                }
            }
            if status.state == .finalizing, domain != nil, let finaliser = status.finalisation?.finaliser {
                switch finaliser.health {
                case .working: break
                case .stalled:
                    status.problems.append("finalisation of \(name) is stalled: its lifeboat process (pid \(finaliser.pid ?? 0)) has made no progress "
                        + "\(Self.describe(step: finaliser.step, disk: finaliser.disk)): run lifeboat resume \(name)")
                case .gone:
                    status.problems.append("finalisation of \(name) is not running (its lifeboat process stopped): run lifeboat resume \(name)")
                }
            }
            if status.state.usesMount, let mount = record?.mount, !Mounts.isMounted(mount),
               status.disks.contains(where: { $0.backing != nil }) {
                status.problems.append("the FUSE mount \(mount) is gone, so the VM cannot read its backing disk: run \(undo)")
            }
        }
    }

    /// A finaliser's step in words.
    static func describe(step: String?, disk: String?) -> String {
        let disk = disk ?? "a disk"
        switch step {
        case "seeding": return "is copying \(disk) from the backup into hot storage"
        case "seeded": return "has copied \(disk) into hot storage"
        case "copying writes": return "is moving the guest's writes of \(disk) onto its hot disk"
        case "pivoting": return "is switching \(disk) to its hot disk"
        case "merging": return "is merging the guest's writes into \(disk)'s hot disk"
        case "finished": return "has finished"
        default: return "is starting"
        }
    }

    /// History of `name`, oldest first.
    public func history(_ name: String) throws -> [HistoryEvent] {
        _ = try repository.machine(name)
        return hot.history(name)
    }

    /// Drills of `name`, oldest first.
    public func drills(_ name: String) throws -> [Drill] {
        _ = try repository.machine(name)
        return hot.drills(name)
    }
}
