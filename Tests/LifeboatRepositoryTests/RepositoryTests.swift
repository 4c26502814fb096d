import Foundation
import LifeboatBase
import Testing
@testable import LifeboatRepository
import LifeboatTestSupport
#if canImport(Glibc)
import Glibc
#endif

@Suite("Backup and restore")
struct BackupRestoreTests {
    /// Small chunks, so that these tests' disks hold many.
    let chunk = 256 * 1024

    @Test("sparse and dense disks round-trip byte-identical, two disks in one machine")
    func roundTrip() throws {
        let scratch = Scratch()
        let sparse = scratch.file("sparse.raw"), dense = scratch.file("dense.img")
        try Disk.make(sparse, size: 64 << 20, writes: [(0, Bytes.text(300_000, seed: 1)), (40 << 20, Bytes.random(1 << 20, seed: 2)),
                                                       ((64 << 20) - 5000, Bytes.random(5000, seed: 3))])
        try Disk.make(dense, size: 8 << 20 + 12345, writes: [(0, Bytes.random(8 << 20 + 12345, seed: 4))])
        let repo = try Repository.create(at: scratch.file("repo"))
        try repo.protect(Machine(name: "web1", disks: Repository.diskNames(for: [sparse, dense])))
        let point = try repo.backup("web1")
        #expect(point.disks.map(\.name) == ["sparse", "dense"])
        #expect(point.disks[0].dataBytes < 4 << 20, "holes are not counted as data")
        let out = scratch.file("out")
        try FileSystem.makeDirectory(out)
        for disk in point.disks {
            let result = try repo.restore(point, disk: disk.name, to: out + "/\(disk.name).raw")
            #expect(!result.inPlace)
        }
        #expect(Disk.contents(out + "/sparse.raw") == Disk.contents(sparse))
        #expect(Disk.contents(out + "/dense.raw") == Disk.contents(dense))
        var st = stat()
        stat(out + "/sparse.raw", &st)
        #expect(Int(st.st_blocks) * 512 < 8 << 20, "the restored sparse disk keeps its holes")
    }

    @Test("an unchanged second backup stores next to nothing; 1% changed stores about 1%")
    func incremental() throws {
        let scratch = Scratch()
        let disk = scratch.file("disk.raw")
        let size = 64 << 20
        try Disk.make(disk, size: size, writes: [(0, Bytes.random(size, seed: 9))])
        let repo = try Repository.create(at: scratch.file("repo"), chunkSize: chunk)
        try repo.protect(Machine(name: "db", disks: Repository.diskNames(for: [disk])))
        let first = try repo.backup("db")
        #expect(first.newBytes == size)
        let second = try repo.backup("db")
        #expect(second.newBytes == 0)
        #expect(second.storedBytes == 0)
        #expect(second.parent == first.id)
        // 1% of the disk in 64 KiB writes, one per chunk-aligned slot.
        let writes = (0..<10).map { ($0 * 24 * chunk + 4096, Bytes.random(64 << 10, seed: UInt64($0) + 77)) }
        Disk.patch(disk, writes: Array(writes))
        let third = try repo.backup("db")
        #expect(third.newBytes == writes.count * chunk)
        #expect(third.storedBytes <= writes.count * chunk + 4096)
        let out = scratch.file("third.raw")
        _ = try repo.restore(third, disk: "disk", to: out)
        #expect(Disk.contents(out) == Disk.contents(disk))
        // The first point is still there, unchanged.
        _ = try repo.restore(first, disk: "disk", to: scratch.file("first.raw"))
        #expect(Disk.contents(scratch.file("first.raw")) == Bytes.random(size, seed: 9))
    }

