import Foundation
import LifeboatBase
import LifeboatS3
import Testing
@testable import LifeboatRepository
import LifeboatTestSupport
#if canImport(Glibc)
import Glibc
#endif

/// The S3 store scripts/ceph-rgw started (scripts/test starts it): a real Ceph RGW on 127.0.0.1.
struct ObjectStore {
    let settings: S3Settings
    let bucket: String
    let environment: [String: String]

    /// Fails the test, saying why, when no store was started.
    static func get() throws -> ObjectStore {
        let env = ProcessInfo.processInfo.environment
        guard let endpoint = env["LIFEBOAT_S3_ENDPOINT"], let bucket = env["LIFEBOAT_S3_BUCKET"] else {
            throw ShellError(description: "no S3 store for the off-site tests: run scripts/ceph-rgw start and eval \"$(scripts/ceph-rgw env)\" (scripts/test does)")
        }
        let settings = try S3Settings.resolve(endpoint: endpoint, region: nil, addressing: nil, credentialsFile: nil)
        return ObjectStore(settings: settings, bucket: bucket, environment: [:])
    }

    /// A new, unused prefix in the bucket: `s3://BUCKET/test-RANDOM`.
    func newAddress() -> String { "s3://\(bucket)/test-\(UInt64.random(in: 0...UInt64.max))" }

    /// A fresh client (its request counts start at zero) with its own cache folder.
    func target(_ address: String, cache: String) throws -> ObjectRepository {
        try ObjectRepository(location: try S3Location(parsing: address), settings: settings, cacheRoot: cache)
    }
}

@Suite("Off-site copies in S3 object storage (real Ceph RGW)", .serialized)
struct OffsiteTests {
    @Test("SigV4 signs AWS's published example request (GET with a range) to its published signature")
    func signatureV4() {
        let signer = SignatureV4(accessKey: "AKIAIOSFODNN7EXAMPLE", secretKey: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", region: "us-east-1")
        let empty = SignatureV4.payloadHash([UInt8]())
        #expect(empty == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        let headers = signer.sign(method: "GET", path: "/test.txt", query: [],
                                  headers: [("Host", "examplebucket.s3.amazonaws.com"), ("Range", "bytes=0-9")],
                                  payloadHash: empty, date: Date(timeIntervalSince1970: 1369353600))
        let authorization = headers.first { $0.0 == "authorization" }?.1 ?? ""
        #expect(authorization.hasSuffix("Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"), "\(authorization)")
        #expect(authorization.contains("SignedHeaders=host;range;x-amz-content-sha256;x-amz-date"))
        #expect(SignatureV4.canonicalQuery([("prefix", "a b/c"), ("list-type", "2")]) == "list-type=2&prefix=a%20b%2Fc")
    }

    @Test("sync sends only what the target lacks; a second sync sends nothing; a 1%-changed point sends its new chunks; restore and verify at the target")
    func syncIncremental() throws {
        let store = try ObjectStore.get()
        let scratch = Scratch()
        let disk = scratch.file("disk.raw")
        let size = 100 << 20
        try Disk.make(disk, size: size, writes: [(0, Bytes.random(80 << 20, seed: 31))])
        let repo = try Repository.create(at: scratch.file("repo"))
        try repo.protect(Machine(name: "web", disks: Repository.diskNames(for: [disk])))
        let first = try repo.backup("web")
        let address = store.newAddress()

        let sent = try repo.sync(to: try store.target(address, cache: scratch.file("cache")))
        #expect(sent.points == ["web/\(first.id)"])
        #expect(sent.chunks == 80)
        #expect(sent.packs == 2, "80 MiB in packs of 64 MiB")
        // 2 packs and their indexes, config.json, machine.json, the point's three files.
        #expect(sent.requests.puts == 2 * 2 + 2 + 3, "\(sent.requests)")
        #expect(sent.requests.gets <= 2, "no request per chunk: \(sent.requests)")
        #expect(repo.offsiteCopy("web")?.newestPoint == first.id)

        let again = try repo.sync(to: try store.target(address, cache: scratch.file("cache")))
        #expect(again.points.isEmpty && again.chunks == 0 && again.requests.puts == 0, "\(again)")

        Disk.patch(disk, writes: [(7 << 20, Bytes.random(1 << 20, seed: 32))])   // 1% of the disk
        let second = try repo.backup("web")
        let incremental = try repo.sync(to: try store.target(address, cache: scratch.file("cache")))
        #expect(incremental.points == ["web/\(second.id)"])
        #expect(incremental.chunks == 1)
        #expect(incremental.bytes <= second.storedBytes * 12 / 10, "sent \(incremental.bytes) for \(second.storedBytes) new stored bytes")
        #expect(incremental.requests.puts == 2 + 3, "one pack, its index and the point's files: \(incremental.requests)")
        #expect(sent.requests.deletes + again.requests.deletes + incremental.requests.deletes == 0, "sync never deletes: a key that cannot delete will do")

        // Read from the bucket through another cache folder, as another host would.
        let remote = try Repository.open(remote: try store.target(address, cache: scratch.file("other-cache")))
        #expect(try remote.points("web").map(\.id) == [first.id, second.id])
        #expect(try remote.verify().isClean)
        let out = scratch.file("out")
        for point in [first, second] {
            _ = try remote.restore(try remote.point("web", point.id), disk: "disk", to: out + "-" + point.id)
        }
        #expect(Disk.contents(out + "-" + second.id) == Disk.contents(disk))
        #expect(Disk.contents(out + "-" + first.id) != Disk.contents(disk))
        #expect(throws: LifeboatError.self) { try remote.backup("web") }

        // A pack changed behind lifeboat's back (same length): verify at the target names the chunk.
        let target = try store.target(address, cache: scratch.file("cache"))
        let pack = try #require(try target.client.list(prefix: target.location.prefix + "packs/").first { $0.key.hasSuffix(".pack") })
        var bytes = try #require(try target.client.get(pack.key))
        bytes[bytes.count / 3] ^= 0x40
        try target.client.put(pack.key, bytes)
        let damaged = try Repository.open(remote: try store.target(address, cache: scratch.file("third-cache"))).verify()
        #expect(damaged.damagedChunks.count == 1, "\(damaged)")
    }

