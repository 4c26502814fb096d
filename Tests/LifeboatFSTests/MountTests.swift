import Crypto
import Foundation
import LifeboatBase
@testable import LifeboatFS
import LifeboatRepository
import LifeboatTestSupport
import Synchronization
import SystemPackage
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// A repository with the demo disk backed up twice (markers A and B), and the disk's bytes at each point.
final class DemoRepository {
    let scratch = Scratch()
    let repo: Repository
    let disk: String
    var points: [RecoveryPoint] = []
    var contents: [String: [UInt8]] = [:]

    init(password: String? = nil) throws {
        disk = scratch.file("demo.raw")
        try DemoDisk.make(disk, marker: "marker A")
        repo = try Repository.create(at: scratch.file("repo"), password: password)
        try repo.protect(Machine(name: "demo", disks: Repository.diskNames(for: [disk])))
        try backup()
        try DemoDisk.setMarker(disk, "marker B")
        try backup()
    }

    @discardableResult
    func backup() throws -> RecoveryPoint {
        let point = try repo.backup("demo")
        points.append(point)
        contents[point.id] = Disk.contents(disk)
        return point
    }

    /// Mounts the repository in the background with the CLI; returns the mount point.
    func mount(_ extra: [String] = [], environment: [String: String] = [:]) throws -> String {
        let mountpoint = scratch.file("mnt-\(UInt32.random(in: 0...UInt32.max))")
        try FileManager.default.createDirectory(atPath: mountpoint, withIntermediateDirectories: false)
        let result = try CLI.run(["mount", mountpoint, "--repo", repo.root] + extra, environment: environment)
        #expect(result.status == 0, "mount failed: \(result.stderr)")
        return mountpoint
    }

    func unmount(_ mountpoint: String) throws {
        let result = try CLI.run(["unmount", mountpoint])
        #expect(result.status == 0, "unmount failed: \(result.stderr)")
    }
}

func sha256(_ path: String) throws -> String {
    let fd = open(path, O_RDONLY)
    guard fd >= 0 else { throw ShellError(description: "cannot open \(path): errno \(errno)") }
    defer { close(fd) }
    var hasher = SHA256()
    var buffer = [UInt8](repeating: 0, count: 1 << 20)
    while true {
        let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        guard n > 0 else { break }
        hasher.update(data: buffer[0..<n])
    }
    return hasher.finalize().map { String(format: "%02x", $0) }.joined()
}

func sha256(_ bytes: [UInt8]) -> String { SHA256.hash(data: bytes).map { String(format: "%02x", $0) }.joined() }

/// pread that reports errno.
func readAt(_ fd: Int32, _ offset: Int, _ count: Int) -> ([UInt8], Int32) {
    var buffer = [UInt8](repeating: 0, count: count)
    let n = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress, count, off_t(offset)) }
    if n < 0 { return ([], errno) }
    return (Array(buffer[0..<n]), 0)
}

func processRunning(_ pattern: String) -> Bool {
    (try? sh(["pgrep", "-f", pattern])).map { !$0.isEmpty } ?? false
}

@Suite("FUSE mount of the repository", .serialized)
struct MountTests {
    @Test("every served disk hashes like the original at each point; latest and point.json are served")
    func servedDisksMatch() throws {
        let demo = try DemoRepository()
        let mnt = try demo.mount()
        defer { try? demo.unmount(mnt) }
        for point in demo.points {
            #expect(try sha256("\(mnt)/demo/\(point.id)/demo.raw") == sha256(demo.contents[point.id]!))
            let manifest = try Data(contentsOf: URL(fileURLWithPath: "\(mnt)/demo/\(point.id)/point.json"))
            #expect(String(decoding: manifest, as: UTF8.self).contains("\"id\" : \"\(point.id)\""))
        }
        #expect(try FileManager.default.destinationOfSymbolicLink(atPath: "\(mnt)/demo/latest") == demo.points.last!.id)
        var st = stat()
        stat("\(mnt)/demo/latest/demo.raw", &st)
        #expect(Int(st.st_size) == demo.points.last!.disks[0].size)
        #expect(st.st_mode & 0o777 == 0o440)
    }

