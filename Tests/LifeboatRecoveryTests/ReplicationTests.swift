import Foundation
import LifeboatTestSupport
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// A running libvirt domain to protect: the demo disk as qcow2, the guest agent's channel, the
/// serial console in a file; a repository and hot storage. Destroys and undefines the domain
/// (with its checkpoints) when it goes away, whether the test passed or not.
final class DomainLab {
    let scratch = Scratch()
    let domain: String
    let machine: String
    var repo: String { scratch.file("repo") }
    var hot: String { scratch.file("hot") }
    var image: String { scratch.file(domain + (rawImage ? ".raw" : ".qcow2")) }
    var consoleLog: String { scratch.file("console.log") }
    var environment: [String: String] { ["LIFEBOAT_REPO": repo, "LIFEBOAT_HOT": hot] }
    static let virsh = ["virsh", "-q", "-c", "qemu:///system"]

    /// With `hardware`: a UEFI (OVMF, secure boot off) q35 machine booting from virtio-scsi
    /// (sda), a second (data) disk on SATA (sdb), two NICs with fixed MACs (virtio and e1000e) on
    /// an isolated network of the lab's own, and an emulated TPM 2.0 (swtpm).
    let hardware: Bool
    let rawImage: Bool
    var network: String { "lbsrc-\(getpid())" }
    static let macs = ["52:54:00:5a:00:01", "52:54:00:5a:00:02"]

    /// With `raw`: the image stays a raw file (no changed-block tracking: every point reads in full).
    init(_ name: String, agent: Bool = true, hardware: Bool = false, raw rawImage: Bool = false) throws {
        self.hardware = hardware
        self.rawImage = rawImage
        chmod(scratch.path, 0o755)   // QEMU (libvirt-qemu) must reach the image and the console log
        domain = "lbsrc-\(name)-\(getpid())"
        machine = "\(name)-\(getpid())"
        let raw = scratch.file("source.raw")
        try DemoDisk.make(raw, marker: "replicated \(name)", uefi: hardware)
        if rawImage { try FileManager.default.moveItem(atPath: raw, toPath: image) } else {
            try sh(["qemu-img", "convert", "-O", "qcow2", raw, image])
            unlink(raw)
        }
        try sh(["chown", "libvirt-qemu:libvirt-qemu", image])
        let channel = agent ? "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>" : ""
        var extra = ""
        if hardware {
            try sh(["qemu-img", "create", "-q", "-f", "qcow2", scratch.file("data.qcow2"), "16M"])
            try sh(["chown", "libvirt-qemu:libvirt-qemu", scratch.file("data.qcow2")])
            try "<network><name>\(network)</name><bridge stp='on' delay='0'/></network>".write(toFile: scratch.file("net.xml"), atomically: true, encoding: .utf8)
            try sh(Self.virsh + ["net-define", scratch.file("net.xml")])
            try sh(Self.virsh + ["net-start", network])
            extra = """
                <controller type='scsi' model='virtio-scsi'/><tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>
                <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='\(scratch.file("data.qcow2"))'/><target dev='sdb' bus='sata'/></disk>
                <interface type='network'><source network='\(network)'/><mac address='\(Self.macs[0])'/><model type='virtio'/></interface>
                <interface type='network'><source network='\(network)'/><mac address='\(Self.macs[1])'/><model type='e1000e'/></interface>
                """
        }
        let xml = """
            <domain type='qemu'><name>\(domain)</name><memory unit='MiB'>256</memory><vcpu>1</vcpu>
            <os\(hardware ? " firmware='efi'" : "")><type arch='x86_64' machine='\(hardware ? "q35" : "pc")'>hvm</type>\(hardware ? "<firmware><feature enabled='no' name='secure-boot'/></firmware>" : "")</os><features><acpi/></features>
            <devices><disk type='file' device='disk'><driver name='qemu' type='\(rawImage ? "raw" : "qcow2")'/><source file='\(image)'/><target dev='\(hardware ? "sda" : "vda")' bus='\(hardware ? "scsi" : "virtio")'/><boot order='1'/></disk>\(extra)
            <serial type='file'><source path='\(consoleLog)'/><target port='0'/></serial>\(channel)</devices></domain>
            """
        try xml.write(toFile: scratch.file("domain.xml"), atomically: true, encoding: .utf8)
        try sh(Self.virsh + ["define", scratch.file("domain.xml")])
        try check(["init"])
    }

