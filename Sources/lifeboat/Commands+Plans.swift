import ArgumentParser
import Foundation
import LifeboatBase
import LifeboatRecovery
import LifeboatRepository

extension Lifeboat {
    struct PlanCommand: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "plan",
            abstract: "Recovery plans: machines in ordered groups, drilled and failed over together (docs/PLANS.md).",
            subcommands: [Apply.self, Show.self, Remove.self, Continue.self])

        struct Apply: ParsableCommand {
            static let configuration = CommandConfiguration(abstract: "Check a plan file (YAML) and store it in the repository.")
            @OptionGroup var repository: RepositoryOptions
            @OptionGroup var recovery: RecoveryOptions
            @Argument(help: "The plan file.") var file: String

            func run() throws {
                let recovery = try self.recovery.recovery(repository)
                let plan = try Plan.load(file: file, repository: recovery.repository)
                try recovery.applyPlan(plan)
                print("plan \(plan.name) stored: \(plan.groups.count) group(s), \(plan.machines.count) machine(s), on-failure \(plan.onFailure.rawValue)"
                      + (plan.drillEverySeconds.map { ", a drill every \(DurationText.format(Double($0)))" } ?? "")
                      + "; scripts run in \(plan.directory)")
            }
        }

        struct Show: ParsableCommand {
            static let configuration = CommandConfiguration(abstract: "A plan's groups, settings and last run.")
            @OptionGroup var repository: RepositoryOptions
            @OptionGroup var recovery: RecoveryOptions
            @Argument(help: "Plan name.") var name: String
            @OptionGroup var output: OutputOptions

            func run() throws {
                let recovery = try self.recovery.recovery(repository)
                let plan = try recovery.plan(name)
                if output.json { return try JSON.print(plan) }
                print("plan \(plan.name): on-failure \(plan.onFailure.rawValue), timeout \(DurationText.format(Double(plan.timeoutSeconds))) per machine, "
                      + "keeps \(plan.keepReports) report(s)" + (plan.drillEverySeconds.map { ", a drill every \(DurationText.format(Double($0)))" } ?? ""))
                print("scripts run in \(plan.directory)")
                for (index, group) in plan.groups.enumerated() {
                    print("group \(index + 1): \(group.machines.joined(separator: ", "))")
                    if let waitFor = group.waitFor { print("  wait-for: \(waitFor)") }
                    if let check = group.check { print("  check: \(check)") }
                    if let after = group.after { print("  after: \(after)") }
                    if let manual = group.manual { print("  manual (failover): \(manual)") }
                }
                if let last = recovery.reports(plan: name).last { print("last run: " + ReportText.line(last)) }
            }
        }

        struct Remove: ParsableCommand {
            static let configuration = CommandConfiguration(abstract: "Forget a plan (its reports stay).")
            @OptionGroup var repository: RepositoryOptions
            @OptionGroup var recovery: RecoveryOptions
            @Argument(help: "Plan name.") var name: String

            func run() throws {
                try self.recovery.recovery(repository).removePlan(name)
                print("plan \(name) removed")
            }
        }

        struct Continue: ParsableCommand {
            static let configuration = CommandConfiguration(
                abstract: "Go on with a plan's failover after its manual step is done, or after it was interrupted.")
            @OptionGroup var repository: RepositoryOptions
            @OptionGroup var recovery: RecoveryOptions
            @Argument(help: "Plan name.") var name: String
            @OptionGroup var output: OutputOptions

            func run() throws {
                let recovery = try self.recovery.recovery(repository)
                let options = PlanRunOptions()
                let report = try recovery.continuePlan(name, options, report: PlanRun.progress(json: output.json))
                try PlanRun.conclude(report, json: output.json)
            }
        }
    }

    struct Plans: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Recovery plans with their machines and last run.")
        @OptionGroup var repository: RepositoryOptions
        @OptionGroup var recovery: RecoveryOptions
        @OptionGroup var output: OutputOptions

        func run() throws {
            let recovery = try self.recovery.recovery(repository)
            let plans = recovery.plans()
            if output.json { return try JSON.print(plans) }
            print(Format.table(["PLAN", "GROUPS", "MACHINES", "DRILL EVERY", "LAST RUN"], plans.map { plan in
                [plan.name, "\(plan.groups.count)", plan.machines.joined(separator: ","),
                 plan.drillEverySeconds.map { DurationText.format(Double($0)) } ?? "-",
                 recovery.reports(plan: plan.name).last.map(ReportText.line) ?? "never"]
            }))
        }
    }

    struct Reports: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Reports of plan runs (drills and failovers), oldest first.")
        @OptionGroup var repository: RepositoryOptions
        @OptionGroup var recovery: RecoveryOptions
        @Argument(help: "Only this plan's.") var plan: String?
        @OptionGroup var output: OutputOptions

        func run() throws {
            let recovery = try self.recovery.recovery(repository)
            if let plan { _ = try recovery.plan(plan) }
            let reports = recovery.reports(plan: plan)
            if output.json { return try JSON.print(reports) }
            print(Format.table(["ID", "KIND", "STARTED", "RESULT", "RTO", "REASON"], reports.map { report in
                [report.id, report.kind.rawValue + (report.scheduled ? " (scheduled)" : ""), Format.time(report.started), report.result.rawValue,
                 report.rtoSeconds.map { String(format: "%.1f s", $0) } ?? "-", report.reason ?? (report.result == .paused ? report.nextStep : "")]
            }))
        }
    }

    struct ReportCommand: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "report", abstract: "One plan report.",
                                                        subcommands: [Show.self])

        struct Show: ParsableCommand {
            static let configuration = CommandConfiguration(abstract: "A report: groups, machines, times, checks; --html writes the page.")
            @OptionGroup var repository: RepositoryOptions
            @OptionGroup var recovery: RecoveryOptions
            @Argument(help: "Report id (see lifeboat reports).") var id: String
            @Option(help: "Also copy the self-contained HTML report to this file.") var html: String?
            @OptionGroup var output: OutputOptions

            func run() throws {
                let recovery = try self.recovery.recovery(repository)
                let report = try recovery.report(id)
                if let html {
                    let source = recovery.reportDirectory(plan: report.plan, id: report.id) + "/report.html"
                    guard let page = FileManager.default.contents(atPath: source) else {
                        throw LifeboatError(.notFound, "report \(id) has no HTML page (\(report.htmlError ?? "the run has not ended")): see lifeboat report show \(id)")
                    }
                    guard FileManager.default.createFile(atPath: html, contents: page) else {
                        throw LifeboatError(.io, "cannot write \(html): check the folder and its permissions")
                    }
                }
                if output.json { return try JSON.print(report) }
                print(ReportText.full(report))
                if let html { print("HTML report written to \(html)") }
            }
        }
    }
}

