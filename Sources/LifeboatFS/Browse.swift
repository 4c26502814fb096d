import Foundation
import LifeboatRepository
#if canImport(Glibc)
import Glibc
#endif

/// What `browse` set up under a folder, kept in `DIR/.lifeboat-browse.json` so that `unbrowse`
/// can undo it, even after a partial browse.
public struct BrowseState: Codable, Sendable {
    public var machine: String
    public var point: String
    /// The FUSE mount serving the disks, and whether browse started it (then unbrowse stops it).
    public var fuseMount: String
    public var startedFuse: Bool
    public var loops: [String] = []
}

/// One file system found on a disk of the point, mounted or not.
public struct BrowsedVolume: Codable, Sendable {
    public var disk: String
    /// `p1`, `p2` …, or `whole` for a disk without a partition table.
    public var partition: String
    public var type: String?
    public var path: String?
    /// Why it is not mounted.
    public var problem: String?
}

/// Attaches a recovery point's disks read-only and mounts their file systems for browsing.
public enum Browser {
    static func statePath(_ dir: String) -> String { dir + "/.lifeboat-browse.json" }
    /// The folder, inside the browse folder, where a browse mounts its own FUSE server.
    public static let privateMountName = ".lifeboat-fuse"

    /// Mounts every file system of `point`'s disks under `dir/DISK/pN`, read-only.
    /// - Parameters:
    ///   - fuseMount: the FUSE mount to read the disks from; `startFuse` makes one when nil.
    /// - Returns: every volume found, mounted or with the reason it is not.
    public static func browse(_ point: RecoveryPoint, dir: String, fuseMount existing: String?,
                              startFuse: (String) throws -> Void) throws -> [BrowsedVolume] {
        guard FileManager.default.fileExists(atPath: dir) else {
            throw LifeboatError(.notFound, "browse folder \(dir) does not exist: create it first")
        }
        if FileManager.default.fileExists(atPath: statePath(dir)) {
            throw LifeboatError(.alreadyExists, "\(dir) already holds a browse: run 'lifeboat unbrowse \(dir)' first")
        }
        var state = BrowseState(machine: point.machine, point: point.id, fuseMount: existing ?? dir + "/" + privateMountName,
                                startedFuse: existing == nil)
        if existing == nil {
            try FileSystemPaths.makeDirectory(state.fuseMount)
            try save(state, dir)
            do { try startFuse(state.fuseMount) } catch {
                try? unbrowse(dir)
                throw error
            }
        }
        try save(state, dir)
        var volumes: [BrowsedVolume] = []
        do {
            for disk in point.disks {
                let file = "\(state.fuseMount)/\(point.machine)/\(point.id)/\(disk.name).raw"
                let attach = try Command.run(["losetup", "-r", "-P", "-f", "--show", file])
                guard attach.status == 0 else {
                    volumes.append(BrowsedVolume(disk: disk.name, partition: "whole", problem: "cannot attach a loop device: \(attach.stderr)"))
                    continue
                }
                let loop = attach.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
                state.loops.append(loop)
                try save(state, dir)
                let found: [(String, String)]
                do { found = try partitions(of: loop) } catch let error as LifeboatError {
                    volumes.append(BrowsedVolume(disk: disk.name, partition: "whole", problem: error.message))
                    continue
                }
                for (partition, device) in found {
                    var volume = BrowsedVolume(disk: disk.name, partition: partition)
                    let target = "\(dir)/\(disk.name)/\(partition)"
                    do {
                        let type = try fileSystemType(device)
                        volume.type = type
                        try FileSystemPaths.makeDirectory("\(dir)/\(disk.name)")
                        try FileSystemPaths.makeDirectory(target)
                        try mount(device, type: type, at: target)
                        volume.path = target
                    } catch let error as LifeboatError {
                        volume.problem = error.message
                    }
                    volumes.append(volume)
                }
            }
        } catch {
            try? unbrowse(dir)
            throw error
        }
        return volumes
    }

    /// Undoes a browse: unmounts, detaches every loop device, stops the FUSE mount if browse
    /// started it, removes the folders it made. Works after a partial or crashed browse too.
    public static func unbrowse(_ dir: String) throws {
        let target = Mounts.canonical(dir)
        let state: BrowseState? = (try? Data(contentsOf: URL(fileURLWithPath: statePath(dir))))
            .flatMap { try? JSONDecoder().decode(BrowseState.self, from: $0) }
        // Without a record (browse killed before writing it), a lifeboat mount inside dir is ours.
        let ownMount = Mounts.all().first { $0.type == "fuse.lifeboat" && $0.mountpoint == target + "/" + privateMountName }
        let fuse = state.map { Mounts.canonical($0.fuseMount) } ?? ownMount?.mountpoint
        let startedFuse = state?.startedFuse ?? (ownMount != nil)
        // Every mount below dir except the FUSE mount, deepest first.
        let below = Mounts.all().map(\.mountpoint).filter { $0.hasPrefix(target + "/") && $0 != fuse }
        var problems: [String] = []
        for path in below.sorted(by: { $0.count > $1.count }) {
            do { try Mounts.unmount(path) } catch { problems.append("\(error)") }
        }
        // Loop devices reading from the FUSE mount (or recorded in the state).
        var loops = Set(state?.loops ?? [])
        if startedFuse, let fuse { loops.formUnion(loopDevices(backedBelow: fuse)) }  // ours alone
        for loop in loops.sorted() where FileManager.default.fileExists(atPath: loop) {
            _ = try Command.run(["partx", "-d", loop])
            let result = try Command.run(["losetup", "-d", loop])
            if result.status != 0 && !result.stderr.contains("No such device") { problems.append("cannot detach \(loop): \(result.stderr)") }
        }
        if startedFuse, let fuse, Mounts.isMounted(fuse) {
            // Loop devices let go of the file asynchronously: retry briefly while busy.
            var lastError: (any Error)? = nil
            for _ in 0..<50 {
                do { try Mounts.unmount(fuse); lastError = nil; break } catch { lastError = error; usleep(100_000) }
            }
            if let lastError { problems.append("\(lastError)") }
        }
        if !problems.isEmpty {
            throw LifeboatError(.busy, "unbrowse of \(dir) left something behind: " + problems.joined(separator: "; "))
        }
        // Remove the (now empty) folders browse made: DIR/DISK/pN, DIR/DISK, the FUSE folder.
        for disk in (try? FileManager.default.contentsOfDirectory(atPath: target)) ?? [] where !disk.hasPrefix(".lifeboat-browse") {
            for part in (try? FileManager.default.contentsOfDirectory(atPath: target + "/" + disk)) ?? [] {
                rmdir(target + "/" + disk + "/" + part)
            }
            rmdir(target + "/" + disk)
        }
        unlink(statePath(dir))
    }