    deinit {
        _ = try? sh(Self.virsh + ["destroy", domain])
        _ = try? sh(Self.virsh + ["undefine", domain, "--checkpoints-metadata", "--nvram"])
        if hardware {
            _ = try? sh(Self.virsh + ["net-destroy", network])
            _ = try? sh(Self.virsh + ["net-undefine", network])
        }
    }

    func start() throws {
        try sh(Self.virsh + ["start", domain])
        #expect(waitForConsole("LIFEBOAT-READY"), "the source VM booted: \(console())")
    }

    func console() -> String { (try? String(contentsOfFile: consoleLog, encoding: .isoLatin1)) ?? "" }

    func waitForConsole(_ text: String, seconds: Double = 90) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if console().contains(text) { return true }
            Thread.sleep(forTimeInterval: 0.2)
        }
        return false
    }

    /// Runs `script` in the guest through the agent's guest-exec and waits for it to end.
    @discardableResult
    func guest(_ script: String, wait: Bool = true, in vm: String? = nil) throws -> Int {
        let domain = vm ?? self.domain
        let request = #"{"execute":"guest-exec","arguments":{"path":"/bin/sh","arg":["-c",\#(jsonString(script))]}}"#
        let answer = try sh(Self.virsh + ["qemu-agent-command", domain, request])
        guard let pid = (try JSONSerialization.jsonObject(with: Data(answer.utf8)) as? [String: Any])
            .flatMap({ $0["return"] as? [String: Any] })?["pid"] as? Int else { throw ShellError(description: "guest-exec: \(answer)") }
        guard wait else { return 0 }
        let deadline = Date().addingTimeInterval(120)
        while Date() < deadline {
            let status = try sh(Self.virsh + ["qemu-agent-command", domain, #"{"execute":"guest-exec-status","arguments":{"pid":\#(pid)}}"#])
            let result = (try JSONSerialization.jsonObject(with: Data(status.utf8)) as? [String: Any])?["return"] as? [String: Any] ?? [:]
            if result["exited"] as? Bool == true { return result["exitcode"] as? Int ?? -1 }
            Thread.sleep(forTimeInterval: 0.2)
        }
        throw ShellError(description: "guest command did not end: \(script)")
    }

    private func jsonString(_ text: String) -> String {
        String(String(decoding: try! JSONSerialization.data(withJSONObject: [text]), as: UTF8.self).dropFirst().dropLast())
    }

    func run(_ arguments: [String]) throws -> CLI.Result { try CLI.run(arguments, environment: environment) }

    @discardableResult
    func check(_ arguments: [String], sourceLocation: SourceLocation = #_sourceLocation) throws -> String {
        let result = try run(arguments)
        #expect(result.status == 0, "lifeboat \(arguments.joined(separator: " ")): \(result.stderr)", sourceLocation: sourceLocation)
        return result.stdout
    }

    /// `lifeboat backup MACHINE --json` as an object.
    func point(sourceLocation: SourceLocation = #_sourceLocation) throws -> [String: Any] {
        let text = try check(["backup", machine, "--json"], sourceLocation: sourceLocation)
        return (try? JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any]) ?? [:]
    }

    func checkpoints() throws -> [String] {
        try sh(Self.virsh + ["checkpoint-list", domain, "--name"]).split(separator: "\n").map(String.init).filter { !$0.isEmpty }
    }

    /// Bytes of the image that hold data, as QEMU sees them (`qemu-img map`).
    func allocatedBytes() throws -> Int {
        let text = try sh(["qemu-img", "map", "-U", "--output=json", image])
        let extents = try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [[String: Any]] ?? []
        return extents.filter { $0["data"] as? Bool == true && $0["zero"] as? Bool != true }.compactMap { $0["length"] as? Int }.reduce(0, +)
    }

    /// Nothing of a point is left on the host: no backup job, no scratch file, no NBD socket.
    func leftovers() throws -> [String] {
        var found: [String] = []
        let job = (try? sh(Self.virsh + ["domjobinfo", domain])) ?? "unknown (domjobinfo failed)"
        if !job.contains("None") { found.append("a libvirt job: \(job)") }
        for folder in [hot + "/" + machine + "/backup", "/run/lifeboat/backup-" + machine] where FileManager.default.fileExists(atPath: folder) {
            found.append(folder)
        }
        return found
    }
}

