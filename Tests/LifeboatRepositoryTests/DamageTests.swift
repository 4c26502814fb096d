import Foundation
import LifeboatBase
import Testing
@testable import LifeboatRepository
import LifeboatTestSupport
#if canImport(Glibc)
import Glibc
#endif

/// A repository with one machine and two points whose disks share most chunks.
struct TwoPoints {
    let scratch = Scratch()
    let repo: Repository
    let first: RecoveryPoint
    let second: RecoveryPoint
    let disk: String

    init(encrypted: Bool = false) throws {
        disk = scratch.file("disk.raw")
        try Disk.make(disk, size: 8 << 20, writes: [(0, Bytes.random(4 << 20, seed: 1)), (6 << 20, Bytes.text(1 << 20, seed: 2))])
        repo = try Repository.create(at: scratch.file("repo"), password: encrypted ? "pw" : nil)
        try repo.protect(Machine(name: "app", disks: Repository.diskNames(for: [disk])))
        first = try repo.backup("app")
        Disk.patch(disk, writes: [(1 << 20, Bytes.random(300_000, seed: 3))])
        second = try repo.backup("app")
    }

    func flipByte(inChunkAt offset: Int, of point: RecoveryPoint) throws -> ChunkID {
        let id = try repo.index(point, disk: "disk").ids[offset / repo.config.chunkSize]
        let path = (repo.store as! LocalChunkStore).path(id)
        let fd = open(path, O_RDWR)
        defer { close(fd) }
        var byte: UInt8 = 0
        pread(fd, &byte, 1, 100)
        byte ^= 0x40
        pwrite(fd, &byte, 1, 100)
        return id
    }
}

@Suite("Damage, verify, prune, gc")
struct DamageTests {
    @Test("verify finds a flipped byte and names the chunk with every point and offset using it", arguments: [false, true])
    func verifyFindsFlippedByte(encrypted: Bool) throws {
        let fixture = try TwoPoints(encrypted: encrypted)
        #expect(try fixture.repo.verify().isClean)
        let id = try fixture.flipByte(inChunkAt: 3 << 20, of: fixture.second)
        let report = try fixture.repo.verify()
        #expect(!report.isClean)
        #expect(report.damagedChunks.map(\.id) == [id.hex])
        let uses = report.damagedChunks[0].usages.map { "\($0.point)@\($0.offset)" }.sorted()
        #expect(uses == ["\(fixture.first.id)@\(3 << 20)", "\(fixture.second.id)@\(3 << 20)"].sorted())
        // The CLI exits non-zero and prints the chunk.
        let result = try CLI.run(["verify", "--repo", fixture.repo.root], environment: ["LIFEBOAT_PASSWORD": "pw"])
        #expect(result.status != 0)
        #expect(result.stdout.contains(id.hex))
    }

    @Test("restore of a damaged chunk fails naming chunk and offset, and leaves no partial file")
    func restoreDamagedChunk() throws {
        let fixture = try TwoPoints()
        let id = try fixture.flipByte(inChunkAt: 2 << 20, of: fixture.first)
        let target = fixture.scratch.file("out.raw")
        do {
            _ = try fixture.repo.restore(fixture.first, disk: "disk", to: target)
            Issue.record("restore of a damaged chunk succeeded")
        } catch let error as LifeboatError {
            #expect(error.code == .damaged)
            #expect(error.message.contains(id.hex))
            #expect(error.message.contains("offset \(2 << 20)"))
        }
        #expect(!FileSystem.exists(target))
        #expect(try FileSystem.list(fixture.scratch.path).filter { $0.hasPrefix(".tmp-") }.isEmpty)
    }

    @Test("a damaged index is named on restore")
    func damagedIndex() throws {
        let fixture = try TwoPoints()
        let path = fixture.repo.indexPath("app", fixture.second.id, disk: "disk")
        Disk.patch(path, writes: [(40, [0xff])])
        #expect {
            _ = try fixture.repo.restore(fixture.second, disk: "disk", to: fixture.scratch.file("x.raw"))
        } throws: { error in
            (error as? LifeboatError)?.message.contains("index \(path) is damaged") == true
        }
        #expect(!(try fixture.repo.verify().isClean))
    }

    @Test("gc removes exactly the unreferenced chunks")
    func gcRemovesUnreferenced() throws {
        let fixture = try TwoPoints()
        let before = try fixture.repo.store.all()
        let firstIDs = Set(try fixture.repo.index(fixture.first, disk: "disk").ids.filter { !$0.isZero })
        let secondIDs = Set(try fixture.repo.index(fixture.second, disk: "disk").ids.filter { !$0.isZero })
        #expect(try fixture.repo.gc().removed == 0)
        let pruned = try fixture.repo.prune("app", policy: RetentionPolicy(last: 1))
        #expect(pruned.removed == [fixture.first.id])
        let result = try fixture.repo.gc()
        let after = try fixture.repo.store.all()
        #expect(after == secondIDs)
        #expect(before.subtracting(after) == firstIDs.subtracting(secondIDs))
        #expect(result.removed == firstIDs.subtracting(secondIDs).count)
        #expect(try fixture.repo.verify().isClean)
    }
}

@Suite("Retention rules")
struct RetentionTests {
    static let base = ISO8601DateFormatter().date(from: "2026-11-20T12:00:00Z")!

    /// Points every 6 hours over 40 days, newest first ids p0, p1, ….
    static let points: [(id: String, time: Date)] = (0..<160).map { ("p\($0)", base.addingTimeInterval(-Double($0) * 6 * 3600)) }

    @Test("each rule keeps exactly what it says", arguments: [
        (RetentionPolicy(last: 3), ["p0", "p1", "p2"]),
        (RetentionPolicy(hourly: 2), ["p0", "p1"]),
        (RetentionPolicy(daily: 3), ["p0", "p3", "p7"]),        // 12:00 today, then 18:00 of the two days before
        (RetentionPolicy(weekly: 2), ["p0", "p19"]),            // 2026-11-20 is a Friday; the ISO week before ends Sunday 15th 18:00
        (RetentionPolicy(monthly: 2), ["p0", "p79"]),           // newest of October: 2026-10-31T18:00
        (RetentionPolicy(within: 24 * 3600), ["p0", "p1", "p2", "p3"]),
        (RetentionPolicy(last: 1, daily: 2), ["p0", "p3"]),
    ])
    func rules(policy: RetentionPolicy, expected: [String]) {
        let kept = policy.keep(Self.points.reversed())  // oldest first, as the repository lists them
        #expect(Set(kept.keys) == Set(expected))
    }

    @Test("durations parse and format")
    func durations() throws {
        #expect(try DurationText.parse("90s") == 90)
        #expect(try DurationText.parse("1h30m") == 5400)
        #expect(try DurationText.parse("2w") == 1_209_600)
        #expect(throws: LifeboatError.self) { try DurationText.parse("10") }
        #expect(throws: LifeboatError.self) { try DurationText.parse("abc") }
        #expect(DurationText.format(3725) == "1h 2m")
    }

    @Test("prune without rules is refused")
    func pruneNeedsRules() throws {
        let fixture = try TwoPoints()
        #expect(throws: LifeboatError.self) { try fixture.repo.prune("app", policy: RetentionPolicy()) }
        #expect(try fixture.repo.points("app").count == 2)
    }
}

extension Repository {
    /// Every stored chunk file's path.
    func chunkFiles() throws -> [String] {
        try store.all().map { (store as! LocalChunkStore).path($0) }
    }
}
