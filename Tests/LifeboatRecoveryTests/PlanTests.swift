import Foundation
import LifeboatTestSupport
import Testing
#if canImport(Glibc)
import Glibc
#endif

extension DrillLab {
    /// Writes a plan file into the scratch folder (scripts run there) and applies it.
    @discardableResult
    func applyPlan(_ yaml: String, file: String = "plan.yaml") throws -> CLI.Result {
        try yaml.write(toFile: scratch.file(file), atomically: true, encoding: .utf8)
        return try run(["plan", "apply", scratch.file(file)])
    }

    /// Runs a plan command with --json and returns its exit status and the report.
    func planRun(_ arguments: [String]) throws -> (status: Int32, report: [String: Any], stderr: String) {
        let result = try run(arguments + ["--json"])
        let report = (try? JSONSerialization.jsonObject(with: Data(result.stdout.utf8))) as? [String: Any] ?? [:]
        return (result.status, report, result.stderr)
    }

    func testDomains() -> [String] {
        machines.filter { domainExists("lifeboat-test-" + $0) }
    }
}

/// A report's machine entries by name.
func machineRuns(_ report: [String: Any]) -> [String: [String: Any]] {
    var byName: [String: [String: Any]] = [:]
    for run in report["machines"] as? [[String: Any]] ?? [] { byName[run["machine"] as? String ?? ""] = run }
    return byName
}

func date(_ value: Any?) -> Date? { (value as? String).flatMap { ISO8601DateFormatter.withFraction.date(from: $0) } }

extension ISO8601DateFormatter {
    static var withFraction: ISO8601DateFormatter {
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        return formatter
    }
}

@Suite("Recovery plans: checking the file")
struct PlanFileTests {
    @Test("bad plans: each error names the file, the line and what is wrong; nothing is stored")
    func badPlans() throws {
        let lab = try DrillLab(["p1", "p2"])
        let (a, b) = (lab.machines[0], lab.machines[1])
        for machine in [a, b] {
            let disk = lab.scratch.file(machine + ".raw")
            try Data(count: 1 << 20).write(to: URL(fileURLWithPath: disk))
            try lab.check(["protect", machine, "--disk", disk, "--ip", "192.168.95.10/24", "--mac", "52:54:00:95:00:1\(machine == a ? 0 : 1)"])
        }
        let cases: [(String, String)] = [
            ("name: shop\ngroups:\n  - machines: [\(a)]\n  - machines: [nosuch]\n", "line 4: unknown machine nosuch"),
            ("name: shop\ngroups:\n  - machines: [\(a)]\n  - machines: [\(b), \(a)]\n", "line 4: machine \(a) is in group 1"),
            ("name: shop\ngroups:\n  - machines: [\(a), \(b)]\n", "IP clash: \(b) and \(a) both have 192.168.95.10"),
            ("name: shop\ngroups:\n  - machines: [\(a)]\n  - machines: []\n", "line 4: group 2 is empty"),
            ("name: shop\non-failure: maybe\ngroups:\n  - machines: [\(a)]\n", "line 2: on-failure is stop or continue"),
            ("name: shop\ngroups:\n  - machines: [\(a)]\n    chek: true\n", "line 4: unknown group field 'chek'"),
            ("name: shop\ngroups: [\n", "not valid YAML"),
        ]
        for (yaml, expected) in cases {
            let result = try lab.applyPlan(yaml)
            #expect(result.status != 0)
            #expect(result.stderr.contains(lab.scratch.file("plan.yaml")) && result.stderr.contains(expected), "\(expected) in \(result.stderr)")
            #expect(result.stderr.split(separator: "\n").count == 1, "one line: \(result.stderr)")
        }
        let stored = try JSONSerialization.jsonObject(with: Data(lab.check(["plans", "--json"]).utf8)) as? [Any]
        #expect(stored?.isEmpty == true, "nothing was stored")
        let unknown = try lab.run(["test-failover", "--plan", "nosuch"])
        #expect(unknown.status != 0 && unknown.stderr.contains("no plan named nosuch"), "\(unknown.stderr)")
        let both = try lab.run(["test-failover", a, "--plan", "shop"])
        #expect(both.status != 0 && both.stderr.contains("not both"), "\(both.stderr)")
    }
}

