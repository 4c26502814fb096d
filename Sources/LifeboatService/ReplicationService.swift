import Foundation
import Hummingbird
import LifeboatBase
import LifeboatRecovery
import LifeboatReplication
import LifeboatRepository
import Logging
import Prometheus
import ServiceLifecycle
import Synchronization

/// How the replication service runs.
public struct ReplicationServiceOptions: Sendable {
    /// Run what is due once, then return (for a systemd timer or cron).
    public var once = false
    /// At most this many points at once.
    public var jobs = 1
    /// gc runs this often (seconds), between jobs; `compact` follows each gc, beside the points.
    public var gcEvery: TimeInterval = 86_400
    /// zstd level of that compact (nil: no compact).
    public var compactLevel: Int? = CompactOptions.defaultLevel
    /// Where each machine's new points are copied after each point (nil: nowhere).
    public var syncTo: ObjectRepository?

    public init(once: Bool = false, jobs: Int = 1, gcEvery: TimeInterval = 86_400, compactLevel: Int? = CompactOptions.defaultLevel,
                syncTo: ObjectRepository? = nil) {
        self.syncTo = syncTo
        self.once = once
        self.jobs = jobs
        self.gcEvery = gcEvery
        self.compactLevel = compactLevel
    }
}

/// Keeps every protected machine within its RPO: a point per machine every interval, the
/// machine's retention after each, gc on its own schedule and a compact after it (on a thread of
/// its own at the lowest CPU priority: points go on meanwhile), failed points retried with back-off.
/// Points run on threads of their own (the repository and libvirt calls block); a graceful
/// shutdown (SIGTERM) cancels running points, which then clean up (backup job aborted, scratch
/// files and sockets removed, nothing half-written) before `run` returns.
public final class ReplicationService: Service, Sendable {
    let recovery: Recovery
    let replication: Replication
    let options: ReplicationServiceOptions
    let metrics: ReplicationMetrics
    let logger: Logger
    private let state = Locked(Jobs())
    private let stopping = Atomic<Bool>(false)

    private struct Jobs {
        var running: Set<String> = []
        /// Outcomes, kept for `--once` only (a service that runs for months must not grow).
        var finished: [ReplicationOutcome] = []
        var finishedCount = 0
        var lastGC: Date = Date()
        /// The plan whose scheduled drill runs now (one at a time).
        var drilling: String?
        /// A compact runs (gc waits until it is done: it would wait for its lock).
        var compacting = false
    }

    public init(recovery: Recovery, replication: Replication, options: ReplicationServiceOptions,
                metrics: ReplicationMetrics, logger: Logger) {
        self.recovery = recovery
        self.replication = replication
        self.options = options
        self.metrics = metrics
        self.logger = logger
    }

    /// The outcomes of the jobs run so far (for `--once`).
    public var outcomes: [ReplicationOutcome] { state.withLock { $0.finished } }

    public func run() async throws {
        logger.info("replication service started", metadata: ["repository": "\(recovery.repository.root)", "jobs": "\(options.jobs)"])
        metrics.update(from: recovery)
        await withGracefulShutdownHandler {
            if options.once {
                let due = recovery.replicationSchedule().filter { $0.due <= Date() }.map(\.machine)
                for name in due {
                    while runningCount() >= options.jobs && !stopping.load(ordering: .acquiring) { try? await Task.sleep(for: .milliseconds(100)) }
                    if stopping.load(ordering: .acquiring) { break }
                    start(name)
                }
            } else {
                while !stopping.load(ordering: .acquiring) {
                    let now = Date()
                    let running = state.withLock { $0.running }
                    let due = recovery.replicationSchedule(now: now).filter { $0.due <= now && !running.contains($0.machine) }
                        .sorted { $0.due < $1.due }
                    for entry in due.prefix(max(0, options.jobs - running.count)) { start(entry.machine) }
                    if runningCount() == 0, !state.withLock({ $0.compacting }),
                       now.timeIntervalSince(state.withLock { $0.lastGC }) >= options.gcEvery {
                        collectGarbage()
                        if let level = options.compactLevel { compact(level: level) }
                    }
                    if state.withLock({ $0.drilling }) == nil,
                       let plan = recovery.drillSchedule().filter({ $0.due <= now }).min(by: { $0.due < $1.due }) {
                        drill(plan.plan)
                    }
                    metrics.update(from: recovery)
                    // Half a second, or less: a finished job frees a slot for the next due machine at once.
                    let finished = state.withLock { $0.finishedCount }
                    for _ in 0..<25 where !stopping.load(ordering: .acquiring) {
                        try? await Task.sleep(for: .milliseconds(20))
                        if state.withLock({ $0.finishedCount }) != finished { break }
                    }
                }
            }
            while runningCount() > 0 || state.withLock({ $0.drilling != nil || $0.compacting }) { try? await Task.sleep(for: .milliseconds(100)) }
        } onGracefulShutdown: {
            self.stopping.store(true, ordering: .releasing)
        }
        metrics.update(from: recovery)
        logger.info("replication service stopped")
    }

