import Foundation
import LifeboatBase
import Testing
@testable import LifeboatRepository
import LifeboatTestSupport
#if canImport(Glibc)
import Glibc
#endif

/// Temporary files anywhere in the repository.
func temporaryFiles(in path: String) -> [String] {
    guard let walker = FileManager.default.enumerator(atPath: path) else { return [] }
    return walker.compactMap { $0 as? String }.filter { $0.split(separator: "/").last?.hasPrefix(".tmp-") == true }
}

/// Waits until the machine's backup lock names a running process other than us.
func waitForBackupToStart(_ repo: Repository, _ machine: String, _ child: Process) {
    let lock = repo.machinePath(machine) + "/backup.lock"
    for _ in 0..<500 {
        if FileLock.owner(of: lock) == "\(child.processIdentifier)" { return }
        usleep(10_000)
    }
    Issue.record("the backup child never took its lock")
}

@Suite("Crashes, concurrency and bad input", .serialized)
struct CrashAndInputTests {
    @Test("kill -9 at random moments of backup, prune and gc leaves a valid repository")
    func killNine() throws {
        let scratch = Scratch()
        let disk = scratch.file("disk.raw")
        let size = 96 << 20
        try Disk.make(disk, size: size, writes: [(0, Bytes.random(size, seed: 100))])
        let repo = try Repository.create(at: scratch.file("repo"))
        try repo.protect(Machine(name: "vm", disks: Repository.diskNames(for: [disk])))
        var expected: [String: [UInt8]] = [:]   // point id -> disk bytes it must restore
        let args = ["--repo", repo.root]
        var generator = SystemRandomNumberGenerator()
        for round in 0..<8 {
            Disk.patch(disk, writes: [(Int.random(in: 0..<(size - (4 << 20)), using: &generator), Bytes.random(4 << 20, seed: UInt64(round) + 1000))])
            let contents = Disk.contents(disk)
            let command: [String]
            switch round % 4 {
            case 3: command = ["gc"]
            case 2: command = ["prune", "vm", "--keep-last", "3"]
            default: command = ["backup", "vm"]
            }
            let child = CLI.start(command + args)
            usleep(UInt32.random(in: 5_000...400_000, using: &generator))
            kill(child.processIdentifier, SIGKILL)
            child.waitUntilExit()
            // Whatever it reached, every visible point is whole.
            let points = try repo.points("vm")
            for point in points where expected[point.id] == nil && command[0] == "backup" {
                expected[point.id] = contents
            }
            for id in Array(expected.keys) where !points.contains(where: { $0.id == id }) {
                expected[id] = nil   // pruned before the kill
            }
            #expect(try repo.verify().isClean, "round \(round): verify after kill -9 of \(command[0])")
            // Then a backup completes and records the disk as it is.
            let point = try repo.backup("vm")
            expected[point.id] = contents
        }
        #expect(temporaryFiles(in: repo.root).isEmpty, "a completed backup removes dead writers' temporary files")
        for point in try repo.points("vm") {
            let out = scratch.file("restore-\(point.id).raw")
            _ = try repo.restore(point, disk: "disk", to: out)
            #expect(Disk.contents(out) == expected[point.id], "point \(point.id) restores byte-identical")
            unlink(out)
        }
    }

    @Test("a second backup of the same machine refuses while the first runs; gc waits for it")
    func concurrentBackups() throws {
        let scratch = Scratch()
        let disk = scratch.file("disk.raw")
        try Disk.make(disk, size: 192 << 20, writes: [(0, Bytes.random(192 << 20, seed: 7))])
        let repo = try Repository.create(at: scratch.file("repo"))
        try repo.protect(Machine(name: "vm", disks: Repository.diskNames(for: [disk])))
        let child = CLI.start(["backup", "vm", "--repo", repo.root])
        waitForBackupToStart(repo, "vm", child)
        let second = try CLI.run(["backup", "vm", "--repo", repo.root])
        #expect(second.status == 1)
        #expect(second.stderr.contains("a backup of machine vm is already running (pid \(child.processIdentifier))"))
        var waited = false
        let gc = try repo.gc { waited = true }
        child.waitUntilExit()
        #expect(child.terminationStatus == 0)
        #expect(waited, "gc waited for the running backup")
        #expect(gc.removed == 0)
        let point = try repo.point("vm", nil)
        _ = try repo.restore(point, disk: "disk", to: scratch.file("r.raw"))
        #expect(Disk.contents(scratch.file("r.raw")) == Disk.contents(disk))
        #expect(try repo.verify().isClean)
    }