extension RecoveryVMTests {
@Suite("Replication of running domains")
struct ReplicationTests {
    @Test("changed-block tracking: full, then only what the guest wrote, then almost nothing; frozen by the agent; the shut-off disk restores identical")
    func changedBlocks() throws {
        let lab = try DomainLab("cbt")
        try lab.start()
        #expect(lab.waitForConsole("LIFEBOAT-AGENT: started"))
        let protect = try lab.check(["protect", lab.machine, "--domain", lab.domain, "--rpo", "1h"])
        #expect(protect.contains("vda=\(lab.image)"), "disks come from the domain XML, named by target: \(protect)")

        let allocated = try lab.allocatedBytes()
        let first = try lab.point()
        let firstRead = first["bytesRead"] as? Int ?? 0
        #expect(first["readMode"] as? String == "full")
        #expect(first["chunkSize"] as? Int == 256 << 10, "a domain's points use 256 KiB chunks, the repository 1 MiB: \(first)")
        #expect(first["consistency"] as? String == "application-consistent")
        #expect(firstRead >= allocated * 9 / 10 && firstRead <= allocated * 11 / 10 + (1 << 20),
                "the first point reads about the allocated \(allocated) bytes, not the 256 MiB disk: read \(firstRead)")
        #expect(lab.console().contains("LIFEBOAT-AGENT: freeze") && lab.console().contains("LIFEBOAT-AGENT: thaw"),
                "the guest froze and thawed its file systems: \(lab.console())")