    /// Copies the machine's new points off-site; a failure is recorded for status and logged,
    /// and the next point's sync sends what this one did not.
    private func sync(_ name: String, to target: ObjectRepository) {
        do {
            let result = try recovery.repository.sync(to: target, machines: [name])
            logger.info("synced off-site", metadata: ["machine": "\(name)", "target": "\(target.description)", "points": "\(result.points.count)",
                                                       "bytes": "\(result.bytes)", "seconds": "\(String(format: "%.2f", result.seconds))"])
        } catch {
            recovery.repository.recordOffsiteFailure(name, target: target.description, error: "\(error)")
            logger.error("off-site sync failed", metadata: ["machine": "\(name)", "target": "\(target.description)", "error": "\(error)"])
        }
        metrics.update(from: recovery)
    }

    private func runningCount() -> Int { state.withLock { $0.running.count } }

    /// Starts a point of `name` on a thread of its own.
    private func start(_ name: String) {
        state.withLock { _ = $0.running.insert(name) }
        logger.info("point started", metadata: ["machine": "\(name)"])
        let thread = Thread { [self] in
            let outcome = recovery.replicate(name, using: replication) { [self] in stopping.load(ordering: .acquiring) }
            metrics.record(outcome)
            if let point = outcome.point {
                logger.info("point taken", metadata: ["machine": "\(name)", "point": "\(point.id)", "mode": "\(point.readMode ?? "full")",
                                                      "consistency": "\(point.consistency)", "bytesRead": "\(point.bytesRead)",
                                                      "seconds": "\(String(format: "%.2f", point.seconds))"])
                if let target = options.syncTo { sync(name, to: target) }
            } else {
                logger.error("point failed", metadata: ["machine": "\(name)", "error": "\(outcome.error ?? "?")",
                                                        "failures": "\(outcome.state.failures)",
                                                        "nextAttempt": "\(outcome.state.nextAttempt.map { "\($0)" } ?? "-")"])
            }
            state.withLock {
                $0.running.remove(name)
                $0.finishedCount += 1
                if options.once { $0.finished.append(outcome) }
            }
        }
        thread.name = "lifeboat-point-\(name)"
        thread.start()
    }

    /// Runs a plan's scheduled drill on a thread of its own: drill, report, stop-test.
    private func drill(_ plan: String) {
        state.withLock { $0.drilling = plan }
        logger.info("scheduled drill started", metadata: ["plan": "\(plan)"])
        let thread = Thread { [self] in
            let logger = self.logger
            // A Recovery of its own (Recovery is safe to share; its own connection keeps a drill's
            // libvirt calls from queueing behind the points').
            let own = Recovery(repository: recovery.repository, settings: recovery.settings)
            let (report, skipped) = own.scheduledDrill(plan) { line in logger.debug("\(line)", metadata: ["plan": "\(plan)"]) }
            if let report {
                metrics.record(drill: report)
                logger.log(level: report.result == .passed ? .info : .error, "scheduled drill \(report.result.rawValue)",
                           metadata: ["plan": "\(plan)", "report": "\(report.id)", "reason": "\(report.reason ?? "-")",
                                      "rto": "\(report.rtoSeconds.map { String(format: "%.1f", $0) } ?? "-")"])
            } else {
                logger.warning("scheduled drill skipped", metadata: ["plan": "\(plan)", "reason": "\(skipped ?? "?")"])
            }
            state.withLock { $0.drilling = nil }
        }
        thread.name = "lifeboat-drill-\(plan)"
        thread.start()
    }

    /// Compacts the chunks written since the last compact, on a thread of its own at the lowest
    /// priority; a shutdown ends it after the chunks under way (the next run goes on from there).
    private func compact(level: Int) {
        state.withLock { $0.compacting = true }
        logger.info("compact started", metadata: ["level": "\(level)"])
        let thread = Thread { [self] in
            let options = CompactOptions(level: level, background: true) { [self] in stopping.load(ordering: .acquiring) }
            do {
                let result = try recovery.repository.compact(options)
                logger.info("compact", metadata: ["compacted": "\(result.compacted)", "bytesSaved": "\(result.bytesBefore - result.bytesAfter)",
                                                  "referenceFrames": "\(result.referenceFrames)", "stopped": "\(result.stopped)",
                                                  "seconds": "\(String(format: "%.1f", result.seconds))"])
                for damaged in result.damaged { logger.error("compact skipped a chunk", metadata: ["error": "\(damaged)"]) }
            } catch {
                logger.error("compact failed", metadata: ["error": "\(error)"])
            }
            state.withLock { $0.compacting = false }
        }
        thread.name = "lifeboat-compact"
        thread.start()
    }