extension RecoveryVMTests {
@Suite("Recovery plans")
struct PlanTests {
    @Test("a drill of two groups: group 2 starts after group 1 is checked, its two machines boot in parallel; report in JSON and HTML; stop-test --plan leaves nothing")
    func groupsInOrder() throws {
        let lab = try DrillLab(["db", "web1", "web2"])
        let (db, web1, web2) = (lab.machines[0], lab.machines[1], lab.machines[2])
        for (index, machine) in lab.machines.enumerated() {
            _ = try lab.protect(machine, marker: machine, ip: "192.168.94.1\(index)/24", mac: "52:54:00:94:00:1\(index)")
            try lab.check(["backup", machine])
        }
        let applied = try lab.applyPlan("""
            name: shop-\(getpid())
            on-failure: stop
            groups:
              - machines: [\(db)]
                wait-for: LIFEBOAT-READY
                check: 'test "$LIFEBOAT_VM_IP" = 192.168.94.10 && echo "db answers at $LIFEBOAT_VM_IP"'
                after: 'echo "$LIFEBOAT_GROUP $LIFEBOAT_MACHINES" > after-ran.txt'
              - machines: [\(web1), \(web2)]
                wait-for: LIFEBOAT-READY
                check: 'grep -q LIFEBOAT-MARKER "$LIFEBOAT_CONSOLE_LOG"'
            """)
        #expect(applied.status == 0, "\(applied.stderr)")
        let plan = "shop-\(getpid())"
        let (status, report, stderr) = try lab.planRun(["test-failover", "--plan", plan])
        defer { _ = try? lab.run(["stop-test", "--plan", plan]) }
        #expect(status == 0, "\(stderr)")
        #expect(report["result"] as? String == "passed", "\(report["reason"] ?? "")")
        let runs = machineRuns(report)
        // Group 2 started only once group 1's machine had its boot line and passed its check, and the after script ran.
        let dbChecked = try #require(date(runs[db]?["checkedAt"]))
        let groups = report["groups"] as? [[String: Any]] ?? []
        let group1End = try #require(date(groups.first?["ended"]))
        for web in [web1, web2] {
            let started = try #require(date(runs[web]?["started"]), "\(web) started")
            #expect(started >= dbChecked && started >= group1End, "\(web) started \(started), db checked \(dbChecked)")
        }
        // Both machines of group 2 were booting at once.
        let starts = [web1, web2].compactMap { date(runs[$0]?["started"]) }
        let boots = [web1, web2].compactMap { date(runs[$0]?["bootLineAt"]) }
        #expect(starts.count == 2 && boots.count == 2 && starts.max()! < boots.min()!, "parallel: starts \(starts), boot lines \(boots)")
        #expect((runs[db]?["checkOutput"] as? String)?.contains("db answers at 192.168.94.10") == true)
        #expect((try? String(contentsOfFile: lab.scratch.file("after-ran.txt"), encoding: .utf8))?.contains("1 \(db)") == true,
                "the after script ran in the plan's folder")
        #expect((report["rtoSeconds"] as? Double ?? 0) > 0)
        #expect(runs.values.allSatisfy { ($0["pointAgeSeconds"] as? Double ?? -1) >= 0 })
        #expect(lab.testDomains().count == 3, "the VMs stay until stop-test")

        // The report: listed, shown, and its HTML opens in a browser with the machines and results.
        let id = try #require(report["id"] as? String)
        #expect(try lab.check(["reports", plan]).contains(id))
        let html = lab.scratch.file("report.html")
        #expect(try lab.check(["report", "show", id, "--html", html]).contains("passed"))
        let page = try String(contentsOfFile: html, encoding: .utf8)
        #expect(page.contains(db) && page.contains(web2) && page.contains("data:image/png;base64,"), "screenshots embedded")
        #expect(!page.contains("http://") && !page.contains("https://"), "no external assets")
        let shot = packageRoot + "/.build/test-artifacts/plan-report.png"
        try FileManager.default.createDirectory(atPath: packageRoot + "/.build/test-artifacts", withIntermediateDirectories: true)
        _ = try? sh(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,1800",
                     "--screenshot=" + shot, "file://" + html])
        let png = FileManager.default.contents(atPath: shot) ?? Data()
        #expect(png.count > 20_000 && png.starts(with: [0x89, 0x50, 0x4E, 0x47]), "chromium rendered the report (\(png.count) bytes)")

        // Status says what runs; stop-test --plan leaves nothing behind.
        #expect(try lab.status(web1)["state"] as? String == "TestingFailover")
        let stopped = try lab.check(["stop-test", "--plan", plan])
        #expect(stopped.contains(db) && stopped.contains(web2), "\(stopped)")
        #expect(lab.testDomains().isEmpty)
        #expect(!lab.networkExists())
        #expect(lab.lifeboatMounts().isEmpty)
        for machine in lab.machines { #expect(try lab.status(machine)["state"] as? String == "Standby") }
    }

