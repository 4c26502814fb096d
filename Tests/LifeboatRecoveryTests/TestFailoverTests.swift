import Foundation
import LifeboatTestSupport
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// A repository, hot storage and libvirt set-up for drills; removes every domain, network and
/// mount it may have made when it goes away, whether the test passed or not.
final class DrillLab {
    let scratch = Scratch()
    let machines: [String]
    var networks: [String] = []
    var repo: String { scratch.file("repo") }
    var hot: String { scratch.file("hot") }
    /// Settings that replace the lab's own (a second site reads its repository from a bucket).
    var overrides: [String: String] = [:]
    var environment: [String: String] {
        ["LIFEBOAT_REPO": repo, "LIFEBOAT_HOT": hot, "LIFEBOAT_VIRT_TYPE": "qemu",
         "LIFEBOAT_TEMPLATES": packageRoot + "/templates"].merging(overrides) { $1 }
    }

    /// Machine names are made unique per process: `web` becomes `web-PID`.
    init(_ names: [String], overrides: [String: String] = [:]) throws {
        chmod(scratch.path, 0o755)   // QEMU (libvirt-qemu) must reach the overlays and console logs
        machines = names.map { "\($0)-\(getpid())" }
        self.overrides = overrides
        if overrides["LIFEBOAT_REPO"] == nil { try check(["init"] + (overrides["LIFEBOAT_PASSWORD"] != nil ? ["--encrypt"] : [])) }
    }

    deinit {
        for network in networks {
            _ = try? sh(["virsh", "-c", "qemu:///system", "net-destroy", network])
            _ = try? sh(["virsh", "-c", "qemu:///system", "net-undefine", network])
        }
        for machine in machines {
            _ = try? CLI.run(["stop-test", machine], environment: environment)
            for domain in ["lifeboat-test-" + machine, machine] {
                _ = try? sh(["virsh", "-c", "qemu:///system", "destroy", domain])
                _ = try? sh(["virsh", "-c", "qemu:///system", "undefine", domain])
            }
        }
        if (try? sh(["virsh", "-c", "qemu:///system", "net-info", "lifeboat-test"])) != nil {
            _ = try? sh(["virsh", "-c", "qemu:///system", "net-destroy", "lifeboat-test"])
            _ = try? sh(["virsh", "-c", "qemu:///system", "net-undefine", "lifeboat-test"])
        }
        for mount in lifeboatMounts() { umount2(mount, Int32(MNT_DETACH)) }
    }