/// Running a plan from the CLI: progress lines, the finaliser, the outcome.
enum PlanRun {
    static func progress(json: Bool) -> @Sendable (String) -> Void {
        { line in if !json { Terminal.writeError("\(Format.time(Date())) \(line)\n") } }
    }

    /// Starts each failed-over machine's finaliser in the background, as `failover` does.
    /// Prints the report; a failed run exits non-zero with its reason.
    static func conclude(_ report: PlanReport, json: Bool) throws {
        if json { try JSON.print(report) } else { print(ReportText.full(report)) }
        if report.result == .failed {
            throw LifeboatError(.invalidState, "plan \(report.plan) \(report.kind.rawValue) \(report.id) failed: \(report.reason ?? "?"); "
                + "what runs stays for inspection until \(report.kind == .drill ? "lifeboat stop-test --plan \(report.plan)" : "you act")")
        }
    }
}

enum ReportText {
    static func line(_ report: PlanReport) -> String {
        "\(report.kind.rawValue) \(report.id) \(report.result.rawValue)" + (report.rtoSeconds.map { String(format: " (RTO %.1f s)", $0) } ?? "")
            + " at \(Format.time(report.started))"
    }

    static func full(_ report: PlanReport) -> String {
        func seconds(_ value: Double?) -> String { value.map { String(format: "%.1f s", $0) } ?? "-" }
        var lines = ["plan \(report.plan) \(report.kind.rawValue) \(report.id): \(report.result.rawValue)" + (report.reason.map { ": \($0)" } ?? "")]
        if report.result == .paused { lines.append("paused: \(report.nextStep)") }
        if let rto = report.rtoSeconds { lines.append(String(format: "RTO %.1f s (start to every machine checked)", rto)) }
        for group in report.groups {
            lines.append("group \(group.number) (\(group.machines.joined(separator: ", "))): \(group.result.rawValue)" + (group.reason.map { ": \($0)" } ?? ""))
        }
        lines.append(Format.table(["MACHINE", "GROUP", "RESULT", "POINT", "POINT AGE", "RUNNING", "BOOT LINE", "CHECKED"], report.machines.map { run in
            [run.machine, "\(run.group)", run.result.rawValue, run.point ?? "-", run.pointAgeSeconds.map { DurationText.format($0) } ?? "-",
             seconds(run.secondsToRunning), seconds(run.secondsToBootLine), seconds(run.secondsToCheck)]
        }))
        for run in report.machines where run.result == .failed {
            lines.append("\(run.machine): \(run.reason ?? "failed")")
        }
        return lines.joined(separator: "\n")
    }
}
