import Foundation
import LifeboatTestSupport
import Testing
#if canImport(Glibc)
import Glibc
#endif

extension DrillLab {
    /// Waits until `text` appears in the failed-over VM's console log.
    func waitForConsole(_ machine: String, _ text: String, seconds: Double = 90) -> Bool {
        let log = hot + "/" + machine + "/console.log"
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if ((try? String(contentsOfFile: log, encoding: .isoLatin1)) ?? "").contains(text) { return true }
            Thread.sleep(forTimeInterval: 0.2)
        }
        return false
    }

    func console(of machine: String) -> String {
        (try? String(contentsOfFile: hot + "/" + machine + "/console.log", encoding: .isoLatin1)) ?? ""
    }

    /// Waits until `status` reports `state`.
    func waitForState(_ machine: String, _ state: String, seconds: Double = 120) throws -> [String: Any] {
        let deadline = Date().addingTimeInterval(seconds)
        var last: [String: Any] = [:]
        repeat {
            last = try status(machine)
            if last["state"] as? String == state { return last }
            Thread.sleep(forTimeInterval: 0.5)
        } while Date() < deadline
        return last
    }

    func hotDisk(_ machine: String, _ disk: String) -> String { hot + "/" + machine + "/disks/" + disk + ".raw" }

    /// `qemu-img info` of a file in use by QEMU (-U: no lock), as JSON.
    func imageInfo(_ path: String) throws -> [String: Any] {
        let text = try sh(["qemu-img", "info", "-U", "--output=json", path])
        return try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any] ?? [:]
    }

    func refused(_ arguments: [String], state: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let result = try run(arguments)
        #expect(result.status != 0, "lifeboat \(arguments.joined(separator: " ")) should be refused", sourceLocation: sourceLocation)
        #expect(result.stderr.contains("is in \(state)"), "\(result.stderr)", sourceLocation: sourceLocation)
    }
}