    @Test("machines of one repository with their own chunk sizes: each point records and uses its machine's, restores byte-identical, verifies")
    func chunkSizePerMachine() throws {
        let scratch = Scratch()
        let disk = scratch.file("disk.raw")
        let size = 16 << 20
        try Disk.make(disk, size: size, writes: [(0, Bytes.random(size / 2, seed: 31)), (size / 2, Bytes.text(size / 2, seed: 32))])
        let repo = try Repository.create(at: scratch.file("repo"))   // 1 MiB chunks
        try repo.protect(Machine(name: "big", disks: Repository.diskNames(for: [disk])))
        var small = Machine(name: "small", disks: Repository.diskNames(for: [disk]))
        small.chunkSize = 64 << 10
        try repo.protect(small)
        let a = try repo.backup("big"), b = try repo.backup("small")
        #expect(a.chunkSize == 1 << 20 && b.chunkSize == 64 << 10)
        #expect(try repo.index(b, disk: "disk").ids.count == size / (64 << 10))
        // 64 KiB written in the random half rewrites one chunk of each: 1 MiB against 64 KiB stored.
        Disk.patch(disk, writes: [(3 << 20, Bytes.random(64 << 10, seed: 33))])
        let a2 = try repo.backup("big"), b2 = try repo.backup("small")
        #expect(a2.newBytes == 1 << 20 && b2.newBytes == 64 << 10)
        for point in [a2, b2] {
            let out = scratch.file("\(point.machine).raw")
            _ = try repo.restore(point, disk: "disk", to: out)
            #expect(Disk.contents(out) == Disk.contents(disk), "\(point.machine) restores byte-identical")
        }
        #expect(try repo.verify().isClean)
        var bad = Machine(name: "bad", disks: Repository.diskNames(for: [disk]))
        bad.chunkSize = 4096   // below the frame size
        #expect(throws: LifeboatError.self) { try repo.protect(bad) }
    }

    @Test("a machine's bandwidth caps the bytes a point reads, not the chunks it takes from the previous point")
    func bandwidth() throws {
        let scratch = Scratch()
        let disk = scratch.file("disk.raw")
        try Disk.make(disk, size: 24 << 20, writes: [(0, Bytes.random(24 << 20, seed: 41))])
        let repo = try Repository.create(at: scratch.file("repo"))
        var machine = Machine(name: "capped", disks: Repository.diskNames(for: [disk]))
        machine.bandwidth = 12   // MiB/s: 24 MiB take 2 s
        try repo.protect(machine)
        let started = Date()
        let first = try repo.backup("capped")
        let took = Date().timeIntervalSince(started)
        #expect(took >= 1.8 && took < 6, "24 MiB at 12 MiB/s: \(took) s")
        #expect(first.bytesRead == 24 << 20)
        // Changed-block input: only the 1 MiB read counts against the cap, not the 23 MiB taken over.
        let index = try repo.index(first, disk: "disk")
        let capture = DiskCapture(name: "disk", origin: disk, size: 24 << 20, ranges: [(5 << 20)..<(6 << 20)], base: index) {
            FileReader(file: try PosixFile.openForReading(disk, what: "disk"), path: disk)
        }
        let again = Date()
        let second = try repo.backup("capped", captures: [capture], details: PointDetails(consistency: "consistent", readMode: "incremental"))
        #expect(second.bytesRead == 1 << 20)
        #expect(Date().timeIntervalSince(again) < 1, "1 MiB at 12 MiB/s takes under a second")
    }

    @Test("restoring onto an existing same-size disk writes only the chunks that differ")
    func restoreInPlace() throws {
        let scratch = Scratch()
        let disk = scratch.file("disk.raw")
        try Disk.make(disk, size: 16 << 20, writes: [(0, Bytes.random(16 << 20, seed: 5))])
        let repo = try Repository.create(at: scratch.file("repo"), chunkSize: chunk)
        try repo.protect(Machine(name: "m", disks: Repository.diskNames(for: [disk])))
        let point = try repo.backup("m")
        Disk.patch(disk, writes: [(100, [1, 2, 3]), (5 << 20, Bytes.random(10, seed: 6)), (12 << 20, [UInt8](repeating: 0, count: chunk))])
        let result = try repo.restore(point, disk: "disk", to: disk)
        #expect(result.inPlace)
        #expect(result.bytesWritten == 3 * chunk)
        #expect(Disk.contents(disk) == Bytes.random(16 << 20, seed: 5))
        #expect(try repo.restore(point, disk: "disk", to: disk).bytesWritten == 0)
    }

    @Test("a disk whose size changed is taken at its new size and the change is recorded")
    func sizeChange() throws {
        let scratch = Scratch()
        let disk = scratch.file("disk.raw")
        try Disk.make(disk, size: 4 << 20, writes: [(0, Bytes.random(1 << 20, seed: 1))])
        let repo = try Repository.create(at: scratch.file("repo"))
        try repo.protect(Machine(name: "m", disks: Repository.diskNames(for: [disk])))
        _ = try repo.backup("m")
        truncate(disk, 6 << 20 + 512)
        let second = try repo.backup("m")
        #expect(second.disks[0].size == 6 << 20 + 512)
        #expect(second.disks[0].previousSize == 4 << 20)
        _ = try repo.restore(second, disk: "disk", to: scratch.file("r.raw"))
        #expect(Disk.contents(scratch.file("r.raw")) == Disk.contents(disk))
    }

