import ArgumentParser
import Foundation
import LifeboatBase
import LifeboatFS
import LifeboatRecovery
import LifeboatRepository
import LifeboatVirt
#if canImport(Glibc)
import Glibc
#endif

/// Where recovery VMs run: libvirt, hot storage, templates, domain type.
struct RecoveryOptions: ParsableArguments {
    @Option(help: "libvirt URI (default: $LIFEBOAT_CONNECT, else qemu:///system).")
    var connect: String?
    @Option(help: "Hot storage folder for recovery VM disks (default: $LIFEBOAT_HOT, else /var/lib/lifeboat/hot).")
    var hot: String?
    @Option(help: "Folder with domain.xml.mustache and the network templates (default: $LIFEBOAT_TEMPLATES, else the installed ones).")
    var templates: String?
    @Option(help: "Domain type: kvm, qemu or auto (default: $LIFEBOAT_VIRT_TYPE, else the machine's setting, else auto).")
    var virtType: String?

    /// Opens the recovery servers of `repository`; their launcher hands the password (nil when
    /// unencrypted) to the helpers it starts (mount, finaliser) on stdin.
    /// - Parameter pointsOnly: for commands that only take points (`backup`): the templates and
    ///   the domain type are not needed, so a host without templates or with a stale
    ///   $LIFEBOAT_VIRT_TYPE can still take them.
    func recovery(_ repository: RepositoryOptions, pointsOnly: Bool = false) throws -> Recovery {
        let (repo, password) = try repository.openKeepingPassword()
        let environment = ProcessInfo.processInfo.environment
        let virtText = virtType ?? environment["LIFEBOAT_VIRT_TYPE"]
        var settings = RecoverySettings(
            connectURI: Connection.uri(connect),
            hotDirectory: hot ?? environment["LIFEBOAT_HOT"] ?? "/var/lib/lifeboat/hot",
            templates: pointsOnly ? (try? locateTemplates()) ?? Templates(directory: templates ?? "templates") : try locateTemplates(),
            virtType: pointsOnly ? virtText.flatMap(VirtType.init(rawValue:)) ?? .auto
                : try virtText.map { try VirtType.parse($0, what: "--virt-type") } ?? .auto,
            launcher: SelfLauncher(password: password))
        // History names who acted: the person behind sudo, else the Unix user.
        settings.user = environment["SUDO_USER"] ?? environment["USER"] ?? environment["LOGNAME"]
        return Recovery(repository: repo, settings: settings)
    }

    func locateTemplates() throws -> Templates {
        do { return try Templates.locate(explicit: templates) } catch let error as TemplateError {
            throw LifeboatError(.notFound, error.description)
        }
    }
}

