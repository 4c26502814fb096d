import Foundation
import LifeboatTestSupport
import Testing
#if canImport(Glibc)
import Glibc
#endif

extension RecoveryVMTests {
@Suite("Recovery at a second site from the bucket")
struct SiteLossTests {
    /// The bucket scripts/ceph-rgw made (scripts/test starts it); the test fails saying so without it.
    static func bucket() throws -> String {
        guard let bucket = ProcessInfo.processInfo.environment["LIFEBOAT_S3_BUCKET"],
              ProcessInfo.processInfo.environment["LIFEBOAT_S3_ENDPOINT"] != nil else {
            throw ShellError(description: "no S3 store: run scripts/ceph-rgw start and eval \"$(scripts/ceph-rgw env)\" (scripts/test does)")
        }
        return bucket
    }

    @Test("site A's service syncs to the bucket, then site A is lost; site B, knowing the bucket, endpoint and key, drills and fails over from it")
    func siteLoss() throws {
        let address = "s3://\(try Self.bucket())/siteloss-\(UInt32.random(in: 0...UInt32.max))"
        let password = ["LIFEBOAT_PASSWORD": "site key"]
        let siteA = try DrillLab(["shop"], overrides: password)
        let shop = siteA.machines[0]
        let boot = siteA.scratch.file("boot.raw"), data = siteA.scratch.file("data.raw")
        try DemoDisk.make(boot, marker: "marker synced")
        let dataBytes = Bytes.random(6 << 20, seed: 401)
        try Disk.make(data, size: 16 << 20, writes: [(1 << 20, dataBytes)])
        try siteA.check(["protect", shop, "--disk", boot, "--disk", data, "--ip", "192.168.79.10/24", "--mac", "52:54:00:79:00:10",
                         "--memory", "256", "--rpo", "1h"])
        // Site A's replication service takes the point and copies it off-site.
        try siteA.check(["replicate", "--once", "--sync-to", address])
        let synced = try #require(try JSONSerialization.jsonObject(with: Data(siteA.check(["points", shop, "--json"]).utf8)) as? [[String: Any]])
        #expect(synced.count == 1)
        // A point site A took after its last sync: site B must never see it.
        try DemoDisk.setMarker(boot, "marker never synced")
        try siteA.check(["backup", shop])

        // Site A is lost: its repository, hot storage and disks.
        for path in [siteA.repo, siteA.hot, boot, data] { try? FileManager.default.removeItem(atPath: path) }

        let siteB = try DrillLab(["shop"], overrides: password.merging(["LIFEBOAT_REPO": address]) { $1 })
        siteB.overrides["LIFEBOAT_CACHE"] = siteB.scratch.file("cache")
        defer {
            _ = try? siteB.run(["cancel-failover", shop, "--yes"])
            for mount in siteB.lifeboatMounts() { umount2(mount, Int32(MNT_DETACH)) }
        }
        let status = try siteB.status(shop)
        #expect(status["lastPoint"] as? String == synced[0]["id"] as? String, "site B knows the synced point from the bucket: \(status)")

        // Wrong keys at site B: one line.
        let wrong = try CLI.run(["points", shop], environment: siteB.environment.merging(["AWS_SECRET_ACCESS_KEY": "wrong"]) { $1 })
        #expect(wrong.status != 0 && wrong.stderr.contains("refused the credentials") && wrong.stderr.split(separator: "\n").count == 1, "\(wrong.stderr)")

        // The drill, its cache cold, through an endpoint that goes away for a few seconds while the VM boots.
        var drillResult: (status: Int32, stdout: String, stderr: String) = (0, "", "")
        try SpareGateway.exclusively {
            let process = CLI.start(["test-failover", shop, "--wait-for", "LIFEBOAT-READY", "--timeout", "150s", "--json"],
                                    environment: siteB.environment.merging(["LIFEBOAT_S3_ENDPOINT": SpareGateway.endpoint]) { $1 })
            Thread.sleep(forTimeInterval: 2)
            try SpareGateway.stop()
            Thread.sleep(forTimeInterval: 4)
            try SpareGateway.start()
            let out = (process.standardOutput as! Pipe).fileHandleForReading.readDataToEndOfFile()
            let err = (process.standardError as! Pipe).fileHandleForReading.readDataToEndOfFile()
            process.waitUntilExit()
            drillResult = (process.terminationStatus, String(decoding: out, as: UTF8.self), String(decoding: err, as: UTF8.self))
        }
        let drill = (status: drillResult.status,
                     drill: (try? JSONSerialization.jsonObject(with: Data(drillResult.stdout.utf8))) as? [String: Any] ?? [:])
        #expect(drill.status == 0, "\(drillResult.stderr)")
        #expect(drill.drill["result"] as? String == "passed", "the drill survived the endpoint's absence: \(drillResult.stdout)")
        #expect(siteB.console(drill.drill).contains("LIFEBOAT-MARKER: marker synced"), "\(siteB.console(drill.drill))")
        #expect(!siteB.console(drill.drill).contains("never synced"))
        try siteB.check(["stop-test", shop])
        #expect(!siteB.domainExists("lifeboat-test-" + shop))

        let network = try siteB.productionNetwork("192.168.79")
        // Site B changes nothing in the bucket: its network is given at failover.
        #expect(try siteB.run(["configure", shop, "--memory", "512"]).stderr.contains("only reads"))
        try siteB.check(["failover", shop, "--network", network])
        let console = siteB.hot + "/" + shop + "/console.log"
        var booted = ""
        for _ in 0..<300 where !booted.contains("LIFEBOAT-READY") {
            Thread.sleep(forTimeInterval: 0.5)
            booted = (try? String(contentsOfFile: console, encoding: .isoLatin1)) ?? ""
        }
        #expect(booted.contains("LIFEBOAT-MARKER: marker synced"), "the recovery VM booted from the bucket: \(booted)")
        #expect(!booted.contains("never synced"))
        if try siteB.status(shop)["state"] as? String == "Finalizing" { _ = try siteB.run(["resume", shop, "--wait"]) }
        var state: [String: Any] = [:]
        for _ in 0..<240 {
            state = try siteB.status(shop)
            if state["state"] as? String == "FailedOver" { break }
            Thread.sleep(forTimeInterval: 0.5)
        }
        #expect(state["state"] as? String == "FailedOver", "finalised into site B's hot storage: \(state)")
        let hotData = siteB.hot + "/" + shop + "/disks/data.raw"
        let copied = Disk.contents(hotData)
        #expect(copied.count == 16 << 20)
        if copied.count == 16 << 20 {
            #expect(Array(copied[(1 << 20)..<(7 << 20)]) == dataBytes, "the data disk in site B's hot storage holds the synced bytes")
        }

        // Protection follows the machine to site B: the running recovery VM is protected into a
        // new local repository there (the bucket stays read-only), and its first point holds the data.
        let local = siteB.environment.merging(["LIFEBOAT_REPO": siteB.scratch.file("site-b-repo")]) { $1 }
        func atSiteB(_ arguments: [String]) throws -> String {
            let result = try CLI.run(arguments, environment: local)
            #expect(result.status == 0, "lifeboat \(arguments.joined(separator: " ")): \(result.stderr)")
            return result.stdout
        }
        _ = try atSiteB(["init", "--encrypt"])
        _ = try atSiteB(["protect", shop, "--domain", shop])
        let point = (try? JSONSerialization.jsonObject(with: Data(try atSiteB(["backup", shop, "--json"]).utf8))) as? [String: Any] ?? [:]
        let disks = (point["disks"] as? [[String: Any]] ?? []).compactMap { $0["name"] as? String }
        #expect(disks.count == 2, "both disks of the recovery VM: \(point)")
        if let second = disks.last {
            _ = try atSiteB(["restore", shop, "--disk", second, "--to", siteB.scratch.file("restored")])
            let restored = Disk.contents(siteB.scratch.file("restored") + "/\(second).raw")
            #expect(restored.count == 16 << 20 && Array(restored[(1 << 20)..<(7 << 20)]) == dataBytes, "site B's own point holds the data disk")
        }
    }
}
}