        let written = 8 << 20
        #expect(try lab.guest("dd if=/dev/urandom of=/data/written bs=1M count=8 conv=fsync") == 0)
        let second = try lab.point()
        let secondRead = second["bytesRead"] as? Int ?? 0
        #expect(second["readMode"] as? String == "incremental")
        #expect(secondRead >= written && secondRead <= written + (6 << 20),
                "an incremental point reads about the \(written) bytes the guest wrote: read \(secondRead)")

        let third = try lab.point()
        let thirdRead = third["bytesRead"] as? Int ?? 0
        #expect(third["readMode"] as? String == "incremental")
        #expect(thirdRead <= 2 << 20, "without guest writes a point reads almost nothing: read \(thirdRead)")
        let checkpoints = try lab.checkpoints()
        #expect(checkpoints.count == 1 && checkpoints[0].hasPrefix("lifeboat-") && checkpoints[0] == third["checkpoint"] as? String,
                "one lifeboat checkpoint, the last point's: \(checkpoints)")
        #expect(try lab.leftovers().isEmpty)
        // A second machine of the same domain (as another repository's would be) keeps a chain
        // of its own: neither deletes the other's checkpoint.
        let other = lab.machine + "-b"
        try lab.check(["protect", other, "--domain", lab.domain])
        try lab.check(["backup", other])
        let fourth = try lab.point()
        #expect(fourth["readMode"] as? String == "incremental", "the first chain survived the second machine's point: \(fourth)")
        let otherText = try lab.check(["backup", other, "--json"])
        let otherPoint = (try? JSONSerialization.jsonObject(with: Data(otherText.utf8)) as? [String: Any]) ?? [:]
        #expect(otherPoint["readMode"] as? String == "incremental", "\(otherPoint)")
        let both = try lab.checkpoints()
        #expect(both.count == 2, "one checkpoint per machine: \(both)")
        let listing = try lab.check(["points", lab.machine])
        #expect(listing.contains("application-consistent") && listing.contains("incremental"), "\(listing)")

        // Shut off: the point reads the image file; it restores byte-identical to the disk.
        try sh(DomainLab.virsh + ["destroy", lab.domain])
        let off = try lab.point()
        #expect(off["readMode"] as? String == "full" && off["consistency"] as? String == "consistent")
        #expect((off["note"] as? String)?.contains("shut off") == true, "\(off)")
        let target = lab.scratch.file("restore")
        try FileManager.default.createDirectory(atPath: target, withIntermediateDirectories: false)
        try lab.check(["restore", lab.machine, "--to", target])
        let compare = try sh(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", target + "/vda.raw", lab.image])
        #expect(compare.contains("identical"), "\(compare)")
        // The incremental point before it holds the guest's file too.
        #expect(try DemoDisk.readFile(target + "/vda.raw", name: "marker").contains("replicated cbt"))
        try lab.check(["verify", lab.machine])
    }

    @Test("a deleted checkpoint or a libvirtd restart: the next point says why it reads in full, then points are incremental again")
    func brokenChain() throws {
        let lab = try DomainLab("chain")
        try lab.start()
        try lab.check(["protect", lab.machine, "--domain", lab.domain])
        _ = try lab.point()
        let checkpoint = try lab.checkpoints().first ?? ""
        try sh(DomainLab.virsh + ["checkpoint-delete", lab.domain, checkpoint])
        let afterDelete = try lab.point()
        #expect(afterDelete["readMode"] as? String == "full")
        #expect((afterDelete["note"] as? String)?.contains("checkpoint \(checkpoint)") == true, "says why: \(afterDelete)")
        let again = try lab.point()
        #expect(again["readMode"] as? String == "incremental", "\(again)")

        // libvirtd dies hard and comes back; the guest runs on.
        _ = try? sh(["pkill", "-9", "-x", "libvirtd"])
        let down = Date().addingTimeInterval(10)
        while (try? sh(["virsh", "-c", "qemu:///system", "version"])) != nil && Date() < down { Thread.sleep(forTimeInterval: 0.1) }
        try startDaemon(["libvirtd", "-d"])
        let up = Date().addingTimeInterval(30)
        while (try? sh(["virsh", "-c", "qemu:///system", "version"])) == nil && Date() < up { Thread.sleep(forTimeInterval: 0.2) }
        let afterRestart = try lab.point()
        let mode = afterRestart["readMode"] as? String
        #expect(mode == "incremental" || (afterRestart["note"] as? String)?.contains("read in full") == true,
                "after a libvirtd restart a point is incremental or says why it is not: \(afterRestart)")
        let next = try lab.point()
        #expect(next["readMode"] as? String == "incremental", "\(next)")
        #expect(try lab.leftovers().isEmpty)

        // A disk added to the running domain is noticed at the next point, which says so.
        let extra = lab.scratch.file("extra.qcow2")
        try sh(["qemu-img", "create", "-q", "-f", "qcow2", extra, "64M"])
        try sh(["chown", "libvirt-qemu:libvirt-qemu", extra])
        try sh(DomainLab.virsh + ["attach-disk", lab.domain, extra, "vdb", "--driver", "qemu", "--subdriver", "qcow2", "--live"])
        let added = try lab.point()
        #expect((added["note"] as? String)?.contains("disk vdb was added") == true, "\(added)")
        #expect((added["disks"] as? [[String: Any]])?.map { $0["name"] as? String } == ["vda", "vdb"])
        #expect(try lab.point()["readMode"] as? String == "incremental")
    }

    @Test("a hung guest agent: the freeze times out, a thaw is attempted, the point is crash-consistent and says so")
    func hungAgent() throws {
        let lab = try DomainLab("hang")
        try lab.start()
        #expect(lab.waitForConsole("LIFEBOAT-AGENT: started"))
        try lab.check(["protect", lab.machine, "--domain", lab.domain])
        #expect(try lab.point()["consistency"] as? String == "application-consistent")
        // The agent stops answering (SIGSTOP, from the guest's own shell through the agent).
        try lab.guest("kill -STOP $(cat /tmp/qemu-ga.pid)", wait: false)
        Thread.sleep(forTimeInterval: 1)
        let started = Date()
        let hung = try lab.point()
        #expect(hung["consistency"] as? String == "crash-consistent")
        #expect((hung["note"] as? String)?.contains("did not freeze") == true, "says why: \(hung)")
        #expect(Date().timeIntervalSince(started) < 60, "the freeze timed out instead of hanging the point")
        #expect(try lab.leftovers().isEmpty)
    }

    @Test("a guest writing all the time: every point verifies and fsck finds its file system clean; SIGKILL and SIGTERM mid-point leave nothing")
    func busyGuestAndKills() throws {
        let lab = try DomainLab("busy")
        try lab.start()
        #expect(lab.waitForConsole("LIFEBOAT-AGENT: started"))
        try lab.check(["protect", lab.machine, "--domain", lab.domain])
        try lab.guest("while true; do dd if=/dev/urandom of=/data/churn bs=64k count=32 conv=fsync 2>/dev/null; done", wait: false)
        var points: [[String: Any]] = []
        for _ in 0..<3 { points.append(try lab.point()) }
        #expect(points.allSatisfy { $0["consistency"] as? String == "application-consistent" }, "\(points.map { $0["consistency"] ?? "" })")

        // Killed as soon as its backup job runs (the scratch file exists), by SIGKILL then SIGTERM.
        for signal in [SIGKILL, SIGTERM] {
            let backup = CLI.start(["backup", lab.machine], environment: lab.environment)
            let scratch = lab.hot + "/" + lab.machine + "/backup/vda.scratch"
            let deadline = Date().addingTimeInterval(30)
            while !FileManager.default.fileExists(atPath: scratch) && backup.isRunning && Date() < deadline { usleep(2_000) }
            kill(backup.processIdentifier, signal)
            backup.waitUntilExit()
            var left: [String] = []
            let settled = Date().addingTimeInterval(10)
            repeat {
                left = try lab.leftovers()
                if left.isEmpty { break }
                Thread.sleep(forTimeInterval: 0.2)
            } while Date() < settled
            #expect(left.isEmpty, "signal \(signal) mid-point left: \(left)")
            #expect(!lab.console().hasSuffix("LIFEBOAT-AGENT: freeze\n"), "the guest is not left frozen")
        }
        let after = try lab.point()
        #expect(after["consistency"] as? String == "application-consistent", "the next point works and freezes again: \(after)")
        try lab.check(["verify", lab.machine])

        // The last point's data partition is a clean ext4.
        let target = lab.scratch.file("restore")
        try FileManager.default.createDirectory(atPath: target, withIntermediateDirectories: false)
        try lab.check(["restore", lab.machine, "--to", target])
        let partition = target + "/data.ext4"
        try sh(["dd", "if=\(target)/vda.raw", "of=\(partition)", "bs=1M", "skip=64", "status=none"])
        let fsck = try CLIProcess.status(["e2fsck", "-fn", partition])
        #expect(fsck.status == 0, "fsck of the point's file system: \(fsck.output)")
    }

    @Test("bad input: one line naming the domain and what to do")
    func badInput() throws {
        let lab = try DomainLab("bad", agent: false)
        func message(_ arguments: [String]) throws -> String {
            let result = try lab.run(arguments)
            #expect(result.status != 0, "lifeboat \(arguments.joined(separator: " ")) should fail")
            #expect(result.stderr.split(separator: "\n").count == 1, "one line: \(result.stderr)")
            return result.stderr
        }
        #expect(try message(["protect", "x", "--domain", "no-such-domain"]).contains("domain no-such-domain not found"))
        #expect(try message(["protect", "x", "--domain", lab.domain, "--disk", "/dev/null"]).contains("not both"))
        try lab.check(["protect", lab.machine, "--domain", lab.domain])
        // The domain is shut off: read from its image; then it is undefined: named, with the fix.
        #expect(try lab.point()["readMode"] as? String == "full")
        try sh(DomainLab.virsh + ["undefine", lab.domain, "--checkpoints-metadata"])
        #expect(try message(["backup", lab.machine]).contains("domain \(lab.domain) not found"))
        #expect(try lab.check(["points", lab.machine, "--json"]).contains("\"readMode\" : \"full\""), "the earlier point is intact")
    }
}
}