    /// Mount points of this lab's repository.
    func lifeboatMounts() -> [String] {
        let text = (try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8)) ?? ""
        return text.split(separator: "\n").compactMap { line in
            let fields = line.split(separator: " ").map(String.init)
            guard let dash = fields.firstIndex(of: "-"), fields.count > dash + 2,
                  fields[dash + 2].hasPrefix("lifeboat:" + scratch.path + "/") else { return nil }
            return fields[4]
        }
    }

    /// An isolated libvirt network standing in for production (no forward element).
    func productionNetwork(_ prefix: String) throws -> String {
        let name = "lbprod-\(getpid())"
        let xml = scratch.file("\(name).xml")
        try "<network><name>\(name)</name><bridge stp='on' delay='0'/><ip address='\(prefix).1' netmask='255.255.255.0'><dhcp><range start='\(prefix).200' end='\(prefix).250'/></dhcp></ip></network>"
            .write(toFile: xml, atomically: true, encoding: .utf8)
        try sh(["virsh", "-c", "qemu:///system", "net-define", xml])
        try sh(["virsh", "-c", "qemu:///system", "net-start", name])
        networks.append(name)
        return name
    }

    func run(_ arguments: [String]) throws -> CLI.Result {
        try CLI.run(arguments, environment: environment)
    }

    /// Runs lifeboat and fails the test with its stderr when it does not succeed.
    @discardableResult
    func check(_ arguments: [String], sourceLocation: SourceLocation = #_sourceLocation) throws -> String {
        let result = try run(arguments)
        #expect(result.status == 0, "lifeboat \(arguments.joined(separator: " ")): \(result.stderr)", sourceLocation: sourceLocation)
        return result.stdout
    }

    /// A demo disk for `machine`, protected, whose boot.sh prints how many boots its data partition has seen.
    func protect(_ machine: String, marker: String, ip: String, mac: String, bootScript: String = "") throws -> String {
        let disk = scratch.file(machine + ".raw")
        try DemoDisk.make(disk, marker: marker)
        try DemoDisk.writeFile(disk, name: "boot.sh", "echo \"LIFEBOAT-BOOTS: $(wc -l < /data/boot.log)\"\n" + bootScript)
        try check(["protect", machine, "--disk", disk, "--ip", ip, "--mac", mac, "--memory", "256"])
        return disk
    }

    func drillJSON(_ arguments: [String]) throws -> (status: Int32, drill: [String: Any], stderr: String) {
        let result = try run(["test-failover"] + arguments + ["--json"])
        let object = (try? JSONSerialization.jsonObject(with: Data(result.stdout.utf8))) as? [String: Any] ?? [:]
        return (result.status, object, result.stderr)
    }

    func console(_ drill: [String: Any]) -> String {
        (drill["consoleLog"] as? String).flatMap { try? String(contentsOfFile: $0, encoding: .isoLatin1) } ?? ""
    }

    func status(_ machine: String) throws -> [String: Any] {
        let text = try check(["status", machine, "--json"])
        let list = try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [[String: Any]]
        return list?.first ?? [:]
    }

    func chunkFiles() -> Set<String> {
        var names = Set<String>()
        for dir in (try? FileManager.default.contentsOfDirectory(atPath: repo + "/chunks")) ?? [] {
            for name in (try? FileManager.default.contentsOfDirectory(atPath: repo + "/chunks/" + dir)) ?? [] { names.insert(name) }
        }
        return names
    }

    func domainExists(_ name: String) -> Bool {
        (try? sh(["virsh", "-c", "qemu:///system", "domstate", name])) != nil
    }

    func networkExists() -> Bool {
        (try? sh(["virsh", "-c", "qemu:///system", "net-info", "lifeboat-test"])) != nil
    }
}

/// Every test that runs VMs, one at a time: they share the test network, libvirtd (which one
/// test restarts) and this host's two cores. Real libvirtd, real QEMU (domain type qemu), real FUSE.
@Suite("Recovery VMs", .serialized)
struct RecoveryVMTests {}

