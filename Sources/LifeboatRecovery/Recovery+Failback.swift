import Foundation
import LifeboatBase
import LifeboatFS
import LifeboatNBD
import LifeboatReplication
import LifeboatRepository
import LifeboatVirt
#if canImport(Glibc)
import Glibc
#endif

/// What a failback did.
public struct FailbackReport: Codable, Sendable {
    public var machine: String
    /// Points taken of the recovery VM: while it ran, then after it was shut down.
    public var points: [String]
    public var restores: [RestoreResult]
    public var bytesWritten: Int { restores.reduce(0) { $0 + $1.bytesWritten } }
    public var diskBytes: Int { restores.reduce(0) { $0 + $1.size } }
}

extension Recovery {
    // MARK: - failback

    /// Sends the recovery VM's changes back to the original disks and makes the source live again:
    /// a point of the running VM, shutdown, a last point, in-place restore (only differing chunks
    /// written) onto the original paths or `targets` (disk name -> path), then Standby.
    public func failback(_ name: String, targets: [String: String] = [:], shutdownTimeout: TimeInterval = 120, start: Bool = false,
                         report: (String) -> Void = { _ in }) throws -> FailbackReport {
        let (lock, opened) = try beginTransition(.failback, name)
        defer { withExtendedLifetime(lock) {} }
        var record = opened
        // A failback resumed after a crash goes on with the targets and --start it began with.
        let targets = targets.isEmpty ? record.failbackTargets ?? [:] : targets
        let start = start || record.failbackStart == true
        record.failbackTargets = targets.isEmpty ? nil : targets
        record.failbackStart = start ? true : nil
        var machine = try repository.machine(name)
        let originals = record.sourceDisks ?? Dictionary(uniqueKeysWithValues: machine.disks.map { ($0.name, $0.path) })
        for key in targets.keys where originals[key] == nil {
            throw LifeboatError(.invalidArgument, "\(name) has no disk \(key): its disks are \(originals.keys.sorted().joined(separator: ", "))")
        }
        let hotDisks = Dictionary(uniqueKeysWithValues: record.disks.map { ($0.name, $0.path) })
        // After commit a domain machine's protected domain is the recovery VM: its points come from
        // libvirt (the backup API while it runs, its images once it is off), as every point of it.
        let recoveryVMProtected = machine.domain != nil && machine.domain == record.vm && record.sourceDomain != nil
        record.state = .failingBack
        record.since = Date()
        record.phase = "failing back"
        try hot.save(record)
        hot.record(name, HistoryEvent(event: "failback", state: .failingBack, point: record.point, detail: "started"))
        let pointOfRecoveryVM = { (what: String) throws -> RecoveryPoint in
            let point = recoveryVMProtected
                ? try self.takePoint(name, using: self.replication).point
                : try self.repository.backup(name, sources: hotDisks)
            if !recoveryVMProtected {
                self.hot.record(name, HistoryEvent(event: "backup", state: .failingBack, point: point.id, detail: what))
            }
            return point
        }

        var points: [String] = []
        let domain = try? connection().domain(named: name)
        if let domain, (try? domain.state().isActive) == true {
            report("taking a recovery point of the running VM \(name)")
            points.append(try pointOfRecoveryVM("point of the running recovery VM").id)
            report("shutting \(name) down")
            try? domain.shutdown()
            let deadline = Date().addingTimeInterval(shutdownTimeout)
            while Date() < deadline, (try? domain.state().isActive) == true { Thread.sleep(forTimeInterval: 0.2) }
            if (try? domain.state().isActive) == true {
                report("the guest did not shut down within \(Int(shutdownTimeout)) s: stopping it")
                try virt("stopping \(name)") { try domain.destroy() }
            }
        }
        report("taking the last recovery point of \(name)")
        let last = try pointOfRecoveryVM("last point, VM shut down")
        points.append(last.id)

        var restores: [RestoreResult] = []
        var formats: [String: String] = [:]
        for disk in last.disks {
            let given = targets[disk.name]
            let target = given ?? originals[disk.name] ?? disk.path
            report("writing \(disk.name) back onto \(target)")
            // The original's format as recorded at failover, never guessed from the bytes the guest
            // wrote (a --to target gets the original's format too).
            let (result, format) = try writeBack(last, disk: disk, to: target, format: record.sourceFormats?[disk.name] ?? "raw")
            restores.append(result)
            formats[disk.name] = format
        }
        machine.disks = machine.disks.map { disk in
            MachineDisk(name: disk.name, path: targets[disk.name] ?? originals[disk.name] ?? disk.path, format: formats[disk.name])
        }
        if let source = record.sourceDomain {
            machine.domain = source
            machine.connectURI = record.sourceConnectURI
        }
        try repository.save(machine)   // the data is home: the machine is the original's again
        // The recovery VM goes first: the original domain may have the machine's name. Defining
        // and starting the original are reported when they fail, not undone: the data is home.
        try tearDown(name, record: record)
        var notes: [String] = []
        var existed = true
        if let source = record.sourceDomain {
            do {
                if let defined = try defineOriginal(source, machine: machine, formats: formats, from: record, last: last, report: report) {
                    notes.append(defined)
                    existed = false
                }
            } catch {
                notes.append("domain \(source) could not be defined again (\(error)): define it with virsh define")
            }
        }
        if start, let source = machine.domain {
            if !targets.isEmpty && existed {
                notes.append("domain \(source) was not started: its definition still names its own disks, not the --to targets")
            } else {
                report("starting domain \(source)")
                do {
                    let found = try replication.domain(of: machine).1
                    try virt("starting domain \(source)") { try found.start() }
                    notes.append("domain \(source) started")
                } catch {
                    notes.append("domain \(source) did not start (\(error))")
                }
            }
        }
        for note in notes { report(note) }
        let result = FailbackReport(machine: name, points: points, restores: restores)
        var detail = String(
            format: "written back onto %@: %lld bytes written of %lld (%.2f%%); the source is live again",
            restores.map(\.path).joined(separator: ", "), Int64(result.bytesWritten), Int64(result.diskBytes),
            result.diskBytes > 0 ? 100 * Double(result.bytesWritten) / Double(result.diskBytes) : 0)
        for note in notes { detail += "; " + note }
        if let source = machine.domain { detail += "; domain \(source) is protected again (its next point is full, with dedup)" }
        try backToStandby(name, event: "failed-back", point: last.id, detail: detail)
        return result
    }

