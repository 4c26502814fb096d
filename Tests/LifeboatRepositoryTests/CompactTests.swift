import Crypto
import Foundation
import LifeboatBase
import Testing
@testable import LifeboatRepository
import LifeboatTestSupport
#if canImport(Glibc)
import Glibc
#endif

/// Text lines with a marker, for compression and for looking for plaintext in stored files.
private func markedText(_ count: Int, seed: Int) -> [UInt8] {
    var out = [UInt8]()
    out.reserveCapacity(count + 200)
    var line = seed
    while out.count < count {
        out += Array("LIFEBOAT-SECRET-MARKER record \(line * 7919 % 100_003) of account \(line % 977), balance \(line * 31 % 10_007)\n".utf8)
        line += 1
    }
    return Array(out.prefix(count))
}

/// x86-like bytes: call and jump opcodes with nearby targets among other instructions.
private func codeLike(_ count: Int, seed: UInt64) -> [UInt8] {
    var state = seed | 1
    func next() -> UInt64 { state ^= state << 13; state ^= state >> 7; state ^= state << 17; return state }
    var out = [UInt8]()
    out.reserveCapacity(count + 16)
    let targets = (0..<64).map { _ in Int(next() % UInt64(count)) }
    while out.count < count {
        switch next() % 4 {
        case 0, 1:
            let target = targets[Int(next() % 64)]
            let relative = Int32(truncatingIfNeeded: target - (out.count + 5))
            out.append(next() % 3 == 0 ? 0xE9 : 0xE8)
            out += withUnsafeBytes(of: relative.littleEndian, Array.init)
        case 2: out += [0x48, 0x89, 0xE5, 0x5D, 0xC3]
        default: out += [0x48, 0x83, 0xEC, UInt8(truncatingIfNeeded: next() % 64), 0x90]
        }
    }
    return Array(out.prefix(count))
}

/// Every chunk file, dictionary and compaction file of a repository.
private func storedFiles(_ repo: Repository) -> [String] {
    guard let walker = FileManager.default.enumerator(atPath: repo.root) else { return [] }
    return walker.compactMap { $0 as? String }.filter { $0.hasPrefix("chunks/") || $0.hasPrefix("dictionaries/") || $0.hasPrefix("compact/") }
        .map { repo.root + "/" + $0 }.filter { !FileSystem.isDirectory($0) }
}

/// Restores `disk` of `point` into the scratch folder and returns its bytes.
private func restored(_ repo: Repository, _ point: RecoveryPoint, disk: String = "disk", in scratch: Scratch) throws -> [UInt8] {
    let path = scratch.file("restored-\(UInt32.random(in: 0...UInt32.max)).raw")
    defer { unlink(path) }
    _ = try repo.restore(point, disk: disk, to: path)
    return Disk.contents(path)
}

private func storedBytes(_ repo: Repository) -> Int {
    (try? repo.chunkFiles())?.reduce(0) { $0 + Disk.contents($1).count } ?? 0
}

