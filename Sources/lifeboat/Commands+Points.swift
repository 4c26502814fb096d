import ArgumentParser
import Foundation
import LifeboatBase
import LifeboatReplication
import LifeboatRepository
import LifeboatS3
import LifeboatVirt

extension Lifeboat {
    struct Backup: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Take a recovery point of all of a machine's disks.")
        @OptionGroup var repository: RepositoryOptions
        @Argument var name: String
        @OptionGroup var recovery: RecoveryOptions
        @OptionGroup var output: OutputOptions

        func run() throws {
            let recovery = try self.recovery.recovery(repository, pointsOnly: true)
            let progress = ProgressMeter()
            _ = try recovery.repository.machine(name)
            // The same call as the console's "Back up now" and the replication service: the
            // point, the machine's retention, history and the replication record.
            let replication = ReplicationOptions.replication(recovery.repository, hot: self.recovery.hot, connect: self.recovery.connect)
            let (point, pruned) = try Terminal.withProgress("backup \(name)", progress) {
                try recovery.takePoint(name, using: replication, progress: progress)
            }
            if output.json { return try JSON.print(point) }
            for disk in point.disks {
                if let old = disk.previousSize {
                    print("note: disk \(disk.name) changed size from \(old) to \(disk.size) bytes; the point records the new size")
                }
            }
            let rate = point.seconds > 0 ? Double(point.size) / point.seconds : 0
            print("recovery point \(point.id) of \(name): \(Format.bytes(point.size)) of disk, \(Format.bytes(point.bytesRead)) read, "
                + "\(Format.bytes(point.newBytes)) new, \(Format.bytes(point.storedBytes)) stored, "
                + String(format: "%.1f s", point.seconds) + " (\(Format.rate(rate))), \(point.consistency)"
                + (point.readMode.map { ", \($0)" } ?? ""))
            if let note = point.note { print("  \(note)") }
            if !pruned.isEmpty { print("  retention removed \(pruned.joined(separator: ", "))") }
        }
    }

    struct Points: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List a machine's recovery points, oldest first.")
        @OptionGroup var repository: RepositoryOptions
        @Argument var name: String
        @OptionGroup var output: OutputOptions

        func run() throws {
            let points = try repository.open().points(name)
            if output.json { return try JSON.print(points) }
            print(Format.table(["ID", "TIME", "DISKS", "READ", "NEW", "STORED", "CONSISTENCY", "MODE"], points.map { point in
                [point.id, Format.time(point.time), point.disks.map { "\($0.name):\(Format.bytes($0.size))" }.joined(separator: ","),
                 Format.bytes(point.bytesRead), Format.bytes(point.newBytes), Format.bytes(point.storedBytes), point.consistency,
                 point.readMode ?? "-"]
            }))
        }
    }

    struct Restore: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Write a recovery point's disks as raw files (sparse; existing same-size files get only the differing chunks).")
        @OptionGroup var repository: RepositoryOptions
        @Argument var name: String
        @Option(help: "Point id or 'latest'.") var point = "latest"
        @Option(help: "Folder to write DISK.raw files into.") var to: String
        @Option(help: "Only this disk.") var disk: String?
        @OptionGroup var output: OutputOptions

        func run() throws {
            let repo = try repository.open()
            let point = try repo.point(name, point)
            let disks = point.disks.filter { disk == nil || $0.name == disk }
            if let disk, disks.isEmpty {
                throw LifeboatError(.notFound, "recovery point \(point.id) of \(name) has no disk \(disk): its disks are \(point.disks.map(\.name).joined(separator: ", "))")
            }
            var results: [RestoreResult] = []
            for pointDisk in disks {
                let progress = ProgressMeter()
                let target = to + "/" + pointDisk.name + ".raw"
                results.append(try Terminal.withProgress("restore \(pointDisk.name)", progress) {
                    try repo.restore(point, disk: pointDisk.name, to: target, progress: progress)
                })
            }
            if output.json { return try JSON.print(results) }
            for result in results {
                print("restored \(result.disk) of \(name) point \(point.id) to \(result.path): \(Format.bytes(result.size)), "
                    + "\(result.bytesWritten) bytes written" + (result.inPlace ? " (only the chunks that differed)" : ""))
            }
        }
    }

    struct Verify: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Re-read every chunk the points use and report damage.")
        @OptionGroup var repository: RepositoryOptions
        @Argument(help: "Machine (default: all).") var name: String?
        @Option(help: "Only this point.") var point: String?
        @OptionGroup var output: OutputOptions

        func validate() throws {
            if point != nil && name == nil { throw ValidationError("--point needs a machine name") }
        }

        func run() throws {
            let repo = try repository.open()
            let progress = ProgressMeter()
            let report = try Terminal.withProgress("verify", progress, unit: .items) {
                try repo.verify(machine: name, point: point, progress: progress)
            }
            if output.json {
                try JSON.print(report)
            } else {
                for damaged in report.damagedChunks {
                    print("DAMAGED chunk \(damaged.id): \(damaged.reason)")
                    for use in damaged.usages {
                        print("  used by \(use.machine) point \(use.point) disk \(use.disk) at offset \(use.offset)")
                    }
                }
                for message in report.damagedPoints + report.damagedFiles { print("DAMAGED \(message)") }
                print("verified \(report.points) point(s), \(report.chunks) chunk(s), \(Format.bytes(report.bytes)): "
                    + (report.isClean ? "no damage" : "\(report.damagedChunks.count) damaged chunk(s), \(report.damagedPoints.count + report.damagedFiles.count) damaged point or repository file(s)"))
            }
            if !report.isClean { throw ExitCode(3) }
        }
    }

    struct Sync: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Copy recovery points to an off-site repository in S3 object storage, or from one into a local repository (only the chunks the target lacks).",
            discussion: "The target is created with the source's keys when it does not exist yet. A stopped sync resends only the pack it was writing; a point is visible at the target once all it needs is there. From a bucket (--repo s3://…) --to names a local folder.")
        @OptionGroup var repository: RepositoryOptions
        @Option(help: "The target: s3://BUCKET/PREFIX (the --s3-* options say how to reach it), or a local folder when --repo is a bucket.") var to: String
        @Argument(help: "Machines to copy (default: all).") var machines: [String] = []
        @Option(help: "MiB per second the sync may send (default: no limit).") var bandwidth: Double?
        @Option(help: "Write packs and points under S3 Object Lock (compliance mode) for so many days.") var objectLock: Int?
        /// Pack size in bytes (tests make several packs of little data).
        @Option(help: .hidden) var packSize = Repository.packSize
        @OptionGroup var output: OutputOptions

        func validate() throws {
            if let bandwidth, bandwidth <= 0 { throw ValidationError("--bandwidth must be a positive number of MiB per second") }
            if let objectLock, objectLock <= 0 { throw ValidationError("--object-lock must be a positive number of days") }
        }

        func run() throws {
            let repo = try repository.open()
            let progress = ProgressMeter(limit: Int((bandwidth ?? 0) * 1_048_576))
            let result: SyncResult
            switch (repo.remote != nil, S3Location.isS3(to)) {
            case (false, true):
                let target = try repository.s3.repository(to)
                result = try Terminal.withProgress("sync", progress) {
                    try repo.sync(to: target, machines: machines, objectLockDays: objectLock, progress: progress, packSize: packSize)
                }
            case (true, false):
                if objectLock != nil { throw ValidationError("--object-lock is for a target in a bucket") }
                result = try Terminal.withProgress("sync", progress) {
                    try repo.sync(toLocal: to, machines: machines, progress: progress)
                }
            case (false, false):
                throw ValidationError("--to must be an s3://BUCKET/PREFIX address when --repo is a local folder (a local copy: copy the repository folder)")
            case (true, true):
                throw ValidationError("from a bucket --to names a local folder: copy between buckets with the store's own replication")
            }
            if output.json { return try JSON.print(result) }
            let rate = result.seconds > 0 ? Format.bytes(Int(Double(result.bytes) / result.seconds)) + "/s" : "-"
            print("synced \(result.points.count) point(s) to \(result.target) (\(result.pointsAlreadyThere) already there): \(result.chunks) chunk(s), \(Format.bytes(result.bytes)) in \(result.packs) pack(s), \(String(format: "%.1f", result.seconds)) s, \(rate); \(result.requests.puts) PUT, \(result.requests.gets) GET, \(result.requests.lists) LIST")
        }
    }

    struct Prune: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Delete recovery points no --keep-* rule keeps (chunks go at the next gc).")
        @OptionGroup var repository: RepositoryOptions
        @Argument var name: String
        @Option var keepLast = 0
        @Option var keepHourly = 0
        @Option var keepDaily = 0
        @Option var keepWeekly = 0
        @Option var keepMonthly = 0
        @Option(help: "Keep every point younger than this, counted back from the newest (e.g. 7d).") var keepWithin: String?
        @Flag var dryRun = false
        @OptionGroup var output: OutputOptions

        func run() throws {
            let policy = RetentionPolicy(last: keepLast, hourly: keepHourly, daily: keepDaily, weekly: keepWeekly,
                                         monthly: keepMonthly, within: try keepWithin.map(DurationText.parse))
            let result = try repository.open().prune(name, policy: policy, dryRun: dryRun)
            if output.json { return try JSON.print(result) }
            for kept in result.kept { print("keep   \(kept.point)  (\(kept.reasons.joined(separator: ", ")))") }
            for id in result.removed { print((dryRun ? "would remove " : "remove ") + id) }
            print("\(result.kept.count) kept, \(result.removed.count) \(dryRun ? "would be " : "")removed; run 'lifeboat gc' to free their chunks")
        }
    }

    struct Compact: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "compact",
            abstract: "Store every chunk smaller: a high zstd level, a dictionary trained on the repository, copies found elsewhere.",
            discussion: "Rewrites each chunk once (later runs take only new chunks); runs beside backups, mounts and drills. The replication service runs it after gc.")
        @OptionGroup var repository: RepositoryOptions
        @Option(help: "zstd level, 1-22.") var level = CompactOptions.defaultLevel
        @Flag(help: "Run at the lowest CPU priority.") var background = false
        @OptionGroup var output: OutputOptions

        func run() throws {
            let repo = try repository.open()
            let progress = ProgressMeter()
            let result = try Terminal.withProgress("compact", progress) {
                try repo.compact(CompactOptions(level: level, background: background), progress: progress)
            }
            if output.json { return try JSON.print(result) }
            let saved = result.bytesBefore - result.bytesAfter
            print("compacted \(result.compacted) of \(result.chunks) chunk(s) (\(result.alreadyCompacted) already were): "
                + "\(Format.bytes(result.bytesBefore)) -> \(Format.bytes(result.bytesAfter)), \(Format.bytes(saved)) saved, "
                + "\(result.referenceFrames) frame(s) stored against copies elsewhere, "
                + (result.dictionary.map { "dictionary \($0)" + (result.trainedDictionary ? " (trained now)" : "") } ?? "no dictionary")
                + String(format: ", %.1f s", result.seconds))
            for damaged in result.damaged { FileHandle.standardError.write(Data("compact: skipped: \(damaged)\n".utf8)) }
        }
    }

    struct GC: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "gc", abstract: "Delete chunks no recovery point uses (waits for running backups).")
        @OptionGroup var repository: RepositoryOptions
        @Flag var dryRun = false
        @OptionGroup var output: OutputOptions

        func run() throws {
            let result = try repository.open().gc(dryRun: dryRun) {
                FileHandle.standardError.write(Data("gc: waiting for running backups to finish\n".utf8))
            }
            if output.json { return try JSON.print(result) }
            print("\(result.referenced) chunk(s) in use; \(result.removed) unreferenced chunk(s) "
                + (dryRun ? "would be removed" : "removed, \(Format.bytes(result.bytesFreed)) freed")
                + (result.packsLocked.map { $0 > 0 ? "; \($0) unused pack(s) kept under Object Lock" : "" } ?? "")
                + (result.packsRecent.map { $0 > 0 ? "; \($0) unused pack(s) kept as written in the last day" : "" } ?? ""))
        }
    }
}

/// Points of libvirt domains from the CLI: hot storage for scratch files, the guard process.
enum ReplicationOptions {
    static func hotDirectory(_ given: String?) -> String {
        given ?? ProcessInfo.processInfo.environment["LIFEBOAT_HOT"] ?? "/var/lib/lifeboat/hot"
    }

    /// Replication of `repo`, whose running backup jobs are watched by `lifeboat backup-guard`.
    static func replication(_ repo: Repository, hot: String?, connect: String? = nil) -> Replication {
        var replication = Replication(repository: repo, hotDirectory: hotDirectory(hot),
                                      defaultConnectURI: Connection.uri(connect))
        replication.launcher = SelfLauncher()
        return replication
    }
}

extension Lifeboat {
    /// Started by a point of a running domain: cleans up after it should its process die.
    struct BackupGuardCommand: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "backup-guard", shouldDisplay: false)
        @Option var pid: Int32
        @Option var domain: String
        @Option var connect: String
        @Option var scratch: String
        @Option var sockets: String
        @Option var checkpoint: String?

        func run() throws {
            BackupGuard(pid: pid, domain: domain, connectURI: connect, checkpoint: checkpoint, scratchDirectory: scratch,
                        socketDirectory: sockets).watch()
        }
    }
}
