import Foundation
import LifeboatBase
import LifeboatRecovery
import LifeboatRepository
import Mustache

/// The console's HTML pages: Mustache templates in `templates/console/` (overridable like the
/// XML templates), rendered from the view models below, whose text is already formatted.
/// `{{x}}` escapes HTML, so nothing a machine or user name holds can change a page.
struct Pages: Sendable {
    let library: MustacheLibrary
    let directory: String

    init(directory: String) async throws {
        guard FileManager.default.fileExists(atPath: directory + "/dashboard.mustache") else {
            throw LifeboatError(.notFound, "the console's templates are not in \(directory): give --templates DIR with a console/ folder (copy lifeboat's templates/)")
        }
        do {
            library = try await MustacheLibrary(directory: directory)
        } catch let error as MustacheLibrary.ParserError {
            throw LifeboatError(.invalidArgument, "template \(directory)/\(error.filename).mustache line \(error.context.lineNumber): \(error.error)")
        }
        self.directory = directory
    }

    func render(_ name: String, _ model: Any) throws -> String {
        guard let html = library.render(model, withTemplate: name) else {
            throw LifeboatError(.notFound, "no console template \(name).mustache in \(directory)")
        }
        return html
    }

    /// A file of `static/` (the stylesheet, the script).
    func asset(_ name: String) -> [UInt8]? {
        guard name.allSatisfy({ $0.isLetter || $0.isNumber || $0 == "." || $0 == "-" }), !name.hasPrefix(".") else { return nil }
        return FileSystem.contents(directory + "/static/" + name)
    }
}

/// What every page has: who is logged in, the CSRF token for its forms, the page's title.
struct Frame: MustacheParent {
    let title: String
    let user: String
    let role: String
    let csrf: String
    let isAdmin: Bool
    let canAct: Bool

    func child(named key: String) -> Any? {
        switch key {
        case "title": return title
        case "user": return user
        case "role": return role
        case "csrf": return csrf
        case "isAdmin": return isAdmin
        case "canAct": return canAct
        default: return nil
        }
    }
}

enum Tone: String {
    case ok, warn, bad, info, none

    /// A run's outcome: passed green, failed red, still going blue.
    init(passed: Bool, failed: Bool) { self = passed ? .ok : failed ? .bad : .info }
}

/// A page whose main part was rendered before (the dashboard's, once per snapshot).
struct Shell: MustacheParent {
    let frame: Frame
    let main: String

    func child(named key: String) -> Any? {
        switch key {
        case "frame": return frame
        case "main": return main
        default: return nil
        }
    }
}

/// The dashboard is rendered once per snapshot with a row per machine: its values are looked up
/// by name (MustacheParent) rather than by reflection, which took most of its time.
struct DashboardPage: MustacheParent {
    struct Row: MustacheParent {
        let name, state, stateTone, lastPoint, age, rpo, rpoTone, rpoText, offsite, offsiteTone, drill, drillTone: String
        let progress: String?
        let problems: [String]

        func child(named key: String) -> Any? {
            switch key {
            case "name": return name
            case "state": return state
            case "stateTone": return stateTone
            case "lastPoint": return lastPoint
            case "age": return age
            case "rpo": return rpo
            case "rpoTone": return rpoTone
            case "rpoText": return rpoText
            case "offsite": return offsite
            case "offsiteTone": return offsiteTone
            case "drill": return drill
            case "drillTone": return drillTone
            case "progress": return progress
            case "problems": return problems
            default: return nil
            }
        }
    }

    func child(named key: String) -> Any? {
        switch key {
        case "protected": return protected
        case "compliant": return compliant
        case "inDrill": return inDrill
        case "failedOver": return failedOver
        case "withProblems": return withProblems
        case "allCompliant": return allCompliant
        case "hasProblems": return hasProblems
        case "rows": return rows
        case "taken": return taken
        default: return nil
        }
    }
    let protected, compliant, inDrill, failedOver, withProblems: Int
    let allCompliant: Bool
    let hasProblems: Bool
    let rows: [Row]
    let taken: String

