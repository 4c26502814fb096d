import Foundation
import LifeboatBase
import LifeboatRepository

/// One run of a plan (a drill or a failover) and what came of it: written as it goes, so a
/// killed run leaves a true account; `report.json` beside a self-contained `report.html`.
public struct PlanReport: Codable, Sendable {
    public enum Kind: String, Codable, Sendable { case drill, failover }
    public enum Result: String, Codable, Sendable { case running, paused, passed, failed, stopped }
    public enum Step: String, Codable, Sendable { case pending, running, passed, failed, skipped }

    /// One machine of the run.
    public struct MachineRun: Codable, Sendable {
        public var machine: String
        /// 1-based group number.
        public var group: Int
        public var point: String?
        public var pointTime: Date?
        /// Age of the point when the run started: the RPO achieved.
        public var pointAgeSeconds: Double?
        public var vm: String?
        public var ip: String?
        /// The machine's drill id (drills only).
        public var drill: String?
        public var started: Date?
        public var runningAt: Date?
        public var bootLineAt: Date?
        public var checkedAt: Date?
        public var bootLine: String?
        public var check: String?
        public var checkStatus: Int32?
        /// The check's output (its last 4 KiB).
        public var checkOutput: String?
        /// The console's last lines at the end of the machine's part.
        public var consoleTail: String?
        public var consoleLog: String?
        public var screenshot: String?
        public var result: Step
        public var reason: String?

        public var secondsToRunning: Double? { seconds(to: runningAt) }
        public var secondsToBootLine: Double? { seconds(to: bootLineAt) }
        public var secondsToCheck: Double? { seconds(to: checkedAt) }
        func seconds(to date: Date?) -> Double? {
            guard let started, let date else { return nil }
            return date.timeIntervalSince(started)
        }
    }

    /// One group of the run.
    public struct GroupRun: Codable, Sendable {
        public var number: Int
        public var machines: [String]
        public var started: Date?
        public var ended: Date?
        public var result: Step
        public var reason: String?
        public var after: String?
        public var afterStatus: Int32?
        public var afterOutput: String?
        public var manual: String?
        /// When the person said the manual step was done (`plan continue`).
        public var manualDone: Date?
    }

    public var id: String
    public var plan: String
    public var kind: Kind
    /// Started by the replication service's schedule rather than a person.
    public var scheduled: Bool
    /// `--at`: every machine's latest point at or before this time.
    public var at: Date?
    public var planned: Bool
    public var started: Date
    public var ended: Date?
    public var result: Result
    public var reason: String?
    /// Start to every machine checked, when the run got that far.
    public var rtoSeconds: Double?
    /// While paused: what the person must do before `lifeboat plan continue`.
    public var pausedFor: String?
    public var groups: [GroupRun]
    public var machines: [MachineRun]
    /// Written when the run ended (or was stopped) and the HTML could not be made.
    public var htmlError: String?

    /// What a person does next about this run, in a sentence.
    public var nextStep: String {
        switch (kind, result) {
        case (_, .paused): return "\(pausedFor ?? "the manual step"), then run lifeboat plan continue \(plan)"
        case (.drill, _): return "lifeboat stop-test --plan \(plan)"
        case (.failover, .running): return "wait for it, or lifeboat plan continue \(plan) if it was interrupted"
        case (.failover, _): return "lifeboat commit --plan \(plan), or lifeboat cancel-failover --plan \(plan) --yes"
        }
    }

    public var isActive: Bool { result == .running || result == .paused }
}

extension Recovery {
    /// HOT/.plans/PLAN: the plan's lock and its reports, one folder per run.
    func planRunsDirectory(_ plan: String) -> String { hot.root + "/.plans/" + plan }
    func planLockPath(_ plan: String) -> String { planRunsDirectory(plan) + "/.lock" }
    public func reportDirectory(plan: String, id: String) -> String { planRunsDirectory(plan) + "/" + id }

    func save(_ report: PlanReport) throws {
        let folder = reportDirectory(plan: report.plan, id: report.id)
        try FileSystem.makeDirectories(folder)
        chmod(hot.root + "/.plans", 0o755)
        try FileSystem.writeAtomically(Array(try JSONEncoder.lifeboat.encode(report)), to: folder + "/report.json")
    }

    /// The plan's reports, oldest first; every plan's when `plan` is nil.
    public func reports(plan: String? = nil) -> [PlanReport] {
        let plans = plan.map { [$0] } ?? ((try? FileSystem.list(hot.root + "/.plans")) ?? []).sorted()
        return plans.flatMap { name in
            ((try? FileSystem.list(planRunsDirectory(name))) ?? []).filter { !$0.hasPrefix(".") }.compactMap { id in
                FileSystem.contents(reportDirectory(plan: name, id: id) + "/report.json")
                    .flatMap { try? JSONDecoder.lifeboat.decode(PlanReport.self, from: Data($0)) }
            }
        }.sorted { ($0.started, $0.id) < ($1.started, $1.id) }
    }