extension Lifeboat {
    struct TestFailover: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "test-failover",
            abstract: "Drill: boot NAME's recovery VM from a recovery point on the isolated test network, check it, record it.",
            discussion: """
            The VM's disks are qcow2 overlays in hot storage over the point's disks served by FUSE: it boots at once \
            and nothing is written to the repository. It keeps running until 'lifeboat stop-test NAME'.
            """)
        @OptionGroup var repository: RepositoryOptions
        @OptionGroup var recovery: RecoveryOptions
        @Argument(help: "Machine name (or give --plan).") var name: String?
        @Option(help: "Drill every machine of this recovery plan, group after group, and write its report.") var plan: String?
        @Option(help: "With --plan: each machine's latest point at or before this time (ISO 8601, or a point id like 20261122-101500).")
        var at: String?
        @Option(help: "Point id or 'latest'.") var point = "latest"
        @Option(help: "vCPUs (default: the machine's).") var vcpus: Int?
        @Option(help: "Memory in MiB (default: the machine's).") var memory: Int?
        @Option(help: "IP on the test network, ADDR/PREFIX (default: the machine's test IP, else its production IP).") var ip: String?
        @Option(help: "Regular expression for the console line that means 'booted' (default: the machine's, else 'login:').")
        var waitFor: String?
        @Option(help: "Time allowed for the boot line and the check, e.g. 90s, 5m.") var timeout = "5m"
        @Option(help: "Shell command run after boot with LIFEBOAT_MACHINE, LIFEBOAT_POINT, LIFEBOAT_VM, LIFEBOAT_VM_IP, LIFEBOAT_CONSOLE_LOG set.")
        var check: String?
        @OptionGroup var output: OutputOptions

        func validate() throws {
            if let vcpus, vcpus < 1 { throw ValidationError("--vcpus must be at least 1") }
            if let memory, memory < 32 { throw ValidationError("--memory is in MiB and must be at least 32") }
            try PlanTarget.validate(name: name, plan: plan)
            if plan != nil && (point != "latest" || vcpus != nil || memory != nil || ip != nil || waitFor != nil || check != nil) {
                throw ValidationError("with --plan, points, IPs, boot lines and checks come from the plan: give --at TIME instead of --point")
            }
            if at != nil && plan == nil { throw ValidationError("--at goes with --plan; for one machine give --point ID") }
        }

        func run() throws {
            let recovery = try recovery.recovery(repository)
            if let plan {
                let options = PlanRunOptions(at: try at.map(PlanTarget.parseTime))
                let report = try recovery.testFailoverPlan(plan, options, report: PlanRun.progress(json: output.json))
                return try PlanRun.conclude(report, json: output.json)
            }
            let name = name!
            let options = DrillOptions(point: point, vcpus: vcpus, memoryMiB: memory, ip: ip, waitFor: waitFor,
                                       timeout: try DurationText.parse(timeout), check: check)
            let drill = try recovery.testFailover(name, options) { line in
                if Terminal.isInteractive && !output.json { Terminal.writeError("\(line)\n") }
            }
            if output.json { try JSON.print(drill) } else { print(DrillText.summary(drill)) }
            if drill.result == .failed {
                throw LifeboatError(.invalidState, "drill \(drill.id) of \(name) failed: \(drill.reason ?? "unknown"); console log \(drill.consoleLog); the VM \(drill.vm) is left for inspection until lifeboat stop-test \(name)")
            }
        }
    }

    struct StopTest: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "stop-test",
            abstract: "End NAME's drill: destroy the VM, delete its overlays, drop the test network and mount when unused.")
        @OptionGroup var repository: RepositoryOptions
        @OptionGroup var recovery: RecoveryOptions
        @Argument(help: "Machine name (or give --plan).") var name: String?
        @Option(help: "End the drill of every machine of this plan.") var plan: String?
        @OptionGroup var output: OutputOptions

        func validate() throws { try PlanTarget.validate(name: name, plan: plan) }

        func run() throws {
            if let plan {
                let reports = try recovery.recovery(repository).stopPlanTest(plan)
                if output.json { return try JSON.print(reports) }
                return print("stopped the drill of plan \(plan): " + (reports.isEmpty ? "no machine was in a drill"
                    : reports.map { "\($0.machine) (\($0.domainRemoved ? "VM destroyed" : "leftovers removed"))" }.joined(separator: ", ")))
            }
            let name = name!
            let report = try recovery.recovery(repository).stopTest(name)
            if output.json { return try JSON.print(report) }
            var parts = [report.domainRemoved ? "VM \(Recovery.testDomainName(name)) destroyed" : "no VM was running"]
            parts.append("\(report.overlaysRemoved) overlay(s) deleted")
            if report.networkRemoved { parts.append("network \(Recovery.testNetworkName) removed") }
            if let mount = report.mountReleased { parts.append("mount \(mount) released") }
            print("stopped the drill of \(name): " + parts.joined(separator: ", ") + "; \(name) is in Standby")
        }
    }

    struct Status: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Recovery servers: last point and RPO, state (checked against libvirt and the mounts), VM, network, IP.")
        @OptionGroup var repository: RepositoryOptions
        @OptionGroup var recovery: RecoveryOptions
        @Argument(help: "Only this machine.") var name: String?
        @Flag(help: "Exit 0 when every machine's newest point is within its RPO, else 1, naming the machines (for monitoring).")
        var check = false
        @OptionGroup var output: OutputOptions

        func run() throws {
            if check {
                let recovery = try self.recovery.recovery(repository)
                let statuses = try recovery.replicationStatus().filter { name == nil || $0.machine == name }
                if output.json { try JSON.print(statuses) }
                let breached = statuses.filter { !$0.compliantEverywhere }
                if !output.json {
                    for status in breached {
                        let rpo = DurationText.format(Double(status.rpoSeconds ?? 0))
                        if !status.compliant {
                            let age = status.lastPointTime.map { DurationText.format(Date().timeIntervalSince($0)) + " old" } ?? "no point"
                            print("\(status.machine): RPO \(rpo) breached (newest point \(age))")
                        }
                        if status.offsiteCompliant == false {
                            let age = status.offsitePointTime.map { DurationText.format(Date().timeIntervalSince($0)) + " old" } ?? "no point there"
                            print("\(status.machine): off-site RPO \(rpo) breached at \(status.offsiteTarget ?? "?") (newest point there \(age))"
                                + (status.offsiteError.map { "; last sync failed: \($0)" } ?? ""))
                        }
                    }
                    if breached.isEmpty { print("every machine is within its RPO (\(statuses.count) machine(s))") }
                }
                if !breached.isEmpty { throw ExitCode(1) }
                return
            }
            let statuses = try recovery.recovery(repository).status(only: name)
            if output.json { return try JSON.print(statuses) }
            let rows = statuses.map { status -> [String] in
                let age = status.lastPointAge.map { DurationText.format($0) } ?? "-"
                var rpo = "-"
                if let seconds = status.rpoSeconds {
                    let ratio = status.rpoRatio.map { String(format: "%.0f%%", $0 * 100) } ?? "no point"
                    rpo = "\(DurationText.format(Double(seconds))) \(ratio) " + (status.rpoCompliant == true ? "ok" : "BREACHED")
                }
                let vm = status.vm.map { "\($0) (\(status.vmState ?? "?"))" } ?? "-"
                return [status.machine, status.lastPoint ?? "-", age, rpo, status.state.rawValue, vm,
                        status.network ?? "-", status.ip ?? "-"]
            }
            print(Format.table(["MACHINE", "LAST POINT", "AGE", "RPO", "STATE", "VM", "NETWORK", "IP"], rows))
            for status in statuses {
                if let offsite = status.offsite {
                    let age = status.offsiteAge.map { DurationText.format($0) + " old" } ?? "none yet"
                    let rpo = status.offsiteRPOCompliant.map { $0 ? ", within the RPO" : ", RPO BREACHED" } ?? ""
                    print("\(status.machine): off-site at \(offsite.target): newest point \(offsite.newestPoint ?? "-") (\(age)\(rpo))")
                }
                if let progress = status.finalisation { print("\(status.machine): " + Finalising.line(progress)) }
                if let transition = status.transition { print("\(status.machine): \(transition)") }
                if let plan = status.plan { print("\(status.machine): \(plan)") }
                for problem in status.problems { print("\(status.machine): \(problem)") }
            }
        }
    }

    struct Drills: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List NAME's drills (test failovers): result, point, times.")
        @OptionGroup var repository: RepositoryOptions
        @OptionGroup var recovery: RecoveryOptions
        @Argument(help: "Machine name.") var name: String
        @OptionGroup var output: OutputOptions

        func run() throws {
            let drills = try recovery.recovery(repository).drills(name)
            if output.json { return try JSON.print(drills) }
            func seconds(_ value: Double?) -> String { value.map { String(format: "%.1f s", $0) } ?? "-" }
            let rows = drills.map { drill in
                [drill.id, drill.result.rawValue, drill.point, seconds(drill.secondsToRunning), seconds(drill.secondsToBootLine),
                 seconds(drill.secondsToCheckEnd), drill.reason ?? ""]
            }
            print(Format.table(["DRILL", "RESULT", "POINT", "RUNNING", "BOOT LINE", "CHECKED", "REASON"], rows))
        }
    }
}