    init(_ snapshot: Snapshot) {
        let statuses = snapshot.statuses
        protected = statuses.count
        compliant = statuses.filter { $0.rpoCompliant ?? true }.count
        allCompliant = compliant == protected
        inDrill = statuses.filter { $0.state == .testingFailover }.count
        failedOver = statuses.filter { [.finalizing, .failedOver, .committed, .failingBack].contains($0.state) }.count
        withProblems = statuses.filter { !$0.problems.isEmpty }.count
        hasProblems = withProblems > 0
        taken = Units.time(snapshot.taken)
        rows = statuses.map { status in
            let drill = snapshot.lastDrills[status.machine]
            return Row(
                name: status.machine, state: status.state.rawValue, stateTone: Self.tone(status).rawValue,
                lastPoint: status.lastPointTime.map(Units.time) ?? "none",
                age: status.lastPointAge.map { DurationText.format($0) + " ago" } ?? "-",
                rpo: status.rpoSeconds.map { DurationText.format(Double($0)) } ?? "-",
                rpoTone: Self.rpoTone(status).rawValue,
                rpoText: Self.rpoText(status),
                offsite: Self.offsiteText(status), offsiteTone: Self.offsiteTone(status).rawValue,
                drill: drill.map { "\($0.result.rawValue) \(Units.time($0.started))" } ?? "never",
                drillTone: (drill.map { Tone(passed: $0.result == .passed, failed: $0.result == .failed) } ?? .none).rawValue,
                progress: Self.progress(status),
                problems: status.problems)
        }
    }

    static func tone(_ status: ServerStatus) -> Tone {
        if !status.problems.isEmpty { return .bad }
        switch status.state {
        case .standby: return .ok
        case .testingFailover: return .info
        case .finalizing, .failingBack: return .warn
        case .failedOver, .committed: return .warn
        }
    }

    static func rpoTone(_ status: ServerStatus) -> Tone {
        guard status.rpoSeconds != nil else { return .none }
        if status.rpoCompliant == false { return .bad }
        return (status.rpoRatio ?? 0) > 0.8 ? .warn : .ok
    }

    /// The off-site copy's newest point, by age, against the RPO ("-" when not synced anywhere).
    static func offsiteText(_ status: ServerStatus) -> String {
        guard status.offsite != nil else { return "-" }
        guard let age = status.offsiteAge else { return "no point there yet" }
        return DurationText.format(age) + " ago" + (status.offsiteRPOCompliant.map { $0 ? ", compliant" : ", breached" } ?? "")
    }

    static func offsiteTone(_ status: ServerStatus) -> Tone {
        guard status.offsite != nil else { return .none }
        if status.offsiteRPOCompliant == false || status.offsite?.lastError != nil { return .bad }
        return .ok
    }

    static func rpoText(_ status: ServerStatus) -> String {
        guard status.rpoSeconds != nil else { return "no RPO set" }
        guard let ratio = status.rpoRatio else { return "no point yet" }
        return String(format: "%@ (%.2f of the RPO)", status.rpoCompliant == false ? "breached" : "compliant", ratio)
    }

    /// A running failover's copy, or the work under way.
    static func progress(_ status: ServerStatus) -> String? {
        if let finalisation = status.finalisation, status.state == .finalizing {
            let percent = finalisation.bytesTotal > 0 ? 100 * Double(finalisation.bytesDone) / Double(finalisation.bytesTotal) : 0
            return String(format: "finalising %.0f%% (%@ of %@)", percent, Units.bytes(Int(finalisation.bytesDone)), Units.bytes(Int(finalisation.bytesTotal)))
        }
        return status.transition ?? status.plan
    }
}

struct MachinePage {
    struct Field { let name, value: String }
    struct PointRow { let id, time, consistency, mode, size, read, stored: String }
    struct DrillRow {
        let id, point, started, result, resultTone, running, bootLine, vm, ip: String
        let reason, screenshot, consoleTail: String?
    }
    struct EventRow { let time, event, state, point, user, detail: String }
    struct ActionForm {
        let action, title: String
        let confirm, choosePoint, danger: Bool
    }
    struct JobRow { let id, action, user, started, state: String }

