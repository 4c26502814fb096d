import Foundation
import LifeboatBase
import LifeboatFS
import LifeboatRepository
import LifeboatVirt
#if canImport(Glibc)
import Glibc
#endif

/// How a plan runs: which points (each failed-over machine's finaliser is started with
/// `startFinaliser`, through the Recovery's launcher).
public struct PlanRunOptions: Sendable {
    public var at: Date?
    public var planned: Bool
    public var scheduled: Bool

    public init(at: Date? = nil, planned: Bool = false, scheduled: Bool = false) {
        self.at = at
        self.planned = planned
        self.scheduled = scheduled
    }
}

/// The report of a run in progress, shared by the threads of a group's machines.
final class RunBook: @unchecked Sendable {
    private let lock = NSLock()
    private var current: PlanReport
    private let save: (PlanReport) -> Void

    init(_ report: PlanReport, save: @escaping (PlanReport) -> Void) {
        current = report
        self.save = save
    }

    var report: PlanReport { lock.withLock { current } }

    /// Changes the report and writes it at once.
    func update(_ change: (inout PlanReport) -> Void) {
        lock.withLock {
            change(&current)
            save(current)
        }
    }

    func updateMachine(_ name: String, _ change: (inout PlanReport.MachineRun) -> Void) {
        update { report in
            if let index = report.machines.firstIndex(where: { $0.machine == name }) { change(&report.machines[index]) }
        }
    }
}

extension Recovery {
    // MARK: - Drills

    /// Drills every machine of the plan on the isolated test network with their production IPs,
    /// group after group (a group's machines in parallel), and writes the report. The VMs keep
    /// running until `stopPlanTest`. A run that fails is returned with its reason, not thrown;
    /// what cannot start at all (unknown plan, a machine busy, no point at `--at`) throws first.
    public func testFailoverPlan(_ name: String, _ options: PlanRunOptions = PlanRunOptions(),
                                 report: @escaping @Sendable (String) -> Void = { _ in }) throws -> PlanReport {
        try runPlan(name, kind: .drill, options, report: report)
    }

    /// Fails every machine of the plan over, group after group; each finalises in the background.
    /// Pauses after a group with a manual step (the report says what to do) until `continuePlan`.
    public func failoverPlan(_ name: String, _ options: PlanRunOptions,
                             report: @escaping @Sendable (String) -> Void = { _ in }) throws -> PlanReport {
        try runPlan(name, kind: .failover, options, report: report)
    }

    func runPlan(_ name: String, kind: PlanReport.Kind, _ options: PlanRunOptions,
                 report: @escaping @Sendable (String) -> Void) throws -> PlanReport {
        let plan = try plan(name)
        let lock = try planLock(name)
        defer { withExtendedLifetime(lock) {} }
        if let active = activeRun(name) {
            throw LifeboatError(.invalidState, "plan \(name) has a \(active.kind.rawValue) \(active.id) that is \(active.result.rawValue): \(active.nextStep)")
        }
        try hot.checkReachableByQemu()
        // Every machine must be free and have a point before anything starts.
        var runs: [PlanReport.MachineRun] = []
        let started = Date()
        for (index, group) in plan.groups.enumerated() {
            for machine in group.machines {
                let state = try reconciledState(machine, record: try hot.record(machine))
                _ = try StateMachine.check(kind == .drill ? .testFailover : .failover, machine: machine, state: state)
                let point = options.planned ? nil : try pointForPlan(machine, at: options.at)
                runs.append(PlanReport.MachineRun(
                    machine: machine, group: index + 1, point: point?.id, pointTime: point?.time,
                    pointAgeSeconds: point.map { started.timeIntervalSince($0.time) }, ip: try repository.machine(machine).ip,
                    result: .pending))
            }
        }
        let existing = Set(((try? FileSystem.list(planRunsDirectory(name))) ?? []).map { String($0.dropFirst(name.count + 1)) })
        let id = name + "-" + Repository.pointID(for: started, existing: existing)
        let groups = plan.groups.enumerated().map { index, group in
            PlanReport.GroupRun(number: index + 1, machines: group.machines, result: .pending, after: group.after,
                                manual: kind == .failover ? group.manual : nil)
        }
        let first = PlanReport(id: id, plan: name, kind: kind, scheduled: options.scheduled, at: options.at, planned: options.planned,
                               started: started, result: .running, groups: groups, machines: runs)
        let book = RunBook(first) { [self] in try? save($0) }
        book.update { _ in }
        report("plan \(name): \(kind.rawValue) \(id), \(plan.groups.count) group(s), \(runs.count) machine(s)")
        return execute(plan, book: book, from: 0, options, report: report)
    }

