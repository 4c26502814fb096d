import Foundation
import LifeboatBase
import LifeboatRecovery
import LifeboatRepository
import LifeboatTestSupport
import LifeboatVirt
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// Defects that came from doing one thing in two places (issue: the architecture).
@Suite("One way to take a point, one RPO rule, one Recovery shared by threads")
struct OneWayTests {
    /// A repository, hot storage and templates for the CLI.
    final class Lab {
        let scratch = Scratch()
        let environment: [String: String]
        init() throws {
            environment = ["LIFEBOAT_REPO": scratch.file("repo"), "LIFEBOAT_HOT": scratch.file("hot"),
                           "LIFEBOAT_VIRT_TYPE": "qemu", "LIFEBOAT_TEMPLATES": packageRoot + "/templates"]
            try check(["init"])
        }

        @discardableResult
        func check(_ arguments: [String], sourceLocation: SourceLocation = #_sourceLocation) throws -> String {
            let result = try CLI.run(arguments, environment: environment)
            #expect(result.status == 0, "lifeboat \(arguments.joined(separator: " ")): \(result.stderr)", sourceLocation: sourceLocation)
            return result.stdout
        }

        func json(_ arguments: [String]) throws -> Any? {
            try JSONSerialization.jsonObject(with: Data(check(arguments + ["--json"]).utf8))
        }
    }

    @Test("lifeboat backup records history and the replication state as the console and the service do; a failure it clears no longer shows")
    func backupIsRecorded() throws {
        let lab = try Lab()
        let disk = lab.scratch.file("web.raw")
        try Disk.make(disk, size: 4 << 20, writes: [(0, Bytes.text(1 << 20, seed: 3))])
        try lab.check(["protect", "web", "--disk", disk, "--rpo", "1h"])
        // A point that fails (its disk is gone): recorded as the service would record it.
        rename(disk, disk + ".away")
        let failed = try CLI.run(["backup", "web"], environment: lab.environment)
        #expect(failed.status != 0 && failed.stderr.contains("web.raw"), "\(failed.stderr)")
        var status = try #require((lab.json(["status", "web"]) as? [[String: Any]])?.first)
        let problems = status["problems"] as? [String] ?? []
        #expect(problems.contains { $0.contains("replication of web is failing") }, "\(problems)")
        var history = try #require(lab.json(["history", "web"]) as? [[String: Any]])
        #expect(history.last?["event"] as? String == "backup-failed")
        // The hand-made point that succeeds: history, the replication record, no stale failure.
        rename(disk + ".away", disk)
        let point = try #require(lab.json(["backup", "web"]) as? [String: Any])
        history = try #require(lab.json(["history", "web"]) as? [[String: Any]])
        #expect(history.last?["event"] as? String == "backup" && history.last?["point"] as? String == point["id"] as? String, "\(history)")
        status = try #require((lab.json(["status", "web"]) as? [[String: Any]])?.first)
        let replication = try #require(status["replication"] as? [String: Any])
        #expect(replication["lastPoint"] as? String == point["id"] as? String && replication["failures"] as? Int == 0, "\(replication)")
        #expect((status["problems"] as? [String] ?? []).isEmpty, "\(status)")
        // restore makes its target folder with its parents, and refuses a path that is a file.
        try lab.check(["restore", "web", "--to", lab.scratch.file("new/deep/folder")])
        #expect(Disk.contents(lab.scratch.file("new/deep/folder/web.raw")) == Disk.contents(disk))
        let onFile = try CLI.run(["restore", "web", "--to", disk], environment: lab.environment)
        #expect(onFile.status != 0 && onFile.stderr.contains("is not a folder"), "\(onFile.stderr)")
        // An unknown machine: one line, and nothing recorded for it.
        let unknown = try CLI.run(["backup", "nope"], environment: lab.environment)
        #expect(unknown.status != 0 && unknown.stderr.contains("no machine named nope"))
        #expect(!FileManager.default.fileExists(atPath: lab.scratch.file("hot/nope")))
    }

    @Test("status, status --check and the replication status judge the RPO by one rule")
    func oneRPORule() throws {
        let lab = try Lab()
        for (name, rpo) in [("fresh", "1h"), ("stale", "1s"), ("never", "1h"), ("free", nil)] {
            let disk = lab.scratch.file("\(name).raw")
            try Disk.make(disk, size: 1 << 20, writes: [(0, Bytes.text(4096, seed: 1))])
            try lab.check(["protect", name, "--disk", disk] + (rpo.map { ["--rpo", $0] } ?? []))
            if name != "never" { try lab.check(["backup", name]) }
        }
        Thread.sleep(forTimeInterval: 1.5)
        let statuses = try #require(lab.json(["status"]) as? [[String: Any]])
        let compliant = Dictionary(uniqueKeysWithValues: statuses.map { ($0["machine"] as! String, $0["rpoCompliant"] as? Bool) })
        #expect(compliant == ["fresh": true, "stale": false, "never": false, "free": nil], "\(compliant)")
        let check = try CLI.run(["status", "--check"], environment: lab.environment)
        #expect(check.status == 1)
        let named = (check.stdout + check.stderr)
        #expect(named.contains("stale") && named.contains("never") && !named.contains("fresh") && !named.contains("free"), "\(named)")
        // The rule itself, at its edges.
        let now = Date()
        #expect(RPORule.evaluate(rpoSeconds: 60, lastPointTime: now.addingTimeInterval(-60), now: now).compliant == true)
        #expect(RPORule.evaluate(rpoSeconds: 60, lastPointTime: now.addingTimeInterval(-61), now: now).compliant == false)
        #expect(RPORule.evaluate(rpoSeconds: 60, lastPointTime: nil, now: now).compliant == false)
        #expect(RPORule.evaluate(rpoSeconds: nil, lastPointTime: nil, now: now).compliant == nil)
        #expect(RPORule.evaluate(rpoSeconds: 0, lastPointTime: now, now: now).compliant == nil)
    }

    @Test("one Recovery used from 16 threads at once: one libvirt connection, statuses all read")
    func sharedRecovery() throws {
        let scratch = Scratch()
        let repository = try Repository.create(at: scratch.file("repo"))
        let disk = scratch.file("d.raw")
        try Disk.make(disk, size: 1 << 20, writes: [(0, Bytes.text(4096, seed: 2))])
        try repository.protect(Machine(name: "m", disks: Repository.diskNames(for: [disk])))
        let settings = RecoverySettings(connectURI: "test:///default", hotDirectory: scratch.file("hot"),
                                        templates: try Templates.locate(explicit: packageRoot + "/templates"), virtType: .qemu)
        let recovery = Recovery(repository: repository, settings: settings)
        let connections = Locked<Set<ObjectIdentifier>>([])
        let failures = Locked<[String]>([])
        DispatchQueue.concurrentPerform(iterations: 16) { _ in
            for _ in 0..<20 {
                do {
                    let connection = try recovery.connection()
                    connections.withLock { _ = $0.insert(ObjectIdentifier(connection)) }
                    let statuses = try recovery.status()
                    if statuses.map(\.machine) != ["m"] { failures.withLock { $0.append("\(statuses.map(\.machine))") } }
                } catch {
                    failures.withLock { $0.append("\(error)") }
                }
            }
        }
        #expect(failures.withLock { $0 }.isEmpty, "\(failures.withLock { $0 }.prefix(3))")
        #expect(connections.withLock { $0.count } == 1, "one connection opened and shared")
    }
}