    /// A report by id (ids carry the plan's name, so they are unique on this host).
    public func report(_ id: String) throws -> PlanReport {
        guard let found = reports().first(where: { $0.id == id }) else {
            throw LifeboatError(.notFound, "no plan report \(id) in \(hot.root): see lifeboat reports")
        }
        return found
    }

    /// The plan's run that is under way or paused, if any.
    public func activeRun(_ plan: String) -> PlanReport? {
        reports(plan: plan).last(where: \.isActive)
    }

    /// True while a lifeboat process is executing one of the plan's runs (it holds the plan's lock).
    public func planRunnerAlive(_ plan: String) -> pid_t? {
        FileLock.holder(of: planLockPath(plan))
    }

    /// Deletes the plan's oldest finished reports beyond `keep`.
    public func pruneReports(plan: String, keep: Int) {
        let finished = reports(plan: plan).filter { !$0.isActive }
        for report in finished.dropLast(keep) {
            FileSystem.removeTree(reportDirectory(plan: plan, id: report.id))
        }
    }

    /// Writes report.html beside report.json from the template `plan-report.html.mustache`, with
    /// screenshots and console tails inside it. Records a failure in the report instead of throwing.
    func writeHTML(_ report: inout PlanReport) {
        let path = reportDirectory(plan: report.plan, id: report.id) + "/report.html"
        do {
            let html = try settings.templates.render(ReportPage.template, ReportPage(report))
            try FileSystem.writeAtomically(Array(html.utf8), to: path)
            report.htmlError = nil
        } catch {
            report.htmlError = "\(error)"
        }
    }
}

/// What the report template sees: text already formatted, images as data: URLs.
struct ReportPage {
    static let template = "plan-report.html.mustache"

    struct MachineRow {
        let machine, group, result, point, pointAge, ip, running, bootLine, check: String
        /// nil when empty: a section over a non-nil string renders even when it is empty.
        let reason, checkOutput, consoleTail, screenshot: String?
        let failed: Bool
    }
    struct GroupRow {
        let number, machines, result, started, ended, reason, after, afterOutput, manual: String
        let failed: Bool
    }

    let title, plan, id, kind, result, reason, started, ended, rto, at, scheduled: String
    let passed: Bool
    let groups: [GroupRow]
    let machines: [MachineRow]

    init(_ report: PlanReport) {
        func time(_ date: Date?) -> String { date.map(Timestamp.format) ?? "-" }
        func seconds(_ value: Double?) -> String { value.map { String(format: "%.1f s", $0) } ?? "-" }
        title = "Lifeboat plan \(report.plan): \(report.kind.rawValue) \(report.id)"
        plan = report.plan
        id = report.id
        kind = report.kind.rawValue + (report.planned ? " (planned)" : "")
        result = report.result.rawValue
        reason = report.reason ?? ""
        started = time(report.started)
        ended = time(report.ended)
        rto = seconds(report.rtoSeconds)
        at = report.at.map(Timestamp.format) ?? "latest points"
        scheduled = report.scheduled ? "scheduled by the replication service" : "started by a person"
        passed = report.result == .passed
        groups = report.groups.map { group in
            GroupRow(number: "\(group.number)", machines: group.machines.joined(separator: ", "), result: group.result.rawValue,
                     started: time(group.started), ended: time(group.ended), reason: group.reason ?? "",
                     after: group.after ?? "", afterOutput: group.afterOutput ?? "", manual: group.manual ?? "",
                     failed: group.result == .failed)
        }
        machines = report.machines.map { run in
            let image = run.screenshot.flatMap { FileSystem.contents($0) }.map { "data:image/png;base64," + Data($0).base64EncodedString() }
            return MachineRow(
                machine: run.machine, group: "\(run.group)", result: run.result.rawValue,
                point: run.point ?? "-", pointAge: run.pointAgeSeconds.map { DurationText.format($0) } ?? "-", ip: run.ip ?? "-",
                running: seconds(run.secondsToRunning), bootLine: seconds(run.secondsToBootLine), check: seconds(run.secondsToCheck),
                reason: run.reason, checkOutput: run.checkOutput.flatMap { $0.isEmpty ? nil : $0 },
                consoleTail: run.consoleTail.flatMap { $0.isEmpty ? nil : $0 },
                screenshot: image, failed: run.result == .failed)
        }
    }
}