    @Test("8 threads of random reads return the original bytes")
    func randomReads() throws {
        let demo = try DemoRepository()
        let mnt = try demo.mount(["--cache-size", "\(4 << 20)"])  // small cache: many misses and evictions
        defer { try? demo.unmount(mnt) }
        let point = demo.points[0]
        let original = demo.contents[point.id]!
        let fd = open("\(mnt)/demo/\(point.id)/demo.raw", O_RDONLY)
        #expect(fd >= 0)
        defer { close(fd) }
        let failures = ManagedAtomicCounter()
        DispatchQueue.concurrentPerform(iterations: 8) { worker in
            var generator = SystemRandomNumberGenerator()
            for _ in 0..<300 {
                let offset = Int.random(in: 0..<(original.count - 1), using: &generator)
                let count = min(original.count - offset, Int.random(in: 1...(300_000), using: &generator))
                let (bytes, error) = readAt(fd, offset, count)
                if error != 0 || bytes[...] != original[offset..<(offset + count)] { failures.increment() }
            }
        }
        #expect(failures.value == 0)
    }

    @Test("reads while compact rewrites the chunks underneath, and after it, return the original bytes")
    func readsDuringCompact() throws {
        let demo = try DemoRepository()
        let mnt = try demo.mount(["--cache-size", "\(2 << 20)"])  // frames evicted, layouts kept: they go stale
        defer { try? demo.unmount(mnt) }
        let point = demo.points[1]
        let original = demo.contents[point.id]!
        let path = "\(mnt)/demo/\(point.id)/demo.raw"
        #expect(try sha256(path) == sha256(original))
        let fd = open(path, O_RDONLY)
        #expect(fd >= 0)
        defer { close(fd) }
        let failures = ManagedAtomicCounter(), reads = ManagedAtomicCounter()
        let compacting = ManagedAtomicCounter()
        compacting.increment()
        let group = DispatchGroup()
        for _ in 0..<4 {
            DispatchQueue.global().async(group: group) {
                var generator = SystemRandomNumberGenerator()
                while compacting.value > 0 {
                    let offset = Int.random(in: 0..<(original.count - 1), using: &generator)
                    let count = min(original.count - offset, Int.random(in: 1...(200_000), using: &generator))
                    let (bytes, error) = readAt(fd, offset, count)
                    reads.increment()
                    if error != 0 || bytes[...] != original[offset..<(offset + count)] { failures.increment() }
                }
            }
        }
        // Overlap made certain, not hoped for: compact starts once reads are under way, and
        // between chunks it waits (at its stop hook) until the readers have read again, so reads
        // interleave with the rewrites however busy the host is.
        @Sendable func readsPassed(_ target: Int) {
            let deadline = Date().addingTimeInterval(30)
            while reads.value < target && Date() < deadline { usleep(200) }
        }
        readsPassed(20)
        let hooks = ManagedAtomicCounter()
        let result = try demo.repo.compact(CompactOptions(level: 9, shouldStop: {
            hooks.increment()
            readsPassed(reads.value + 2)
            return false
        }))
        let readsDuring = reads.value
        compacting.decrement()
        group.wait()
        #expect(result.compacted > 0 && result.bytesAfter < result.bytesBefore)
        #expect(hooks.value >= result.compacted && readsDuring >= 20 + result.compacted,
                "\(readsDuring) reads while \(result.compacted) chunks were rewritten")
        #expect(failures.value == 0, "\(failures.value) of \(reads.value) reads differed or failed")
        #expect(try sha256(path) == sha256(original), "the same open disk, every chunk now compacted")
        #expect(try sha256("\(mnt)/demo/\(demo.points[0].id)/demo.raw") == sha256(demo.contents[demo.points[0].id]!))
    }

    @Test("eight threads reading frames and reading ahead through a cache of four slots all get each frame's bytes; a cache larger than the address space gets an error naming --cache-size")
    func frameSlots() throws {
        let demo = try DemoRepository(password: "pw")
        let point = demo.points[1]
        let index = try demo.repo.indexReader(point, disk: "demo")
        let disk = demo.contents[point.id]!
        let frameSize = demo.repo.config.frameSize
        var found: [(id: ChunkID, start: Int, length: Int)] = []
        for chunk in 0..<index.count {
            let id = try index.id(at: chunk)
            let end = min(index.diskSize, (chunk + 1) * index.chunkSize)
            guard !id.isZero else { continue }
            for start in stride(from: chunk * index.chunkSize, to: end, by: frameSize) {
                found.append((id, start, min(frameSize, end - start)))
            }
        }
        let frames = found
        #expect(frames.count > 8)
        let cache = try FrameCache(repository: demo.repo, capacity: 4 * frameSize)
        let wrong = Locked(0), reads = Locked(0)
        DispatchQueue.concurrentPerform(iterations: 8) { thread in
            for i in 0..<300 {
                let f = frames[(i * 7919 + thread * 104_729) % frames.count]
                let frame = (f.start % index.chunkSize) / frameSize
                if i % 40 == thread { cache.prefetch(f.id, frames: index.chunkSize / frameSize) }
                let right = try? cache.withFrame(frame, of: f.id) { bytes in
                    bytes.count == f.length && bytes.elementsEqual(disk[f.start..<(f.start + f.length)])
                }
                reads.withLock { $0 += 1 }
                if right != true { wrong.withLock { $0 += 1 } }
            }
        }
        #expect(reads.withLock { $0 } == 2400)
        #expect(wrong.withLock { $0 } == 0, "frames read wrong or not at all")
        #expect(cache.capacity == 4 * frameSize && cache.size <= cache.capacity && cache.size > 0)
        // More address space than the machine has: an error naming the option, not a crash.
        let error = #expect(throws: LifeboatError.self) { try FrameCache(repository: demo.repo, capacity: 1 << 60) }
        #expect(error?.message.contains("give a smaller --cache-size") == true, "\(String(describing: error))")
    }

    @Test("a disk's warmer takes layouts from DISK.layouts; with frames moved in it, or garbage, the served bytes stay right")
    func storedLayouts() throws {
        let demo = try DemoRepository()
        let ids = try demo.repo.indexReader(demo.points[1], disk: "demo").ids(limit: 1 << 16)
        // With the chunk files out of reach, only DISK.layouts can give the layouts.
        let chunks = demo.repo.root + "/chunks"
        #expect(rename(chunks, chunks + ".away") == 0)
        let fromFile = try FrameCache(repository: demo.repo, capacity: 1 << 20)
        fromFile.warmLayouts(ids) { demo.repo.storedLayouts(demo.points[1], disk: "demo") }
        let fromHeaders = try FrameCache(repository: demo.repo, capacity: 1 << 20)
        fromHeaders.warmLayouts(ids)
        #expect(rename(chunks + ".away", chunks) == 0)
        #expect(ids.count > 3 && fromFile.layoutCount == ids.count)
        #expect(fromHeaders.layoutCount == 0)

        // Point 1: every entry's first frame one byte longer and its second one shorter (the
        // file sizes still match, the id check still passes: only decoding can tell). Point 0: garbage.
        let layouts = demo.repo.root + "/machines/demo/points/\(demo.points[1].id)/demo.layouts"
        var bytes = Disk.contents(layouts)
        var offset = 16, shifted = 0
        while offset + 56 <= bytes.count {
            let frames = Int(bytes[offset + 52]) | Int(bytes[offset + 53]) << 8
            if frames >= 2 {
                let first = offset + 56, second = offset + 56 + 36
                let a = bytes[first..<(first + 4)].reversed().reduce(0) { $0 << 8 | Int($1) }
                let b = bytes[second..<(second + 4)].reversed().reduce(0) { $0 << 8 | Int($1) }
                if b > 1 {
                    bytes.replaceSubrange(first..<(first + 4), with: withUnsafeBytes(of: UInt32(a + 1).littleEndian, Array.init))
                    bytes.replaceSubrange(second..<(second + 4), with: withUnsafeBytes(of: UInt32(b - 1).littleEndian, Array.init))
                    shifted += 1
                }
            }
            offset += 56 + frames * 36
        }
        #expect(shifted > 3 && offset == bytes.count)
        #expect(FileManager.default.createFile(atPath: layouts, contents: Data(bytes)))
        let garbage = demo.repo.root + "/machines/demo/points/\(demo.points[0].id)/demo.layouts"
        #expect(FileManager.default.createFile(atPath: garbage, contents: Data(Array(Disk.contents(garbage).prefix(16)) + Bytes.random(100_000, seed: 9))))
        let mnt = try demo.mount(["--cache-size", "\(2 << 20)"])
        defer { try? demo.unmount(mnt) }
        for point in demo.points {
            #expect(try sha256("\(mnt)/demo/\(point.id)/demo.raw") == sha256(demo.contents[point.id]!), "point \(point.id)")
        }
    }

    @Test("a point taken while mounted appears; a pruned one disappears")
    func livePoints() throws {
        let demo = try DemoRepository()
        let mnt = try demo.mount()
        defer { try? demo.unmount(mnt) }
        try DemoDisk.setMarker(demo.disk, "marker C")
        let third = try demo.backup()
        var appeared = false
        for _ in 0..<50 where !appeared {
            appeared = (try? FileManager.default.contentsOfDirectory(atPath: "\(mnt)/demo"))?.contains(third.id) == true
            if !appeared { usleep(100_000) }
        }
        #expect(appeared)
        #expect(try sha256("\(mnt)/demo/\(third.id)/demo.raw") == sha256(demo.contents[third.id]!))
        #expect(try FileManager.default.destinationOfSymbolicLink(atPath: "\(mnt)/demo/latest") == third.id)
        _ = try demo.repo.prune("demo", policy: RetentionPolicy(last: 1))
        var gone = false
        for _ in 0..<50 where !gone {
            gone = !FileManager.default.fileExists(atPath: "\(mnt)/demo/\(demo.points[0].id)")
            if !gone { usleep(100_000) }
        }
        #expect(gone)
    }

    @Test("nothing can be written through the mount: EROFS")
    func readOnly() throws {
        let demo = try DemoRepository()
        let mnt = try demo.mount()
        defer { try? demo.unmount(mnt) }
        let file = "\(mnt)/demo/latest/demo.raw"
        #expect(open(file, O_WRONLY) == -1 && errno == EROFS)
        #expect(open(file, O_RDWR) == -1 && errno == EROFS)
        #expect(truncate(file, 0) == -1 && errno == EROFS)
        #expect(chmod(file, 0o644) == -1 && errno == EROFS)
        #expect(mkdir("\(mnt)/demo/new", 0o755) == -1 && errno == EROFS)
        #expect(unlink("\(mnt)/demo/latest/point.json") == -1 && errno == EROFS)
        #expect(open("\(mnt)/demo/new.raw", O_CREAT | O_WRONLY, 0o644) == -1 && errno == EROFS)
    }

    @Test("a qcow2 overlay backed by the served disk reads the point's bytes; holes answer SEEK_HOLE")
    func qcow2Overlay() throws {
        let demo = try DemoRepository()
        let mnt = try demo.mount()
        defer { try? demo.unmount(mnt) }
        let point = demo.points[0]
        let served = "\(mnt)/demo/\(point.id)/demo.raw"
        let overlay = demo.scratch.file("overlay.qcow2")
        try sh(["qemu-img", "create", "-q", "-f", "qcow2", "-b", served, "-F", "raw", overlay])
        let original = demo.scratch.file("first.raw")
        FileManager.default.createFile(atPath: original, contents: Data(demo.contents[point.id]!))
        let compare = try sh(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", overlay, original])
        #expect(compare.contains("Images are identical"))
        // The served file says where its data is, from the chunk index.
        let fd = open(served, O_RDONLY)
        defer { close(fd) }
        let firstData = lseek(fd, 0, 3 /* SEEK_DATA */)
        let firstHole = lseek(fd, 0, 4 /* SEEK_HOLE */)
        #expect(firstData == 0)
        #expect(firstHole > 0 && firstHole < off_t(point.disks[0].size))
        let map = try sh(["qemu-img", "map", "--output=json", "-f", "raw", served])
        #expect(map.contains("\"data\": false"), "qemu sees the holes of the served disk")
    }

    @Test("a flipped byte in a chunk gives EIO for that range only, and the mount keeps serving")
    func damagedChunk() throws {
        let demo = try DemoRepository()
        let point = demo.points[0]
        let index = try demo.repo.index(point, disk: "demo")
        let chunk = index.ids.firstIndex { !$0.isZero }!
        let path = demo.repo.root + "/chunks/" + index.ids[chunk].hex.prefix(2) + "/" + index.ids[chunk].hex
        Disk.patch(path, writes: [(Int(Disk.contents(path).count) - 10, [0x55])])   // inside the last frame
        let mnt = try demo.mount()
        defer { try? demo.unmount(mnt) }
        let fd = open("\(mnt)/demo/\(point.id)/demo.raw", O_RDONLY)
        defer { close(fd) }
        let chunkStart = chunk * index.chunkSize
        let (_, badError) = readAt(fd, chunkStart + index.chunkSize - 4096, 4096)
        #expect(badError == EIO)
        let (good, goodError) = readAt(fd, chunkStart, 4096)   // first frame of the same chunk is intact
        #expect(goodError == 0)
        #expect(good[...] == demo.contents[point.id]![chunkStart..<(chunkStart + 4096)])
        let other = index.ids.lastIndex { !$0.isZero && $0 != index.ids[chunk] }!
        let (fine, fineError) = readAt(fd, other * index.chunkSize, 65536)
        #expect(fineError == 0)
        #expect(fine[...] == demo.contents[point.id]![(other * index.chunkSize)..<(other * index.chunkSize + 65536)])
        let log = try String(contentsOfFile: "/run/lifeboat/mount" + mnt.replacingOccurrences(of: "/", with: "_") + ".log", encoding: .utf8)
        #expect(log.contains(index.ids[chunk].hex))
    }

    @Test("memory stays bounded while reading a whole large disk")
    func boundedMemory() throws {
        let scratch = Scratch()
        let disk = scratch.file("big.raw")
        try sh(["dd", "if=/dev/urandom", "of=\(disk)", "bs=1M", "count=384", "status=none"])
        let repo = try Repository.create(at: scratch.file("repo"))
        try repo.protect(Machine(name: "big", disks: Repository.diskNames(for: [disk])))
        let point = try repo.backup("big")
        let mnt = scratch.file("mnt")
        try FileManager.default.createDirectory(atPath: mnt, withIntermediateDirectories: false)
        let cache = 16 << 20
        #expect(try CLI.run(["mount", mnt, "--repo", repo.root, "--cache-size", "\(cache)"]).status == 0)
        defer { _ = try? CLI.run(["unmount", mnt]) }
        let pid = try sh(["pgrep", "-f", "lifeboat mount \(mnt) --foreground"]).split(separator: "\n").first.map(String.init) ?? ""
        func kib(_ field: String) throws -> Int {
            let status = try String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)
            return Int(status.split(separator: "\n").first { $0.hasPrefix(field + ":") }!.split(separator: " ")[1])!
        }
        // Measured from the daemon as it starts (its code and libraries: 45 MiB in a debug
        // build), so that the bound is about what reading costs, not how big the binary is.
        let started = try kib("VmRSS")
        #expect(try sha256("\(mnt)/big/\(point.id)/big.raw") == sha256(disk))
        let grown = (try kib("VmHWM") - started) * 1024
        #expect(grown < cache + (64 << 20),
                "the daemon grew by \(grown >> 10) KiB reading 384 MiB with a 16 MiB cache (from \(started) KiB)")
    }

    @Test("encrypted repositories are served too")
    func encrypted() throws {
        let demo = try DemoRepository(password: "s3cret")
        let mnt = try demo.mount(environment: ["LIFEBOAT_PASSWORD": "s3cret"])
        defer { try? demo.unmount(mnt) }
        #expect(try sha256("\(mnt)/demo/latest/demo.raw") == sha256(demo.contents[demo.points.last!.id]!))
        let wrong = try CLI.run(["mount", demo.scratch.file("x"), "--repo", demo.repo.root], environment: ["LIFEBOAT_PASSWORD": "nope"])
        #expect(wrong.status != 0)
    }

    @Test("bad mount input: one line naming the thing")
    func badInput() throws {
        let demo = try DemoRepository()
        let file = demo.scratch.file("plain-file")
        FileManager.default.createFile(atPath: file, contents: Data())
        let mnt = try demo.mount()
        defer { try? demo.unmount(mnt) }
        let cases: [([String], String)] = [
            (["mount", demo.scratch.file("missing"), "--repo", demo.repo.root], "does not exist"),
            (["mount", file, "--repo", demo.repo.root], "is not a directory"),
            (["mount", mnt, "--repo", demo.repo.root], "is already a mount point"),
            (["mount", demo.scratch.path, "--repo", demo.scratch.file("no-repo")], "no repository at"),
            (["unmount", demo.scratch.path], "is not a lifeboat mount"),
            (["mount", demo.scratch.path, "--repo", demo.repo.root, "--cache-size", "4096"], "--cache-size 4096 is out of range"),
            (["mount", demo.scratch.path, "--repo", demo.repo.root, "--cache-size", "\(1 << 50)"], "give bytes from 1 MiB"),
            (["mount", demo.scratch.path, "--repo", demo.repo.root, "--busy-poll", "200000"], "--busy-poll 200000 is out of range"),
        ]
        for (arguments, message) in cases {
            let result = try CLI.run(arguments)
            #expect(result.status != 0)
            #expect(result.stderr.split(separator: "\n").count == 1 && result.stderr.contains(message), "\(arguments): \(result.stderr)")
        }
    }
}