enum DrillText {
    static func summary(_ drill: Drill) -> String {
        func seconds(_ value: Double?) -> String { value.map { String(format: "%.1f s", $0) } ?? "-" }
        var lines = ["drill \(drill.id) of \(drill.machine) from point \(drill.point): \(drill.result.rawValue.uppercased())"]
        if let reason = drill.reason { lines.append("  reason:    \(reason)") }
        lines.append("  VM:        \(drill.vm) (\(drill.virtType), \(drill.vcpus) vCPU, \(drill.memoryMiB) MiB) on \(drill.network)" + (drill.ip.map { " at \($0)" } ?? ""))
        lines.append("  times:     running \(seconds(drill.secondsToRunning)), boot line \(seconds(drill.secondsToBootLine)), check done \(seconds(drill.secondsToCheckEnd))")
        if let line = drill.bootLine { lines.append("  boot line: \(line)") }
        lines.append("  console:   \(drill.consoleLog)")
        if let shot = drill.screenshot { lines.append("  screen:    \(shot)") }
        if let log = drill.checkLog { lines.append("  check log: \(log)") }
        lines.append("  stop it with: lifeboat stop-test \(drill.machine)")
        return lines.joined(separator: "\n")
    }
}

/// `NAME` or `--plan PLAN`: commands that act on one machine or on every machine of a plan.
enum PlanTarget {
    static func validate(name: String?, plan: String?) throws {
        if name == nil && plan == nil { throw ValidationError("give a machine name, or --plan PLAN") }
        if name != nil && plan != nil { throw ValidationError("give a machine name or --plan PLAN, not both") }
    }

    /// ISO 8601 (2026-11-22T10:15:00Z) or a point id's form (20261122-101500, UTC).
    static func parseTime(_ text: String) throws -> Date {
        if let date = Timestamp.parse(text) { return date }
        let formatter = DateFormatter()
        formatter.locale = Locale(identifier: "en_US_POSIX")
        formatter.timeZone = TimeZone(identifier: "UTC")
        formatter.dateFormat = "yyyyMMdd-HHmmss"
        if let date = formatter.date(from: text) { return date }
        throw LifeboatError(.invalidArgument, "--at '\(text)' is not a time: write it like 2026-11-22T10:15:00Z or 20261122-101500 (UTC)")
    }
}
