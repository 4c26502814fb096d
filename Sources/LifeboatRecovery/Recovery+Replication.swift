import Foundation
import LifeboatBase
import LifeboatReplication
import LifeboatRepository
#if canImport(Glibc)
import Glibc
#endif

/// How the replication of one machine is going: kept in hot storage (HOT/NAME/replication.json),
/// which stays writable when the repository is not, so that a failure is always visible.
public struct ReplicationState: Codable, Sendable, Equatable {
    public var lastAttempt: Date?
    public var lastSuccess: Date?
    public var lastPoint: String?
    /// Failed attempts since the last success.
    public var failures: Int = 0
    public var lastError: String?
    /// When the service tries again after a failure (back-off with jitter).
    public var nextAttempt: Date?
    /// Seconds the last point took, bytes it read.
    public var lastSeconds: Double?
    public var lastBytesRead: Int?

    public init() {}
}

/// What one replication job did.
public struct ReplicationOutcome: Sendable {
    public var machine: String
    public var point: RecoveryPoint?
    public var error: String?
    public var pruned: [String] = []
    public var state: ReplicationState
}

extension HotStorage {
    func replicationPath(_ name: String) -> String { machineDirectory(name) + "/replication.json" }

    public func replicationState(_ name: String) -> ReplicationState? {
        (try? Data(contentsOf: URL(fileURLWithPath: replicationPath(name))))
            .flatMap { try? JSONDecoder.lifeboat.decode(ReplicationState.self, from: $0) }
    }

    /// Changes the machine's replication state under a lock of its own (a hand-made point and
    /// the service's may end at the same moment), read afresh; returns it as saved.
    @discardableResult
    func updateReplicationState(_ name: String, _ change: (inout ReplicationState) -> Void) -> ReplicationState {
        try? prepare(name)
        let lock = try? FileLock(path: machineDirectory(name) + "/.replication.lock", mode: .exclusive, wait: true)
        defer { withExtendedLifetime(lock) {} }
        var state = replicationState(name) ?? ReplicationState()
        change(&state)
        if let bytes = try? JSONEncoder.lifeboat.encode(state) { try? FileSystem.writeAtomically(Array(bytes), to: replicationPath(name)) }
        return state
    }
}

extension Recovery {
    /// When each machine is next due for a point: its last point plus its interval (now when it
    /// has none), or the retry time after a failure. Machines whose source is not live (failed
    /// over and not committed, or failing back) are left out.
    public func replicationSchedule(now: Date = Date()) -> [(machine: String, due: Date)] {
        let machines = (try? repository.machines()) ?? []
        return machines.compactMap { machine in
            let state = (try? hot.record(machine.name))?.state ?? .standby
            guard state == .standby || state == .testingFailover || state == .committed else { return nil }
            let replication = hot.replicationState(machine.name)
            if let replication, replication.failures > 0, let next = replication.nextAttempt { return (machine.name, next) }
            // Never backed up: due since it was protected, so it goes before machines due later.
            guard let last = (try? repository.points(machine.name))?.last else { return (machine.name, min(now, machine.created)) }
            return (machine.name, last.time.addingTimeInterval(TimeInterval(machine.interval)))
        }
    }

    /// Back-off after `failures` failed attempts: doubling from a base of a quarter of the
    /// interval (between 1 s and 1 min), at most the interval (and 30 min), with ±20 % jitter so
    /// that machines that failed together do not retry together.
    public static func backoff(failures: Int, interval: Int, jitter: Double = Double.random(in: 0.8...1.2)) -> TimeInterval {
        let base = min(60, max(1, Double(interval) / 4))
        let cap = max(base, min(Double(interval), 1800))
        return min(cap, base * pow(2, Double(max(0, failures - 1)))) * jitter
    }