/// A counter many threads can bump.
final class ManagedAtomicCounter: @unchecked Sendable {
    private let lock = NSLock()
    private var count = 0
    func increment() { lock.lock(); count += 1; lock.unlock() }
    func decrement() { lock.lock(); count -= 1; lock.unlock() }
    var value: Int { lock.lock(); defer { lock.unlock() }; return count }
}

@Suite("Who may read served disks", .serialized)
struct AccessTests {
    @Test("with --allow-other, root and QEMU's user read the disks; any other user is refused")
    func qemuUserReads() throws {
        let group = QemuUser.groupName()
        #expect(getgrnam(group) != nil, "libvirt's QEMU group \(group) exists (libvirt-daemon-system installs it)")
        let demo = try DemoRepository()
        let mnt = try demo.mount(["--allow-other"])
        defer { try? demo.unmount(mnt) }
        chmod(demo.scratch.path, 0o755)   // let the other users reach the mount point
        let file = "\(mnt)/demo/latest/demo.raw"
        var st = stat()
        #expect(stat(file, &st) == 0)
        #expect(st.st_uid == 0 && st.st_gid == QemuUser.gid() && st.st_mode & 0o777 == 0o440)
        let qemuUser = try sh(["sh", "-c", "awk -F'\"' '/^ *user *=/ {print $2}' /etc/libvirt/qemu.conf | head -1"])
            .trimmingCharacters(in: .whitespacesAndNewlines)
        let user = qemuUser.isEmpty ? "libvirt-qemu" : qemuUser
        let allowed = try sh(["runuser", "-u", user, "--", "head", "-c", "512", file])
        #expect(allowed.utf8.count == 512 || !allowed.isEmpty)
        #expect(throws: ShellError.self) { try sh(["runuser", "-u", "nobody", "--", "head", "-c", "512", file]) }
    }