extension RecoveryVMTests {
@Suite("Test failover")
struct TestFailoverTests {
    @Test("drills boot each point's marker; the guest's writes never reach the repository and vanish at stop-test")
    func drillsShowEachPoint() throws {
        let lab = try DrillLab(["web"])
        let web = lab.machines[0]
        let disk = try lab.protect(web, marker: "marker A", ip: "192.168.77.10/24", mac: "52:54:00:77:00:10")
        try lab.check(["backup", web])
        let first = try #require(lab.check(["points", web, "--json"]).firstMatch(of: /"id" : "([0-9-]+)"/)?.1).description
        try DemoDisk.setMarker(disk, "marker B")
        try lab.check(["backup", web])
        let chunksBefore = lab.chunkFiles()

        let a = try lab.drillJSON([web, "--point", first, "--wait-for", "LIFEBOAT-READY", "--timeout", "90s"])
        #expect(a.status == 0, "\(a.stderr)")
        #expect(a.drill["result"] as? String == "passed")
        #expect(lab.console(a.drill).contains("LIFEBOAT-MARKER: marker A"))
        #expect(lab.console(a.drill).contains("LIFEBOAT-BOOTS: 1"), "first boot of this point")
        #expect(lab.console(a.drill).contains("LIFEBOAT-IP: 192.168.77.10"), "DHCP gave the production IP")
        #expect(try lab.status(web)["state"] as? String == "TestingFailover")
        #expect(lab.domainExists("lifeboat-test-" + web))
        // The guest wrote its boot log; the repository did not change.
        let again = try lab.run(["test-failover", web])
        #expect(again.status != 0 && again.stderr.contains("is in TestingFailover"), "\(again.stderr)")
        #expect(lab.chunkFiles() == chunksBefore, "the guest's writes stay in the overlay")
        // The source keeps running and its backups still work during the drill.
        try lab.check(["backup", web])
        // Retention cannot take away the point the drill runs from.
        let pruned = try lab.check(["prune", web, "--keep-last", "1", "--json"])
        #expect(pruned.contains("held by test-failover"), "\(pruned)")
        #expect(try lab.check(["points", web, "--json"]).contains(first))
        let chunksAfterBackup = lab.chunkFiles()
        try lab.check(["stop-test", web])
        #expect(lab.chunkFiles() == chunksAfterBackup)
        try lab.check(["verify"])

        let b = try lab.drillJSON([web, "--wait-for", "LIFEBOAT-READY", "--timeout", "90s"])
        #expect(b.status == 0, "\(b.stderr)")
        #expect(lab.console(b.drill).contains("LIFEBOAT-MARKER: marker B"))
        try lab.check(["stop-test", web])

        // The first drill's boot-log line went with its overlay: this boot is again the first.
        let a2 = try lab.drillJSON([web, "--point", first, "--wait-for", "LIFEBOAT-READY", "--timeout", "90s"])
        #expect(lab.console(a2.drill).contains("LIFEBOAT-BOOTS: 1"))
        #expect(lab.console(a2.drill).contains("LIFEBOAT-MARKER: marker A"))
        let stop = try lab.check(["stop-test", web])
        #expect(stop.contains("destroyed"))

        // Nothing is left: no domain, no network, no overlay, no mount.
        #expect(!lab.domainExists("lifeboat-test-" + web))
        #expect(!lab.networkExists())
        #expect(((try? FileManager.default.contentsOfDirectory(atPath: lab.hot + "/" + web + "/test")) ?? []).isEmpty)
        #expect(lab.lifeboatMounts().isEmpty)
        #expect(try lab.status(web)["state"] as? String == "Standby")
        let drills = try lab.check(["drills", web, "--json"])
        #expect(drills.components(separatedBy: "\"passed\"").count - 1 == 3)
        let stopAgain = try lab.run(["stop-test", web])
        #expect(stopAgain.status != 0 && stopAgain.stderr.contains("is in Standby"))
    }

    @Test("two drilled machines reach each other on the isolated network; a failing check marks a drill failed")
    func twoMachinesTalk() throws {
        let lab = try DrillLab(["db", "app"])
        let (db, app) = (lab.machines[0], lab.machines[1])
        _ = try lab.protect(db, marker: "db", ip: "192.168.77.20/24", mac: "52:54:00:77:00:20")
        let ping = "for i in $(seq 1 30); do if ping -c 1 -W 1 192.168.77.20 >/dev/null 2>&1; then echo LIFEBOAT-PING-OK; break; fi; done\n"
        _ = try lab.protect(app, marker: "app", ip: "192.168.77.21/24", mac: "52:54:00:77:00:21", bootScript: ping)
        try lab.check(["backup", db])
        try lab.check(["backup", app])

        // The db drill's check fails: the drill is recorded failed, its VM stays up for inspection.
        let dbDrill = try lab.drillJSON([db, "--wait-for", "LIFEBOAT-READY", "--timeout", "90s",
                                         "--check", "echo \"checked $LIFEBOAT_MACHINE $LIFEBOAT_VM_IP\"; exit 3"])
        #expect(dbDrill.status != 0)
        #expect(dbDrill.drill["result"] as? String == "failed")
        #expect(dbDrill.drill["checkStatus"] as? Int == 3)
        let checkLog = (dbDrill.drill["checkLog"] as? String).flatMap { try? String(contentsOfFile: $0, encoding: .utf8) } ?? ""
        #expect(checkLog.contains("checked \(db) 192.168.77.20"))
        #expect(lab.domainExists("lifeboat-test-" + db))

        // Another subnet than the one the running drill uses is refused, and undone cleanly.
        let outside = try lab.run(["test-failover", app, "--ip", "10.9.9.9/24"])
        #expect(outside.status != 0 && outside.stderr.contains("outside the test network"), "\(outside.stderr)")
        #expect(try lab.status(app)["state"] as? String == "Standby")
        #expect(lab.networkExists() && lab.domainExists("lifeboat-test-" + db), "the running drill is untouched")

        let appDrill = try lab.drillJSON([app, "--wait-for", "LIFEBOAT-READY", "--timeout", "120s",
                                          "--check", "grep -q LIFEBOAT-PING-OK \"$LIFEBOAT_CONSOLE_LOG\""])
        #expect(appDrill.status == 0, "\(appDrill.stderr)\n\(lab.console(appDrill.drill))")
        #expect(appDrill.drill["result"] as? String == "passed")
        #expect(lab.console(appDrill.drill).contains("LIFEBOAT-PING-OK"))

        // The network stays while the other drill uses it.
        try lab.check(["stop-test", app])
        #expect(lab.networkExists())
        #expect(try lab.status(db)["state"] as? String == "TestingFailover")
        try lab.check(["stop-test", db])
        #expect(!lab.networkExists())
        #expect(lab.lifeboatMounts().isEmpty)
    }