    @Test("kill -9 mid-sync, then sync again: nothing that arrived is sent again, the point appears only at the end")
    func killedSyncResumes() throws {
        let store = try ObjectStore.get()
        let scratch = Scratch()
        let disk = scratch.file("disk.raw")
        try Disk.make(disk, size: 96 << 20, writes: [(0, Bytes.random(96 << 20, seed: 41))])
        let repo = try Repository.create(at: scratch.file("repo"))
        try repo.protect(Machine(name: "db", disks: Repository.diskNames(for: [disk])))
        let point = try repo.backup("db")
        let address = store.newAddress()
        let cache = scratch.file("cache")
        let args = ["sync", "--repo", repo.root, "--to", address, "--cache-dir", cache, "--pack-size", "\(8 << 20)", "--json"]
        let child = CLI.start(args)
        // Killed once some packs (8 MiB each) have arrived, well before the twelfth.
        var arrived = 0
        for _ in 0..<3000 where arrived < 3 {
            arrived = (try? FileManager.default.contentsOfDirectory(atPath: cache + "/packs").filter { !$0.hasPrefix(".") }.count) ?? 0
            usleep(5_000)
        }
        kill(child.processIdentifier, SIGKILL)
        child.waitUntilExit()
        #expect(arrived >= 3 && arrived < 12, "packs before the kill: \(arrived)")
        let target = try store.target(address, cache: scratch.file("reader-cache"))
        #expect(try target.visiblePoints("db").isEmpty, "a point is visible only once all its chunks are there")

        let resumed = try CLI.run(args)
        #expect(resumed.status == 0, "\(resumed.stderr)")
        let result = try JSONDecoder.lifeboat.decode(SyncResult.self, from: Data(resumed.stdout.utf8))
        let there = try target.loadPackIndexes().count
        #expect(result.points == ["db/\(point.id)"])
        #expect(result.chunks <= 96 - 8 * arrived, "resumed sync sent \(result.chunks) of 96 chunks after \(arrived) packs had arrived")
        #expect(there >= 96)
        let remote = try Repository.open(remote: target)
        #expect(try remote.verify().isClean)
        _ = try remote.restore(try remote.point("db", point.id), disk: "disk", to: scratch.file("out"))
        #expect(Disk.contents(scratch.file("out")) == Disk.contents(disk))
    }

    @Test("an encrypted repository's chunks travel encrypted; a target made with other keys is refused in one line")
    func encryptedSync() throws {
        let store = try ObjectStore.get()
        let scratch = Scratch()
        let disk = scratch.file("disk.raw")
        let marker = Array("LIFEBOAT-PLAINTEXT-MARKER-".utf8)
        try Disk.make(disk, size: 8 << 20, writes: [(0, Array((0..<4000).flatMap { _ in marker }))])
        let repo = try Repository.create(at: scratch.file("repo"), password: "secret one")
        try repo.protect(Machine(name: "mail", disks: Repository.diskNames(for: [disk])))
        let point = try repo.backup("mail")
        let address = store.newAddress()
        let target = try store.target(address, cache: scratch.file("cache"))
        let result = try repo.sync(to: target)
        #expect(result.chunks > 0)
        for object in try target.client.list(prefix: target.location.prefix + "packs/") where object.key.hasSuffix(".pack") {
            let bytes = try #require(try target.client.get(object.key))
            #expect(!bytes.contains(marker), "plaintext in \(object.key)")
        }
        let remote = try Repository.open(remote: try store.target(address, cache: scratch.file("reader"))) { "secret one" }
        _ = try remote.restore(try remote.point("mail", point.id), disk: "disk", to: scratch.file("out"))
        #expect(Disk.contents(scratch.file("out")) == Disk.contents(disk))

        // A target initialised on its own has other keys.
        let other = store.newAddress()
        let made = try CLI.run(["init", "--repo", other, "--encrypt", "--cache-dir", scratch.file("other")], environment: ["LIFEBOAT_PASSWORD": "secret two"])
        #expect(made.status == 0, "\(made.stderr)")
        let refused = try CLI.run(["sync", "--repo", repo.root, "--to", other, "--cache-dir", scratch.file("other")],
                                  environment: ["LIFEBOAT_PASSWORD": "secret one"])
        #expect(refused.status != 0)
        #expect(refused.stderr.contains("was made with other keys"), "\(refused.stderr)")
        #expect(refused.stderr.split(separator: "\n").count == 1, "\(refused.stderr)")
    }