    @Test("without --allow-other only root reads")
    func rootOnly() throws {
        let demo = try DemoRepository()
        let mnt = try demo.mount()
        defer { try? demo.unmount(mnt) }
        chmod(demo.scratch.path, 0o755)
        #expect(FileManager.default.isReadableFile(atPath: "\(mnt)/demo/latest/demo.raw"))
        #expect(throws: ShellError.self) { try sh(["runuser", "-u", "libvirt-qemu", "--", "head", "-c", "512", "\(mnt)/demo/latest/demo.raw"]) }
    }

    @Test("a repository that vanishes underneath gives EIO, not a crash")
    func vanishingRepository() throws {
        let demo = try DemoRepository()
        let mnt = try demo.mount(["--cache-size", "\(1 << 20)"])
        defer { try? demo.unmount(mnt) }
        let point = demo.points[0]
        let fd = open("\(mnt)/demo/\(point.id)/demo.raw", O_RDONLY)
        defer { close(fd) }
        #expect(fd >= 0)
        try FileManager.default.moveItem(atPath: demo.repo.root + "/chunks", toPath: demo.scratch.file("chunks-away"))
        let (_, error) = readAt(fd, 8 << 20, 4096)
        #expect(error == EIO)
        try FileManager.default.moveItem(atPath: demo.scratch.file("chunks-away"), toPath: demo.repo.root + "/chunks")
        let (bytes, again) = readAt(fd, 8 << 20, 4096)
        #expect(again == 0, "the mount is still serving")
        #expect(bytes[...] == demo.contents[point.id]![(8 << 20)..<((8 << 20) + 4096)])
    }
}