    let frame: Frame
    let name, state, stateTone, rpoText, rpoTone, lastPoint, age: String
    let progress: String?
    let problems: [String]
    let status: [Field]
    let settings: [Field]
    let points: [PointRow]
    let pointIDs: [String]
    let drills: [DrillRow]
    let history: [EventRow]
    let actions: [ActionForm]
    let jobs: [JobRow]
    let busy: String?

    init(status: ServerStatus, machine: Machine, points: [RecoveryPoint], drills: [Drill], history: [HistoryEvent],
         jobs: [ConsoleJob], frame: Frame) {
        self.frame = frame
        name = status.machine
        state = status.state.rawValue
        stateTone = DashboardPage.tone(status).rawValue
        rpoText = DashboardPage.rpoText(status)
        rpoTone = DashboardPage.rpoTone(status).rawValue
        lastPoint = status.lastPointTime.map(Units.time) ?? "none"
        age = status.lastPointAge.map { DurationText.format($0) + " ago" } ?? "-"
        progress = DashboardPage.progress(status)
        problems = status.problems
        var fields: [Field] = []
        func add(_ name: String, _ value: String?) { if let value, !value.isEmpty { fields.append(Field(name: name, value: value)) } }
        add("since", status.since.map(Units.time))
        add("point in use", status.point)
        add("VM", status.vm.map { "\($0) (\(status.vmState ?? "?"))" })
        add("network", status.network)
        add("IP", status.ip)
        if let offsite = status.offsite {
            add("off-site copy", "\(offsite.target): newest point \(offsite.newestPoint ?? "none") (\(DashboardPage.offsiteText(status)))")
        }
        add("disks", status.disks.map { "\($0.name): \($0.isHot ? "hot" : "on the backup")" }.joined(separator: ", "))
        if let replication = status.replication {
            add("last replication", replication.lastSuccess.map(Units.time))
            add("failures in a row", replication.failures > 0 ? "\(replication.failures): \(replication.lastError ?? "")" : nil)
        }
        self.status = fields
        var settings: [Field] = []
        func set(_ name: String, _ value: String?) { if let value, !value.isEmpty { settings.append(Field(name: name, value: value)) } }
        set("description", machine.description)
        set("disks", machine.disks.map { "\($0.name): \($0.path)" }.joined(separator: ", "))
        set("libvirt domain", machine.domain)
        set("vCPUs", "\(machine.vcpus)")
        set("memory", "\(machine.memoryMiB) MiB")
        set("MACs", machine.macs.joined(separator: ", "))
        set("production IP", machine.ip)
        set("gateway", machine.gateway)
        set("test IP", machine.testIP)
        set("network", machine.bridge.map { "bridge \($0)" } ?? machine.network)
        set("RPO", machine.rpoSeconds.map { DurationText.format(Double($0)) })
        set("point every", machine.everySeconds.map { DurationText.format(Double($0)) })
        set("domain type", machine.virtType)
        set("boot line", machine.bootPattern)
        set("protected since", Units.time(machine.created))
        self.settings = settings
        self.points = points.reversed().map { point in
            PointRow(id: point.id, time: Units.time(point.time), consistency: point.consistency, mode: point.readMode ?? "full",
                     size: Units.bytes(point.size), read: Units.bytes(point.bytesRead), stored: Units.bytes(point.storedBytes))
        }
        pointIDs = points.reversed().map(\.id)
        self.drills = drills.reversed().prefix(10).map { drill in
            DrillRow(id: drill.id, point: drill.point, started: Units.time(drill.started), result: drill.result.rawValue,
                     resultTone: Tone(passed: drill.result == .passed, failed: drill.result == .failed).rawValue,
                     running: drill.secondsToRunning.map { String(format: "%.1f s", $0) } ?? "-",
                     bootLine: drill.secondsToBootLine.map { String(format: "%.1f s", $0) } ?? "-",
                     vm: drill.vm, ip: drill.ip ?? "-", reason: drill.reason,
                     screenshot: drill.screenshot.map { _ in "/machines/\(status.machine)/drills/\(drill.id)/screenshot.png" },
                     consoleTail: Recovery.tail(of: drill.consoleLog, bytes: 1500).flatMap { $0.isEmpty ? nil : $0 })
        }
        self.history = history.reversed().prefix(50).map { event in
            EventRow(time: Units.time(event.time), event: event.event, state: event.state.rawValue, point: event.point ?? "-",
                     user: event.user ?? "-", detail: event.detail)
        }
        let canAct = frame.canAct
        actions = canAct ? ConsoleAction.offered(in: status.state).map { action in
            ActionForm(action: action.rawValue, title: action.title, confirm: action.needsConfirmation,
                       choosePoint: action == .testFailover || action == .failover || action == .changePoint,
                       danger: action == .failover || action == .cancelFailover || action == .failback)
        } : []
        self.jobs = jobs.filter { $0.machine == status.machine }.prefix(10).map { job in
            JobRow(id: job.id, action: job.action, user: job.user, started: Units.time(job.started), state: job.state.rawValue)
        }
        busy = jobs.first { $0.machine == status.machine && $0.state == .running }.map { "\($0.action) by \($0.user) is under way" }
    }
}