/// Runs a program and returns its status and combined output (for programs whose failure is an answer).
enum CLIProcess {
    static func status(_ arguments: [String]) throws -> (status: Int32, output: String) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = arguments
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = pipe
        try process.run()
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return (process.terminationStatus, String(decoding: data, as: UTF8.self))
    }
}

extension RecoveryVMTests {
@Suite("The replication service")
struct ReplicationServiceTests {
    /// Starts `lifeboat replicate ARGS` in the background (its log goes to a file).
    func service(_ lab: DomainLab, _ arguments: [String]) throws -> (process: Process, log: String) {
        let log = lab.scratch.file("replicate-\(UInt32.random(in: 0...UInt32.max)).log")
        let process = Process()
        process.executableURL = URL(fileURLWithPath: CLI.binary)
        process.arguments = ["replicate"] + arguments
        process.environment = ProcessInfo.processInfo.environment.merging(lab.environment) { $1 }
        FileManager.default.createFile(atPath: log, contents: nil)
        let handle = FileHandle(forWritingAtPath: log)!
        process.standardOutput = handle
        process.standardError = handle
        process.standardInput = FileHandle.nullDevice
        try process.run()
        return (process, log)
    }

    func statusCheck(_ lab: DomainLab) throws -> Int32 { try lab.run(["status", "--check"]).status }