    /// Goes on with the plan's paused failover (its manual step done) or with one that was
    /// interrupted (a killed lifeboat): from the group that was not finished.
    public func continuePlan(_ name: String, _ options: PlanRunOptions,
                             report: @escaping @Sendable (String) -> Void = { _ in }) throws -> PlanReport {
        let plan = try plan(name)
        let lock = try planLock(name)
        defer { withExtendedLifetime(lock) {} }
        guard var run = activeRun(name) else {
            throw LifeboatError(.invalidState, "plan \(name) has no paused or interrupted run: see lifeboat reports \(name)")
        }
        guard run.kind == .failover else {
            throw LifeboatError(.invalidState, "plan \(name)'s run \(run.id) is a drill that was interrupted: end it with lifeboat stop-test --plan \(name)")
        }
        let next = run.groups.firstIndex { $0.result != .passed } ?? run.groups.count
        if run.result == .paused, next > 0 {
            run.groups[next - 1].manualDone = Date()
            report("plan \(name): manual step done (\(run.pausedFor ?? "")); going on with group \(next + 1)")
        } else {
            report("plan \(name): run \(run.id) was interrupted; going on with group \(next + 1)")
        }
        run.result = .running
        run.pausedFor = nil
        let book = RunBook(run) { [self] in try? save($0) }
        book.update { _ in }
        var resumed = options
        resumed.planned = run.planned
        resumed.at = run.at
        return execute(plan, book: book, from: next, resumed, report: report)
    }

    /// Runs groups `from`... to the end, a pause, or a failure with on-failure: stop.
    func execute(_ plan: Plan, book: RunBook, from start: Int, _ options: PlanRunOptions,
                 report: @escaping @Sendable (String) -> Void) -> PlanReport {
        let kind = book.report.kind
        var failed: String? = book.report.groups.prefix(start).first { $0.result == .failed }.map { "group \($0.number) failed" }
        for index in start..<plan.groups.count {
            let group = plan.groups[index]
            let number = index + 1
            if failed != nil && plan.onFailure == .stop { break }
            book.update { $0.groups[index].started = Date(); $0.groups[index].result = .running }
            report("group \(number): \(group.machines.joined(separator: ", "))")
            Parallel.each(group.machines) { [repository, settings] machine in
                // A Recovery per machine (safe to share, but each machine's libvirt calls then
                // go over a connection of their own).
                let own = Recovery(repository: repository, settings: settings)
                own.runMachine(machine, plan: plan, group: group, number: number, kind: kind, book: book, options, report: report)
            }
            let machines = book.report.machines.filter { $0.group == number }
            var problem = machines.first { $0.result != .passed }.map { "\($0.machine): \($0.reason ?? $0.result.rawValue)" }
            if problem == nil, let after = group.after {
                problem = runAfter(after, plan: plan, number: number, machines: machines, book: book, report: report)
            }
            book.update {
                $0.groups[index].ended = Date()
                $0.groups[index].result = problem == nil ? .passed : .failed
                $0.groups[index].reason = problem
            }
            if let problem {
                report("group \(number) failed: \(problem)")
                failed = failed ?? "group \(number) failed: \(problem)"
                continue
            }
            report("group \(number) passed")
            if kind == .failover, let manual = group.manual, index + 1 < plan.groups.count {
                book.update { $0.result = .paused; $0.pausedFor = manual }
                report("plan \(plan.name) paused: \(manual); then run lifeboat plan continue \(plan.name)")
                return finish(book)
            }
        }
        book.update { run in
            if let failed, plan.onFailure == .stop {
                for index in run.groups.indices where run.groups[index].result == .pending {
                    run.groups[index].result = .skipped
                    run.groups[index].reason = "not started: \(failed) (on-failure: stop)"
                    for m in run.machines.indices where run.machines[m].group == index + 1 {
                        run.machines[m].result = .skipped
                        run.machines[m].reason = "not started: \(failed)"
                    }
                }
            }
            run.ended = Date()
            run.result = failed == nil ? .passed : .failed
            run.reason = failed
            if failed == nil, let last = run.machines.compactMap(\.checkedAt).max() {
                run.rtoSeconds = last.timeIntervalSince(run.started)
            }
        }
        let done = book.report
        report(String(format: "plan %@: %@ %@", plan.name, done.result.rawValue,
                      done.rtoSeconds.map { String(format: "(RTO %.1f s)", $0) } ?? "(\(done.reason ?? ""))"))
        if kind == .drill { pruneReports(plan: plan.name, keep: plan.keepReports) }
        return finish(book)
    }

