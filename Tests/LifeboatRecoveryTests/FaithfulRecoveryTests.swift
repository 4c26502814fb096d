import Foundation
import LifeboatTestSupport
import Testing
#if canImport(Glibc)
import Glibc
#endif

extension RecoveryVMTests {
@Suite("The recovered machine is the machine")
struct FaithfulRecoveryTests {
    static func json(_ text: String) -> [String: Any] {
        (try? JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any]) ?? [:]
    }

    @Test("a qcow2 --disk machine: its points hold the guest's bytes (the virtual size), restored equal to the raw image, and its drill boots; a vmdk is refused in one line")
    func qcow2DiskMachine() throws {
        let scratch = Scratch()
        chmod(scratch.path, 0o755)   // QEMU (libvirt-qemu) reaches hot storage here
        let env = ["LIFEBOAT_REPO": scratch.file("repo"), "LIFEBOAT_HOT": scratch.file("hot")]
        let raw = scratch.file("web.raw"), image = scratch.file("web.qcow2")
        try DemoDisk.make(raw, marker: "qcow2 machine")
        try sh(["qemu-img", "convert", "-O", "qcow2", raw, image])
        #expect(try CLI.run(["init"], environment: env).status == 0)

        let vmdk = scratch.file("old.vmdk")
        try sh(["qemu-img", "create", "-q", "-f", "vmdk", vmdk, "8M"])
        let refused = try CLI.run(["protect", "old", "--disk", vmdk], environment: env)
        #expect(refused.status != 0)
        #expect(refused.stderr.contains("vmdk image") && refused.stderr.contains("qemu-img convert"), "\(refused.stderr)")
        #expect(refused.stderr.split(separator: "\n").count == 1, "one line: \(refused.stderr)")
        #expect(try CLI.run(["machines", "--json"], environment: env).stdout.contains("old") == false)

        let protected = try CLI.run(["protect", "web", "--disk", image], environment: env)
        #expect(protected.status == 0, "\(protected.stderr)")
        let backup = try CLI.run(["backup", "web", "--json"], environment: env)
        #expect(backup.status == 0, "\(backup.stderr)")
        let point = Self.json(backup.stdout)
        let disk = (point["disks"] as? [[String: Any]])?.first ?? [:]
        let virtualSize = (Self.json(try sh(["qemu-img", "info", "--output=json", image]))["virtual-size"] as? Int) ?? -1
        #expect(disk["size"] as? Int == virtualSize, "the point's disk is the guest's \(virtualSize) bytes, not the container: \(disk)")
        let restored = try CLI.run(["restore", "web", "--to", scratch.file("out")], environment: env)
        #expect(restored.status == 0, "\(restored.stderr)")
        let files = (try? FileManager.default.contentsOfDirectory(atPath: scratch.file("out"))) ?? []
        let out = scratch.file("out") + "/" + (files.first ?? "?")
        #expect((try? sh(["cmp", raw, out])) != nil, "the restored disk equals the guest's bytes (\(files))")
        // And it boots: a drill of the qcow2 machine's point.
        defer { _ = try? CLI.run(["stop-test", "web"], environment: env) }
        let drill = try CLI.run(["test-failover", "web", "--memory", "256", "--wait-for", "LIFEBOAT-MARKER: qcow2 machine", "--timeout", "3m"],
                                environment: env)
        #expect(drill.status == 0 && drill.stdout.contains("PASSED"), "\(drill.stdout) \(drill.stderr)")
    }