    func states(_ lab: DomainLab) throws -> [String: Any] {
        let text = try lab.check(["status", lab.machine, "--json"])
        return (try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [[String: Any]])?.first ?? [:]
    }

    @Test("keeps the RPO over several cycles, retries with back-off while the repository is read-only, is compliant again after; metrics; one service per repository")
    func keepsRPO() throws {
        let lab = try DomainLab("svc")
        try lab.start()
        try lab.check(["protect", lab.machine, "--domain", lab.domain, "--rpo", "15s", "--every", "3s", "--keep-last", "4"])
        #expect(try statusCheck(lab) == 1, "no point yet: the RPO is breached")
        let port = 9400 + Int(getpid() % 400)
        let (service, log) = try self.service(lab, ["--metrics", "127.0.0.1:\(port)"])
        defer { if service.isRunning { kill(service.processIdentifier, SIGKILL) } }

        // Several cycles: compliant at every look once the first point is there.
        let first = Date().addingTimeInterval(60)
        while try statusCheck(lab) != 0 && Date() < first { Thread.sleep(forTimeInterval: 0.5) }
        var breaches = 0
        for _ in 0..<10 {
            if try statusCheck(lab) != 0 { breaches += 1 }
            Thread.sleep(forTimeInterval: 1)
        }
        #expect(breaches == 0, "status --check stayed green over 10 s of 3 s cycles")
        let points = try JSONSerialization.jsonObject(with: Data(try lab.check(["points", lab.machine, "--json"]).utf8)) as? [[String: Any]] ?? []
        #expect(points.count >= 3 && points.count <= 4, "points every 3 s, retention keeps the last 4: \(points.count)")
        #expect(points.dropFirst().allSatisfy { $0["readMode"] as? String == "incremental" })

        // A second service on the same repository refuses, naming the holder.
        let second = try lab.run(["replicate", "--once"])
        #expect(second.status != 0 && second.stderr.contains("pid \(service.processIdentifier)"), "\(second.stderr)")

        // The repository becomes read-only: points fail, are retried with growing waits, and say so.
        try sh(["mount", "--bind", lab.repo, lab.repo])
        try sh(["mount", "-o", "remount,bind,ro", lab.repo])
        var failing: [String: Any] = [:]
        let faulted = Date().addingTimeInterval(60)
        repeat {
            failing = (try states(lab)["replication"] as? [String: Any]) ?? [:]
            if (failing["failures"] as? Int ?? 0) >= 4 { break }
            Thread.sleep(forTimeInterval: 0.5)
        } while Date() < faulted
        #expect((failing["failures"] as? Int ?? 0) >= 4, "attempts failed and were retried: \(failing)")
        let problems = try states(lab)["problems"] as? [String] ?? []
        #expect(problems.contains { $0.contains("replication of \(lab.machine) is failing") && $0.contains("next attempt") }, "\(problems)")
        let history = try lab.check(["history", lab.machine, "--json"])
        let failures = (try JSONSerialization.jsonObject(with: Data(history.utf8)) as? [[String: Any]] ?? [])
            .filter { $0["event"] as? String == "backup-failed" }.compactMap { $0["time"] as? String }
        #expect(failures.count >= 4)
        let times = failures.compactMap { ISOTime.date(from: $0) }
        if times.count >= 4 {
            // Doubling waits with ±20 % jitter and the service's half-second tick: one doubling can
            // hide in the noise (1.2 b + tick against 1.6 b), two cannot (at least 3.2 b against 1.7 b).
            let gaps = zip(times.dropFirst(), times).map { $0.timeIntervalSince($1) }
            #expect(gaps[2] > gaps[0] * 1.5, "back-off: the waits grow: \(gaps)")
        }
        let metrics = try sh(["curl", "-s", "http://127.0.0.1:\(port)/metrics"])
        for name in ["lifeboat_last_point_timestamp_seconds", "lifeboat_rpo_seconds", "lifeboat_rpo_compliant",
                     "lifeboat_backup_duration_seconds", "lifeboat_backup_bytes_read_total", "lifeboat_backup_failures_total"] {
            #expect(metrics.contains("\(name){machine=\"\(lab.machine)\"}"), "metric \(name) in \(metrics)")
        }

        // The fault is gone: the next attempt succeeds and the machine is compliant again.
        try sh(["umount", lab.repo])
        let healed = Date().addingTimeInterval(90)
        while (try states(lab)["replication"] as? [String: Any])?["failures"] as? Int ?? 1 > 0 && Date() < healed {
            Thread.sleep(forTimeInterval: 0.5)
        }
        #expect(try statusCheck(lab) == 0, "compliant again once the repository is writable")
        #expect(try lab.leftovers().isEmpty)

        kill(service.processIdentifier, SIGTERM)
        service.waitUntilExit()
        #expect(service.terminationStatus == 0, "SIGTERM ends the service cleanly: \((try? String(contentsOfFile: log, encoding: .utf8)) ?? "")")
        try lab.check(["verify", lab.machine])
    }

