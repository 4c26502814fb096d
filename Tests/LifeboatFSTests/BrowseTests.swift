import Foundation
import LifeboatFS
import LifeboatRepository
import LifeboatTestSupport
import Testing
#if canImport(Glibc)
import Glibc
#endif

func loopDevices() -> [String] {
    ((try? sh(["losetup", "-a"])) ?? "").split(separator: "\n").map(String.init)
}

@Suite("Browsing recovery points", .serialized)
struct BrowseTests {
    @Test("browse two points, read a different marker from each; unbrowse leaves no mount, loop device or FUSE process")
    func browseTwoPoints() throws {
        let demo = try DemoRepository()
        let loopsBefore = loopDevices()
        var dirs: [String] = []
        for (point, marker) in zip(demo.points, ["marker A", "marker B"]) {
            let dir = demo.scratch.file("browse-\(point.id)")
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: false)
            dirs.append(dir)
            let result = try CLI.run(["browse", "demo", "--point", point.id, dir, "--repo", demo.repo.root])
            #expect(result.status == 0, "\(result.stderr)")
            #expect(result.stdout.contains("mounted     demo p2 (ext4)"))
            #expect(result.stdout.contains("mounted     demo p1 (vfat)"))
            let text = try String(contentsOfFile: "\(dir)/demo/p2/marker", encoding: .utf8)
            #expect(text == marker + "\n")
            #expect(FileManager.default.fileExists(atPath: "\(dir)/demo/p1/SYSLINUX.CFG"))
        }
        for dir in dirs {
            let result = try CLI.run(["unbrowse", dir])
            #expect(result.status == 0, "\(result.stderr)")
            #expect(!Mounts.all().contains { $0.mountpoint.hasPrefix(dir + "/") })
            #expect(try FileManager.default.contentsOfDirectory(atPath: dir).isEmpty)
        }
        #expect(loopDevices() == loopsBefore)
        #expect(!processRunning("lifeboat mount \(demo.scratch.path)"))
    }

    @Test("NTFS (a Windows guest's partition, made by mkntfs): browsed read-only, through ntfs-3g when the kernel has no ntfs3; unbrowse leaves nothing")
    func ntfsPartition() throws {
        let scratch = Scratch()
        let part = scratch.file("part.img"), disk = scratch.file("win.raw"), file = scratch.file("m.txt")
        try sh(["truncate", "-s", "32M", part])
        _ = try? sh(["mkntfs", "-q", "-F", "-f", "-L", "WIN", "-p", "2048", "-H", "255", "-S", "63", part])
        try "written in windows\n".write(toFile: file, atomically: true, encoding: .utf8)
        try sh(["ntfscp", "-f", part, file, "marker.txt"])
        try sh(["truncate", "-s", "40M", disk])
        try sh(["sh", "-c", "printf 'label: dos\\nstart=1MiB, size=32MiB, type=7\\n' | sfdisk -q \(disk)"])
        try sh(["dd", "if=\(part)", "of=\(disk)", "bs=1M", "seek=1", "conv=notrunc", "status=none"])
        let repo = try Repository.create(at: scratch.file("repo"))
        try repo.protect(Machine(name: "win", disks: Repository.diskNames(for: [disk])))
        _ = try repo.backup("win")
        let loopsBefore = loopDevices()
        let dir = scratch.file("browse")
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: false)
        let result = try CLI.run(["browse", "win", dir, "--repo", repo.root])
        #expect(result.status == 0, "\(result.stderr)")
        #expect(result.stdout.contains("(ntfs)"), "\(result.stdout)")
        #expect(try String(contentsOfFile: "\(dir)/win/p1/marker.txt", encoding: .utf8) == "written in windows\n")
        #expect(!FileManager.default.createFile(atPath: "\(dir)/win/p1/new.txt", contents: Data("x".utf8)), "read-only")
        let unbrowse = try CLI.run(["unbrowse", dir])
        #expect(unbrowse.status == 0, "\(unbrowse.stderr)")
        #expect(!Mounts.all().contains { $0.mountpoint.hasPrefix(dir + "/") })
        #expect(loopDevices() == loopsBefore)
    }

    @Test("LVM: linear logical volumes are mounted without device-mapper, others reported; two disks with the same volume group name do not clash")
    func logicalVolumes() throws {
        let scratch = Scratch()
        let first = scratch.file("one.raw"), second = scratch.file("two.raw")
        try sh([packageRoot + "/scripts/make-lvm-disk", first, "--marker", "first disk", "--vg", "lbsame"])
        try sh([packageRoot + "/scripts/make-lvm-disk", second, "--marker", "second disk", "--vg", "lbsame"])
        let repo = try Repository.create(at: scratch.file("repo"))
        try repo.protect(Machine(name: "lvm", disks: Repository.diskNames(for: [first, second])))
        _ = try repo.backup("lvm")
        let loopsBefore = loopDevices()
        let dir = scratch.file("browse")
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: false)
        let result = try CLI.run(["browse", "lvm", dir, "--repo", repo.root])
        #expect(result.status == 0, "\(result.stderr)")
        #expect(try String(contentsOfFile: "\(dir)/one/p2-lbsame-root/marker", encoding: .utf8) == "first disk\n")
        #expect(try String(contentsOfFile: "\(dir)/two/p2-lbsame-root/marker", encoding: .utf8) == "second disk\n")
        #expect(try String(contentsOfFile: "\(dir)/one/p1/marker", encoding: .utf8) == "boot\n")
        #expect(result.stdout.contains("not mounted one p2-lbsame-split (LVM): its extents are not contiguous"), "\(result.stdout)")
        let undo = try CLI.run(["unbrowse", dir])
        #expect(undo.status == 0, "\(undo.stderr)")
        #expect(loopDevices() == loopsBefore, "every loop device detached, the logical volumes' too")
        #expect(((try? sh(["vgs", "--noheadings", "-o", "vg_name"])) ?? "").contains("lbsame") == false,
                "nothing of the browsed volume groups is left on the host")
        #expect(!Mounts.all().contains { $0.mountpoint.hasPrefix(dir + "/") })
    }

    @Test("a disk without a partition table is browsed as one file system; a partial browse is undone")
    func wholeDiskAndPartial() throws {
        let scratch = Scratch()
        let disk = scratch.file("fs.img")
        let content = scratch.file("content")
        try FileManager.default.createDirectory(atPath: content, withIntermediateDirectories: false)
        FileManager.default.createFile(atPath: content + "/hello.txt", contents: Data("whole disk\n".utf8))
        try sh(["mkfs.ext4", "-q", "-d", content, disk, "32M"])
        let repo = try Repository.create(at: scratch.file("repo"))
        try repo.protect(Machine(name: "plain", disks: Repository.diskNames(for: [disk])))
        _ = try repo.backup("plain")
        let dir = scratch.file("browse")
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: false)
        let result = try CLI.run(["browse", "plain", dir, "--repo", repo.root])
        #expect(result.status == 0, "\(result.stderr)")
        #expect(try String(contentsOfFile: "\(dir)/fs/whole/hello.txt", encoding: .utf8) == "whole disk\n")
        // A second browse into the same folder is refused; unbrowse still cleans everything.
        let again = try CLI.run(["browse", "plain", dir, "--repo", repo.root])
        #expect(again.status != 0 && again.stderr.contains("already holds a browse"))
        // As after a browse killed halfway: without its record, unbrowse finds what is mounted anyway.
        unlink(dir + "/.lifeboat-browse.json")
        let undo = try CLI.run(["unbrowse", dir])
        #expect(undo.status == 0, "\(undo.stderr)")
        #expect(!Mounts.all().contains { $0.mountpoint.hasPrefix(dir + "/") })
        #expect(!loopDevices().contains { $0.contains(dir) })
    }
}