struct JobPage {
    let frame: Frame
    let id, action, machine, user, started, state, stateTone: String
    let ended, message, error, drill, bytes: String?
    let running: Bool
    let lines: [String]

    init(_ job: ConsoleJob, frame: Frame) {
        self.frame = frame
        id = job.id
        action = job.action
        machine = job.machine
        user = job.user
        started = Units.time(job.started)
        state = job.state.rawValue
        stateTone = Tone(passed: job.state == .succeeded, failed: job.state == .failed).rawValue
        ended = job.ended.map(Units.time)
        message = job.message
        error = job.error
        drill = job.drill
        bytes = JobPage.bytes(job)
        running = job.state == .running
        lines = job.lines
    }

    static func bytes(_ job: ConsoleJob) -> String? {
        guard let done = job.bytesDone, let total = job.bytesTotal, total > 0 else { return nil }
        var text = String(format: "%@ of %@ (%.0f%%)", Units.bytes(done), Units.bytes(total), 100 * Double(done) / Double(total))
        if let rate = job.rate { text += ", " + Units.rate(rate) }
        if let eta = job.eta, job.state == .running { text += ", ETA " + DurationText.format(eta) }
        return text
    }
}

struct PlansPage {
    struct ReportRow { let id, kind, result, resultTone, started, rto: String }
    struct PlanRow {
        let name, groups, machines, drillEvery, lastDrill, lastTone: String
        let reports: [ReportRow]
    }
    let frame: Frame
    let plans: [PlanRow]
    let none: Bool

    init(plans: [Plan], reports: [PlanReport], frame: Frame) {
        self.frame = frame
        none = plans.isEmpty
        self.plans = plans.map { plan in
            let mine = reports.filter { $0.plan == plan.name }
            let last = mine.last { $0.kind == .drill }
            return PlanRow(
                name: plan.name, groups: "\(plan.groups.count)", machines: plan.machines.joined(separator: ", "),
                drillEvery: plan.drillEverySeconds.map { DurationText.format(Double($0)) } ?? "not scheduled",
                lastDrill: last.map { "\($0.result.rawValue) \(Units.time($0.started))" } ?? "never",
                lastTone: (last.map { Tone(passed: $0.result == .passed, failed: $0.result == .failed) } ?? .none).rawValue,
                reports: mine.reversed().prefix(20).map { report in
                    ReportRow(id: report.id, kind: report.kind.rawValue, result: report.result.rawValue,
                              resultTone: Tone(passed: report.result == .passed, failed: report.result == .failed).rawValue,
                              started: Units.time(report.started), rto: report.rtoSeconds.map { String(format: "%.1f s", $0) } ?? "-")
                })
        }
    }
}

struct UsersPage {
    struct Row { let name, role, created: String; let isSelf: Bool }
    let frame: Frame
    let users: [Row]
    let roles: [String]
}

struct LoginPage {
    let title = "Log in"
    let error: String?
    let user: String
    let csrf: String
}

struct ErrorPage {
    let title: String
    let status: Int
    let message: String
    let frame: Frame?
}