    /// Writes the HTML and the final JSON.
    func finish(_ book: RunBook) -> PlanReport {
        book.update { writeHTML(&$0) }
        return book.report
    }

    /// One machine's part: its drill (or failover), boot line and check, into the report.
    func runMachine(_ machine: String, plan: Plan, group: Plan.Group, number: Int, kind: PlanReport.Kind, book: RunBook,
                    _ options: PlanRunOptions, report: @escaping @Sendable (String) -> Void) {
        let say: (String) -> Void = { report("  \(machine): \($0)") }
        let previous = book.report.machines.first { $0.machine == machine }
        if previous?.result == .passed { return }   // continuing an interrupted run
        book.updateMachine(machine) { $0.started = Date(); $0.result = .running; $0.reason = nil }
        let environment = ["LIFEBOAT_PLAN": plan.name, "LIFEBOAT_GROUP": "\(number)", "LIFEBOAT_PLAN_RUN": book.report.id]
        do {
            let settings = try repository.machine(machine)
            switch kind {
            case .drill:
                var drillOptions = DrillOptions(point: previous?.point, ip: settings.ip, waitFor: group.waitFor,
                                                timeout: TimeInterval(plan.timeoutSeconds), check: group.check)
                drillOptions.checkDirectory = plan.directory
                drillOptions.checkEnvironment = environment
                let drill = try testFailover(machine, drillOptions, report: say)
                book.updateMachine(machine) { run in
                    run.drill = drill.id
                    run.vm = drill.vm
                    run.ip = drill.ip
                    run.runningAt = drill.secondsToRunning.map { drill.started.addingTimeInterval($0) }
                    run.bootLineAt = drill.secondsToBootLine.map { drill.started.addingTimeInterval($0) }
                    run.checkedAt = drill.result == .passed ? drill.secondsToCheckEnd.map { drill.started.addingTimeInterval($0) } : nil
                    run.started = drill.started
                    run.bootLine = drill.bootLine
                    run.check = drill.check
                    run.checkStatus = drill.checkStatus
                    run.checkOutput = drill.checkLog.flatMap { Self.tail(of: $0, bytes: 4096) }
                    run.consoleLog = drill.consoleLog
                    run.consoleTail = Self.tail(of: drill.consoleLog, bytes: 2048)
                    run.screenshot = drill.screenshot
                    run.result = drill.result == .passed ? .passed : .failed
                    run.reason = drill.reason
                }
            case .failover:
                try failoverMachine(machine, plan: plan, group: group, book: book, environment: environment, options, report: say)
            }
        } catch {
            book.updateMachine(machine) { $0.result = .failed; $0.reason = "\(error)" }
        }
        say(book.report.machines.first { $0.machine == machine }.map { "\($0.result.rawValue)" + ($0.reason.map { ": " + $0 } ?? "") } ?? "")
    }

