import Foundation
import Synchronization
import LifeboatFS
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
    public func failback(_ name: String, targets: [String: String] = [:], shutdownTimeout: TimeInterval = 120,
                         report: (String) -> Void = { _ in }) throws -> FailbackReport {
        let (lock, opened) = try beginTransition(.failback, name)
        defer { withExtendedLifetime(lock) {} }
        var record = opened
        var machine = try repository.machine(name)
        let originals = record.sourceDisks ?? Dictionary(uniqueKeysWithValues: machine.disks.map { ($0.name, $0.path) })
        for key in targets.keys where originals[key] == nil {
            throw LifeboatError(.invalidArgument, "\(name) has no disk \(key): its disks are \(originals.keys.sorted().joined(separator: ", "))")
        }
        let hotDisks = Dictionary(uniqueKeysWithValues: record.disks.map { ($0.name, $0.path) })
        record.state = .failingBack
        record.since = Date()
        record.phase = "failing back"
        try hot.save(record)
        hot.record(name, HistoryEvent(event: "failback", state: .failingBack, point: record.point, detail: "started"))

        var points: [String] = []
        let domain = try? connection().domain(named: name)
        if let domain, (try? domain.state().isActive) == true {
            report("taking a recovery point of the running VM \(name)")
            let live = try repository.backup(name, sources: hotDisks)
            points.append(live.id)
            hot.record(name, HistoryEvent(event: "backup", state: .failingBack, point: live.id, detail: "point of the running recovery VM (incremental)"))
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
        let last = try repository.backup(name, sources: hotDisks)
        points.append(last.id)
        hot.record(name, HistoryEvent(event: "backup", state: .failingBack, point: last.id, detail: "last point, VM shut down"))

        var restores: [RestoreResult] = []
        for disk in last.disks {
            let target = targets[disk.name] ?? originals[disk.name] ?? disk.path
            report("restoring \(disk.name) onto \(target)")
            let result = try repository.restore(last, disk: disk.name, to: target)
            restores.append(result)
        }
        for index in machine.disks.indices {
            let disk = machine.disks[index].name
            machine.disks[index].path = targets[disk] ?? originals[disk] ?? machine.disks[index].path
        }
        try repository.save(machine)
        try tearDown(name, record: record)
        let result = FailbackReport(machine: name, points: points, restores: restores)
        try backToStandby(name, event: "failed-back", point: last.id, detail: String(
            format: "restored onto %@: %lld bytes written of %lld (%.2f%%); the source is live again",
            restores.map(\.path).joined(separator: ", "), Int64(result.bytesWritten), Int64(result.diskBytes),
            result.diskBytes > 0 ? 100 * Double(result.bytesWritten) / Double(result.diskBytes) : 0))
        return result
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
