import Foundation
import LifeboatBase
import LifeboatS3

extension Repository {
    /// Seconds a pack stays after it was written even when no point uses it: a sync on another
    /// host may be sending the points that will (their chunks go first). Like PBS's gc, a day.
    static var offsiteGCGrace: Double {
        ProcessInfo.processInfo.environment["LIFEBOAT_OFFSITE_GC_GRACE"].flatMap(Double.init) ?? 86_400
    }

    /// gc at an off-site copy: deletes every version of packs no point uses (and their indexes),
    /// except packs written in the last day and versions under Object Lock, which the store keeps
    /// and gc counts. Nothing is deleted while any manifest could not be read.
    func offsiteGC(_ remote: ObjectRepository, dryRun: Bool) throws -> GCResult {
        guard remote.problems.isEmpty else {
            throw LifeboatError(.damaged, "\(remote.description) has manifests that cannot be read (see verify): gc cannot tell which packs they use, so it deletes nothing")
        }
        guard let lock = try FileLock(path: remote.cacheRoot + "/sync.lock", mode: .exclusive, wait: true) else {
            throw LifeboatError(.busy, "a sync to \(remote.description) is running: run gc after it")
        }
        defer { withExtendedLifetime(lock) {} }
        // What the bucket holds now, not when this repository was opened: a sync that finished
        // while gc waited for it published points whose packs must stay.
        try Self.mirrorManifests(remote, into: root, keys: keys)
        guard remote.problems.isEmpty else {
            throw LifeboatError(.damaged, "\(remote.description) has manifests that cannot be read (see verify): gc cannot tell which packs they use, so it deletes nothing")
        }
        let locations = try remote.loadPackIndexes()
        let referenced = closingOverReferences(try liveChunks(), catalogue: try loadReferenceCatalogue())
        var packs: [String: (chunks: Int, used: Bool)] = [:]
        for (id, location) in locations {
            packs[location.pack, default: (0, false)].chunks += 1
            if referenced.contains(id) { packs[location.pack]!.used = true }
        }
        let listed = Dictionary(try remote.client.list(prefix: remote.key("packs/")).map { ($0.key, $0) }) { a, _ in a }
        let recent = Date().addingTimeInterval(-Self.offsiteGCGrace)
        var result = GCResult(referenced: referenced.count, removed: 0, bytesFreed: 0, dryRun: dryRun)
        result.packsLocked = 0
        result.packsRecent = 0
        for (pack, content) in packs.sorted(by: { $0.key < $1.key }) where !content.used {
            let object = listed[remote.key(pack + ".pack")]
            if let modified = object?.lastModified, modified > recent { result.packsRecent! += 1; continue }
            if !dryRun {
                do {
                    try remote.client.deleteAllVersions(remote.key(pack + ".pack"))   // the pack first: an index alone is harmless
                    try remote.client.deleteAllVersions(remote.key(pack + ".idx"))
                } catch let error as LifeboatError where error.code == .authentication {
                    result.packsLocked! += 1
                    continue
                }
            }
            result.removed += content.chunks
            result.bytesFreed += object?.size ?? 0
        }
        return result
    }

    /// prune at an off-site copy: the points no rule keeps go (every version of their files,
    /// point.json first), each after a sealed note `machines/NAME/pruned/ID` that tells readers it
    /// went on purpose. A point under Object Lock stays and is said to.
    func offsitePrune(_ remote: ObjectRepository, machine: String, policy: RetentionPolicy, dryRun: Bool) throws -> PruneResult {
        guard !policy.isEmpty else {
            throw LifeboatError(.invalidArgument, "prune needs at least one --keep-* rule, or every point would go")
        }
        let points = try self.points(machine)
        let reasons = policy.keep(points.map { ($0.id, $0.time) })
        var kept = points.filter { reasons[$0.id] != nil }.map { PruneResult.Kept(point: $0.id, reasons: reasons[$0.id]!) }
        var removed: [String] = []
        for point in points where reasons[point.id] == nil {
            if dryRun { removed.append(point.id); continue }
            let folder = "machines/\(machine)/points/\(point.id)/"
            let note = "machines/\(machine)/pruned/\(point.id)"
            try remote.client.put(remote.key(note), try ObjectRepository.seal(Array("pruned \(point.id)".utf8), name: note, keys: keys))
            let keys = try remote.client.list(prefix: remote.key(folder)).map(\.key)
            let files = keys.filter { $0.hasSuffix("/point.json") } + keys.filter { !$0.hasSuffix("/point.json") }
            do {
                for key in files { try remote.client.deleteAllVersions(key) }
                removed.append(point.id)
                FileSystem.removeTree(pointPath(machine, point.id))
            } catch let error as LifeboatError where error.code == .authentication {
                kept.append(PruneResult.Kept(point: point.id, reasons: ["under Object Lock in the bucket"]))
            }
        }
        return PruneResult(kept: kept.sorted { $0.point < $1.point }, removed: removed, dryRun: dryRun)
    }
}