    /// Takes one point of `name` (a domain through `replication`, disk files directly), applies
    /// the machine's retention, and records the outcome in history and the replication state:
    /// the one way a point is taken, whoever asks (`lifeboat backup`, the console, the service).
    /// - Throws: the point's own error, after recording it (an unknown machine records nothing).
    public func takePoint(_ name: String, using replication: Replication, progress: ProgressMeter = ProgressMeter(),
                          cancelled: @escaping @Sendable () -> Bool = { false }) throws -> (point: RecoveryPoint, pruned: [String]) {
        let machine = try repository.machine(name)
        let started = Date()
        let serverState = (try? hot.record(name))?.state ?? .standby
        do {
            let point = machine.domain != nil
                ? try replication.takePoint(name, progress: progress, cancelled: cancelled)
                : machine.disks.allSatisfy(\.isRaw)
                    ? try repository.backup(name, progress: progress)
                    : try replication.imagePoint(name, progress: progress, cancelled: cancelled)
            var pruned: [String] = []
            if let policy = machine.retention, !policy.isEmpty {
                do { pruned = try repository.prune(name, policy: policy).removed } catch {
                    hot.record(name, HistoryEvent(event: "prune-failed", state: serverState, point: point.id, detail: "\(error)"))
                }
            }
            hot.updateReplicationState(name) { state in
                state.lastAttempt = started
                state.lastSuccess = point.time
                state.lastPoint = point.id
                state.failures = 0
                state.lastError = nil
                state.nextAttempt = nil
                state.lastSeconds = point.seconds
                state.lastBytesRead = point.bytesRead
            }
            var detail = "\(point.readMode ?? "full") point, \(point.consistency), \(point.bytesRead) bytes read in "
                + String(format: "%.1f s", point.seconds)
            if let note = point.note { detail += "; \(note)" }
            if !pruned.isEmpty { detail += "; retention removed \(pruned.joined(separator: ", "))" }
            hot.record(name, HistoryEvent(event: "backup", state: serverState, point: point.id, detail: detail))
            return (point, pruned)
        } catch {
            var wait = 0.0
            let state = hot.updateReplicationState(name) { state in
                state.lastAttempt = started
                state.failures += 1
                state.lastError = "\(error)"
                wait = cancelled() ? 0 : Self.backoff(failures: state.failures, interval: machine.interval)
                state.nextAttempt = Date().addingTimeInterval(wait)
            }
            hot.record(name, HistoryEvent(event: "backup-failed", state: serverState, detail: "\(error)"
                + (cancelled() ? "" : String(format: "; attempt %d, next in %.0f s", state.failures, wait))))
            throw error
        }
    }

    /// `takePoint`, its outcome as a value (the service and the console's jobs).
    public func replicate(_ name: String, using replication: Replication, progress: ProgressMeter = ProgressMeter(),
                          cancelled: @escaping @Sendable () -> Bool = { false }) -> ReplicationOutcome {
        do {
            let (point, pruned) = try takePoint(name, using: replication, progress: progress, cancelled: cancelled)
            return ReplicationOutcome(machine: name, point: point, pruned: pruned, state: hot.replicationState(name) ?? ReplicationState())
        } catch {
            return ReplicationOutcome(machine: name, error: "\(error)", state: hot.replicationState(name) ?? ReplicationState())
        }
    }

    /// Holds the repository's replication-service lock for as long as the returned object lives.
    /// - Throws: `.busy` naming the pid of the service that holds it.
    package func lockReplicationService() throws -> FileLock {
        try FileLock.exclusive(repository.root + "/replicate.lock") {
            "another lifeboat replicate\($0) serves repository \(repository.root): stop it first (one service per repository)"
        }
    }
}

/// A machine's newest point against its RPO, from the repository alone (no libvirt).
public struct RPOStatus: Codable, Sendable {
    public var machine: String
    public var lastPoint: String?
    public var lastPointTime: Date?
    public var rpoSeconds: Int?
    /// True when the newest point is younger than the RPO (or no RPO is set).
    public var compliant: Bool
    /// The off-site copy (`lifeboat sync`): where, its newest point's time, and the same RPO
    /// rule applied to it (nil when the machine is not synced anywhere or has no RPO).
    public var offsiteTarget: String?
    public var offsitePointTime: Date?
    public var offsiteCompliant: Bool?
    /// Why the last sync of the machine failed, when it did.
    public var offsiteError: String?

    /// Within the RPO here and, when copied off-site, there too.
    public var compliantEverywhere: Bool { compliant && offsiteCompliant != false }
}

/// The one RPO rule (status, `status --check`, the metrics and the console all use it): a
/// machine with an RPO is compliant while its newest point is no older than the RPO; one with no
/// point is not; a machine without an RPO (or an RPO of 0) has nothing to comply with.
public enum RPORule {
    /// The newest point's age over the RPO (nil without an RPO or a point) and compliance (nil without an RPO).
    public static func evaluate(rpoSeconds: Int?, lastPointTime: Date?, now: Date) -> (ratio: Double?, compliant: Bool?) {
        guard let rpo = rpoSeconds, rpo > 0 else { return (nil, nil) }
        guard let last = lastPointTime else { return (nil, false) }
        let ratio = now.timeIntervalSince(last) / Double(rpo)
        return (ratio, ratio <= 1)
    }
}

extension Recovery {
    /// Every machine's newest point against its RPO (`RPORule`).
    public func replicationStatus(now: Date = Date()) throws -> [RPOStatus] {
        try repository.machines().map { machine in
            let last = (try? repository.points(machine.name))?.last
            let compliant = RPORule.evaluate(rpoSeconds: machine.rpoSeconds, lastPointTime: last?.time, now: now).compliant ?? true
            let offsite = repository.offsiteCopy(machine.name)
            return RPOStatus(machine: machine.name, lastPoint: last?.id, lastPointTime: last?.time, rpoSeconds: machine.rpoSeconds,
                             compliant: compliant, offsiteTarget: offsite?.target, offsitePointTime: offsite?.newestPointTime,
                             offsiteCompliant: offsite.flatMap { RPORule.evaluate(rpoSeconds: machine.rpoSeconds, lastPointTime: $0.newestPointTime, now: now).compliant },
                             offsiteError: offsite?.lastError)
        }
    }
}