    /// A machine's failover within a plan: fail over (unless an interrupted run already did),
    /// start its finaliser, wait for the boot line on the production network, run the check.
    func failoverMachine(_ machine: String, plan: Plan, group: Plan.Group, book: RunBook, environment: [String: String],
                         _ options: PlanRunOptions, report: @escaping (String) -> Void) throws {
        let console = hot.machineDirectory(machine) + "/console.log"
        let state = try reconciledState(machine, record: try hot.record(machine))
        var offset = 0
        let record: ServerRecord
        if state == .standby {
            offset = Int((try? FileManager.default.attributesOfItem(atPath: console)[.size] as? Int) ?? 0)
            let point = book.report.machines.first { $0.machine == machine }?.point
            record = try failover(machine, FailoverOptions(point: options.planned ? nil : point, planned: options.planned), report: report)
            try startFinaliser(record.machine)
        } else {
            guard let existing = try hot.record(machine), existing.state == .finalizing || existing.state == .failedOver else {
                throw LifeboatError(.invalidState, "\(machine) is in \(state.rawValue): a plan failover goes on only from Standby, Finalizing or FailedOver")
            }
            record = existing
        }
        let machineSettings = try repository.machine(machine)
        book.updateMachine(machine) { run in
            run.runningAt = Date()
            run.vm = record.vm
            run.ip = record.ip
            run.point = record.point
            run.pointTime = record.pointTime
            if run.pointAgeSeconds == nil, let time = record.pointTime { run.pointAgeSeconds = book.report.started.timeIntervalSince(time) }
            run.consoleLog = console
        }
        let patternText = group.waitFor ?? machineSettings.bootPattern ?? Self.defaultBootPattern
        guard let domain = try connection().domain(named: record.vm ?? machine) else {
            throw LifeboatError(.notFound, "the VM \(record.vm ?? machine) vanished after the failover: see lifeboat status \(machine)")
        }
        let folder = reportDirectory(plan: plan.name, id: book.report.id)
        let timeout = TimeInterval(plan.timeoutSeconds)
        let ip = record.ip
        let watch = BootWatch(machine: machine, point: record.point ?? "", domain: domain, consoleLog: console, offset: offset,
                              pattern: patternText, timeout: timeout, deadline: Date().addingTimeInterval(timeout),
                              screenshot: folder + "/\(machine).png", check: group.check, checkLog: folder + "/\(machine).check.log",
                              checkDirectory: plan.directory, environment: environment, address: { ip })
        let outcome = try watchBoot(watch, report: report) { booted in
            report("boot line: \(booted.line ?? "")")
            book.updateMachine(machine) { run in
                run.bootLineAt = booted.bootLineAt
                run.bootLine = booted.line
                if let path = booted.screenshot { run.screenshot = path }
            }
        }
        guard outcome.line != nil else {
            book.updateMachine(machine) { $0.result = .failed; $0.reason = outcome.reason; $0.consoleTail = Self.tail(of: console, bytes: 2048) }
            return
        }
        book.updateMachine(machine) { run in
            if let check = group.check {
                run.check = check
                run.checkStatus = outcome.checkStatus
                run.checkOutput = outcome.checkLog.flatMap { Self.tail(of: $0, bytes: 4096) }
            }
            run.consoleTail = Self.tail(of: console, bytes: 2048)
            run.result = outcome.reason == nil ? .passed : .failed
            run.reason = outcome.reason
            run.checkedAt = outcome.reason == nil ? outcome.checkedAt ?? Date() : nil
        }
    }

    /// The group's `after` script, run once in the plan's folder; nil when it passed.
    func runAfter(_ script: String, plan: Plan, number: Int, machines: [PlanReport.MachineRun], book: RunBook,
                  report: (String) -> Void) -> String? {
        report("group \(number): running its after script: \(script)")
        let log = reportDirectory(plan: plan.name, id: book.report.id) + "/group-\(number).after.log"
        let environment = [
            "LIFEBOAT_PLAN": plan.name, "LIFEBOAT_GROUP": "\(number)", "LIFEBOAT_PLAN_RUN": book.report.id,
            "LIFEBOAT_MACHINES": machines.map(\.machine).joined(separator: " "),
            "LIFEBOAT_VM_IPS": machines.compactMap(\.ip).map { $0.split(separator: "/").first.map(String.init) ?? $0 }.joined(separator: " "),
        ]
        let outcome: (status: Int32, failure: String?)
        do {
            outcome = try Self.runCheck(script, environment: environment, log: log,
                                        deadline: Date().addingTimeInterval(TimeInterval(plan.timeoutSeconds)),
                                        directory: plan.directory, what: "the after script")
        } catch {
            outcome = (-1, "\(error)")
        }
        book.update {
            $0.groups[number - 1].afterStatus = outcome.status
            $0.groups[number - 1].afterOutput = Self.tail(of: log, bytes: 4096)
        }
        return outcome.failure
    }

    // MARK: - Ending runs