@Suite("Compact")
struct CompactTests {
    @Test("x86 filter: decode(encode(x)) == x, also for opcodes at the very end and random bytes")
    func x86FilterRoundTrip() {
        for seed in 1...40 {
            var data = seed % 2 == 0 ? codeLike(65536 - seed, seed: UInt64(seed)) : Bytes.random(4096 + seed * 97, seed: UInt64(seed))
            data.append(0xE8)   // an opcode with no room for its operand
            let original = data
            data.withUnsafeMutableBytes { X86Filter.encode($0) }
            if seed % 2 == 0 { #expect(data != original, "code-like frames change") }
            data.withUnsafeMutableBytes { X86Filter.decode($0) }
            #expect(data == original, "seed \(seed)")
        }
        #expect(codeLike(65536, seed: 3).withUnsafeBytes { X86Filter.looksLikeCode($0) })
        #expect(!Bytes.text(65536, seed: 3).withUnsafeBytes { X86Filter.looksLikeCode($0) })
    }

    @Test("compact stores less, keeps ids and indexes, restores byte-identical, compacts each chunk once", arguments: [false, true])
    func roundTrip(encrypted: Bool) throws {
        let scratch = Scratch()
        let disk = scratch.file("disk.raw")
        let size = 24 << 20
        let text = markedText(6 << 20, seed: 1)
        // A copy of 2 MiB of the text at a 4 KiB boundary that is no 64 KiB one: only references find it.
        try Disk.make(disk, size: size, writes: [(0, text), (8 << 20, codeLike(2 << 20, seed: 5)),
                                                 ((12 << 20) + 12288, Array(text[(1 << 20)..<(3 << 20)])),
                                                 (18 << 20, Bytes.random(1 << 20, seed: 6))])
        let repo = try Repository.create(at: scratch.file("repo"), password: encrypted ? "pw" : nil)
        try repo.protect(Machine(name: "app", disks: Repository.diskNames(for: [disk])))
        let first = try repo.backup("app")
        let indexPath = repo.indexPath("app", first.id, disk: "disk")
        let indexBefore = Disk.contents(indexPath)
        let before = storedBytes(repo)

        let result = try repo.compact(CompactOptions(level: 9))
        #expect(result.compacted == result.chunks && result.chunks > 0)
        #expect(result.damaged.isEmpty)
        #expect(result.trainedDictionary && result.dictionary == 1)
        #expect(result.referenceFrames >= 20, "the 2 MiB copy is stored against the frames it copies")
        #expect(result.bytesAfter < result.bytesBefore)
        #expect(storedBytes(repo) < before * 85 / 100, "compacted chunks are smaller (\(storedBytes(repo)) of \(before))")
        #expect(Disk.contents(indexPath) == indexBefore, "indexes and chunk ids do not change")
        let format = encrypted ? 3 : 2   // encrypted ones seal their manifests since format 3
        #expect(try repo.config.format == format && Repository.open(at: repo.root) { "pw" }.config.format == format)
        #expect(try !repo.loadReferenceCatalogue().isEmpty)
        let firstBytes = Disk.contents(disk)
        #expect(try restored(repo, first, in: scratch) == firstBytes)
        #expect(try repo.verify().isClean)

        let again = try repo.compact(CompactOptions(level: 9))
        #expect(again.compacted == 0 && again.alreadyCompacted == again.chunks)

        // A changed-block point that patches a compacted chunk whose frames refer to others: those
        // are compressed anew on their own (only compact makes references, and records them).
        // (Which copy of the text refers to the other depends on the order of the keyed ids.)
        let records = try repo.loadReferenceCatalogue()
        let ids = try repo.index(first, disk: "disk").ids
        let copyIndex = try #require(ids.firstIndex { id in records.contains { $0.source == id } })
        let copyChunk = copyIndex << 20
        Disk.patch(disk, writes: [(copyChunk + 100_000, Bytes.random(5000, seed: 13))])
        let file = try PosixFile(path: disk, flags: O_RDONLY)
        let capture = DiskCapture(name: "disk", origin: disk, size: size, ranges: [(copyChunk + 100_000)..<(copyChunk + 105_000)],
                                  base: try repo.index(first, disk: "disk")) { FileReader(file: file, path: disk) }
        let patchedPoint = try repo.backup("app", captures: [capture], details: PointDetails(consistency: "crash-consistent", readMode: "incremental"))
        #expect(try restored(repo, patchedPoint, in: scratch) == Disk.contents(disk))
        #expect(try repo.verify().isClean, "no reference the catalogue does not know")

        // New data: the next compact takes only the new chunks, with the same dictionary.
        Disk.patch(disk, writes: [(20 << 20, markedText(1 << 20, seed: 99)), (4 << 20, Bytes.random(70_000, seed: 7))])
        let second = try repo.backup("app")
        let third = try repo.compact(CompactOptions(level: 9))
        #expect(third.compacted == Set([copyIndex, 4, 20]).count, "the patched chunk and the chunks at 4 and 20 MiB")
        #expect(!third.trainedDictionary && third.dictionary == 1)
        #expect(try restored(repo, second, in: scratch) == Disk.contents(disk))
        #expect(try restored(repo, first, in: scratch) == firstBytes)
        #expect(try repo.verify().isClean)

        if encrypted {
            // The dictionary is made of plaintext and the block table hashes it: both are sealed.
            let needle = Array("LIFEBOAT-SECRET".utf8)
            for path in storedFiles(repo) {
                #expect(!Disk.contents(path).windows(ofCount: needle.count).contains { $0.elementsEqual(needle) }, "\(path) holds plaintext")
            }
        }
    }

    @Test("each point's DISK.layouts describes its chunks as their files are; the next point carries it; compact rewrites it and writes a missing one",
          arguments: [false, true])
    func diskLayouts(encrypted: Bool) throws {
        let scratch = Scratch()
        let disk = scratch.file("disk.raw")
        try Disk.make(disk, size: 12 << 20, writes: [(0, markedText(3 << 20, seed: 2)), (5 << 20, Bytes.random(1 << 20, seed: 3)),
                                                     (8 << 20, Array(markedText(2 << 20, seed: 2)))])
        let repo = try Repository.create(at: scratch.file("repo"), password: encrypted ? "pw" : nil)
        try repo.protect(Machine(name: "app", disks: Repository.diskNames(for: [disk])))
        /// The point's layouts, which must be those of its chunk files now.
        @discardableResult
        func expectCurrent(_ point: RecoveryPoint, _ what: String) throws -> [ChunkID: ChunkLayout] {
            let stored = repo.storedLayouts(point, disk: "disk")
            let ids = try repo.index(point, disk: "disk").distinctIDs(limit: DiskLayouts.limit)
            #expect(ids.count >= 4 && Set(stored.keys) == Set(ids), "\(what): one entry per distinct chunk")
            for id in ids {
                let file = try repo.chunkLayout(id)
                let entry = try #require(stored[id])
                #expect(entry.storedSize == file.storedSize && entry.compacted == file.compacted
                        && (0..<file.frameCount).allSatisfy { entry.storedRange(ofFrame: $0) == file.storedRange(ofFrame: $0) },
                        "\(what): chunk \(id.hex) as its file is")
            }
            return stored
        }
        let first = try repo.backup("app")
        try expectCurrent(first, "first point")
        Disk.patch(disk, writes: [(2 << 20, Bytes.random(300_000, seed: 4))])
        let second = try repo.backup("app")
        let before = try expectCurrent(second, "second point")

        unlink(repo.layoutsPath("app", first.id, disk: "disk"))   // as a point taken by an older lifeboat
        let result = try repo.compact(CompactOptions(level: 9))
        #expect(result.compacted == result.chunks)
        #expect(FileSystem.exists(repo.layoutsPath("app", first.id, disk: "disk")), "compact writes the missing file")
        try expectCurrent(first, "first point after compact")
        let after = try expectCurrent(second, "second point after compact")
        #expect(after.contains { before[$0.key]?.storedSize != $0.value.storedSize }, "compact moved frames: the file was rewritten")

        // The next point after compact carries the rewritten entries.
        Disk.patch(disk, writes: [(10 << 20, Bytes.random(70_000, seed: 5))])
        try expectCurrent(try repo.backup("app"), "third point")
    }