extension RecoveryVMTests {
@Suite("Failover")
struct FailoverTests {
    @Test("failover boots at once, finalises while the guest writes, commit, then failback writes the guest's changes home")
    func failoverFinaliseFailback() throws {
        let lab = try DrillLab(["prod"])
        let name = lab.machines[0]
        let network = try lab.productionNetwork("192.168.88")
        let source = try lab.protect(name, marker: "marker A", ip: "192.168.88.10/24", mac: "52:54:00:88:00:10")
        try lab.check(["configure", name, "--network", network])
        try lab.check(["backup", name])
        try lab.refused(["commit", name], state: "Standby")
        try lab.refused(["failback", name], state: "Standby")

        // 256 KiB/s: copying the disk's 18 MiB outlasts the boot even when other tests keep both
        // cores busy (at 1 MiB/s it did not once), so the guest's boot-log write lands during finalisation.
        try lab.check(["failover", name, "--bandwidth", "0.25"])
        #expect(try lab.status(name)["state"] as? String == "Finalizing")
        #expect(lab.waitForConsole(name, "LIFEBOAT-READY"), "the VM booted from the backup: \(lab.console(of: name))")
        #expect(lab.console(of: name).contains("LIFEBOAT-MARKER: marker A"))
        #expect(lab.console(of: name).contains("LIFEBOAT-IP: 192.168.88.10"), "production IP by DHCP reservation")
        let during = try lab.status(name)
        #expect(during["state"] as? String == "Finalizing", "still copying after the boot: \(during)")
        #expect(during["finalisation"] != nil)
        try lab.refused(["test-failover", name], state: "Finalizing")
        try lab.refused(["commit", name], state: "Finalizing")
        try lab.refused(["failover", name], state: "Finalizing")

        // The background finaliser completes at 1 MiB/s; resume lifts the limit to be quick.
        try lab.check(["resume", name, "--wait"])
        let done = try lab.waitForState(name, "FailedOver")
        #expect(done["state"] as? String == "FailedOver")
        let info = try lab.imageInfo(lab.hotDisk(name, name))
        #expect(info["format"] as? String == "raw")
        #expect(info["backing-filename"] == nil, "the hot disk stands alone: \(info)")
        #expect(lab.lifeboatMounts().isEmpty, "the FUSE mount is no longer held")
        let bootLog = try DemoDisk.readFile(lab.hotDisk(name, name), name: "boot.log")
        #expect(bootLog.contains("ip=192.168.88.10"), "the guest's write is in the hot disk: \(bootLog)")

        try lab.check(["commit", name])
        try lab.refused(["change-point", name, "--point", "latest"], state: "Committed")
        let history = try lab.check(["history", name, "--json"])
        for event in ["\"failover\"", "\"finalised\"", "\"commit\""] { #expect(history.contains(event)) }

        // Failback: the guest's boot log goes home; only differing chunks are written.
        let sizeBefore = try FileManager.default.attributesOfItem(atPath: source)[.size] as? Int ?? 0
        #expect(try DemoDisk.readFile(source, name: "boot.log").isEmpty, "the source never booted")
        let report = try lab.check(["failback", name, "--shutdown-timeout", "3", "--json"])
        let object = try JSONSerialization.jsonObject(with: Data(report.utf8)) as? [String: Any] ?? [:]
        let restores = object["restores"] as? [[String: Any]] ?? []
        let written = restores.compactMap { $0["bytesWritten"] as? Int }.reduce(0, +)
        #expect(written > 0 && written < sizeBefore / 10, "wrote \(written) of \(sizeBefore) bytes")
        #expect(try DemoDisk.readFile(source, name: "boot.log").contains("ip=192.168.88.10"))
        #expect(try lab.status(name)["state"] as? String == "Standby")
        #expect(!lab.domainExists(name))
        #expect(!FileManager.default.fileExists(atPath: lab.hotDisk(name, name)))
        let machines = try lab.check(["machines", "--json"])
        #expect(machines.contains(source), "backups read the source disk again")
    }

    @Test("change-point brings the other marker back; cancel-failover asks, then leaves nothing")
    func changePointAndCancel() throws {
        let lab = try DrillLab(["cp"])
        let name = lab.machines[0]
        let network = try lab.productionNetwork("192.168.89")
        let source = try lab.protect(name, marker: "marker A", ip: "192.168.89.10/24", mac: "52:54:00:89:00:10")
        try lab.check(["configure", name, "--network", network])
        try lab.check(["backup", name])
        let first = try #require(lab.check(["points", name, "--json"]).firstMatch(of: /"id" : "([0-9-]+)"/)?.1).description
        try DemoDisk.setMarker(source, "marker B")
        try lab.check(["backup", name])

        try lab.check(["failover", name, "--wait"])
        #expect(lab.waitForConsole(name, "LIFEBOAT-MARKER: marker B"))
        try lab.check(["change-point", name, "--point", first, "--wait"])
        #expect(lab.waitForConsole(name, "LIFEBOAT-MARKER: marker A"))
        #expect(try lab.status(name)["state"] as? String == "FailedOver")

        let unconfirmed = try lab.run(["cancel-failover", name])
        #expect(unconfirmed.status != 0 && unconfirmed.stderr.contains("--yes") && unconfirmed.stderr.contains("lost"))
        #expect(lab.domainExists(name), "nothing happened without --yes")
        try lab.check(["cancel-failover", name, "--yes"])
        #expect(!lab.domainExists(name))
        #expect(!FileManager.default.fileExists(atPath: lab.hot + "/" + name + "/disks"))
        #expect(lab.lifeboatMounts().isEmpty)
        #expect(try lab.status(name)["state"] as? String == "Standby")
        try lab.refused(["cancel-failover", name, "--yes"], state: "Standby")

        // A failover that cannot start (here: a broken domain template) is undone: Standby, nothing left.
        let templates = lab.scratch.file("templates")
        try FileManager.default.copyItem(atPath: packageRoot + "/templates", toPath: templates)
        let domainTemplate = templates + "/domain.xml.mustache"
        try (try String(contentsOfFile: domainTemplate, encoding: .utf8)).replacingOccurrences(of: "{{/disks}}", with: "{{/disk}}")
            .write(toFile: domainTemplate, atomically: true, encoding: .utf8)
        let broken = try lab.run(["failover", name, "--templates", templates])
        #expect(broken.status != 0 && broken.stderr.contains("domain.xml.mustache line"), "\(broken.stderr)")
        #expect(try lab.status(name)["state"] as? String == "Standby")
        #expect(!lab.domainExists(name))
        #expect(lab.lifeboatMounts().isEmpty, "the mount it started is released")
    }

    @Test("planned failover: refused while the source disk is open, then takes a final point and loses nothing")
    func plannedFailover() throws {
        let lab = try DrillLab(["plan"])
        let name = lab.machines[0]
        let network = try lab.productionNetwork("192.168.90")
        let source = try lab.protect(name, marker: "old", ip: "192.168.90.10/24", mac: "52:54:00:90:00:10")
        try lab.check(["configure", name, "--network", network])
        try lab.check(["backup", name])
        try DemoDisk.setMarker(source, "written just before the failover")

        let holder = Process()
        holder.executableURL = URL(fileURLWithPath: "/bin/sh")
        holder.arguments = ["-c", "exec 3<\"$0\"; exec sleep 60", source]
        try holder.run()
        defer { if holder.isRunning { kill(holder.processIdentifier, SIGKILL) } }
        Thread.sleep(forTimeInterval: 0.3)
        let busy = try lab.run(["failover", name, "--planned"])
        #expect(busy.status != 0 && busy.stderr.contains("is open in process \(holder.processIdentifier)"), "\(busy.stderr)")
        kill(holder.processIdentifier, SIGKILL)
        holder.waitUntilExit()

        try lab.check(["failover", name, "--planned", "--wait"])
        #expect(lab.waitForConsole(name, "LIFEBOAT-MARKER: written just before the failover"))
        #expect(try lab.check(["points", name, "--json"]).components(separatedBy: "\"id\"").count - 1 == 2, "a final point was taken")
        try lab.check(["cancel-failover", name, "--yes"])
    }

    @Test("status polled every 100 ms through a whole failover never tells a person to act while lifeboat works")
    func statusNeverCriesWolf() throws {
        let lab = try DrillLab(["calm"])
        let name = lab.machines[0]
        let network = try lab.productionNetwork("192.168.93")
        _ = try lab.protect(name, marker: "calm", ip: "192.168.93.10/24", mac: "52:54:00:93:00:10")
        try lab.check(["configure", name, "--network", network])
        try lab.check(["backup", name])

        // From before the command starts until FailedOver: the failover command, the background
        // finaliser starting, seeding (8 MiB/s, a few seconds), the block copy, both pivots.
        let failover = CLI.start(["failover", name, "--bandwidth", "8"], environment: lab.environment)
        var alarms: [String] = []
        var transitions = Set<String>()
        var polls = 0
        let deadline = Date().addingTimeInterval(240)
        var state = ""
        while Date() < deadline {
            let text = try lab.check(["status", name, "--json"])
            let status = (try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [[String: Any]])?.first ?? [:]
            polls += 1
            state = status["state"] as? String ?? ""
            for problem in status["problems"] as? [String] ?? [] { alarms.append("\(state): \(problem)") }
            if let transition = status["transition"] as? String { transitions.insert(transition) }
            // The finaliser still holds the machine for a moment after the record says FailedOver
            // (autostart, releasing the mount): status shows that as a transition; wait it out.
            if state == "FailedOver" && status["transition"] == nil && !failover.isRunning { break }
            Thread.sleep(forTimeInterval: 0.1)
        }
        failover.waitUntilExit()
        #expect(failover.terminationStatus == 0)
        #expect(state == "FailedOver", "finalisation ended within 4 minutes")
        #expect(alarms.isEmpty, "status told a person to act while all was well (\(alarms.count) of \(polls) polls): \(Array(Set(alarms)))")
        #expect(transitions.contains { $0.contains("finaliser") && $0.contains("copying") },
                "status showed the finaliser at work: \(transitions)")
        #expect(polls > 5, "status was polled through the whole failover (\(polls) polls)")

        // And a dead finaliser is reported at once: failover again, kill it while it seeds.
        try lab.check(["cancel-failover", name, "--yes"])
        try lab.check(["failover", name, "--bandwidth", "1"])
        let beat = lab.hot + "/" + name + "/finaliser.json"
        let seeding = Date().addingTimeInterval(30)
        while Date() < seeding, !((try? String(contentsOfFile: beat, encoding: .utf8)) ?? "").contains("\"seeding\"") {
            Thread.sleep(forTimeInterval: 0.1)
        }
        _ = try? sh(["pkill", "-9", "-f", "lifeboat finalise \(name) "])
        Thread.sleep(forTimeInterval: 0.5)
        let dead = try lab.status(name)
        #expect((dead["problems"] as? [String])?.contains { $0.contains("not running") && $0.contains("lifeboat resume \(name)") } == true,
                "a killed finaliser is reported with what to do: \(dead)")
        try lab.check(["cancel-failover", name, "--yes"])
    }