    @Test("a point's definition files are sealed in an encrypted repository: no plaintext, read back whole, a changed or moved file is named damaged")
    func sealedAttachments() throws {
        let scratch = Scratch()
        let repo = try Repository.create(at: scratch.file("repo"), password: "correct horse")
        try Disk.make(scratch.file("vda.raw"), size: 1 << 20, writes: [])
        try repo.protect(Machine(name: "vm", disks: [MachineDisk(name: "vda", path: scratch.file("vda.raw"))]))
        final class Zeros: BlockReader {
            func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int) throws -> Int {
                buffer.initializeMemory(as: UInt8.self, repeating: 0)
                return buffer.count
            }
        }
        let xml = Array("<domain><name>secret-payroll-db</name><devices/></domain>".utf8)
        var details = PointDetails(consistency: "consistent", readMode: "full")
        details.attachments = ["domain.xml": xml, "nvram": [1, 2, 3]]
        let capture = DiskCapture(name: "vda", origin: "zeros", size: 1 << 20, ranges: [], base: nil) { Zeros() }
        let first = try repo.backup("vm", captures: [capture], details: details)
        let second = try repo.backup("vm", captures: [capture], details: details)
        let folder = scratch.file("repo") + "/machines/vm/points/"
        let stored = Disk.contents(folder + first.id + "/domain.xml")
        #expect(!stored.isEmpty && !stored.windows(ofCount: 6).contains { $0.elementsEqual(Array("secret".utf8)) })
        let reopened = try Repository.open(at: scratch.file("repo")) { "correct horse" }
        #expect(try reopened.attachment(first, "domain.xml") == xml)
        #expect(try reopened.attachment(first, "nvram") == [1, 2, 3])
        #expect(try reopened.attachment(first, "tpm-state") == nil)
        // Another point's file put in its place does not authenticate: it is bound to its point.
        try FileManager.default.removeItem(atPath: folder + first.id + "/domain.xml")
        try FileManager.default.copyItem(atPath: folder + second.id + "/domain.xml", toPath: folder + first.id + "/domain.xml")
        #expect(throws: LifeboatError.self) { _ = try reopened.attachment(first, "domain.xml") }
        var changed = Disk.contents(folder + second.id + "/nvram")
        changed[changed.count - 1] ^= 1
        try Data(changed).write(to: URL(fileURLWithPath: folder + second.id + "/nvram"))
        do { _ = try reopened.attachment(second, "nvram"); Issue.record("a changed file was read") } catch let error as LifeboatError {
            #expect(error.message.contains("vm/\(second.id)/nvram") && error.message.contains("altered"))
        }
    }

    @Test("an encrypted repository seals its manifests: no disk path, address or point id readable; a changed, swapped or rolled-back one is named; format 2 ones are read as before")
    func sealedManifests() throws {
        let scratch = Scratch()
        let diskPath = scratch.file("payroll-secret-disk.raw")
        try Disk.make(diskPath, size: 2 << 20, writes: [(0, Bytes.random(2 << 20, seed: 0x51))])
        let repo = try Repository.create(at: scratch.file("repo"), password: "correct horse", chunkSize: chunk)
        #expect(repo.sealsManifests && repo.config.format == 3)
        var machine = Machine(name: "hr", disks: [MachineDisk(name: "vda", path: diskPath)])
        machine.ip = "10.77.31.9"
        try repo.protect(machine)
        var points: [RecoveryPoint] = []
        for seed in [0x52, 0x54, 0x58, 0x60] {
            Disk.patch(diskPath, writes: [(seed << 12, Bytes.random(4096, seed: UInt64(seed)))])
            points.append(try repo.backup("hr"))
        }
        let root = scratch.file("repo")
        let folder = root + "/machines/hr/points/"
        // Nothing a manifest says is readable in the files: paths, the address, point ids, times.
        let secrets = [diskPath, "10.77.31.9", "payroll", points[0].id, "consistent", "\"disks\""]
        let files = [root + "/machines/hr/machine.json"] + points.flatMap { point in
            ["point.json", "vda.idx", "vda.layouts"].map { folder + point.id + "/" + $0 }
        }
        for file in files {
            let stored = Disk.contents(file)
            #expect(!stored.isEmpty, "\(file) is there")
            for secret in secrets {
                #expect(!stored.windows(ofCount: secret.utf8.count).contains { $0.elementsEqual(Array(secret.utf8)) }, "\(secret) in \(file)")
            }
            #expect(Array(stored.prefix(8)) != DiskIndex.magic)
        }
        // Read back whole with the key: points, indexes, layouts, the restored disk.
        let reopened = try Repository.open(at: root) { "correct horse" }
        #expect(try reopened.machine("hr").ip == "10.77.31.9")
        #expect(try reopened.points("hr").map(\.id) == points.map(\.id))
        #expect(!reopened.storedLayouts(points[3], disk: "vda").isEmpty)
        #expect(try reopened.indexReader(points[3], disk: "vda").id(at: 0) == (try reopened.index(points[3], disk: "vda")).ids[0])
        _ = try reopened.restore(points[3], disk: "vda", to: scratch.file("out.raw"))
        #expect(Disk.contents(scratch.file("out.raw")) == Disk.contents(diskPath))
        #expect(try reopened.verify().isClean)

        // Swapped: point 1's manifest put under point 2's name does not open there.
        let saved = Disk.contents(folder + points[2].id + "/point.json")
        try Data(Disk.contents(folder + points[1].id + "/point.json")).write(to: URL(fileURLWithPath: folder + points[2].id + "/point.json"))
        do { _ = try reopened.points("hr"); Issue.record("a swapped manifest was read") } catch let error as LifeboatError {
            #expect(error.code == .damaged && error.message.contains("machines/hr/points/\(points[2].id)/point.json"))
        }
        #expect(try !reopened.verify().isClean)
        try Data(saved).write(to: URL(fileURLWithPath: folder + points[2].id + "/point.json"))
        // Changed: one byte of an index.
        var index = Disk.contents(folder + points[3].id + "/vda.idx")
        index[index.count / 2] ^= 1
        try Data(index).write(to: URL(fileURLWithPath: folder + points[3].id + "/vda.idx"))
        do { _ = try reopened.index(points[3], disk: "vda"); Issue.record("a changed index was read") } catch let error as LifeboatError {
            #expect(error.code == .damaged && error.message.contains("vda.idx") && error.message.contains("altered"))
        }
        index[index.count / 2] ^= 1
        try Data(index).write(to: URL(fileURLWithPath: folder + points[3].id + "/vda.idx"))

        // Pruned on purpose: no alarm. Deleted behind lifeboat's back: named by verify.
        let pruned = try reopened.prune("hr", policy: RetentionPolicy(last: 3))
        #expect(pruned.removed == [points[0].id])
        #expect(try reopened.rolledBackPoints("hr").isEmpty)
        #expect(try reopened.verify().isClean)
        try FileManager.default.removeItem(atPath: folder + points[1].id)
        let problems = try reopened.rolledBackPoints("hr")
        #expect(problems.count == 1 && problems[0].contains("point \(points[1].id) of hr is missing") && problems[0].contains(points[2].id))
        #expect(try reopened.verify().damagedPoints == problems)
        // A prune note copied under another name does not excuse it.
        try FileManager.default.copyItem(atPath: root + "/machines/hr/pruned/" + points[0].id, toPath: root + "/machines/hr/pruned/" + points[1].id)
        #expect(try reopened.rolledBackPoints("hr").count == 1)
        try FileManager.default.removeItem(atPath: root + "/machines/hr/pruned/" + points[1].id)
        // A pruned point's folder put back (an old copy) is named too.
        try FileManager.default.copyItem(atPath: folder + points[2].id, toPath: scratch.file("kept"))
        _ = try reopened.prune("hr", policy: RetentionPolicy(last: 1))
        try FileManager.default.copyItem(atPath: scratch.file("kept"), toPath: folder + points[2].id)
        #expect(try reopened.rolledBackPoints("hr") == ["point \(points[2].id) of hr was pruned and is back in \(root): someone put an old copy of it there"])
        // config.json is not authenticated: a format lowered there does not turn the sealing off
        // (the wrapped key says the repository seals its manifests).
        var lowered = reopened.config
        lowered.format = 2
        try FileSystem.writeAtomically(Array(try JSONEncoder.lifeboat.encode(lowered)), to: root + "/config.json")
        let downgraded = try Repository.open(at: root) { "correct horse" }
        #expect(downgraded.sealsManifests)
        let later = try downgraded.backup("hr")
        #expect(Array(Disk.contents(folder + later.id + "/point.json").prefix(1)) != Array("{".utf8), "still sealed")
        #expect(try downgraded.points("hr").last?.id == later.id)

        // An encrypted repository made before manifests were sealed (format 2) is read and written as before.
        let older = try Repository.create(at: scratch.file("old"), password: "pw", chunkSize: chunk, sealManifests: false)
        #expect(try Repository.open(at: scratch.file("old")) { "pw" }.config.format == 2)
        #expect(!older.sealsManifests)
        try older.protect(Machine(name: "hr", disks: [MachineDisk(name: "vda", path: diskPath)]))
        let point = try older.backup("hr")
        let plain = Disk.contents(scratch.file("old") + "/machines/hr/points/\(point.id)/point.json")
        #expect((try? JSONDecoder.lifeboat.decode(RecoveryPoint.self, from: Data(plain)))?.id == point.id, "plaintext, as before")
        #expect(try Repository.open(at: scratch.file("old")) { "pw" }.config.format == 2, "a backup does not raise it to 3")
        _ = try older.restore(point, disk: "vda", to: scratch.file("old.raw"))
        #expect(Disk.contents(scratch.file("old.raw")) == Disk.contents(diskPath))
    }

    @Test("encrypted chunks hold no plaintext; the right password reads them, a wrong one fails cleanly")
    func encryption() throws {
        let scratch = Scratch()
        let disk = scratch.file("disk.raw")
        let secret = Array(String(repeating: "TOP-SECRET-PAYROLL-RECORD ", count: 20000).utf8)
        try Disk.make(disk, size: 8 << 20, writes: [(0, secret)])
        let repo = try Repository.create(at: scratch.file("repo"), password: "correct horse")
        try repo.protect(Machine(name: "hr", disks: Repository.diskNames(for: [disk])))
        let point = try repo.backup("hr")
        let needle = Array("TOP-SECRET".utf8)
        for path in try repo.chunkFiles() {
            let bytes = Disk.contents(path)
            #expect(!bytes.windows(ofCount: needle.count).contains { $0.elementsEqual(needle) })
        }
        // Ids are keyed: the plain SHA-256 of a chunk is not its name.
        let firstChunk = Array(Disk.contents(disk).prefix(repo.config.chunkSize))
        let plainID = firstChunk.withUnsafeBytes { ChunkCodec(compression: .init(level: 1), frameSize: repo.config.frameSize, keys: nil).id(of: $0) }
        #expect(try !repo.chunkFiles().contains { $0.hasSuffix(plainID.hex) })
        #expect(throws: LifeboatError.self) { try Repository.open(at: scratch.file("repo")) { "wrong" } }
        do {
            _ = try Repository.open(at: scratch.file("repo")) { "wrong" }
        } catch let error as LifeboatError {
            #expect(error.code == .authentication)
            #expect(error.message.contains("wrong password"))
        }
        #expect(throws: LifeboatError.self) { try Repository.open(at: scratch.file("repo")) { nil } }
        let reopened = try Repository.open(at: scratch.file("repo")) { "correct horse" }
        _ = try reopened.restore(point, disk: "disk", to: scratch.file("r.raw"))
        #expect(Disk.contents(scratch.file("r.raw")) == Disk.contents(disk))
        #expect(try reopened.verify().isClean)
    }
}