    @Test("gc keeps a chunk that compacted frames refer to after the points that used it are gone")
    func gcKeepsReferencedChunks() throws {
        let scratch = Scratch()
        let shared = Bytes.random(3 << 20, seed: 11)
        let a = scratch.file("a.raw"), b = scratch.file("b.raw")
        try Disk.make(a, size: 8 << 20, writes: [(0, shared)])
        try Disk.make(b, size: 8 << 20, writes: [(12288, shared), (5 << 20, markedText(1 << 20, seed: 3))])
        let repo = try Repository.create(at: scratch.file("repo"))
        try repo.protect(Machine(name: "a", disks: Repository.diskNames(for: [a])))
        try repo.protect(Machine(name: "b", disks: Repository.diskNames(for: [b])))
        let pointA = try repo.backup("a"), pointB = try repo.backup("b")
        let idsA = Set(try repo.index(pointA, disk: "a").ids), idsB = Set(try repo.index(pointB, disk: "b").ids)
        let result = try repo.compact(CompactOptions(level: 3))
        #expect(result.referenceFrames >= 40, "3 MiB of copies, 64 KiB frames")
        let records = try repo.loadReferenceCatalogue()
        // Drop the machine whose chunks the other one's frames refer to.
        let bNeedsA = records.contains { idsB.contains($0.source) && !idsB.contains($0.target.chunk) }
        let (gone, kept, keptDisk, keptPoint) = bNeedsA ? ("a", "b", b, pointB) : ("b", "a", a, pointA)
        let needed = Set(records.filter { (bNeedsA ? idsB : idsA).contains($0.source) }.map(\.target.chunk))
            .subtracting(bNeedsA ? idsB : idsA)
        #expect(!needed.isEmpty)
        try repo.unprotect(gone, purge: true)
        let collected = try repo.gc()
        #expect(collected.removed > 0, "chunks only the dropped machine used and nothing refers to go")
        let stored = try repo.store.all()
        #expect(needed.isSubset(of: stored), "the chunks \(kept)'s frames refer to stay")
        #expect(try restored(repo, keptPoint, disk: kept, in: scratch) == Disk.contents(keptDisk))
        #expect(try repo.verify().isClean)
        #expect(try repo.loadReferenceCatalogue().allSatisfy { stored.contains($0.source) }, "gc drops records of chunks that are gone")
    }