    @Test("a killed test-failover: status tells the truth and stop-test cleans up")
    func killedDrill() throws {
        let lab = try DrillLab(["kill"])
        let name = lab.machines[0]
        _ = try lab.protect(name, marker: "k", ip: "192.168.77.30/24", mac: "52:54:00:77:00:30")
        try lab.check(["backup", name])
        let process = CLI.start(["test-failover", name, "--timeout", "90s"], environment: lab.environment)
        let domain = "lifeboat-test-" + name
        let deadline = Date().addingTimeInterval(30)
        while !lab.domainExists(domain) && Date() < deadline { Thread.sleep(forTimeInterval: 0.05) }
        kill(process.processIdentifier, SIGKILL)
        process.waitUntilExit()
        #expect(lab.domainExists(domain))
        let status = try lab.status(name)
        #expect(status["state"] as? String == "TestingFailover")
        #expect(status["vm"] as? String == domain)

        // The VM is killed behind lifeboat's back: status says so.
        _ = try sh(["virsh", "-c", "qemu:///system", "destroy", domain])
        let after = try lab.status(name)
        #expect(after["vmState"] as? String == "shut-off")
        #expect((after["problems"] as? [String])?.contains { $0.contains("stop-test") } == true)

        try lab.check(["stop-test", name])
        #expect(!lab.domainExists(domain))
        #expect(!lab.networkExists())
        #expect(lab.lifeboatMounts().isEmpty)
        #expect(try lab.status(name)["state"] as? String == "Standby")
        let drills = try lab.check(["drills", name, "--json"])
        #expect(drills.contains("\"failed\"") && drills.contains("interrupted"), "\(drills)")
    }

    @Test("boot line not seen in time: drill failed, console kept, VM left until stop-test")
    func bootLineTimeout() throws {
        let lab = try DrillLab(["slow"])
        let name = lab.machines[0]
        _ = try lab.protect(name, marker: "s", ip: "192.168.77.40/24", mac: "52:54:00:77:00:40")
        try lab.check(["backup", name])
        let result = try lab.drillJSON([name, "--wait-for", "NEVER-PRINTED", "--timeout", "20s"])
        #expect(result.status != 0)
        #expect(result.stderr.contains("did not appear within 20s") && result.stderr.contains("stop-test"), "\(result.stderr)")
        #expect(result.drill["result"] as? String == "failed")
        #expect(FileManager.default.fileExists(atPath: result.drill["consoleLog"] as? String ?? "/nonexistent"))
        #expect(lab.domainExists("lifeboat-test-" + name))
        try lab.check(["stop-test", name])
        #expect(!lab.domainExists("lifeboat-test-" + name))
    }

