import ArgumentParser
import Foundation
import LifeboatBase
import LifeboatFS
import LifeboatRecovery
import LifeboatRepository
#if canImport(Glibc)
import Glibc
#endif

extension Lifeboat {
    struct Failover: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Fail NAME over: its recovery VM boots on the production network from a point at once, then finalises into hot storage.",
            discussion: """
            The VM starts on a qcow2 overlay over the point's disk served by FUSE, so it serves users within its boot \
            time whatever the disk size; block copies move every byte into standalone raw disks in hot storage while \
            it runs (state Finalizing), then the VM no longer needs the backup (FailedOver). Without --wait the copy \
            is finished by a background 'lifeboat' process; 'lifeboat status' shows its progress.
            """)
        @OptionGroup var repository: RepositoryOptions
        @OptionGroup var recovery: RecoveryOptions
        @Argument(help: "Machine name (or give --plan).") var name: String?
        @Option(help: "Fail over every machine of this recovery plan, group after group, and write its report.") var plan: String?
        @Option(help: "Point id or 'latest'.") var point = "latest"
        @Flag(help: "The source is reachable: refuse while its disks are open, take a final backup, fail over from it (no data lost).")
        var planned = false
        @Flag(help: "With --planned: go on even though a process has the source disks open.") var force = false
        @Option(help: "vCPUs (default: the machine's).") var vcpus: Int?
        @Option(help: "Memory in MiB (default: the machine's).") var memory: Int?
        @Option(help: "Production IP, ADDR/PREFIX (default: the machine's).") var ip: String?
        @Option(help: "Production libvirt network (default: the machine's, else lifeboat-prod made from the template).")
        var network: String?
        @Option(help: "Production host bridge instead of a libvirt network.") var bridge: String?
        @Option(name: .customLong("network-map"), help: ArgumentHelp("SOURCE=TARGET: the NICs of a --domain machine on source network SOURCE join TARGET (repeat; the others join --network).", valueName: "SOURCE=TARGET"))
        var networkMap: [String] = []
        @Option(help: "Limit the copy into hot storage to this many MiB/s; fractions such as 0.5 too (default or 0: no limit).") var bandwidth: Double?
        @Flag(help: "Wait for finalisation, showing progress.") var wait = false
        @OptionGroup var output: OutputOptions

        func validate() throws {
            for pair in networkMap where pair.split(separator: "=").count != 2 {
                throw ValidationError("--network-map takes SOURCE=TARGET (two network names), not '\(pair)'")
            }
            if force && !planned { throw ValidationError("--force only goes with --planned") }
            if network != nil && bridge != nil { throw ValidationError("give --network or --bridge, not both") }
            if let bandwidth, !(bandwidth.isFinite && bandwidth >= 0) { throw ValidationError("--bandwidth is in MiB/s: give 0 (no limit) or more") }
            if planned && point != "latest" { throw ValidationError("--planned fails over from the final backup it takes: leave out --point") }
            try PlanTarget.validate(name: name, plan: plan)
            if plan != nil && (point != "latest" || vcpus != nil || memory != nil || ip != nil || network != nil || bridge != nil || wait || force) {
                throw ValidationError("with --plan, machines fail over with their own settings: only --planned may be given")
            }
        }

        func run() throws {
            let recovery = try self.recovery.recovery(repository)
            if let plan {
                let options = PlanRunOptions(planned: planned)
                let report = try recovery.failoverPlan(plan, options, report: PlanRun.progress(json: output.json))
                return try PlanRun.conclude(report, json: output.json)
            }
            let name = name!
            var options = FailoverOptions(point: point, planned: planned, force: force, vcpus: vcpus, memoryMiB: memory, ip: ip,
                                          network: network, bridge: bridge, bandwidth: bandwidth.flatMap { $0 > 0 ? max(1, UInt64(min($0, 0x1p40) * 1048576)) : nil })
            options.networkMap = Dictionary(networkMap.map { pair in
                let parts = pair.split(separator: "=").map(String.init)
                return (parts[0], parts[1])
            }) { $1 }
            let started = Date()
            let record = try recovery.failover(name, options) { line in
                if Terminal.isInteractive && !output.json { Terminal.writeError("\(line)\n") }
            }
            if !output.json {
                print(String(format: "%@ failed over from point %@: VM %@ running after %.1f s on %@%@", name, record.point ?? "?", name,
                             Date().timeIntervalSince(started), record.bridge.map { "bridge " + $0 } ?? record.network ?? "?",
                             record.ip.map { " at \($0)" } ?? ""))
            }
            try Finalising.finish(recovery, record, wait: wait, json: output.json)
        }
    }

    struct Resume: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Finish an interrupted failover (restart the VM or its copies) or failback.")
        @OptionGroup var repository: RepositoryOptions
        @OptionGroup var recovery: RecoveryOptions
        @Argument(help: "Machine name.") var name: String
        @Flag(help: "Wait for finalisation, showing progress (else it finishes in the background).") var wait = false
        @OptionGroup var output: OutputOptions

        func run() throws {
            let recovery = try self.recovery.recovery(repository)
            if try recovery.hot.record(name)?.state == .failingBack {
                let report = try recovery.failback(name) { line in if Terminal.isInteractive { Terminal.writeError("\(line)\n") } }
                return output.json ? try JSON.print(report) : print(Failback.summary(report))
            }
            let record = try recovery.resume(name)
            if record.state != .finalizing {
                return output.json ? try JSON.print(record) : print("\(name) is \(record.state.rawValue): every disk is in hot storage")
            }
            try Finalising.finish(recovery, record, wait: wait, json: output.json)
        }
    }

    /// The background finaliser started by failover, resume and change-point.
    struct Finalise: ParsableCommand {
        static let configuration = CommandConfiguration(shouldDisplay: false)
        @OptionGroup var repository: RepositoryOptions
        @OptionGroup var recovery: RecoveryOptions
        @Argument var name: String

        func run() throws {
            let recovery = try self.recovery.recovery(repository)
            let record = try recovery.waitForFinalisation(name)
            Terminal.writeError("\(Format.time(Date())) \(name): \(record.state.rawValue)\n")
        }
    }

    struct CancelFailover: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "cancel-failover",
            abstract: "Throw the failover away: VM destroyed, hot disks deleted, back to Standby (the VM's writes are lost).")
        @OptionGroup var repository: RepositoryOptions
        @OptionGroup var recovery: RecoveryOptions
        @Argument(help: "Machine name (or give --plan).") var name: String?
        @Option(help: "Cancel the failover of every machine of this plan.") var plan: String?
        @Flag(help: "Yes, discard everything the recovery VM wrote since the failover.") var yes = false

        func validate() throws { try PlanTarget.validate(name: name, plan: plan) }

        func run() throws {
            let recovery = try self.recovery.recovery(repository)
            if let plan {
                guard yes else {
                    throw LifeboatError(.invalidArgument, "cancel-failover --plan \(plan) destroys the recovery VMs of every machine of the plan and deletes their hot disks: give --yes to confirm")
                }
                let cancelled = try recovery.cancelFailoverPlan(plan)
                return print("cancelled the failover of plan \(plan): " + (cancelled.isEmpty ? "no machine was failed over" : cancelled.joined(separator: ", ") + " in Standby"))
            }
            let name = name!
            if !yes {
                let since = (try? recovery.hot.record(name))?.flatMap { $0.state == .standby ? nil : $0.since }
                let warning = "cancel-failover destroys \(name)'s recovery VM and deletes its hot disks: everything it wrote since the failover"
                    + (since.map { " (\(Format.time($0)))" } ?? "") + " is lost"
                guard isatty(0) != 0 else { throw LifeboatError(.invalidArgument, "\(warning); give --yes to confirm") }
                Terminal.writeError("\(warning).\nType 'yes' to go on: ")
                guard readLine()?.trimmingCharacters(in: .whitespaces) == "yes" else {
                    throw LifeboatError(.invalidArgument, "not confirmed: nothing was changed")
                }
            }
            try recovery.cancelFailover(name)
            print("cancelled the failover of \(name): VM destroyed, hot disks deleted; \(name) is in Standby")
        }
    }

    struct ChangePoint: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "change-point",
            abstract: "Bring the failed-over VM back from another point (before commit); what it wrote since is discarded.")
        @OptionGroup var repository: RepositoryOptions
        @OptionGroup var recovery: RecoveryOptions
        @Argument(help: "Machine name.") var name: String
        @Option(help: "Point id or 'latest'.") var point: String
        @Flag(help: "Wait for finalisation, showing progress.") var wait = false
        @OptionGroup var output: OutputOptions

        func run() throws {
            let recovery = try self.recovery.recovery(repository)
            let record = try recovery.changePoint(name, to: point) { line in
                if Terminal.isInteractive && !output.json { Terminal.writeError("\(line)\n") }
            }
            if !output.json { print("\(name) restarted from point \(record.point ?? "?"); finalising again") }
            try Finalising.finish(recovery, record, wait: wait, json: output.json)
        }
    }

    struct Commit: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Make NAME's failover final: its backups now read the recovery VM's hot disks.")
        @OptionGroup var repository: RepositoryOptions
        @OptionGroup var recovery: RecoveryOptions
        @Argument(help: "Machine name (or give --plan).") var name: String?
        @Option(help: "Commit every machine of this plan (all must be FailedOver).") var plan: String?

        func validate() throws { try PlanTarget.validate(name: name, plan: plan) }

        func run() throws {
            if let plan {
                let machines = try self.recovery.recovery(repository).commitPlan(plan)
                return print("committed the failover of plan \(plan): " + machines.map(\.name).joined(separator: ", "))
            }
            let name = name!
            let machine = try self.recovery.recovery(repository).commit(name)
            print("committed the failover of \(name): backups now read " + machine.disks.map(\.path).joined(separator: ", "))
        }
    }

    struct Failback: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Return NAME to its source: points of the recovery VM, shutdown, last point, restore onto the original disks.",
            discussion: "Only chunks that differ are written to the original disks. The source is live again afterwards (Standby).")
        @OptionGroup var repository: RepositoryOptions
        @OptionGroup var recovery: RecoveryOptions
        @Argument(help: "Machine name.") var name: String
        @Option(name: .customLong("to"), help: "Restore onto this path instead of the original (repeat per disk, in disk order).")
        var targets: [String] = []
        @Option(help: "Seconds to wait for the guest to shut down before stopping it.") var shutdownTimeout = 120.0
        @Flag(help: "Start the original domain afterwards (machines protected with --domain).") var start = false
        @OptionGroup var output: OutputOptions

        func run() throws {
            let recovery = try self.recovery.recovery(repository)
            let disks = try recovery.repository.machine(name).disks
            guard targets.count <= disks.count else {
                throw LifeboatError(.invalidArgument, "\(targets.count) --to paths for \(disks.count) disk(s) of \(name): give at most one per disk")
            }
            let map = Dictionary(uniqueKeysWithValues: zip(disks.map(\.name), targets.map {
                $0.hasPrefix("/") ? $0 : FileManager.default.currentDirectoryPath + "/" + $0
            }))
            let report = try recovery.failback(name, targets: map, shutdownTimeout: shutdownTimeout, start: start) { line in
                if Terminal.isInteractive && !output.json { Terminal.writeError("\(line)\n") }
            }
            if output.json { try JSON.print(report) } else { print(Self.summary(report)) }
        }

        static func summary(_ report: FailbackReport) -> String {
            var lines = ["failed back \(report.machine): points \(report.points.joined(separator: ", ")) of the recovery VM"]
            for restore in report.restores {
                lines.append(String(format: "  %@ -> %@: %@ written of %@ (%.2f%%)", restore.disk, restore.path, Format.bytes(restore.bytesWritten),
                                    Format.bytes(restore.size), restore.size > 0 ? 100 * Double(restore.bytesWritten) / Double(restore.size) : 0))
            }
            lines.append("\(report.machine) is in Standby: the source is live again")
            return lines.joined(separator: "\n")
        }
    }

    struct History: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "NAME's recovery history: drills, failovers, finalisation, commit, failback, with times.")
        @OptionGroup var repository: RepositoryOptions
        @OptionGroup var recovery: RecoveryOptions
        @Argument(help: "Machine name.") var name: String
        @OptionGroup var output: OutputOptions

        func run() throws {
            let events = try recovery.recovery(repository).history(name)
            if output.json { return try JSON.print(events) }
            print(Format.table(["TIME", "EVENT", "STATE", "POINT", "BY", "DETAIL"], events.map {
                [Format.time($0.time), $0.event, $0.state.rawValue, $0.point ?? "-", $0.user ?? "-", $0.detail]
            }))
        }
    }
}