    @Test("--once runs what is due and exits; SIGTERM in the middle of a point leaves no job, no scratch file and a repository that verifies")
    func onceAndTerm() throws {
        let lab = try DomainLab("once")
        try lab.start()
        #expect(lab.waitForConsole("LIFEBOAT-AGENT: started"))
        try lab.check(["protect", lab.machine, "--domain", lab.domain, "--rpo", "1h"])
        // Enough data that a full point takes a moment to read.
        #expect(try lab.guest("dd if=/dev/urandom of=/data/bulk bs=1M count=120 conv=fsync") == 0)
        let (service, _) = try self.service(lab, ["--once"])
        let scratch = lab.hot + "/" + lab.machine + "/backup/vda.scratch"
        let deadline = Date().addingTimeInterval(60)
        while !FileManager.default.fileExists(atPath: scratch) && service.isRunning && Date() < deadline { usleep(2_000) }
        kill(service.processIdentifier, SIGTERM)
        service.waitUntilExit()
        #expect(try lab.leftovers().isEmpty, "SIGTERM mid-point leaves nothing")
        let state = try states(lab)
        #expect((state["replication"] as? [String: Any])?["failures"] as? Int == 1, "the cancelled point is recorded: \(state)")
        try lab.check(["verify", lab.machine])

        let once = try lab.run(["replicate", "--once"])
        #expect(once.status == 0, "\(once.stderr)")
        #expect(once.stdout.contains("\(lab.machine): point"), "\(once.stdout)")
        let again = try lab.run(["replicate", "--once"])
        #expect(again.status == 0 && !again.stdout.contains("point"), "nothing is due right after a point: \(again.stdout)")
        #expect(try statusCheck(lab) == 0)
    }
}
}

enum ISOTime {
    static func date(from text: String) -> Date? {
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        return formatter.date(from: text)
    }
}