    @Test("a VM that stops before its boot line fails the drill at once, with the reason from libvirt's events")
    func vmStopsDuringWait() throws {
        let lab = try DrillLab(["stops"])
        let name = lab.machines[0]
        _ = try lab.protect(name, marker: "x", ip: "192.168.77.45/24", mac: "52:54:00:77:00:45")
        try lab.check(["backup", name])
        let started = Date()
        let process = CLI.start(["test-failover", name, "--wait-for", "NEVER-PRINTED", "--timeout", "120s", "--json"],
                                environment: lab.environment)
        let domain = "lifeboat-test-" + name
        let deadline = Date().addingTimeInterval(30)
        while (try? sh(["virsh", "-c", "qemu:///system", "domstate", domain]))?.contains("running") != true && Date() < deadline {
            Thread.sleep(forTimeInterval: 0.1)
        }
        _ = try sh(["virsh", "-c", "qemu:///system", "destroy", domain])
        let output = (process.standardOutput as! Pipe).fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        #expect(process.terminationStatus != 0)
        #expect(Date().timeIntervalSince(started) < 60, "did not wait for the timeout")
        let drill = (try? JSONSerialization.jsonObject(with: output)) as? [String: Any] ?? [:]
        #expect(drill["result"] as? String == "failed")
        #expect((drill["reason"] as? String)?.contains("the VM was destroyed before the boot line appeared") == true, "\(drill)")
        try lab.check(["stop-test", name])
    }

    @Test("bad input: one line each, naming the thing and what to do")
    func badInput() throws {
        let lab = try DrillLab(["bad"])
        let name = lab.machines[0]
        _ = try lab.protect(name, marker: "b", ip: "192.168.77.50/24", mac: "52:54:00:77:00:50")
        func message(_ arguments: [String], environment extra: [String: String] = [:]) throws -> String {
            let result = try CLI.run(arguments, environment: lab.environment.merging(extra) { $1 })
            #expect(result.status != 0, "lifeboat \(arguments.joined(separator: " ")) should fail")
            #expect(result.stderr.split(separator: "\n").count == 1, "one line: \(result.stderr)")
            return result.stderr
        }
        #expect(try message(["test-failover", name]).contains("take a backup first"))
        try lab.check(["backup", name])
        #expect(try message(["test-failover", name, "--point", "19990101-000000"]).contains("19990101-000000"))
        #expect(try message(["test-failover", "nosuch"]).contains("nosuch"))
        #expect(try message(["test-failover", name, "--vcpus", "4096"]).contains("more than this host has"))
        #expect(try message(["test-failover", name, "--memory", "99999999"]).contains("more than this host has"))
        #expect(try message(["test-failover", name, "--ip", "10.1.2.300/24"]).contains("not ADDR/PREFIX"))
        #expect(try message(["test-failover", name, "--wait-for", "(unclosed"]).contains("not a regular expression"))
        #expect(try message(["test-failover", name, "--virt-type", "xen"]).contains("kvm, qemu, auto"))
        #expect(try message(["test-failover", name], environment: ["LIFEBOAT_CONNECT": "qemu:///system?socket=/nonexistent/sock"])
            .contains("libvirtd -d"))

        // Hot storage under a folder QEMU's user may not enter (mktemp -d makes 0700): refused
        // before anything is made, naming the folder and the fix.
        let closed = lab.scratch.file("closed")
        try FileManager.default.createDirectory(atPath: closed, withIntermediateDirectories: false, attributes: [.posixPermissions: 0o700])
        for command in [["test-failover", name], ["failover", name]] {
            let unreachable = try message(command + ["--hot", closed + "/hot"])
            #expect(unreachable.contains("may not enter \(closed) (mode 0700)") && unreachable.contains("chmod o+x \(closed)"), "\(unreachable)")
        }
        #expect(!FileManager.default.fileExists(atPath: closed + "/hot"), "nothing was created")

        // A broken template names its file and line.
        let templates = lab.scratch.file("templates")
        try FileManager.default.copyItem(atPath: packageRoot + "/templates", toPath: templates)
        let domainTemplate = templates + "/domain.xml.mustache"
        var text = try String(contentsOfFile: domainTemplate, encoding: .utf8)
        text = text.replacingOccurrences(of: "{{/disks}}", with: "{{/disk}}")
        try text.write(toFile: domainTemplate, atomically: true, encoding: .utf8)
        let broken = try message(["test-failover", name, "--templates", templates])
        #expect(broken.contains("domain.xml.mustache line"), "\(broken)")
        // ... and the failed start left nothing behind.
        #expect(try lab.status(name)["state"] as? String == "Standby")
        #expect(!lab.domainExists("lifeboat-test-" + name))
        #expect(lab.lifeboatMounts().isEmpty)
    }
}
}