extension Array where Element == UInt8 {
    func windows(ofCount n: Int) -> [ArraySlice<UInt8>] {
        guard count >= n else { return [] }
        return stride(from: 0, through: count - n, by: 1).lazy.filter { self[$0] == UInt8(ascii: "T") }.map { self[$0..<($0 + n)] }
    }
}

@Suite("Timestamps")
struct TimestampTests {
    @Test("our own form is read to the same instant as ISO8601DateFormatter reads it, and written back unchanged")
    func fastPathMatchesFormatter() throws {
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        let plain = ISO8601DateFormatter()
        plain.formatOptions = [.withInternetDateTime]
        var generator = SystemRandomNumberGenerator()
        for index in 0..<5_000 {
            // 1901 to 2099, with leap days and milliseconds of every kind.
            let seconds = Double(Int64.random(in: -2_000_000_000...4_000_000_000, using: &generator)) + Double(index % 1000) / 1000
            let text = formatter.string(from: Date(timeIntervalSince1970: seconds))
            let fast = try #require(Timestamp.parse(text))
            #expect(fast == formatter.date(from: text), "\(text)")
            #expect(Timestamp.format(fast) == text)
            let whole = plain.string(from: Date(timeIntervalSince1970: seconds.rounded(.down)))
            #expect(Timestamp.parse(whole) == plain.date(from: whole), "\(whole)")
        }
        #expect(Timestamp.parse("2026-02-30T00:00:00Z") == formatter.date(from: "2026-02-30T00:00:00Z") ?? plain.date(from: "2026-02-30T00:00:00Z"))
        #expect(Timestamp.parse("2026-11-22T10:00:00+01:00") == plain.date(from: "2026-11-22T10:00:00+01:00"), "other forms go to the formatter")
        #expect(Timestamp.parse("yesterday") == nil)
    }
}