    @Test("disk full during backup: no point, earlier points intact, no temporary files")
    func diskFull() throws {
        let scratch = Scratch()
        let mount = scratch.file("small")
        try FileSystem.makeDirectory(mount)
        #expect(Glibc.mount("tmpfs", mount, "tmpfs", 0, "size=24m") == 0, "mounting a small tmpfs needs root")
        defer { umount2(mount, Int32(MNT_DETACH)) }
        let disk = scratch.file("disk.raw")
        try Disk.make(disk, size: 64 << 20, writes: [(0, Bytes.random(4 << 20, seed: 1))])
        let repo = try Repository.create(at: mount + "/repo")
        try repo.protect(Machine(name: "vm", disks: Repository.diskNames(for: [disk])))
        let first = try repo.backup("vm")
        Disk.patch(disk, writes: [(8 << 20, Bytes.random(40 << 20, seed: 2))])
        do {
            _ = try repo.backup("vm")
            Issue.record("a backup larger than the repository's file system succeeded")
        } catch let error as LifeboatError {
            #expect(error.code == .noSpace)
            #expect(error.message.contains("no space left on device"))
        }
        #expect(try repo.points("vm").map(\.id) == [first.id])
        #expect(temporaryFiles(in: repo.root).isEmpty)
        _ = try repo.gc()
        #expect(try repo.verify().isClean)
        _ = try repo.restore(first, disk: "disk", to: scratch.file("r.raw"))
        #expect(Disk.contents(scratch.file("r.raw")).prefix(4 << 20) == Bytes.random(4 << 20, seed: 1)[...])
        // The CLI says it in one line.
        let result = try CLI.run(["backup", "vm", "--repo", repo.root])
        #expect(result.status == 1)
        #expect(result.stderr.split(separator: "\n").count == 1)
        #expect(result.stderr.contains("no space left on device"))
    }

    @Test("bad input gets a one-line error naming the thing", arguments: [
        (["points", "x", "--repo", "/nonexistent/repo"], "no repository at /nonexistent/repo"),
        (["points", "x", "--repo", "/tmp"], "/tmp is not a Lifeboat repository"),
        (["protect", "a/b", "--disk", "/etc/hostname", "--repo", "REPO"], "invalid machine name 'a/b'"),
        (["protect", "..", "--disk", "/etc/hostname", "--repo", "REPO"], "invalid machine name '..'"),
        (["protect", "", "--disk", "/etc/hostname", "--repo", "REPO"], "invalid machine name ''"),
        (["protect", "m", "--disk", "/nonexistent.raw", "--repo", "REPO"], "disk /nonexistent.raw does not exist"),
        (["protect", "m", "--disk", "/tmp", "--repo", "REPO"], "disk /tmp is a directory"),
        (["backup", "ghost", "--repo", "REPO"], "no machine named ghost"),
        (["points", "m2", "--repo", "REPO"], "no machine named m2"),
        (["restore", "vm", "--to", "/tmp", "--repo", "REPO"], "machine vm has no recovery points yet"),
        (["init", "--repo", "REPO"], "a repository already exists at REPO"),
        (["protect", "m", "--disk", "/etc/hostname", "--chunk-size", "300000", "--repo", "REPO"], "invalid chunk size 300000"),
        (["protect", "m", "--disk", "/etc/hostname", "--chunk-size", "4096", "--repo", "REPO"], "invalid chunk size 4096"),
    ])
    func badInput(arguments: [String], message: String) throws {
        let scratch = Scratch()
        let repo = try Repository.create(at: scratch.file("repo"))
        try Disk.make(scratch.file("d.raw"), size: 1 << 20, writes: [])
        try repo.protect(Machine(name: "vm", disks: Repository.diskNames(for: [scratch.file("d.raw")])))
        let result = try CLI.run(arguments.map { $0 == "REPO" ? repo.root : $0 })
        #expect(result.status != 0)
        let lines = result.stderr.split(separator: "\n")
        #expect(lines.count == 1, "one line: \(result.stderr)")
        #expect(result.stderr.contains(message.replacingOccurrences(of: "REPO", with: repo.root)), "\(result.stderr)")
    }

    @Test("a disk that vanished after protect, and a wrong password, are refused cleanly")
    func vanishedDiskAndPassword() throws {
        let scratch = Scratch()
        try Disk.make(scratch.file("d.raw"), size: 1 << 20, writes: [(0, [1])])
        let env = ["LIFEBOAT_PASSWORD": "right"]
        #expect(try CLI.run(["init", "--encrypt", "--repo", scratch.file("repo")], environment: env).status == 0)
        #expect(try CLI.run(["protect", "vm", "--disk", scratch.file("d.raw"), "--repo", scratch.file("repo")], environment: env).status == 0)
        let wrong = try CLI.run(["backup", "vm", "--repo", scratch.file("repo")], environment: ["LIFEBOAT_PASSWORD": "wrong"])
        #expect(wrong.status == 1)
        #expect(wrong.stderr.contains("wrong password"))
        let none = try CLI.run(["points", "vm", "--repo", scratch.file("repo")], environment: ["LIFEBOAT_PASSWORD": ""].filter { _ in false })
        #expect(none.status == 1)
        unlink(scratch.file("d.raw"))
        let gone = try CLI.run(["backup", "vm", "--repo", scratch.file("repo")], environment: env)
        #expect(gone.status == 1)
        #expect(gone.stderr.contains("disk \(scratch.file("d.raw")) does not exist"))
        #expect(temporaryFiles(in: scratch.file("repo")).isEmpty)
    }
}