    /// Defines the source domain again when it is gone from libvirt (the site was lost), from the
    /// newest point that keeps its definition, on the written-back disks; its UEFI variables too.
    /// - Returns: what was done, in words; nil when the domain is still defined.
    func defineOriginal(_ source: String, machine: Machine, formats: [String: String], from record: ServerRecord, last: RecoveryPoint,
                        report: (String) -> Void) throws -> String? {
        let uri = machine.connectURI ?? settings.connectURI
        let connection = try virt("connecting to \(uri)") { try Connection(uri: uri) }
        if try virt("looking up domain \(source)", { try connection.domain(named: source) }) != nil { return nil }
        // The source's own definition: a point of the domain the failover came from (same UUID),
        // never one of the recovery VM, which may carry the same name.
        let all = try repository.points(machine.name)
        let failedOverFrom = all.first { $0.id == record.point }
        let kept = all.reversed().lazy.compactMap { point -> (RecoveryPoint, [UInt8])? in
            guard point.hardware?.domain == source,
                  failedOverFrom?.domainUUID == nil || point.domainUUID == failedOverFrom?.domainUUID,
                  record.pointTime == nil || point.time <= record.pointTime!,
                  let xml = try? self.repository.attachment(point, "domain.xml") else { return nil }
            return (point, xml)
        }.first
        guard let (point, xml) = kept else {
            return "domain \(source) is gone and no point keeps its definition: define it again (virsh define) on \(machine.disks.map(\.path).joined(separator: ", "))"
        }
        let definition = try DomainDefinition(xml: String(decoding: xml, as: UTF8.self))
        // Where libvirt looks for the variables of a domain whose XML names no file: its default.
        // The path comes from the stored definition: written only inside libvirt's NVRAM folder.
        let nvramPath = definition.nvramPath ?? (point.hardware?.firmware == "uefi" ? QemuUser.nvramFolder + "/\(source)_VARS.fd" : nil)
        // The newest variables and TPM state are the recovery VM's (its last point), else the source's.
        if let nvram = nvramPath, !QemuUser.isNVRAMPath(nvram) {
            report("the UEFI variables of \(source) were not written back: \(nvram) is outside \(QemuUser.nvramFolder)")
        } else if let nvram = nvramPath, !FileSystem.exists(nvram),
                  let variables = try repository.attachment(last, "nvram") ?? repository.attachment(point, "nvram") {
            try FileSystem.makeDirectories(FileSystem.parent(of: nvram))
            try FileSystem.writeAtomically(variables, to: nvram)
            QemuUser.give(nvram)
        }
        if let uuid = definition.uuid, let path = QemuUser.tpmStatePath(uuid: uuid), !FileSystem.exists(path),
           let state = try repository.attachment(last, "tpm-state") ?? repository.attachment(point, "tpm-state") {
            try QemuUser.placeTPMState(state, uuid: uuid)
        }
        report("defining domain \(source) again from the definition kept with point \(point.id)")
        let sources = Dictionary(uniqueKeysWithValues: machine.disks.map { ($0.name, (path: $0.path, format: formats[$0.name] ?? $0.format ?? "raw")) })
        _ = try virt("defining domain \(source)") { try connection.defineDomain(xml: definition.withDiskSources(sources)) }
        return "domain \(source) defined again from the definition kept with point \(point.id)"
    }