/// Waiting for finalisation, in the foreground or in a background process.
enum Finalising {
    /// Waits for finalisation (`wait`) or leaves it to a background process; prints the outcome.
    static func finish(_ recovery: Recovery, _ record: ServerRecord, wait: Bool, json: Bool) throws {
        let name = record.machine
        if wait {
            let done = try Finalising.wait(recovery, name, json: json)
            return json ? try JSON.print(done) : print(summary(done))
        }
        let (pid, log) = try recovery.startFinaliser(name)
        if json { return try JSON.print(record) }
        print("finalising into \(recovery.hot.disksDirectory(name)) in the background (pid \(pid), log \(log)); progress: lifeboat status \(name)")
    }

    static func wait(_ recovery: Recovery, _ name: String, json: Bool) throws -> ServerRecord {
        let started = Date()
        let record = try recovery.waitForFinalisation(name) { progress in
            guard Terminal.isInteractive && !json else { return }
            Terminal.writeError("\r\u{1b}[K" + line(progress, elapsed: Date().timeIntervalSince(started)))
        }
        if Terminal.isInteractive && !json { Terminal.writeError("\r\u{1b}[K") }
        return record
    }

    static func line(_ progress: FinalisationProgress, elapsed: Double? = nil) -> String {
        let percent = progress.bytesTotal > 0 ? 100 * Double(progress.bytesDone) / Double(progress.bytesTotal) : 0
        var text = String(format: "finalising %3.0f%%  %@ of %@", percent, Format.bytes(Int(progress.bytesDone)), Format.bytes(Int(progress.bytesTotal)))
        if let rate = progress.rate { text += "  " + Format.rate(rate) }
        if let eta = progress.eta { text += "  ETA " + DurationText.format(eta) }
        if progress.disks.contains(where: { $0.phase == "switching" }) { text += "  (switching to the hot disk)" }
        return text
    }

    static func summary(_ record: ServerRecord) -> String {
        switch record.state {
        case .failedOver:
            return "\(record.machine) is FailedOver: every disk is in hot storage (" + record.disks.map(\.path).joined(separator: ", ")
                + "); the backup is no longer needed. Next: lifeboat commit \(record.machine), or change-point / cancel-failover"
        default:
            return "\(record.machine) is \(record.state.rawValue)"
        }
    }
}
