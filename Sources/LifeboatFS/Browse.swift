import Foundation
import LifeboatBase
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
                              repository: Repository, launcher: SelfLauncher) throws -> [BrowsedVolume] {
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
            do {
                _ = try Mounts.start(repository, at: state.fuseMount, launcher: launcher, cacheSize: 256 << 20, allowOther: false, threads: 8)
            } catch {
                try? unbrowse(dir)
                throw error
            }
        }
        try save(state, dir)
        var volumes: [BrowsedVolume] = []
        do {
            for disk in point.disks {
                let file = "\(state.fuseMount)/\(point.machine)/\(point.id)/\(disk.name).raw"
                let attach = try ChildProcess.run(["losetup", "-r", "-P", "-f", "--show", file])
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
                    if (try? fileSystemType(device)) == Self.lvmMember {
                        volumes += try browseLogicalVolumes(on: device, disk: disk.name, partition: partition, dir: dir, state: &state)
                        continue
                    }
                    volumes.append(mountVolume(device, disk: disk.name, partition: partition, dir: dir))
                }
            }
        } catch {
            try? unbrowse(dir)
            throw error
        }
        return volumes
    }

    /// Mounts one file system read-only at `dir/DISK/PARTITION`; a failure is reported in the volume.
    static func mountVolume(_ device: String, disk: String, partition: String, dir: String) -> BrowsedVolume {
        var volume = BrowsedVolume(disk: disk, partition: partition)
        let target = "\(dir)/\(disk)/\(partition)"
        do {
            let type = try fileSystemType(device)
            volume.type = type
            try FileSystemPaths.makeDirectory("\(dir)/\(disk)")
            try FileSystemPaths.makeDirectory(target)
            try mount(device, type: type, at: target)
            volume.path = target
        } catch let error as LifeboatError {
            volume.problem = error.message
        } catch {
            volume.problem = "\(error)"
        }
        return volume
    }

    static let lvmMember = "LVM2_member"

    /// A logical volume's place on its physical volume.
    struct LogicalVolume: Equatable {
        var vg: String
        var lv: String
        /// Bytes from the start of the physical volume, and length; nil with `problem` when the
        /// volume is not one contiguous linear range.
        var offset: Int?
        var size: Int?
        var problem: String?
    }

    /// Mounts the linear logical volumes of an LVM physical volume at `dir/DISK/pN-VG-LV`.
    /// Nothing is activated: no device-mapper is needed (this kernel has none), and the host's own
    /// volume groups, even ones with the same names, are never touched. Each volume is a read-only
    /// loop device over its extents of the partition, found from the LVM metadata that `lvs` reads
    /// from this one device (`--devices`).
    static func browseLogicalVolumes(on device: String, disk: String, partition: String, dir: String,
                                     state: inout BrowseState) throws -> [BrowsedVolume] {
        let volumes: [LogicalVolume]
        do { volumes = try logicalVolumes(on: device) } catch let error as LifeboatError {
            return [BrowsedVolume(disk: disk, partition: partition, type: lvmMember, problem: error.message)]
        }
        if volumes.isEmpty {
            return [BrowsedVolume(disk: disk, partition: partition, type: lvmMember, problem: "LVM physical volume without logical volumes")]
        }
        var result: [BrowsedVolume] = []
        for volume in volumes {
            let name = "\(partition)-\(volume.vg)-\(volume.lv)"
            guard let offset = volume.offset, let size = volume.size else {
                result.append(BrowsedVolume(disk: disk, partition: name, type: "LVM", problem: volume.problem))
                continue
            }
            let attach = try ChildProcess.run(["losetup", "-r", "-f", "--show", "--offset", "\(offset)", "--sizelimit", "\(size)", device])
            guard attach.status == 0 else {
                result.append(BrowsedVolume(disk: disk, partition: name, type: "LVM", problem: "cannot attach a loop device: \(attach.stderr)"))
                continue
            }
            state.loops.append(attach.stdout.trimmingCharacters(in: .whitespacesAndNewlines))
            try save(state, dir)
            result.append(mountVolume(state.loops.last!, disk: disk, partition: name, dir: dir))
        }
        return result
    }

    /// The logical volumes recorded on physical volume `device`, with their byte ranges.
    static func logicalVolumes(on device: String) throws -> [LogicalVolume] {
        let pv = try ChildProcess.run(["pvs", "--readonly", "--devices", device, "--noheadings", "--units", "b", "--nosuffix", "-o", "pe_start", device])
        guard pv.status == 0, let peStart = Int(pv.stdout.trimmingCharacters(in: .whitespacesAndNewlines)) else {
            throw LifeboatError(.unsupported, "LVM physical volume whose metadata cannot be read (\(pv.stderr.split(separator: "\n").first ?? "is lvm2 installed?"))")
        }
        let lvs = try ChildProcess.run(["lvs", "--readonly", "--devices", device, "--segments", "--noheadings", "--units", "b", "--nosuffix",
                                   "--separator", "|", "-o", "vg_name,lv_name,segtype,seg_pe_ranges,vg_extent_size,seg_start"])
        guard lvs.status == 0 else {
            throw LifeboatError(.unsupported, "LVM logical volumes cannot be listed: \(lvs.stderr.split(separator: "\n").first ?? "")")
        }
        return parseSegments(lvs.stdout, device: device, peStart: peStart)
    }

    /// Joins `lvs --segments` lines (vg|lv|segtype|pe ranges|extent size|segment start) into one
    /// byte range per logical volume, or a problem when it is not one linear, contiguous range.
    static func parseSegments(_ text: String, device: String, peStart: Int) -> [LogicalVolume] {
        var order: [String] = []
        var byName: [String: LogicalVolume] = [:]
        var nextExtent: [String: Int] = [:]
        for line in text.split(separator: "\n") {
            let fields = line.trimmingCharacters(in: .whitespaces).split(separator: "|", omittingEmptySubsequences: false).map(String.init)
            guard fields.count >= 6, let extent = Int(fields[4]) else { continue }
            let key = fields[0] + "/" + fields[1]
            if byName[key] == nil {
                order.append(key)
                byName[key] = LogicalVolume(vg: fields[0], lv: fields[1])
            }
            guard byName[key]!.problem == nil else { continue }
            guard fields[2] == "linear" else {
                byName[key] = LogicalVolume(vg: fields[0], lv: fields[1], problem: "LVM \(fields[2]) volume: only linear volumes can be browsed without device-mapper")
                continue
            }
            // "/dev/loop0p2:2-11"
            guard let colon = fields[3].lastIndex(of: ":"), String(fields[3][..<colon]) == device else {
                byName[key] = LogicalVolume(vg: fields[0], lv: fields[1], problem: "spans another physical volume (\(fields[3])): not browsable from this disk alone")
                continue
            }
            let range = fields[3][fields[3].index(after: colon)...].split(separator: "-").compactMap { Int($0) }
            guard range.count == 2 else { continue }
            if let expected = nextExtent[key], expected != range[0] {
                byName[key] = LogicalVolume(vg: fields[0], lv: fields[1], problem: "its extents are not contiguous: not browsable without device-mapper")
                continue
            }
            var volume = byName[key]!
            if volume.offset == nil { volume.offset = peStart + range[0] * extent }
            volume.size = (volume.size ?? 0) + (range[1] - range[0] + 1) * extent
            byName[key] = volume
            nextExtent[key] = range[1] + 1
        }
        return order.compactMap { byName[$0] }
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
        // Loop devices reading from the FUSE mount (or recorded in the state), and those over
        // their partitions (logical volumes); the latter first, so the partitions are free.
        var loops = state?.loops ?? []
        if startedFuse, let fuse {  // ours alone
            let disks = loopDevices(backedBelow: fuse)
            loops += disks.filter { !loops.contains($0) }
            loops += disks.flatMap { loopDevices(backedBelow: $0 + "p") }.filter { !loops.contains($0) }
        }
        for loop in loops.reversed() where FileManager.default.fileExists(atPath: loop) {
            _ = try ChildProcess.run(["partx", "-d", loop])
            let result = try ChildProcess.run(["losetup", "-d", loop])
            if result.status != 0 && !result.stderr.contains("No such device") { problems.append("cannot detach \(loop): \(result.stderr)") }
        }
        if startedFuse, let fuse, Mounts.isMounted(fuse) {
            // Loop devices let go of the file asynchronously (a fusefat daemon exits some time
            // after its unmount, and only then the loop device under it): retry while busy.
            var lastError: (any Error)? = nil
            for _ in 0..<200 {
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
        let table = try ChildProcess.run(["blkid", "-p", "-o", "value", "-s", "PTTYPE", loop])
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
            if attempt == 10 && partitions.isEmpty { _ = try ChildProcess.run(["partx", "-a", loop]) }
            usleep(20_000)
        }
        throw LifeboatError(.io, "the partitions of \(loop) did not appear")
    }

    static func fileSystemType(_ device: String) throws -> String {
        let probe = try ChildProcess.run(["blkid", "-p", "-o", "value", "-s", "TYPE", device])
        let type = probe.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        guard !type.isEmpty else { throw LifeboatError(.notFound, "no file system found") }
        switch type {
        case "swap": throw LifeboatError(.unsupported, "swap space: nothing to browse")
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
        if type == "ntfs" {
            // Windows guests: the kernel's ntfs3 when it has it, else Debian's ntfs-3g (FUSE),
            // read-only either way.
            command = kernelSupports("ntfs3") ? ["mount", "-t", "ntfs3", "-o", "ro", device, target]
                : ["ntfs-3g", "-o", "ro,norecover", device, target]
        } else if !kernelSupports(type) {
            // Some kernels (VMs, containers) have no vfat: fusefat serves FAT from user space.
            guard type == "vfat" || type == "msdos" else {
                throw LifeboatError(.unsupported, "this kernel cannot mount \(type) file systems")
            }
            command = ["fusefat", "-o", "ro", device, target]
        }
        let result = try ChildProcess.run(command)
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
            return backing.hasPrefix(path.hasSuffix("p") ? path : path + "/") ? "/dev/" + name : nil
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