/// A disk file read through `BlockReader`, as a libvirt backup's NBD export is read.
final class FileBlockReader: BlockReader {
    let fd: Int32
    init(_ path: String) { fd = open(path, O_RDONLY) }
    deinit { close(fd) }
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int) throws -> Int {
        pread(fd, buffer.baseAddress, buffer.count, off_t(offset))
    }
}

@Suite("Changed-block points")
struct ChangedBlockTests {
    @Test("a point that reads only changed ranges rebuilds touched chunks from their stored frames: byte-identical, verifies, same ids as a full read",
          arguments: [false, true])
    func patchedChunks(encrypted: Bool) throws {
        let scratch = Scratch()
        let path = scratch.file("disk.raw")
        let size = 16 << 20
        try Disk.make(path, size: size, writes: [(0, Bytes.text(8 << 20, seed: 7)), (8 << 20, Bytes.random(4 << 20, seed: 8))])
        let repo = try Repository.create(at: scratch.file("repo"), password: encrypted ? "patch-secret" : nil, chunkSize: 1 << 20)
        try repo.protect(Machine(name: "vm", disks: [MachineDisk(name: "vda", path: path)]))
        func capture(_ ranges: [Range<Int>], base: DiskIndex?) -> DiskCapture {
            DiskCapture(name: "vda", origin: path, size: size, ranges: ranges, base: base) { FileBlockReader(path) }
        }
        let full = try repo.backup("vm", captures: [capture([0..<size], base: nil)], details: PointDetails(consistency: "consistent", readMode: "full"))
        // Writes as a guest makes them: 4 KiB here and there, a frame rewritten whole, a write
        // across a frame and a chunk boundary, and a chunk zeroed whole (it becomes a hole).
        let writes: [(Int, [UInt8])] = [
            (4096, Bytes.random(4096, seed: 9)), ((3 << 20) + 70_000, Bytes.text(10_000, seed: 10)),
            (5 << 20, Bytes.random(64 << 10, seed: 11)), ((6 << 20) - 3000, Bytes.random(9000, seed: 12)),
            (9 << 20, [UInt8](repeating: 0, count: 1 << 20)),
        ]
        Disk.patch(path, writes: writes)
        let ranges = writes.map { $0.0..<($0.0 + $0.1.count) }.sorted { $0.lowerBound < $1.lowerBound }
        let base = try repo.index(full, disk: "vda")
        let incremental = try repo.backup("vm", captures: [capture(ranges, base: base)],
                                          details: PointDetails(consistency: "consistent", readMode: "incremental"))
        #expect(incremental.bytesRead == ranges.reduce(0) { $0 + $1.count }, "only the changed ranges are read")
        let index = try repo.index(incremental, disk: "vda")
        #expect(index.ids[9].isZero, "a chunk written with zeros only is a hole")
        #expect(incremental.disks[0].newBytes == 4 << 20, "4 touched chunks are new (the zeroed one is a hole)")
        #expect(incremental.disks[0].storedBytes < full.disks[0].storedBytes / 2, "only the touched chunks are stored again")
        let out = scratch.file("out.raw")
        _ = try repo.restore(incremental, disk: "vda", to: out)
        #expect(Disk.contents(out) == Disk.contents(path), "the patched point restores byte-identical")
        let report = try repo.verify()
        #expect(report.isClean, "\(report.damagedChunks)")
        // The same bytes read in full give the same chunk ids: patched chunks are ordinary chunks.
        let reread = try repo.backup("vm", captures: [capture([0..<size], base: nil)], details: PointDetails(consistency: "consistent", readMode: "full"))
        #expect(try repo.index(reread, disk: "vda").ids == index.ids)
        #expect(reread.disks[0].newBytes == 0)
    }
}