    @Test("gc deletes nothing and verify reports it when the reference catalogue is damaged or incomplete")
    func damagedCatalogue() throws {
        let scratch = Scratch()
        let disk = scratch.file("disk.raw")
        let copy = Bytes.random(1 << 20, seed: 21)
        try Disk.make(disk, size: 8 << 20, writes: [(0, copy), ((4 << 20) + 4096, copy)])
        let repo = try Repository.create(at: scratch.file("repo"))
        try repo.protect(Machine(name: "m", disks: Repository.diskNames(for: [disk])))
        _ = try repo.backup("m")
        Disk.patch(disk, writes: [(0, Bytes.random(1 << 20, seed: 22))])
        _ = try repo.backup("m")
        _ = try repo.compact(CompactOptions(level: 3))
        let files = try FileSystem.list(repo.compactPath).filter { $0.hasPrefix("references-") }
        #expect(files.count == 1)
        let path = repo.compactPath + "/" + files[0]
        let original = Disk.contents(path)
        var flipped = original
        flipped[flipped.count / 2] ^= 1
        try FileSystem.writeAtomically(flipped, to: path)
        let points = try repo.points("m")
        _ = try repo.prune("m", policy: RetentionPolicy(last: 1))
        let chunksBefore = try repo.store.all()
        #expect(throws: LifeboatError.self) { try repo.gc() }
        #expect(try repo.store.all() == chunksBefore, "nothing deleted")
        #expect(try !repo.verify().isClean)
        // Without the catalogue verify names the references gc could break.
        FileSystem.remove(path)
        let report = try repo.verify()
        #expect(report.damagedFiles.contains { $0.contains("does not record") })
        try FileSystem.writeAtomically(original, to: path)
        #expect(try repo.verify().isClean)
        _ = try repo.gc()
        #expect(try restored(repo, try repo.point("m", points.last!.id), in: scratch) == Disk.contents(disk))
    }

    @Test("kill -9 of compact at random moments leaves every chunk readable; a later compact finishes")
    func killedCompact() throws {
        let scratch = Scratch()
        let disk = scratch.file("disk.raw")
        let size = 48 << 20
        try Disk.make(disk, size: size, writes: [(0, markedText(size / 2, seed: 5)), (size / 2, codeLike(size / 2, seed: 8))])
        let repo = try Repository.create(at: scratch.file("repo"))
        try repo.protect(Machine(name: "vm", disks: Repository.diskNames(for: [disk])))
        let point = try repo.backup("vm")
        var generator = SystemRandomNumberGenerator()
        for round in 0..<4 {
            let child = CLI.start(["compact", "--level", "19", "--repo", repo.root])
            usleep(UInt32.random(in: 200_000...2_500_000, using: &generator))
            kill(child.processIdentifier, SIGKILL)
            child.waitUntilExit()
            #expect(try repo.verify().isClean, "round \(round)")
            #expect(try restored(repo, point, in: scratch) == Disk.contents(disk), "round \(round)")
        }
        let done = try CLI.run(["compact", "--level", "9", "--json", "--repo", repo.root])
        #expect(done.status == 0, "\(done.stderr)")
        #expect(try repo.compact(CompactOptions(level: 9)).compacted == 0)
        _ = try repo.gc()
        #expect(temporaryFiles(in: repo.root).isEmpty, "gc removes a killed compact's staged chunks")
        #expect(try restored(repo, point, in: scratch) == Disk.contents(disk))
        #expect(try repo.verify().isClean)
    }