    /// Ends the plan's drill: stop-test for every machine of the plan that is in a drill; the
    /// run's report says it was stopped. Works on what a killed run left.
    public func stopPlanTest(_ name: String) throws -> [StopReport] {
        let plan = try plan(name)
        let lock = try planLock(name)
        defer { withExtendedLifetime(lock) {} }
        var stopped: [StopReport] = []
        for machine in plan.machines where try reconciledState(machine, record: try hot.record(machine)) == .testingFailover {
            stopped.append(try stopTest(machine))
        }
        endActiveRun(name, kind: .drill, why: "stopped by lifeboat stop-test --plan before it finished")
        return stopped
    }

    /// Commits every machine of the plan; refuses, naming them, while some are not FailedOver.
    public func commitPlan(_ name: String) throws -> [Machine] {
        let plan = try plan(name)
        let lock = try planLock(name)
        defer { withExtendedLifetime(lock) {} }
        let notReady = try plan.machines.compactMap { machine -> String? in
            let state = try hot.record(machine)?.state ?? .standby
            return state == .failedOver ? nil : "\(machine) (\(state.rawValue))"
        }
        guard notReady.isEmpty else {
            throw LifeboatError(.invalidState, "plan \(name) cannot be committed yet: " + notReady.joined(separator: ", ")
                + " not FailedOver: wait for finalisation (lifeboat status), or finish the run first")
        }
        if let run = activeRun(name) {
            throw LifeboatError(.invalidState, "plan \(name)'s failover \(run.id) is \(run.result.rawValue): \(run.nextStep)")
        }
        return try plan.machines.map { try commit($0) }
    }

    /// Cancels the failover of every machine of the plan that is failed over.
    public func cancelFailoverPlan(_ name: String) throws -> [String] {
        let plan = try plan(name)
        let lock = try planLock(name)
        defer { withExtendedLifetime(lock) {} }
        var cancelled: [String] = []
        for machine in plan.machines {
            let state = try hot.record(machine)?.state ?? .standby
            guard state == .finalizing || state == .failedOver else { continue }
            try cancelFailover(machine)
            cancelled.append(machine)
        }
        endActiveRun(name, kind: .failover, why: "cancelled by lifeboat cancel-failover --plan")
        return cancelled
    }

    /// Marks the plan's unfinished run of `kind` stopped; a finished one only gets its HTML again.
    func endActiveRun(_ name: String, kind: PlanReport.Kind, why: String) {
        guard var run = reports(plan: name).last(where: { $0.kind == kind }) else { return }
        if run.isActive {
            run.result = .stopped
            run.reason = why
            run.ended = Date()
            for index in run.machines.indices where run.machines[index].result == .running || run.machines[index].result == .pending {
                run.machines[index].result = run.machines[index].result == .running ? .failed : .skipped
                run.machines[index].reason = why
            }
            for index in run.groups.indices where run.groups[index].result == .running || run.groups[index].result == .pending {
                run.groups[index].result = run.groups[index].result == .running ? .failed : .skipped
                run.groups[index].reason = why
            }
        }
        writeHTML(&run)
        try? save(run)
    }

    // MARK: - Helpers

    /// The plan's lock: held by the process that runs, continues or ends one of its runs.
    func planLock(_ name: String) throws -> FileLock {
        try FileSystem.makeDirectories(planRunsDirectory(name))
        chmod(hot.root + "/.plans", 0o755)
        return try HotStorage.exclusiveLock(planLockPath(name), busy: "is running plan \(name)")
    }

    /// The machine's latest point, or its latest at or before `at`.
    func pointForPlan(_ machine: String, at: Date?) throws -> RecoveryPoint {
        guard let at else { return try repository.point(machine, nil) }
        guard let point = try repository.points(machine).last(where: { $0.time <= at }) else {
            throw LifeboatError(.notFound, "\(machine) has no recovery point at or before \(Timestamp.format(at)): see lifeboat points \(machine), or give a later --at")
        }
        return point
    }