    @Test("lifeboat killed and libvirtd restarted mid-finalisation: status tells the truth, resume completes, the guest's data intact")
    func killedFinalisation() throws {
        let lab = try DrillLab(["crash"])
        let name = lab.machines[0]
        let network = try lab.productionNetwork("192.168.91")
        _ = try lab.protect(name, marker: "survivor", ip: "192.168.91.10/24", mac: "52:54:00:91:00:10")
        try lab.check(["configure", name, "--network", network])
        try lab.check(["backup", name])
        try lab.check(["failover", name, "--bandwidth", "1"])
        #expect(lab.waitForConsole(name, "LIFEBOAT-READY"))

        // Kill every lifeboat process working on it (the background finaliser), then restart libvirtd.
        _ = try? sh(["pkill", "-9", "-f", "lifeboat finalise \(name) "])
        // libvirtd dies hard (its zombie lingers here: PID 1 does not reap), then comes back.
        _ = try? sh(["pkill", "-9", "-x", "libvirtd"])
        let down = Date().addingTimeInterval(10)
        while (try? sh(["virsh", "-c", "qemu:///system", "version"])) != nil && Date() < down { Thread.sleep(forTimeInterval: 0.1) }
        let unreachable = try lab.status(name)
        #expect(unreachable["vmState"] as? String == "unknown", "without libvirtd the VM's state is unknown, not guessed")
        try startDaemon(["libvirtd", "-d"])
        let up = Date().addingTimeInterval(20)
        while (try? sh(["virsh", "-c", "qemu:///system", "version"])) == nil && Date() < up { Thread.sleep(forTimeInterval: 0.2) }
        let status = try lab.status(name)
        #expect(status["state"] as? String == "Finalizing")
        #expect(status["vmState"] as? String == "running", "QEMU outlived libvirtd")
        #expect((status["problems"] as? [String])?.contains { $0.contains("not running") && $0.contains("resume") } == true,
                "the killed copy is reported: \(status)")