    @Test("a second compact refuses while one runs; bad levels are refused in one sentence")
    func concurrentAndBadInput() throws {
        let scratch = Scratch()
        let disk = scratch.file("disk.raw")
        try Disk.make(disk, size: 32 << 20, writes: [(0, markedText(32 << 20, seed: 2))])
        let repo = try Repository.create(at: scratch.file("repo"))
        try repo.protect(Machine(name: "vm", disks: Repository.diskNames(for: [disk])))
        _ = try repo.backup("vm")
        let child = CLI.start(["compact", "--level", "19", "--repo", repo.root])
        for _ in 0..<500 where FileLock.owner(of: repo.root + "/compact.lock") != "\(child.processIdentifier)" { usleep(10_000) }
        do {
            _ = try repo.compact()
            Issue.record("a second compact ran beside the first")
        } catch let error as LifeboatError {
            #expect(error.code == .busy)
            #expect(error.message.contains("already running (pid \(child.processIdentifier))"))
        }
        kill(child.processIdentifier, SIGKILL)
        child.waitUntilExit()
        let bad = try CLI.run(["compact", "--level", "40", "--repo", repo.root])
        #expect(bad.status != 0)
        #expect(bad.stderr.contains("invalid compact level 40"))
    }

    @Test("the replication service compacts after its gc, beside points; SIGTERM during a compact ends it cleanly")
    func serviceCompacts() throws {
        let scratch = Scratch()
        let disk = scratch.file("disk.raw")
        try Disk.make(disk, size: 64 << 20, writes: [(0, markedText(40 << 20, seed: 12)), (48 << 20, codeLike(8 << 20, seed: 3))])
        let repo = try Repository.create(at: scratch.file("repo"))
        try repo.protect(Machine(name: "vm", disks: Repository.diskNames(for: [disk]), rpoSeconds: 3600))
        func service(_ arguments: [String]) throws -> (Process, String) {
            let log = scratch.file("replicate-\(UInt32.random(in: 0...UInt32.max)).log")
            FileManager.default.createFile(atPath: log, contents: nil)
            let process = Process()
            process.executableURL = URL(fileURLWithPath: CLI.binary)
            process.arguments = ["replicate", "--repo", repo.root, "--hot", scratch.file("hot")] + arguments
            let handle = FileHandle(forWritingAtPath: log)!
            (process.standardOutput, process.standardError, process.standardInput) = (handle, handle, FileHandle.nullDevice)
            try process.run()
            return (process, log)
        }
        func waitFor(_ text: String, in log: String, seconds: Double) -> Bool {
            let deadline = Date().addingTimeInterval(seconds)
            while Date() < deadline {
                if (try? String(contentsOfFile: log, encoding: .utf8))?.contains(text) == true { return true }
                Thread.sleep(forTimeInterval: 0.2)
            }
            return false
        }
        // A slow compact (level 19) that SIGTERM interrupts: the service ends at once, cleanly.
        let (slow, slowLog) = try service(["--gc-every", "2s", "--compact-level", "19"])
        defer { if slow.isRunning { kill(slow.processIdentifier, SIGKILL) } }
        #expect(waitFor("compact started", in: slowLog, seconds: 60), "\((try? String(contentsOfFile: slowLog, encoding: .utf8)) ?? "")")
        Thread.sleep(forTimeInterval: 1)
        let asked = Date()
        kill(slow.processIdentifier, SIGTERM)
        slow.waitUntilExit()
        #expect(slow.terminationStatus == 0)
        #expect(Date().timeIntervalSince(asked) < 20, "a compact stops after the chunks under way")
        #expect(try repo.verify().isClean)
        // Then a service whose compact finishes: every chunk the points use is compacted.
        let (fast, fastLog) = try service(["--gc-every", "2s", "--compact-level", "3"])
        defer { if fast.isRunning { kill(fast.processIdentifier, SIGKILL) } }
        #expect(waitFor("stopped=false", in: fastLog, seconds: 90), "\((try? String(contentsOfFile: fastLog, encoding: .utf8)) ?? "")")
        kill(fast.processIdentifier, SIGTERM)
        fast.waitUntilExit()
        #expect(fast.terminationStatus == 0)
        let again = try repo.compact(CompactOptions(level: 3))
        #expect(again.compacted == 0 && again.alreadyCompacted == again.chunks && again.chunks > 0)
        #expect(try repo.points("vm").count >= 1)
        #expect(try repo.verify().isClean)
    }