    /// The last `bytes` of a text file, from a line start.
    public static func tail(of path: String, bytes: Int) -> String? {
        // Only the end is read: a console log grows for as long as the VM runs.
        guard let handle = FileHandle(forReadingAtPath: path) else { return nil }
        defer { try? handle.close() }
        let size = (try? handle.seekToEnd()) ?? 0
        try? handle.seek(toOffset: size > UInt64(bytes) ? size - UInt64(bytes) : 0)
        let data = (try? handle.readToEnd()) ?? Data()
        var text = String(decoding: data, as: UTF8.self)
        if size > UInt64(bytes), let newline = text.firstIndex(of: "\n") { text = String(text[text.index(after: newline)...]) }
        // Terminal escapes (a shell asking for the cursor position) and control bytes mean nothing in a report.
        text = text.replacingOccurrences(of: "\u{1b}\\[[0-9;?]*[A-Za-z]", with: "", options: .regularExpression)
        return String(text.unicodeScalars.filter { $0 == "\n" || $0 == "\t" || $0.value >= 0x20 })
    }
}

/// Runs a body per element, each on a thread of its own, and waits for all: a group's machines
/// boot in parallel whatever the number of cores (each mostly waits on QEMU).
enum Parallel {
    static func each(_ items: [String], _ body: @escaping @Sendable (String) -> Void) {
        let group = DispatchGroup()
        for item in items {
            group.enter()
            Thread {
                body(item)
                group.leave()
            }.start()
        }
        group.wait()
    }
}

// MARK: - Scheduled drills

/// When a plan's scheduled drill was last skipped, and why.
public struct DrillSkip: Codable, Sendable {
    public var time: Date
    public var reason: String
}

extension Recovery {
    func skipPath(_ plan: String) -> String { planRunsDirectory(plan) + "/.skipped.json" }

    public func lastSkip(_ plan: String) -> DrillSkip? {
        FileSystem.contents(skipPath(plan)).flatMap { try? JSONDecoder.lifeboat.decode(DrillSkip.self, from: Data($0)) }
    }

    /// Plans with `drill-every`, each with when its next drill is due: `drill-every` after its
    /// last drill; a plan never drilled is due at once (its first report is the baseline). After
    /// a skip, the drill is tried again a minute later.
    public func drillSchedule() -> [(plan: String, due: Date)] {
        plans().compactMap { plan in
            guard let every = plan.drillEverySeconds else { return nil }
            let lastDrill = reports(plan: plan.name).last { $0.kind == .drill }?.started
            var due = lastDrill.map { $0.addingTimeInterval(TimeInterval(every)) } ?? plan.applied
            if let skip = lastSkip(plan.name), skip.time >= (lastDrill ?? .distantPast) {
                due = max(due, skip.time.addingTimeInterval(min(TimeInterval(every), 60)))
            }
            return (plan.name, due)
        }
    }

    /// The replication service's drill of a plan: refused (and recorded as skipped) while the plan
    /// or one of its machines is in a drill or failover; else the drill, its report, then
    /// stop-test, and old reports pruned.
    /// - Returns: the report, or the reason it was skipped.
    public func scheduledDrill(_ name: String, report: @escaping @Sendable (String) -> Void = { _ in }) -> (report: PlanReport?, skipped: String?) {
        func skip(_ reason: String) -> (PlanReport?, String?) {
            try? FileSystem.makeDirectories(planRunsDirectory(name))
            if let bytes = try? JSONEncoder.lifeboat.encode(DrillSkip(time: Date(), reason: reason)) {
                try? FileSystem.writeAtomically(Array(bytes), to: skipPath(name))
            }
            return (nil, reason)
        }
        guard let plan = try? plan(name) else { return skip("the plan is gone") }
        if let run = activeRun(name) { return skip("the plan's \(run.kind.rawValue) \(run.id) is \(run.result.rawValue)") }
        for machine in plan.machines {
            let state = (try? reconciledState(machine, record: try hot.record(machine))) ?? .standby
            if state != .standby { return skip("\(machine) is in \(state.rawValue)") }
        }
        let outcome: PlanReport
        do {
            outcome = try testFailoverPlan(name, PlanRunOptions(scheduled: true), report: report)
        } catch let error as LifeboatError where error.code == .busy || error.code == .invalidState {
            return skip(error.message)
        } catch {
            // Nothing started, or what started is cleaned up below; the failure is the report's.
            _ = try? stopPlanTest(name)
            return skip("the drill could not start: \(error)")
        }
        _ = try? stopPlanTest(name)   // the run pruned the plan's old reports already
        return (reports(plan: name).last { $0.id == outcome.id } ?? outcome, nil)
    }
}