    @Test("an encrypted repository's manifests are sealed in the bucket: no disk path readable; a changed, swapped or rolled-back point is named")
    func sealedManifests() throws {
        let store = try ObjectStore.get()
        let scratch = Scratch()
        let disk = scratch.file("secret-disk-name.raw")
        try Disk.make(disk, size: 4 << 20, writes: [(0, Bytes.random(4 << 20, seed: 71))])
        let repo = try Repository.create(at: scratch.file("repo"), password: "pw")
        try repo.protect(Machine(name: "hr", disks: Repository.diskNames(for: [disk])))
        var points: [RecoveryPoint] = []
        for round in 0..<4 {
            Disk.patch(disk, writes: [(round << 20, Bytes.random(4096, seed: UInt64(72 + round)))])
            points.append(try repo.backup("hr", now: Date().addingTimeInterval(Double(round))))
        }
        let address = store.newAddress()
        let target = try store.target(address, cache: scratch.file("cache"))
        _ = try repo.sync(to: target)
        let client = target.client
        let prefix = target.location.prefix
        func key(_ point: RecoveryPoint, _ file: String = "point.json") -> String { prefix + "machines/hr/points/\(point.id)/\(file)" }
        for object in try client.list(prefix: prefix + "machines/") {
            let bytes = try #require(try client.get(object.key))
            #expect(!bytes.contains(Array("secret-disk-name".utf8)), "\(object.key) is readable")
            #expect(!bytes.contains(Array(points[0].id.utf8)), "\(object.key) is readable")
        }
        func open() throws -> (Repository, [String]) {
            let remote = try Repository.open(remote: try store.target(address, cache: scratch.file("reader-\(UInt32.random(in: 0...UInt32.max))"))) { "pw" }
            return (remote, try remote.verify().damagedPoints)
        }
        let (clean, none) = try open()
        let count = try clean.points("hr").count
        #expect(none.isEmpty && count == 4)

        // Changed: one byte of point 1's manifest.
        var changed = try #require(try client.get(key(points[1])))
        changed[changed.count / 2] ^= 1
        try client.put(key(points[1]), changed)
        var (remote, problems) = try open()
        #expect(problems.contains { $0.contains(points[1].id) && $0.contains("altered") }, "\(problems)")
        #expect(try remote.points("hr").map(\.id) == [points[0].id, points[2].id, points[3].id])

        // Swapped: point 3's manifest under point 2's name.
        try client.put(key(points[2]), try #require(try client.get(key(points[3]))))
        (_, problems) = try open()
        #expect(problems.contains { $0.contains(points[2].id) && $0.contains("altered") }, "\(problems)")

        // Rolled back: point 2 gone while point 3 names it as the one before.
        for object in try client.list(prefix: prefix + "machines/hr/points/\(points[2].id)/") { try client.delete(object.key) }
        (remote, problems) = try open()
        #expect(problems.contains { $0.contains("point \(points[2].id) of hr is missing") && $0.contains(points[3].id) }, "\(problems)")
        // Names the bucket gives that lifeboat will not write are left out and named.
        try client.put(prefix + "dictionaries/.hidden", [1, 2, 3])
        (_, problems) = try open()
        #expect(problems.contains { $0.contains("dictionaries/.hidden") }, "\(problems)")
        try client.delete(prefix + "dictionaries/.hidden")

        // config.json replaced by one without encryption: a host that read the bucket before refuses it.
        _ = try Repository.open(remote: try store.target(address, cache: scratch.file("pinned"))) { "pw" }
        let plain = try Repository.create(at: scratch.file("plain"))
        try client.put(prefix + "config.json", Disk.contents(plain.root + "/config.json"))
        #expect(throws: LifeboatError.self) { _ = try Repository.open(remote: try store.target(address, cache: scratch.file("pinned"))) { "pw" } }
        let forged = try CLI.run(["points", "hr", "--repo", address, "--cache-dir", scratch.file("forged")], environment: ["LIFEBOAT_PASSWORD": "pw"])
        #expect(forged.status != 0 && forged.stderr.contains("says it is not encrypted"), "\(forged.stderr)")
        try client.put(prefix + "config.json", Disk.contents(repo.root + "/config.json"))

        let cli = try CLI.run(["verify", "--repo", address, "--cache-dir", scratch.file("cli-cache")], environment: ["LIFEBOAT_PASSWORD": "pw"])
        #expect(cli.status == 3 && cli.stdout.contains("DAMAGED"), "\(cli.stdout) \(cli.stderr)")
        #expect(cli.stderr.contains("warning: point \(points[2].id) of hr is missing"), "\(cli.stderr)")
    }

    @Test("replicate --sync-to copies each point off-site; status, status --check and the metrics show the off-site RPO")
    func offsiteRPO() throws {
        let store = try ObjectStore.get()
        let scratch = Scratch()
        let disk = scratch.file("disk.raw")
        try Disk.make(disk, size: 8 << 20, writes: [(0, Bytes.random(8 << 20, seed: 81))])
        let repo = scratch.file("repo")
        let address = store.newAddress()
        let environment = ["LIFEBOAT_REPO": repo, "LIFEBOAT_HOT": scratch.file("hot"), "LIFEBOAT_CACHE": scratch.file("cache")]
        func lifeboat(_ arguments: [String]) throws -> CLI.Result { try CLI.run(arguments, environment: environment) }
        #expect(try lifeboat(["init"]).status == 0)
        #expect(try lifeboat(["protect", "files", "--disk", disk, "--rpo", "1h"]).status == 0)
        let port = 9900 + Int(getpid() % 90)
        let service = CLI.start(["replicate", "--sync-to", address, "--metrics", "127.0.0.1:\(port)"], environment: environment)
        defer { if service.isRunning { kill(service.processIdentifier, SIGKILL) } }
        var metrics = ""
        for _ in 0..<120 where !metrics.contains("lifeboat_offsite_rpo_compliant{machine=\"files\"} 1") {
            Thread.sleep(forTimeInterval: 0.5)
            metrics = (try? sh(["curl", "-fsS", "http://127.0.0.1:\(port)/metrics"])) ?? ""
        }
        kill(service.processIdentifier, SIGTERM)
        service.waitUntilExit()
        #expect(metrics.contains("lifeboat_offsite_rpo_compliant{machine=\"files\"} 1"), "\(metrics)")
        #expect(metrics.contains("lifeboat_offsite_last_point_timestamp_seconds{machine=\"files\"}"))

        let check = try lifeboat(["status", "--check", "--json"])
        #expect(check.status == 0, "\(check.stdout)")
        let statuses = try #require(try JSONSerialization.jsonObject(with: Data(check.stdout.utf8)) as? [[String: Any]])
        #expect(statuses.first?["offsiteTarget"] as? String == address + "/")
        #expect(statuses.first?["offsiteCompliant"] as? Bool == true)
        let status = try lifeboat(["status"])
        #expect(status.stdout.contains("files: off-site at \(address)/: newest point"), "\(status.stdout)")

        // A local point newer than the RPO, none off-site: the off-site RPO is breached, and said.
        #expect(try lifeboat(["configure", "files", "--rpo", "2s"]).status == 0)
        Thread.sleep(forTimeInterval: 3)
        #expect(try lifeboat(["backup", "files"]).status == 0)
        let breached = try lifeboat(["status", "--check"])
        #expect(breached.status == 1)
        #expect(breached.stdout.contains("files: off-site RPO 2s breached at \(address)/"), "\(breached.stdout)")
        #expect(!breached.stdout.contains("files: RPO"), "the local RPO holds: \(breached.stdout)")
    }

    @Test("with --object-lock the store refuses to delete a locked version of a point's pack and manifest")
    func objectLock() throws {
        let store = try ObjectStore.get()
        let scratch = Scratch()
        let disk = scratch.file("disk.raw")
        try Disk.make(disk, size: 4 << 20, writes: [(0, Bytes.random(4 << 20, seed: 51))])
        let repo = try Repository.create(at: scratch.file("repo"))
        try repo.protect(Machine(name: "fs", disks: Repository.diskNames(for: [disk])))
        let point = try repo.backup("fs")
        let address = store.newAddress()
        let synced = try CLI.run(["sync", "--repo", repo.root, "--to", address, "--object-lock", "1", "--cache-dir", scratch.file("cache")])
        #expect(synced.status == 0, "\(synced.stderr)")
        let target = try store.target(address, cache: scratch.file("cache"))
        let pack = try #require(try target.client.list(prefix: target.location.prefix + "packs/").first { $0.key.hasSuffix(".pack") })
        let manifest = target.location.prefix + "machines/fs/points/\(point.id)/point.json"
        for key in [pack.key, manifest] {
            let version = try #require(try target.client.versions(of: key).first, "\(key) has a version")
            #expect(throws: LifeboatError.self, "deleting locked \(key)") { try target.client.delete(key, version: version) }
            #expect(try target.client.get(key) != nil, "\(key) is still there")
        }
        let remote = try Repository.open(remote: try store.target(address, cache: scratch.file("reader")))
        #expect(try remote.verify().isClean)
    }

    @Test("prune and gc at the target: points go with a note readers trust, unused packs go; under Object Lock both keep what is locked")
    func pruneAndGCAtTarget() throws {
        let store = try ObjectStore.get()
        let scratch = Scratch()
        let disk = scratch.file("disk.raw")
        try Disk.make(disk, size: 8 << 20, writes: [(0, Bytes.random(8 << 20, seed: 91))])
        let repo = try Repository.create(at: scratch.file("repo"), password: "pw")
        try repo.protect(Machine(name: "app", disks: Repository.diskNames(for: [disk])))
        let address = store.newAddress(), locked = store.newAddress()
        var points: [RecoveryPoint] = []
        for round in 0..<3 {
            Disk.patch(disk, writes: [(0, Bytes.random(4 << 20, seed: UInt64(200 + 10 * round)))])   // 4 new chunks each
            points.append(try repo.backup("app", now: Date().addingTimeInterval(Double(round))))
            _ = try repo.sync(to: try store.target(address, cache: scratch.file("cache")))
            _ = try repo.sync(to: try store.target(locked, cache: scratch.file("locked-cache")), objectLockDays: 1)
        }
        let env = ["LIFEBOAT_PASSWORD": "pw", "LIFEBOAT_OFFSITE_GC_GRACE": "0"]
        // A reader that saw all three points before the prune.
        let before = try Repository.open(remote: try store.target(address, cache: scratch.file("reader"))) { "pw" }
        #expect(try before.points("app").count == 3)

        let pruned = try CLI.run(["prune", "app", "--keep-last", "1", "--repo", address, "--cache-dir", scratch.file("admin"), "--json"], environment: env)
        #expect(pruned.status == 0, "\(pruned.stderr)")
        let result = try JSONDecoder.lifeboat.decode(PruneResult.self, from: Data(pruned.stdout.utf8))
        #expect(Set(result.removed) == Set(points.prefix(2).map(\.id)))
        let gc = try CLI.run(["gc", "--repo", address, "--cache-dir", scratch.file("admin"), "--json"], environment: env)
        #expect(gc.status == 0, "\(gc.stderr)")
        let collected = try JSONDecoder.lifeboat.decode(GCResult.self, from: Data(gc.stdout.utf8))
        #expect(collected.removed == 4, "the pack of the second point: the first point's pack holds chunks the third uses: \(collected)")
        #expect(collected.bytesFreed > 4 << 20)
        for cache in ["reader", "fresh"] {
            let remote = try Repository.open(remote: try store.target(address, cache: scratch.file(cache))) { "pw" }
            #expect(try remote.points("app").map(\.id) == [points[2].id])
            #expect(try remote.verify().isClean, "pruned on purpose is no roll-back: \(remote.remote!.problems)")
            _ = try remote.restore(try remote.point("app", nil), disk: "disk", to: scratch.file("out-" + cache))
            #expect(Disk.contents(scratch.file("out-" + cache)) == Disk.contents(disk))
        }

        let lockedPrune = try CLI.run(["prune", "app", "--keep-last", "1", "--repo", locked, "--cache-dir", scratch.file("admin2"), "--json"], environment: env)
        #expect(lockedPrune.status == 0, "\(lockedPrune.stderr)")
        let lockedResult = try JSONDecoder.lifeboat.decode(PruneResult.self, from: Data(lockedPrune.stdout.utf8))
        #expect(lockedResult.removed.isEmpty)
        #expect(lockedResult.kept.filter { $0.reasons.contains("under Object Lock in the bucket") }.count == 2, "\(lockedResult)")
        let stillThere = try Repository.open(remote: try store.target(locked, cache: scratch.file("locked-reader"))) { "pw" }
        #expect(try stillThere.points("app").count == 3)
        #expect(try stillThere.verify().isClean)
    }

    @Test("the endpoint going away mid-sync: one line once the retries run out; the next sync sends only what had not arrived")
    func endpointDownMidSync() throws {
        let store = try ObjectStore.get()
        let scratch = Scratch()
        let disk = scratch.file("disk.raw")
        try Disk.make(disk, size: 64 << 20, writes: [(0, Bytes.random(64 << 20, seed: 301))])
        let repo = try Repository.create(at: scratch.file("repo"))
        try repo.protect(Machine(name: "erp", disks: Repository.diskNames(for: [disk])))
        let point = try repo.backup("erp")
        let address = store.newAddress()
        let cache = scratch.file("cache")
        let args = ["sync", "--repo", repo.root, "--to", address, "--cache-dir", cache, "--pack-size", "\(4 << 20)", "--json"]
        var arrived = 0
        try SpareGateway.exclusively {
            let child = CLI.start(args + ["--bandwidth", "8"],
                                  environment: ["LIFEBOAT_S3_RETRY_SECONDS": "3", "LIFEBOAT_S3_ENDPOINT": SpareGateway.endpoint])
            for _ in 0..<3000 where arrived < 2 {
                arrived = (try? FileManager.default.contentsOfDirectory(atPath: cache + "/packs").filter { !$0.hasPrefix(".") }.count) ?? 0
                usleep(5_000)
            }
            try SpareGateway.stop()
            child.waitUntilExit()
            let stderr = String(decoding: (child.standardError as! Pipe).fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            #expect(child.terminationStatus != 0)
            #expect(stderr.contains("cannot be reached") && stderr.split(separator: "\n").count == 1, "\(stderr)")
        }
        arrived = try FileManager.default.contentsOfDirectory(atPath: cache + "/packs").filter { !$0.hasPrefix(".") }.count
        #expect(arrived >= 2 && arrived < 16, "packs before the endpoint went: \(arrived)")

        let resumed = try CLI.run(args)
        #expect(resumed.status == 0, "\(resumed.stderr)")
        let result = try JSONDecoder.lifeboat.decode(SyncResult.self, from: Data(resumed.stdout.utf8))
        #expect(result.chunks <= 64 - 4 * arrived, "sent \(result.chunks) of 64 chunks after \(arrived) packs had arrived")
        let remote = try Repository.open(remote: try store.target(address, cache: scratch.file("reader")))
        #expect(try remote.verify().isClean)
        _ = try remote.restore(try remote.point("erp", point.id), disk: "disk", to: scratch.file("out"))
        #expect(Disk.contents(scratch.file("out")) == Disk.contents(disk))
    }

    @Test("a disk served from the bucket: right bytes through a small evicting cache; a second mount starts warm; the endpoint gone longer than the retries: EIO and status says why, then reads again")
    func mountFromBucket() throws {
        let store = try ObjectStore.get()
        let scratch = Scratch()
        let disk = scratch.file("disk.raw")
        let size = 48 << 20
        try Disk.make(disk, size: size, writes: [(0, Bytes.random(size, seed: 321))])
        let repo = try Repository.create(at: scratch.file("repo"))
        try repo.protect(Machine(name: "nas", disks: Repository.diskNames(for: [disk])))
        _ = try repo.backup("nas")
        let address = store.newAddress()
        _ = try repo.sync(to: try store.target(address, cache: scratch.file("site-a-cache")))
        let expected = Disk.contents(disk)
        let cache = scratch.file("cache")
        let mountpoint = scratch.file("mnt")
        try FileManager.default.createDirectory(atPath: mountpoint, withIntermediateDirectories: true)
        let served = mountpoint + "/nas/latest/disk.raw"
        func mount(_ extra: [String] = []) throws {
            let result = try CLI.run(["mount", mountpoint, "--repo", address, "--cache-dir", cache] + extra,
                                     environment: ["LIFEBOAT_S3_ENDPOINT": SpareGateway.endpoint, "LIFEBOAT_S3_RETRY_SECONDS": "2"])
            #expect(result.status == 0, "\(result.stderr)")
        }
        func unmount() { _ = try? CLI.run(["unmount", mountpoint]) }
        defer { unmount() }
        func cached() -> Int {
            ((try? FileManager.default.contentsOfDirectory(atPath: cache + "/chunks")) ?? []).reduce(0) { total, name in
                total + ((try? FileManager.default.attributesOfItem(atPath: cache + "/chunks/" + name)[.size] as? Int) ?? 0)
            }
        }
        func read(_ range: Range<Int>) throws -> [UInt8] {
            let handle = try FileHandle(forReadingFrom: URL(fileURLWithPath: served))
            defer { try? handle.close() }
            try handle.seek(toOffset: UInt64(range.lowerBound))
            return Array(try handle.read(upToCount: range.count) ?? Data())
        }
        try SpareGateway.exclusively {
            // 16 MiB of cache for a 48 MiB disk: what is read is right while chunks come and go.
            try mount(["--s3-cache-size", "\(16 << 20)"])
            #expect(try read(0..<size) == expected)
            #expect(cached() <= (16 << 20) + (1 << 20), "the cache folder keeps to its bound: \(cached())")
            unmount()

            // Warm: what the cache holds is read with the endpoint gone.
            try mount()
            #expect(try read(0..<size) == expected)
            unmount()
            try SpareGateway.stop()
            try mount()
            #expect(try read(0..<size) == expected, "a warm cache serves every byte without the endpoint")
            unmount()

            // Cold, the endpoint gone longer than the retries: an I/O error, never a wrong byte; status says why.
            try FileManager.default.removeItem(atPath: cache + "/chunks")
            try mount()
            #expect(throws: (any Error).self) { _ = try read(0..<(1 << 20)) }
            let status = try CLI.run(["status", "--repo", address, "--cache-dir", cache, "--json"],
                                     environment: ["LIFEBOAT_HOT": scratch.file("hot")])
            #expect(status.stdout.contains("are failing since"), "\(status.stdout) \(status.stderr)")
            try SpareGateway.start()
            #expect(try read(0..<(1 << 20)) == Array(expected[0..<(1 << 20)]), "reads again once the endpoint is back")
            let after = try CLI.run(["status", "--repo", address, "--cache-dir", cache, "--json"], environment: ["LIFEBOAT_HOT": scratch.file("hot")])
            #expect(!after.stdout.contains("are failing since"), "\(after.stdout)")
        }
    }

    @Test("reads from the bucket: a frame costs one range GET of that frame; read-ahead and restore fetch neighbouring chunks together, in pack order")
    func rangeReads() throws {
        let store = try ObjectStore.get()
        let scratch = Scratch()
        let disk = scratch.file("disk.raw")
        let size = 48 << 20
        try Disk.make(disk, size: size, writes: [(0, Bytes.random(size, seed: 0x4321))])
        let expected = Disk.contents(disk)
        let repo = try Repository.create(at: scratch.file("repo"), password: "pw")
        try repo.protect(Machine(name: "arc", disks: Repository.diskNames(for: [disk])))
        let point = try repo.backup("arc")
        let address = store.newAddress()
        _ = try repo.sync(to: try store.target(address, cache: scratch.file("site-a-cache")))
        let remote = try Repository.open(remote: try store.target(address, cache: scratch.file("cache"))) { "pw" }
        let client = try #require(remote.remote).client
        let served = try remote.point("arc", point.id)
        let ids = try remote.index(served, disk: "disk").ids
        let layouts = remote.storedLayouts(served, disk: "disk")
        #expect(layouts.count == 48, "DISK.layouts came with the manifests")
        func frame(_ k: Int, ofChunk i: Int) throws -> [UInt8] {
            try [UInt8](filling: 64 << 10) { try remote.readFrame(k, of: ids[i], layout: layouts[ids[i]], into: $0, references: nil).length }
        }
        func gets(_ body: () throws -> Void) rethrows -> (gets: Int, bytes: Int) {
            let before = client.requestCounts
            try body()
            let after = client.requestCounts
            return (after.gets - before.gets, after.bytesReceived - before.bytesReceived)
        }
        // A cold 4 KiB read needs one frame: one GET of about 64 KiB, not of the 1 MiB chunk.
        var read: [UInt8] = []
        let cold = try gets { read = try frame(5, ofChunk: 7) }
        #expect(read == Array(expected[((7 << 20) + 5 * 65536)..<((7 << 20) + 6 * 65536)]))
        #expect(cold.gets == 1 && cold.bytes < 80 << 10, "\(cold)")
        #expect(try gets { _ = try frame(5, ofChunk: 7) }.gets == 0, "kept in the cache folder")
        // Read-ahead of 32 chunks: a few GETs of neighbours (16 MiB at most each), kept whole.
        let ahead = gets { remote.fetchAhead(Array(ids[8..<40])) }
        #expect(ahead.gets <= 3 && ahead.bytes >= 32 << 20, "\(ahead)")
        #expect(try gets { read = try frame(3, ofChunk: 20) }.gets == 0, "read ahead whole")
        #expect(read == Array(expected[((20 << 20) + 3 * 65536)..<((20 << 20) + 4 * 65536)]))
        // A cached chunk left wrong (same length: the cache is written without fsync) is dropped
        // and fetched again: the right bytes, never an error or a wrong byte.
        let cachedChunk = scratch.file("cache") + "/chunks/" + ids[21].hex
        var garbage = Disk.contents(cachedChunk)
        #expect(garbage.count > 4096)
        for i in stride(from: 0, to: garbage.count, by: 512) { garbage[i] ^= 0x5a }
        try Data(garbage).write(to: URL(fileURLWithPath: cachedChunk))
        let refetched = try gets { read = try frame(2, ofChunk: 21) }
        #expect(read == Array(expected[((21 << 20) + 2 * 65536)..<((21 << 20) + 3 * 65536)]))
        #expect(refetched.gets == 1, "\(refetched)")
        // A restore (what finalisation runs) takes what is cached from there and the rest in
        // pack order, neighbours together: 16 chunks left to fetch, in 2 runs.
        let restore = try gets { _ = try remote.restore(served, disk: "disk", to: scratch.file("out")) }
        #expect(Disk.contents(scratch.file("out")) == expected)
        #expect(restore.gets <= 4 && restore.bytes < 17 << 20, "\(restore)")
    }

    @Test("sync from the bucket into a local repository: its points there, manifests sealed, byte-identical; again: nothing; a later point: only its new chunks")
    func syncDown() throws {
        let store = try ObjectStore.get()
        let scratch = Scratch()
        let disk = scratch.file("erp-payroll.raw")
        try Disk.make(disk, size: 24 << 20, writes: [(0, Bytes.random(12 << 20, seed: 0x5101))])
        let repo = try Repository.create(at: scratch.file("site-a"), password: "pw")
        try repo.protect(Machine(name: "erp", disks: Repository.diskNames(for: [disk])))
        let first = try repo.backup("erp")
        Disk.patch(disk, writes: [(3 << 20, Bytes.random(1 << 20, seed: 0x5102))])
        let second = try repo.backup("erp")
        _ = try repo.prune("erp", policy: RetentionPolicy(last: 1))   // the bucket gets the second alone
        let address = store.newAddress()
        _ = try repo.sync(to: try store.target(address, cache: scratch.file("a-cache")))
        let bucket = try Repository.open(remote: try store.target(address, cache: scratch.file("b-cache"))) { "pw" }

        let local = scratch.file("site-b")
        let copied = try bucket.sync(toLocal: local)
        #expect(copied.points == ["erp/\(second.id)"] && copied.chunks == 12, "\(copied)")
        #expect(copied.requests.gets <= 3, "neighbours in one range GET each: \(copied.requests)")
        let siteB = try Repository.open(at: local) { "pw" }
        #expect(siteB.sealsManifests && siteB.config.id == repo.config.id)
        #expect(try siteB.points("erp").map(\.id) == [second.id])
        let point = Disk.contents(local + "/machines/erp/points/\(second.id)/point.json")
        #expect(!point.isEmpty && !point.windows(ofCount: 7).contains { $0.elementsEqual(Array("payroll".utf8)) }, "sealed at site B too")
        _ = try siteB.restore(try siteB.point("erp", second.id), disk: "erp-payroll", to: scratch.file("out.raw"))
        #expect(Disk.contents(scratch.file("out.raw")) == Disk.contents(disk))
        #expect(try siteB.verify().isClean, "the point before it, pruned in the bucket, is not taken for a roll-back")

        // Again, from the command line: nothing to copy.
        let again = try CLI.run(["sync", "--repo", address, "--cache-dir", scratch.file("b-cache"), "--to", local, "--json"],
                                environment: ["LIFEBOAT_PASSWORD": "pw"])
        #expect(again.status == 0, "\(again.stderr)")
        let answer = (try? JSONSerialization.jsonObject(with: Data(again.stdout.utf8))) as? [String: Any] ?? [:]
        #expect((answer["points"] as? [String])?.isEmpty == true && answer["chunks"] as? Int == 0 && answer["pointsAlreadyThere"] as? Int == 1, "\(again.stdout)")
        Disk.patch(disk, writes: [(5 << 20, Bytes.random(1 << 20, seed: 0x5130))])
        let third = try repo.backup("erp")
        _ = try repo.sync(to: try store.target(address, cache: scratch.file("a-cache")))
        let later = try Repository.open(remote: try store.target(address, cache: scratch.file("b-cache"))) { "pw" }.sync(toLocal: local)
        #expect(later.points == ["erp/\(third.id)"], "\(later)")
        #expect(later.chunks == 1, "\(later)")
        _ = try siteB.restore(try siteB.point("erp", third.id), disk: "erp-payroll", to: scratch.file("out3.raw"))
        #expect(Disk.contents(scratch.file("out3.raw")) == Disk.contents(disk))
        _ = first
        // What site B pruned stays pruned: the next copy does not bring it back.
        #expect(try siteB.prune("erp", policy: RetentionPolicy(last: 1)).removed == [second.id])
        let afterPrune = try Repository.open(remote: try store.target(address, cache: scratch.file("b-cache"))) { "pw" }.sync(toLocal: local)
        #expect(afterPrune.points.isEmpty && afterPrune.chunks == 0 && afterPrune.pointsAlreadyThere == 2, "\(afterPrune)")
        #expect(try siteB.points("erp").map(\.id) == [third.id])
        #expect(try siteB.verify().isClean)

        // Another repository's folder is refused in one line; so is a local target from a local repository.
        let other = try Repository.create(at: scratch.file("other"), password: "pw")
        _ = other
        #expect(throws: LifeboatError.self) { _ = try bucket.sync(toLocal: scratch.file("other")) }
        let refused = try CLI.run(["sync", "--repo", scratch.file("site-a"), "--to", scratch.file("elsewhere")], environment: ["LIFEBOAT_PASSWORD": "pw"])
        #expect(refused.status != 0 && refused.stderr.contains("--to must be an s3://"), "\(refused.stderr)")
    }

    @Test("a wrong clock and a full bucket: one line each")
    func clockAndQuota() throws {
        let store = try ObjectStore.get()
        let scratch = Scratch()
        let disk = scratch.file("disk.raw")
        try Disk.make(disk, size: 8 << 20, writes: [(0, Bytes.random(8 << 20, seed: 311))])
        let repo = try Repository.create(at: scratch.file("repo"))
        try repo.protect(Machine(name: "crm", disks: Repository.diskNames(for: [disk])))
        _ = try repo.backup("crm")
        let skewed = try CLI.run(["sync", "--repo", repo.root, "--to", store.newAddress(), "--cache-dir", scratch.file("c1")],
                                 environment: ["LIFEBOAT_S3_CLOCK_OFFSET": "-3600"])
        #expect(skewed.status != 0)
        #expect(skewed.stderr.contains("RequestTimeTooSkewed") && skewed.stderr.split(separator: "\n").count == 1, "\(skewed.stderr)")

        let bucket = "quota-\(UInt32.random(in: 0...UInt32.max))"
        try S3Client(settings: store.settings, bucket: bucket).createBucket(objectLock: false)
        let conf = ProcessInfo.processInfo.environment["LIFEBOAT_CEPH_CONF"] ?? "/var/tmp/lifeboat-ceph/ceph.conf"
        try sh(["radosgw-admin", "-c", conf, "quota", "set", "--quota-scope=bucket", "--bucket=\(bucket)", "--max-size=1048576"])
        try sh(["radosgw-admin", "-c", conf, "quota", "enable", "--quota-scope=bucket", "--bucket=\(bucket)"])
        let full = try CLI.run(["sync", "--repo", repo.root, "--to", "s3://\(bucket)/x", "--cache-dir", scratch.file("c2")])
        #expect(full.status != 0)
        #expect(full.stderr.contains("full") && full.stderr.split(separator: "\n").count == 1, "\(full.stderr)")

        // A key that may only read: sync is refused in one line, nothing lost; reading works (all site B needs).
        let address = store.newAddress()
        let point = try repo.backup("crm")
        _ = try repo.sync(to: try store.target(address, cache: scratch.file("c3")))
        let subuser = "lifeboat:ro\(UInt32.random(in: 0...UInt32.max))"
        let made = try sh(["radosgw-admin", "-c", conf, "subuser", "create", "--uid=lifeboat", "--subuser=\(subuser)", "--access=read",
                           "--key-type=s3", "--gen-access-key", "--gen-secret"])
        defer { _ = try? sh(["radosgw-admin", "-c", conf, "subuser", "rm", "--subuser=\(subuser)", "--purge-keys"]) }
        let keys = ((try? JSONSerialization.jsonObject(with: Data(made.utf8)) as? [String: Any])?["keys"] as? [[String: Any]] ?? [])
            .first { $0["user"] as? String == subuser }
        let readOnly = ["AWS_ACCESS_KEY_ID": keys?["access_key"] as? String ?? "", "AWS_SECRET_ACCESS_KEY": keys?["secret_key"] as? String ?? ""]
        Disk.patch(disk, writes: [(0, Bytes.random(1 << 20, seed: 0x3140))])
        let later = try repo.backup("crm")
        let refused = try CLI.run(["sync", "--repo", repo.root, "--to", address, "--cache-dir", scratch.file("c4")], environment: readOnly)
        #expect(refused.status != 0 && refused.stderr.contains("AccessDenied") && refused.stderr.split(separator: "\n").count == 1,
                "\(refused.stderr)")
        let listed = try CLI.run(["points", "crm", "--repo", address, "--cache-dir", scratch.file("c5")], environment: readOnly)
        #expect(listed.status == 0 && listed.stdout.contains(point.id) && !listed.stdout.contains(later.id), "\(listed.stdout) \(listed.stderr)")
    }

    @Test("objects larger than the multipart threshold go up in parts, under Object Lock too, and read back whole")
    func multipartUpload() throws {
        let store = try ObjectStore.get()
        let scratch = Scratch()
        let disk = scratch.file("disk.raw")
        try Disk.make(disk, size: 24 << 20, writes: [(0, Bytes.random(24 << 20, seed: 331))])
        let repo = try Repository.create(at: scratch.file("repo"))
        try repo.protect(Machine(name: "big", disks: Repository.diskNames(for: [disk])))
        let point = try repo.backup("big")
        let address = store.newAddress()
        // Packs of 12 MiB, sent in parts of 5 MiB once larger than 4 MiB.
        let synced = try CLI.run(["sync", "--repo", repo.root, "--to", address, "--cache-dir", scratch.file("cache"), "--pack-size", "\(12 << 20)",
                                  "--object-lock", "1", "--json"],
                                 environment: ["LIFEBOAT_S3_MULTIPART_THRESHOLD": "\(4 << 20)", "LIFEBOAT_S3_PART_SIZE": "\(5 << 20)"])
        #expect(synced.status == 0, "\(synced.stderr)")
        let result = try JSONDecoder.lifeboat.decode(SyncResult.self, from: Data(synced.stdout.utf8))
        #expect(result.packs == 2)
        // Each pack: start, 3 parts, complete; its index in one PUT; config, machine, 3 point files.
        #expect(result.requests.puts == 2 * (1 + 3 + 1) + 2 + 2 + 3, "\(result.requests)")
        let remote = try Repository.open(remote: try store.target(address, cache: scratch.file("reader")))
        #expect(try remote.verify().isClean)
        _ = try remote.restore(try remote.point("big", point.id), disk: "disk", to: scratch.file("out"))
        #expect(Disk.contents(scratch.file("out")) == Disk.contents(disk))
    }

    @Test("wrong keys, a missing bucket and an endpoint that is down: one line each, nothing sent")
    func badTargets() throws {
        let store = try ObjectStore.get()
        let scratch = Scratch()
        let disk = scratch.file("disk.raw")
        try Disk.make(disk, size: 1 << 20, writes: [(0, Bytes.random(1 << 20, seed: 61))])
        let repo = try Repository.create(at: scratch.file("repo"))
        try repo.protect(Machine(name: "one", disks: Repository.diskNames(for: [disk])))
        _ = try repo.backup("one")
        let cases: [(String, [String: String], String)] = [
            (store.newAddress(), ["AWS_SECRET_ACCESS_KEY": "wrong"], "refused the credentials"),
            ("s3://no-such-bucket-\(UInt32.random(in: 0...UInt32.max))/x", [:], "does not exist"),
            (store.newAddress(), ["LIFEBOAT_S3_ENDPOINT": "http://127.0.0.1:9", "LIFEBOAT_S3_RETRY_SECONDS": "1"], "cannot be reached"),
        ]
        for (address, environment, expected) in cases {
            let result = try CLI.run(["sync", "--repo", repo.root, "--to", address, "--cache-dir", scratch.file("cache")], environment: environment)
            #expect(result.status != 0)
            #expect(result.stderr.contains(expected), "\(result.stderr)")
            #expect(result.stderr.split(separator: "\n").count == 1, "\(result.stderr)")
        }
    }
}

extension Array where Element == UInt8 {
    func contains(_ needle: [UInt8]) -> Bool {
        Data(self).range(of: Data(needle)) != nil
    }
}