/// Two 4 KiB files: a read of /slow at offset 0 waits (as a read that misses the frame cache
/// waits for the disk, after `RequestLoop.willBlock()`) until /fast has been read, or 10 s.
final class WaitingFileSystem: FuseFileSystem {
    let slowWaiting = DispatchSemaphore(value: 0)
    let fastRead = DispatchSemaphore(value: 0)
    private let waiting = Locked(false)

    func attributes(of path: String) throws -> FileAttributes {
        let kind: FileAttributes.Kind
        switch path {
        case "/": kind = .directory
        case "/slow", "/fast": kind = .file
        default: throw Errno.noSuchFileOrDirectory
        }
        return FileAttributes(kind: kind, size: kind == .file ? 4096 : 0, permissions: 0o555, uid: 0, gid: 0,
                              modified: Date(timeIntervalSince1970: 0))
    }
    func list(_ path: String) throws -> [String] {
        guard path == "/" else { throw Errno.notDirectory }
        return ["fast", "slow"]
    }
    func link(_ path: String) throws -> String { throw Errno.invalidArgument }
    func open(_ path: String) throws -> OpenedFile { OpenedFile(handle: path == "/slow" ? 1 : 2, directIO: true) }
    func read(_ handle: UInt64, into buffer: UnsafeMutableRawBufferPointer, at offset: Int) throws -> Int {
        let n = max(0, min(buffer.count, 4096 - offset))
        if handle == 1 && offset == 0 {
            RequestLoop.willBlock()
            waiting.withLock { $0 = true }
            slowWaiting.signal()
            guard fastRead.wait(timeout: .now() + 10) == .success else { throw Errno.timedOut }
        }
        UnsafeMutableRawBufferPointer(rebasing: buffer[0..<n]).initializeMemory(as: UInt8.self, repeating: handle == 1 ? 0x73 : 0x66)
        if handle == 2 && waiting.withLock({ $0 }) { fastRead.signal() }
        return n
    }
    func seek(_ handle: UInt64, to offset: Int, whence: Int32) throws -> Int { throw Errno.invalidArgument }
    func close(_ handle: UInt64) {}
}