        // Then as if the host rebooted: the VM is off and the FUSE mount gone.
        _ = try sh(["virsh", "-c", "qemu:///system", "destroy", name])
        for mount in lab.lifeboatMounts() { umount2(mount, Int32(MNT_DETACH)) }
        let rebooted = try lab.status(name)
        #expect(rebooted["vmState"] as? String == "shut-off")
        #expect((rebooted["problems"] as? [String])?.contains { $0.contains("FUSE mount") } == true, "\(rebooted)")

        try lab.check(["resume", name, "--wait"])
        let left = (try? FileManager.default.contentsOfDirectory(atPath: lab.hot + "/" + name + "/disks")) ?? []
        #expect(left.allSatisfy { !$0.hasPrefix(".tmp-") }, "the killed seeder's half-written file is gone: \(left)")
        #expect(lab.waitForConsole(name, "LIFEBOAT-BOOTS: 2"), "booted again from its overlay, first boot's write kept: \(lab.console(of: name))")
        #expect(try lab.status(name)["state"] as? String == "FailedOver")
        let info = try lab.imageInfo(lab.hotDisk(name, name))
        #expect(info["backing-filename"] == nil)
        #expect(try DemoDisk.readFile(lab.hotDisk(name, name), name: "marker").contains("survivor"))
        #expect(try DemoDisk.readFile(lab.hotDisk(name, name), name: "boot.log").contains("ip=192.168.91.10"))
        let history = try lab.check(["history", name])
        #expect(history.contains("finalised"))
        try lab.check(["cancel-failover", name, "--yes"])
    }
}
}