    private func collectGarbage() {
        state.withLock { $0.lastGC = Date() }
        do {
            let result = try recovery.repository.gc()
            logger.info("gc", metadata: ["removed": "\(result.removed)", "bytesFreed": "\(result.bytesFreed)"])
        } catch {
            logger.error("gc failed", metadata: ["error": "\(error)"])
        }
    }
}

/// The service's Prometheus metrics, each labelled by machine.
public final class ReplicationMetrics: Sendable {
    public let registry = PrometheusCollectorRegistry()

    public init() {}

    static var lastPointTime: MetricNameDescriptor { metric("last_point_timestamp", "seconds", "Time of the machine's newest recovery point") }
    static var rpo: MetricNameDescriptor { metric("rpo", "seconds", "The machine's recovery point objective") }
    static var compliant: MetricNameDescriptor { metric("rpo", "compliant", "1 when the newest point is within the RPO, else 0") }
    static var offsitePointTime: MetricNameDescriptor {
        metric("offsite_last_point_timestamp", "seconds", "Time of the machine's newest recovery point at its off-site copy")
    }
    static var offsiteCompliant: MetricNameDescriptor {
        metric("offsite_rpo", "compliant", "1 when the newest point at the off-site copy is within the RPO, else 0")
    }
    static var duration: MetricNameDescriptor { metric("backup_duration", "seconds", "Seconds the machine's last point took") }
    static var bytesRead: MetricNameDescriptor { metric("backup_bytes_read", "total", "Bytes read from the machine's disks by points") }
    static var failures: MetricNameDescriptor { metric("backup_failures", "total", "Failed points") }

    /// lifeboat_NAME_UNIT.
    static func metric(_ name: String, _ unit: String, _ help: String) -> MetricNameDescriptor {
        MetricNameDescriptor(namespace: "lifeboat", metricName: name, unitName: unit, helpText: help)
    }

    private func labels(_ machine: String) -> [(String, String)] { [("machine", machine)] }

    /// Point times, RPOs and compliance from the repository, as status computes them.
    public func update(from recovery: Recovery) {
        for plan in recovery.plans() {
            if let last = recovery.reports(plan: plan.name).last(where: { $0.kind == .drill && !$0.isActive }) { record(drill: last) }
        }
        guard let statuses = try? recovery.replicationStatus() else { return }
        for status in statuses {
            let labels = labels(status.machine)
            if let time = status.lastPointTime {
                registry.makeGauge(descriptor: Self.lastPointTime, labels: labels).set(to: time.timeIntervalSince1970)
            }
            if let rpo = status.rpoSeconds {
                registry.makeGauge(descriptor: Self.rpo, labels: labels).set(to: Double(rpo))
                registry.makeGauge(descriptor: Self.compliant, labels: labels).set(to: status.compliant ? 1 : 0)
            }
            if let time = status.offsitePointTime {
                registry.makeGauge(descriptor: Self.offsitePointTime, labels: labels).set(to: time.timeIntervalSince1970)
            }
            if let compliant = status.offsiteCompliant {
                registry.makeGauge(descriptor: Self.offsiteCompliant, labels: labels).set(to: compliant ? 1 : 0)
            }
        }
    }

    static var drillPassed: MetricNameDescriptor { metric("drill", "passed", "1 when the plan's last drill passed, else 0") }
    static var drillLastRun: MetricNameDescriptor { metric("drill_last_run_timestamp", "seconds", "When the plan's last drill started") }

    /// The plan's last drill: passed or not, and when.
    public func record(drill report: PlanReport) {
        let labels = [("plan", report.plan)]
        registry.makeGauge(descriptor: Self.drillPassed, labels: labels).set(to: report.result == .passed ? 1 : 0)
        registry.makeGauge(descriptor: Self.drillLastRun, labels: labels).set(to: report.started.timeIntervalSince1970)
    }

    /// Counts a finished point or failure.
    public func record(_ outcome: ReplicationOutcome) {
        let labels = labels(outcome.machine)
        if let point = outcome.point {
            registry.makeGauge(descriptor: Self.duration, labels: labels).set(to: point.seconds)
            registry.makeCounter(descriptor: Self.bytesRead, labels: labels).increment(by: Int64(point.bytesRead))
        } else {
            registry.makeCounter(descriptor: Self.failures, labels: labels).increment()
        }
    }

    /// A Hummingbird application serving the metrics on GET /metrics at `host:port`.
    public func server(host: String, port: Int, logger: Logger) -> some Service {
        let router = Router()
        router.get("metrics") { [registry] _, _ -> Response in
            var buffer: [UInt8] = []
            registry.emit(into: &buffer)
            return Response(status: .ok, headers: [.contentType: "text/plain; version=0.0.4; charset=utf-8"],
                            body: .init(byteBuffer: ByteBuffer(bytes: buffer)))
        }
        return Application(router: router, configuration: .init(address: .hostname(host, port: port), serverName: "lifeboat"),
                           logger: logger)
    }
}