/// Lets a test hand the session to the thread that serves it.
final class SessionBox: @unchecked Sendable {
    let session: FuseSession
    init(_ session: FuseSession) { self.session = session }
}

@Suite("FUSE request loop", .serialized)
struct RequestLoopTests {
    @Test("a read that waits lets another client's read through at once; fstat and listings of open handles answer")
    func waitingRead() throws {
        let scratch = Scratch()
        let mountpoint = scratch.file("mnt")
        try FileManager.default.createDirectory(atPath: mountpoint, withIntermediateDirectories: false)
        let fs = WaitingFileSystem()
        let box = SessionBox(try FuseSession(fileSystem: fs, mountpoint: mountpoint, fsname: "lifeboat-test", options: []))
        let stopped = DispatchSemaphore(value: 0)
        Thread { try? box.session.run(threads: 4, busyPoll: .microseconds(300)); stopped.signal() }.start()
        defer {
            _ = try? sh(["fusermount3", "-u", mountpoint])
            #expect(stopped.wait(timeout: .now() + 10) == .success, "the loop ends when unmounted")
            box.session.close()
        }
        // Both files open first, and reads one at a time: then one thread serves them, and the
        // others wait away from the device (opening wakes one to read, in case it waits).
        let fd = open(mountpoint + "/fast", O_RDONLY)
        let slowFD = open(mountpoint + "/slow", O_RDONLY)
        #expect(fd >= 0 && slowFD >= 0)
        defer { close(fd); close(slowFD) }
        for _ in 0..<20 {
            #expect(readAt(fd, 0, 4096).0 == [UInt8](repeating: 0x66, count: 4096))
            #expect(readAt(slowFD, 1, 4095).0 == [UInt8](repeating: 0x73, count: 4095))
        }
        // One client's read waits in the file system; a second client's read must not wait for it.
        let slow = Locked<([UInt8], Int32)>(([], -1))
        let slowDone = DispatchSemaphore(value: 0)
        Thread {
            slow.withLock { $0 = readAt(slowFD, 0, 4096) }
            slowDone.signal()
        }.start()
        #expect(fs.slowWaiting.wait(timeout: .now() + 10) == .success, "the slow read reached the file system")
        let started = ContinuousClock.now
        let (fast, error) = readAt(fd, 0, 4096)
        #expect(error == 0 && fast == [UInt8](repeating: 0x66, count: 4096))
        #expect(started.duration(to: .now) < .seconds(5), "the fast read did not wait for the slow one")
        #expect(slowDone.wait(timeout: .now() + 15) == .success)
        let (bytes, slowError) = slow.withLock { $0 }
        #expect(slowError == 0 && bytes == [UInt8](repeating: 0x73, count: 4096))
        // Requests on open handles carry no path (nullpath_ok): libfuse's box keeps them.
        var st = stat()
        #expect(fstat(fd, &st) == 0 && st.st_size == 4096)
        #expect(try FileManager.default.contentsOfDirectory(atPath: mountpoint).sorted() == ["fast", "slow"])
    }
}