    /// Writes one disk of `point` back onto `path` as guest bytes in the image's own format: a raw
    /// file or block device directly, a qcow2 image through qemu-nbd (made anew when it is gone);
    /// only chunks that differ are written.
    /// - Returns: what was written, and the format.
    func writeBack(_ point: RecoveryPoint, disk: PointDisk, to path: String, format declared: String) throws -> (RestoreResult, String) {
        let format = declared
        if FileSystem.exists(path) {
            _ = try DiskImage.inspect(path, declared: declared, what: "disk \(disk.name)'s original")
        } else {
            if format == "qcow2" {
                try FileSystem.makeDirectories(FileSystem.parent(of: path))
                try DiskImage.createQcow2(path, size: disk.size)
            }
        }
        guard format == "qcow2" else { return (try repository.restore(point, disk: disk.name, to: path), format) }
        let image = try DiskImage.inspect(path, declared: format)
        let folder = settings.runDirectory + "/failback-" + point.machine
        try FileSystem.makeDirectories(folder)
        defer { FileSystem.removeTree(folder) }
        let export = try ImageExport(image, name: disk.name, in: folder, writable: true)
        defer { export.stop() }
        let socket = export.socket, name = disk.name
        let result = try repository.restore(point, disk: disk.name, through: {
            NBDBlockDevice(try NBDConnection(socket: socket, export: name))
        }, size: image.virtualSize, describedAs: path)
        return (result, format)
    }

    /// Refuses (unless `force`) while another process has one of the machine's disk files open.
    func checkSourceIdle(_ machine: Machine, force: Bool) throws {
        guard !force else { return }
        for disk in machine.disks {
            let users = Self.processes(using: disk.path)
            if !users.isEmpty {
                throw LifeboatError(.busy,
                    "disk \(disk.path) of \(machine.name) is open in process \(users.map(String.init).joined(separator: ", ")): shut the source machine down first (a planned failover takes a final backup of stopped disks), or give --force")
            }
        }
    }

    /// PIDs with `path` open, from /proc/*/fd.
    static func processes(using path: String) -> [Int32] {
        let target = (try? FileManager.default.destinationOfSymbolicLink(atPath: path)).map {
            $0.hasPrefix("/") ? $0 : (path as NSString).deletingLastPathComponent + "/" + $0
        } ?? path
        var pids: [Int32] = []
        for entry in (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? [] {
            guard let pid = Int32(entry), pid != getpid() else { continue }
            let fds = "/proc/\(entry)/fd"
            for fd in (try? FileManager.default.contentsOfDirectory(atPath: fds)) ?? [] {
                if (try? FileManager.default.destinationOfSymbolicLink(atPath: fds + "/" + fd)) == target {
                    pids.append(pid)
                    break
                }
            }
        }
        return pids
    }
}