    @Test("a repository of the first format is read, upgraded by the first backup, and compacted")
    func firstFormat() throws {
        let scratch = Scratch()
        let disk = scratch.file("disk.raw")
        try Disk.make(disk, size: 8 << 20, writes: [(0, markedText(3 << 20, seed: 4)), (5 << 20, Bytes.random(1 << 20, seed: 4))])
        let created = try Repository.create(at: scratch.file("repo"), password: "pw", sealManifests: false)   // as then
        try created.protect(Machine(name: "old", disks: Repository.diskNames(for: [disk])))
        let point = try created.backup("old")
        try FirstFormat.convert(created)
        let repo = try Repository.open(at: created.root) { "pw" }
        #expect(repo.config.format == 1)
        #expect(try repo.chunkFiles().allSatisfy { Disk.contents($0)[4] == 1 }, "chunks are of the first format")
        let firstBytes = Disk.contents(disk)
        #expect(try restored(repo, point, in: scratch) == firstBytes)
        #expect(try repo.verify().isClean)
        // A changed-block point (as of a libvirt domain) patches a first-format chunk: the frame it
        // touched is compressed anew, the others are taken over into second-format frames.
        Disk.patch(disk, writes: [(100_000, Bytes.random(5000, seed: 9))])
        let file = try PosixFile(path: disk, flags: O_RDONLY)
        let capture = DiskCapture(name: "disk", origin: disk, size: 8 << 20, ranges: [100_000..<105_000],
                                  base: try repo.index(point, disk: "disk")) { FileReader(file: file, path: disk) }
        let second = try repo.backup("old", captures: [capture], details: PointDetails(consistency: "crash-consistent", readMode: "incremental"))
        #expect(second.bytesRead == 5000)
        #expect(try Repository.open(at: repo.root) { "pw" }.config.format == 2)
        let patched = try repo.index(second, disk: "disk").ids[0]
        #expect(Disk.contents((repo.store as! LocalChunkStore).path(patched))[4] == 2)
        #expect(try restored(repo, second, in: scratch) == Disk.contents(disk))
        _ = try repo.compact(CompactOptions(level: 5))
        #expect(try restored(repo, second, in: scratch) == Disk.contents(disk))
        #expect(try restored(repo, point, in: scratch) == firstBytes)
        #expect(try repo.verify().isClean)
    }
}

/// Rewrites a repository into the first format (bare zstd frames, config format 1), as
/// lifeboat before format 2 wrote it.
enum FirstFormat {
    static func convert(_ repo: Repository) throws {
        let codec = repo.codec
        for path in try repo.chunkFiles() {
            let id = ChunkID(hex: String(path.split(separator: "/").last!))!
            let stored = Disk.contents(path)
            var plain = [UInt8](repeating: 0, count: 16 << 20)
            let layout = try stored.withUnsafeBytes { try codec.layout($0, id: id, storedSize: $0.count) }
            _ = try plain.withUnsafeMutableBytes { out in try stored.withUnsafeBytes { try codec.decode($0, id: id, into: out, references: nil) } }
            var frames: [[UInt8]] = []
            for k in 0..<layout.frameCount {
                let frame = Array(plain[(k * codec.frameSize)..<(k * codec.frameSize + layout.rawLength(ofFrame: k))])
                var out = [UInt8](repeating: 0, count: Zstd.bound(frame.count))
                let n = try out.withUnsafeMutableBytes { o in try frame.withUnsafeBytes { try codec.zstd.compress($0, into: o) } }
                var body = n < frame.count ? Array(out[0..<n]) : frame
                if let keys = codec.keys {
                    let aad = id.bytes + withUnsafeBytes(of: UInt32(k).littleEndian, Array.init)
                    body = Array(try AES.GCM.seal(body, using: keys.encryption, authenticating: aad).combined!)
                }
                frames.append(body)
            }
            var file = Array(stored[0..<layout.tableEnd])
            file[4] = 1
            file[5] &= 3
            for (k, frame) in frames.enumerated() {
                let entry = ChunkCodec.headerSize + k * ChunkCodec.tableEntrySize
                withUnsafeBytes(of: UInt32(frame.count).littleEndian) { for i in 0..<4 { file[entry + i] = $0[i] } }
            }
            for frame in frames { file += frame }
            try FileSystem.writeAtomically(file, to: path, syncDirectory: false)
        }
        var config = repo.config
        config.format = 1
        try FileSystem.writeAtomically(Array(try JSONEncoder.lifeboat.encode(config)), to: repo.root + "/config.json")
    }
}