    @Test("a block device (a loop device) as a --disk: raw, never probed; its point restores byte-identical")
    func blockDeviceDisk() throws {
        let scratch = Scratch()
        let env = ["LIFEBOAT_REPO": scratch.file("repo"), "LIFEBOAT_HOT": scratch.file("hot")]
        let file = scratch.file("dev.raw")
        try DemoDisk.make(file, marker: "on a block device")
        let device = try sh(["losetup", "-f", "--show", file]).trimmingCharacters(in: .whitespacesAndNewlines)
        defer { _ = try? sh(["losetup", "-d", device]) }
        #expect(try CLI.run(["init"], environment: env).status == 0)
        let protected = try CLI.run(["protect", "blk", "--disk", device], environment: env)
        #expect(protected.status == 0, "\(protected.stderr)")
        let backup = try CLI.run(["backup", "blk"], environment: env)
        #expect(backup.status == 0, "\(backup.stderr)")
        let restored = try CLI.run(["restore", "blk", "--to", scratch.file("out")], environment: env)
        #expect(restored.status == 0, "\(restored.stderr)")
        let files = (try? FileManager.default.contentsOfDirectory(atPath: scratch.file("out"))) ?? []
        #expect((try? sh(["cmp", file, scratch.file("out") + "/" + (files.first ?? "?")])) != nil, "restored byte-identical (\(files))")
    }

    @Test("a disk-file machine of a UEFI guest on SCSI: --firmware uefi --machine q35 --disk-bus scsi, its drill boots; bad values refused, naming the option")
    func diskMachineHardware() throws {
        let lab = try DrillLab(["efi"])
        let name = lab.machines[0]
        let disk = lab.scratch.file("efi.raw")
        try DemoDisk.make(disk, marker: "uefi disk file", uefi: true)
        for (flag, value) in [("--firmware", "coreboot"), ("--disk-bus", "ide"), ("--machine", "q35;x")] {
            let refused = try lab.run(["protect", name, "--disk", disk, flag, value])
            // A usage error: its first line names the option and what it takes (the usage follows).
            #expect(refused.status != 0 && refused.stderr.split(separator: "\n").first?.contains(flag) == true, "\(refused.stderr)")
        }
        try lab.check(["protect", name, "--disk", disk, "--memory", "256", "--firmware", "uefi", "--machine", "q35", "--disk-bus", "scsi"])
        try lab.check(["backup", name])
        let (status, drill, stderr) = try lab.drillJSON([name, "--wait-for", "LIFEBOAT-READY", "--timeout", "4m"])
        #expect(status == 0 && drill["result"] as? String == "passed", "\(stderr) \(lab.console(drill).suffix(600))")
        let xml = (try? sh(["virsh", "-q", "-c", "qemu:///system", "dumpxml", "lifeboat-test-" + name])) ?? ""
        #expect(xml.contains("q35") && xml.contains("OVMF") && xml.contains("bus='scsi'") && xml.contains("dev='sda'"), "\(xml)")
        #expect(lab.console(drill).contains("LIFEBOAT-MARKER: uefi disk file"))
        try lab.check(["stop-test", name])
    }