    @Test("on-failure stop: a failing check in group 1 leaves group 2 unstarted and says why; --at picks matching points; a killed run is reported and stop-test --plan cleans up")
    func stopsOnFailure() throws {
        let lab = try DrillLab(["app", "cache"])
        let (app, cache) = (lab.machines[0], lab.machines[1])
        let disks = try lab.machines.enumerated().map { index, machine in
            try lab.protect(machine, marker: "first", ip: "192.168.96.1\(index)/24", mac: "52:54:00:96:00:1\(index)")
        }
        for machine in lab.machines { try lab.check(["backup", machine]) }
        let firstPoints = try lab.machines.map { try JSONSerialization.jsonObject(with: Data(lab.check(["points", $0, "--json"]).utf8)) as! [[String: Any]] }
        Thread.sleep(forTimeInterval: 1.2)
        let between = Date()
        Thread.sleep(forTimeInterval: 1.2)
        for disk in disks { try DemoDisk.setMarker(disk, "second") }
        for machine in lab.machines { try lab.check(["backup", machine]) }
        let plan = "halt-\(getpid())"
        #expect(try lab.applyPlan("""
            name: \(plan)
            on-failure: stop
            groups:
              - machines: [\(app)]
                wait-for: LIFEBOAT-READY
                check: 'echo "the app does not answer"; exit 3'
              - machines: [\(cache)]
            """).status == 0)
        let at = ISO8601DateFormatter().string(from: between)
        let (status, report, _) = try lab.planRun(["test-failover", "--plan", plan, "--at", at])
        #expect(status != 0)
        #expect(report["result"] as? String == "failed")
        #expect((report["reason"] as? String)?.contains("exited with status 3") == true, "\(report["reason"] ?? "")")
        let runs = machineRuns(report)
        #expect(runs[app]?["point"] as? String == firstPoints[0].first?["id"] as? String, "--at took the point before the time")
        let groups = report["groups"] as? [[String: Any]] ?? []
        #expect(groups.last?["result"] as? String == "skipped")
        #expect((groups.last?["reason"] as? String)?.contains("group 1 failed") == true, "\(groups.last ?? [:])")
        #expect(runs[cache]?["result"] as? String == "skipped" && runs[cache]?["started"] == nil)
        #expect(lab.testDomains() == [app], "group 2 never started; group 1's VM stays for inspection")
        #expect(try lab.check(["stop-test", "--plan", plan]).contains(app))
        #expect(lab.testDomains().isEmpty)

        // A run killed in the middle: status says so and names the command; stop-test --plan cleans up.
        #expect(try lab.applyPlan("""
            name: \(plan)
            groups:
              - machines: [\(app), \(cache)]
                wait-for: NEVER-PRINTED
            """).status == 0)
        let runner = CLI.start(["test-failover", "--plan", plan], environment: lab.environment)
        let deadline = Date().addingTimeInterval(60)
        while lab.testDomains().count < 2 && Date() < deadline { Thread.sleep(forTimeInterval: 0.2) }
        kill(runner.processIdentifier, SIGKILL)
        runner.waitUntilExit()
        let problems = try lab.status(app)["problems"] as? [String] ?? []
        #expect(problems.contains { $0.contains("was interrupted") && $0.contains("lifeboat stop-test --plan \(plan)") }, "\(problems)")
        _ = try lab.check(["stop-test", "--plan", plan])
        #expect(lab.testDomains().isEmpty)
        #expect(!lab.networkExists())
        let last = try JSONSerialization.jsonObject(with: Data(lab.check(["reports", plan, "--json"]).utf8)) as? [[String: Any]] ?? []
        #expect(last.last?["result"] as? String == "stopped", "the killed run's report says it was stopped")
        #expect((try lab.status(app)["problems"] as? [String] ?? []).isEmpty)
    }

    @Test("a failover plan with a manual step pauses after its group until plan continue; commit needs every machine failed over; cancel --plan")
    func failoverWithManualStep() throws {
        let lab = try DrillLab(["pdb", "pweb"])
        let (db, web) = (lab.machines[0], lab.machines[1])
        let network = try lab.productionNetwork("192.168.97")
        for (index, machine) in lab.machines.enumerated() {
            _ = try lab.protect(machine, marker: machine, ip: "192.168.97.1\(index)/24", mac: "52:54:00:97:00:1\(index)")
            try lab.check(["configure", machine, "--network", network])
            try lab.check(["backup", machine])
        }
        let plan = "move-\(getpid())"
        #expect(try lab.applyPlan("""
            name: \(plan)
            groups:
              - machines: [\(db)]
                wait-for: LIFEBOAT-READY
                manual: 'switch the DNS record to the recovery site'
              - machines: [\(web)]
                wait-for: LIFEBOAT-READY
            """).status == 0)
        defer { _ = try? lab.run(["cancel-failover", "--plan", plan, "--yes"]) }
        let (status, paused, stderr) = try lab.planRun(["failover", "--plan", plan])
        #expect(status == 0, "\(stderr)")
        #expect(paused["result"] as? String == "paused")
        #expect(try lab.status(web)["state"] as? String == "Standby", "group 2 waits for the person")
        let dbStatus = try lab.status(db)
        #expect((dbStatus["plan"] as? String)?.contains("switch the DNS record") == true, "\(dbStatus)")
        #expect((dbStatus["plan"] as? String)?.contains("lifeboat plan continue \(plan)") == true)
        let early = try lab.run(["commit", "--plan", plan])
        #expect(early.status != 0 && early.stderr.contains(web), "commit refuses while \(web) is not failed over: \(early.stderr)")

        let (continued, done, why) = try lab.planRun(["plan", "continue", plan])
        #expect(continued == 0, "\(why)")
        #expect(done["result"] as? String == "passed", "\(done["reason"] ?? "")")
        let groups = done["groups"] as? [[String: Any]] ?? []
        #expect(groups.first?["manualDone"] != nil)
        #expect(["Finalizing", "FailedOver"].contains(try lab.status(web)["state"] as? String ?? ""))
        #expect((try lab.status(db)["plan"]) == nil, "no run is under way any more")
        let cancelled = try lab.check(["cancel-failover", "--plan", plan, "--yes"])
        #expect(cancelled.contains(db) && cancelled.contains(web), "\(cancelled)")
        for machine in lab.machines {
            #expect(try lab.status(machine)["state"] as? String == "Standby")
            #expect(!lab.domainExists(machine))
        }
    }

    @Test("a scheduled drill: the replication service runs the plan's drill, stops it after its report, exports its result")
    func scheduledDrill() throws {
        let lab = try DrillLab(["sched"])
        let name = lab.machines[0]
        _ = try lab.protect(name, marker: "scheduled", ip: "192.168.98.10/24", mac: "52:54:00:98:00:10")
        try lab.check(["configure", name, "--every", "1h"])
        try lab.check(["backup", name])
        let plan = "weekly-\(getpid())"
        #expect(try lab.applyPlan("""
            name: \(plan)
            drill-every: 10m
            keep-reports: 1
            groups:
              - machines: [\(name)]
                wait-for: LIFEBOAT-READY
                check: 'grep -q "LIFEBOAT-MARKER: scheduled" "$LIFEBOAT_CONSOLE_LOG"'
            """).status == 0)
        let port = 9500 + Int(getpid() % 400)
        let service = CLI.start(["replicate", "--metrics", "127.0.0.1:\(port)"], environment: lab.environment)
        defer { if service.isRunning { kill(service.processIdentifier, SIGKILL) } }
        var reports: [[String: Any]] = []
        let deadline = Date().addingTimeInterval(180)
        while Date() < deadline {
            reports = (try? JSONSerialization.jsonObject(with: Data(lab.check(["reports", plan, "--json"]).utf8))) as? [[String: Any]] ?? []
            if reports.contains(where: { $0["result"] as? String == "passed" }) && !lab.domainExists("lifeboat-test-" + name) { break }
            Thread.sleep(forTimeInterval: 1)
        }
        let metrics = (try? sh(["curl", "-fsS", "http://127.0.0.1:\(port)/metrics"])) ?? ""
        kill(service.processIdentifier, SIGTERM)
        service.waitUntilExit()
        let passed = reports.last { $0["result"] as? String == "passed" }
        #expect(passed?["scheduled"] as? Bool == true, "a scheduled drill passed: \(reports)")
        #expect(reports.count <= 2, "keep-reports: 1 (and at most one more under way)")
        #expect(!lab.domainExists("lifeboat-test-" + name), "the service stopped the drill after its report")
        #expect(metrics.contains("lifeboat_drill_passed{plan=\"\(plan)\"} 1"), "\(metrics)")
        #expect(metrics.contains("lifeboat_drill_last_run_timestamp_seconds{plan=\"\(plan)\"}"))
    }
}
}