    static func save(_ state: BrowseState, _ dir: String) throws {
        let data = try JSONEncoder().encode(state)
        guard FileManager.default.createFile(atPath: statePath(dir), contents: data) else {
            throw LifeboatError(.io, "cannot write \(statePath(dir))")
        }
    }

    /// `(pN, /dev/loopXpN)` for each partition, or `(whole, /dev/loopX)` without a partition table.
    /// The kernel's own scan (`losetup -P`) does not always register partitions (seen in
    /// containers); then `partx -a` adds them from the table.
    static func partitions(of loop: String) throws -> [(String, String)] {
        let table = try Command.run(["blkid", "-p", "-o", "value", "-s", "PTTYPE", loop])
        guard !table.stdout.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty else { return [("whole", loop)] }
        let name = String(loop.split(separator: "/").last!)
        func found() -> [(String, String)] {
            ((try? FileManager.default.contentsOfDirectory(atPath: "/sys/block/\(name)")) ?? [])
                .filter { $0.hasPrefix(name + "p") }
                .compactMap { entry -> (Int, String)? in Int(entry.dropFirst(name.count + 1)).map { ($0, entry) } }
                .sorted { $0.0 < $1.0 }
                .map { ("p\($0.0)", "/dev/" + $0.1) }
        }
        for attempt in 0..<100 {
            let partitions = found()
            if !partitions.isEmpty && partitions.allSatisfy({ FileManager.default.fileExists(atPath: $0.1) }) { return partitions }
            if attempt == 10 && partitions.isEmpty { _ = try Command.run(["partx", "-a", loop]) }
            usleep(20_000)
        }
        throw LifeboatError(.io, "the partitions of \(loop) did not appear")
    }

    static func fileSystemType(_ device: String) throws -> String {
        let probe = try Command.run(["blkid", "-p", "-o", "value", "-s", "TYPE", device])
        let type = probe.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        guard !type.isEmpty else { throw LifeboatError(.notFound, "no file system found") }
        switch type {
        case "swap": throw LifeboatError(.unsupported, "swap space: nothing to browse")
        case "LVM2_member": throw LifeboatError(.unsupported, "LVM physical volume: browsing logical volumes is not supported yet")
        case "crypto_LUKS": throw LifeboatError(.unsupported, "LUKS-encrypted: open it with cryptsetup to browse")
        default: return type
        }
    }

    /// Read-only mount options that also keep the kernel from replaying journals onto the device.
    static func mount(_ device: String, type: String, at target: String) throws {
        let options: String
        switch type {
        case "ext3", "ext4": options = "ro,noload"
        case "xfs": options = "ro,norecovery,nouuid"
        case "btrfs": options = "ro,rescue=nologreplay"
        default: options = "ro"
        }
        var command = ["mount", "-t", type, "-o", options, device, target]
        if !kernelSupports(type) {
            // Some kernels (VMs, containers) have no vfat: fusefat serves FAT from user space.
            guard type == "vfat" || type == "msdos" else {
                throw LifeboatError(.unsupported, "this kernel cannot mount \(type) file systems")
            }
            command = ["fusefat", "-o", "ro", device, target]
        }
        let result = try Command.run(command)
        guard result.status == 0 else {
            let reason = result.stderr.split(separator: "\n").first.map(String.init) ?? "exit \(result.status)"
            throw LifeboatError(.io, "mount failed: \(reason)")
        }
    }

    static func kernelSupports(_ type: String) -> Bool {
        guard let text = try? String(contentsOfFile: "/proc/filesystems", encoding: .utf8) else { return true }
        return text.split(separator: "\n").contains { $0.split(separator: "\t").last.map(String.init) == type }
    }

    /// Loop devices whose backing file lies below `path`.
    static func loopDevices(backedBelow path: String) -> [String] {
        let blocks = (try? FileManager.default.contentsOfDirectory(atPath: "/sys/block")) ?? []
        return blocks.filter { $0.hasPrefix("loop") }.compactMap { name in
            guard let backing = try? String(contentsOfFile: "/sys/block/\(name)/loop/backing_file", encoding: .utf8) else { return nil }
            return backing.hasPrefix(path + "/") ? "/dev/" + name : nil
        }
    }
}

enum FileSystemPaths {
    static func makeDirectory(_ path: String) throws {
        if mkdir(path, 0o755) != 0 && errno != EEXIST {
            throw LifeboatError(.io, "cannot create directory \(path): \(String(cString: strerror(errno)))")
        }
    }

}