    @Test("a qcow2 domain's and a raw domain's planned failover: the final point is the guest's bytes (the virtual size), the recovery VM boots", arguments: [false, true])
    func plannedFailoverOfDomain(raw: Bool) throws {
        let lab = try DomainLab(raw ? "plannedraw" : "planned", raw: raw)
        let network = "lbplan-\(getpid())"
        try "<network><name>\(network)</name><bridge stp='on' delay='0'/></network>".write(toFile: lab.scratch.file("net.xml"), atomically: true, encoding: .utf8)
        try sh(DomainLab.virsh + ["net-define", lab.scratch.file("net.xml")])
        try sh(DomainLab.virsh + ["net-start", network])
        defer {
            _ = try? lab.run(["cancel-failover", lab.machine, "--yes"])
            _ = try? sh(DomainLab.virsh + ["destroy", lab.machine])
            _ = try? sh(DomainLab.virsh + ["undefine", lab.machine])
            _ = try? sh(DomainLab.virsh + ["net-destroy", network])
            _ = try? sh(DomainLab.virsh + ["net-undefine", network])
        }
        try lab.start()
        try lab.check(["protect", lab.machine, "--domain", lab.domain])
        let running = try lab.point()
        #expect(running["readMode"] as? String == "full")
        if raw { #expect((running["note"] as? String)?.contains("cannot hold a dirty bitmap") == true, "\(running)") }
        try sh(DomainLab.virsh + ["destroy", lab.domain])   // the source is shut down for a planned failover
        try lab.check(["failover", lab.machine, "--planned", "--wait", "--network", network])
        let points = (try? JSONSerialization.jsonObject(with: Data(try lab.check(["points", lab.machine, "--json"]).utf8))) as? [[String: Any]] ?? []
        let final = points.last ?? [:]
        #expect(points.count == 2 && (final["note"] as? String)?.contains("shut off") == true, "the planned failover took its final point: \(final)")
        #expect(((final["disks"] as? [[String: Any]])?.first?["size"] as? Int) == 256 << 20, "the guest's 256 MiB, not the image file: \(final)")
        let console = lab.hot + "/\(lab.machine)/console.log"
        let deadline = Date().addingTimeInterval(180)
        var booted = false
        while !booted && Date() < deadline {
            booted = ((try? String(contentsOfFile: console, encoding: .isoLatin1)) ?? "").contains("LIFEBOAT-MARKER: replicated")
            if !booted { Thread.sleep(forTimeInterval: 0.5) }
        }
        #expect(booted, "the recovery VM booted from the final point")
    }

    @Test("a UEFI q35 domain booting from virtio-scsi, a SATA disk, two NICs, agent, TPM: points keep its definition and NVRAM; the drill VM is that machine; failover after the site is lost, commit, a write in the recovery VM, its points; failback defines the original again and it boots with that write")
    func faithfulDomainRoundTrip() throws {
        let lab = try DomainLab("faithful", hardware: true)
        defer {
            // Whatever happened: no recovery VM or drill VM of this machine is left running.
            _ = try? lab.run(["stop-test", lab.machine])
            _ = try? lab.run(["cancel-failover", lab.machine, "--yes"])
            for vm in [lab.machine, "lifeboat-test-" + lab.machine] {
                _ = try? sh(DomainLab.virsh + ["destroy", vm])
                _ = try? sh(DomainLab.virsh + ["undefine", vm, "--nvram"])
            }
        }
        try lab.start()
        #expect(lab.waitForConsole("LIFEBOAT-AGENT: started"))
        try lab.check(["protect", lab.machine, "--domain", lab.domain])
        let first = try lab.point()
        let hardware = first["hardware"] as? [String: Any] ?? [:]
        #expect((hardware["machine"] as? String)?.contains("q35") == true, "\(hardware)")
        let disks = hardware["disks"] as? [[String: Any]] ?? []
        #expect(disks.contains { $0["target"] as? String == "sdb" && $0["bus"] as? String == "sata" }, "\(disks)")
        #expect(disks.contains { $0["target"] as? String == "sda" && $0["bus"] as? String == "scsi" && $0["bootOrder"] as? Int == 1 }, "\(disks)")
        #expect(hardware["firmware"] as? String == "uefi" && hardware["tpm"] as? String == "tpm-crb 2.0", "\(hardware)")
        let pointFolder = lab.repo + "/machines/\(lab.machine)/points/\(first["id"] as? String ?? "?")"
        for file in ["domain.xml", "nvram", "tpm-state"] {
            #expect(FileManager.default.fileExists(atPath: pointFolder + "/" + file), "the point keeps \(file)")
        }
        let nics = hardware["nics"] as? [[String: Any]] ?? []
        #expect(nics.compactMap { $0["mac"] as? String } == DomainLab.macs, "\(nics)")
        #expect(nics.compactMap { $0["model"] as? String } == ["virtio", "e1000e"], "\(nics)")
        #expect(hardware["agent"] as? Bool == true)

        // The drill: the VM is the source's hardware on the isolated test network.
        let drill = try lab.run(["test-failover", lab.machine, "--wait-for", "LIFEBOAT-READY", "--timeout", "4m"])
        #expect(drill.status == 0, "\(drill.stderr)")
        let drillXML = (try? sh(DomainLab.virsh + ["dumpxml", "lifeboat-test-" + lab.machine])) ?? ""
        #expect(drillXML.contains("q35") && drillXML.contains("OVMF") && drillXML.contains("<nvram"), "machine type, UEFI loader and NVRAM kept")
        #expect(drillXML.contains("bus='scsi'") && drillXML.contains("dev='sda'") && drillXML.contains("tpm-crb"), "boot disk on SCSI as sda, TPM")
        #expect(drillXML.contains("bus='sata'") && drillXML.contains("dev='sdb'"), "the data disk on SATA as sdb")
        for mac in DomainLab.macs { #expect(drillXML.contains(mac), "MAC \(mac) kept") }
        #expect(drillXML.contains("e1000e") && drillXML.contains("org.qemu.guest_agent.0"), "NIC model and agent channel kept")
        #expect(!drillXML.contains(lab.network), "no NIC of the drill on the source's network: \(drillXML)")
        try lab.check(["stop-test", lab.machine])

        // The site is lost: the source domain destroyed and its definition gone.
        try sh(DomainLab.virsh + ["destroy", lab.domain])
        try sh(DomainLab.virsh + ["undefine", lab.domain, "--checkpoints-metadata", "--nvram"])
        let lost = try lab.check(["status", lab.machine, "--json"])
        #expect(lost.contains("is gone from libvirt") && lost.contains("lifeboat failover"), "status names the lost domain: \(lost)")
        try lab.check(["configure", lab.machine, "--network", lab.network])
        let unmapped = try lab.run(["failover", lab.machine, "--network-map", "\(lab.network)=lbnowhere"])
        #expect(unmapped.status != 0 && unmapped.stderr.contains("network lbnowhere") && unmapped.stderr.split(separator: "\n").count == 1,
                "a network map naming a missing network: one line: \(unmapped.stderr)")
        #expect(try lab.check(["status", lab.machine, "--json"]).contains("\"Standby\""), "nothing changed")
        try lab.check(["failover", lab.machine, "--wait", "--network-map", "\(lab.network)=\(lab.network)"])
        let failedOverXML = (try? sh(DomainLab.virsh + ["dumpxml", lab.machine])) ?? ""
        for mac in DomainLab.macs { #expect(failedOverXML.contains(mac), "the recovery VM keeps MAC \(mac)") }
        try lab.check(["commit", lab.machine])
        let status = Self.json("{\"s\":" + (try lab.check(["status", lab.machine, "--json"])) + "}")["s"] as? [[String: Any]] ?? []
        #expect((status.first?["protected"] as? String)?.contains("the recovery VM: domain \(lab.machine)") == true, "\(status)")

        // A write inside the recovery VM; the next point is of the recovery VM and holds it.
        var wrote = false
        for _ in 0..<120 where !wrote {
            wrote = (try? lab.guest("echo written-after-commit > /data/marker && sync", in: lab.machine)) == 0
            if !wrote { Thread.sleep(forTimeInterval: 1) }
        }
        #expect(wrote, "the recovery VM's agent answered")
        let afterCommit = try lab.point()
        #expect((afterCommit["hardware"] as? [String: Any])?["domain"] as? String == lab.machine, "points now read the recovery VM")
        #expect(afterCommit["consistency"] as? String == "application-consistent", "\(afterCommit)")
        #expect((afterCommit["note"] as? String)?.contains("protection follows the machine") == true, "the first point after commit says why it is full: \(afterCommit)")
        let next = try lab.point()
        #expect(next["readMode"] as? String == "incremental", "the recovery VM's disks are qcow2 now: its next point is incremental: \(next)")

        // Failback: the original is defined again, its qcow2 written through, and it boots with the write.
        try lab.check(["failback", lab.machine, "--start"])
        #expect((try? sh(DomainLab.virsh + ["domstate", lab.domain])) != nil, "domain \(lab.domain) is defined again")
        let format = Self.json(try sh(["qemu-img", "info", "-U", "--output=json", lab.image]))["format"] as? String
        #expect(format == "qcow2", "the original stays qcow2")
        #expect(lab.waitForConsole("LIFEBOAT-MARKER: written-after-commit", seconds: 180), "the original booted with the recovery VM's write: \(lab.console().suffix(400))")
        let back = Self.json("{\"s\":" + (try lab.check(["status", lab.machine, "--json"])) + "}")["s"] as? [[String: Any]] ?? []
        #expect(back.first?["protected"] as? String == "domain \(lab.domain)", "\(back)")
        let again = try lab.point()
        #expect((again["hardware"] as? [String: Any])?["domain"] as? String == lab.domain, "protection is back on the original")
    }
}
}
