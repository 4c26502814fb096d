import Foundation
#if canImport(Glibc)
import Glibc
import LifeboatBase
#endif

public struct PruneResult: Sendable, Codable {
    public struct Kept: Sendable, Codable {
        public var point: String
        public var reasons: [String]
    }
    public var kept: [Kept]
    public var removed: [String]
    public var dryRun: Bool
}

/// What `gc` found and did.
public struct GCResult: Sendable, Codable {
    public var referenced: Int
    public var removed: Int
    public var bytesFreed: Int
    public var dryRun: Bool
    /// At an off-site copy: unused packs the store keeps under Object Lock, and those written too
    /// recently to be sure no sync is still sending the points that use them.
    public var packsLocked: Int?
    public var packsRecent: Int?
}

extension Repository {
    /// Deletes the machine's recovery points that no rule of `policy` keeps. Their chunks stay
    /// until `gc`. Each point disappears at once (one rename) and is then deleted.
    public func prune(_ machine: String, policy: RetentionPolicy, dryRun: Bool = false) throws -> PruneResult {
        if let remote { return try offsitePrune(remote, machine: machine, policy: policy, dryRun: dryRun) }
        guard !policy.isEmpty else {
            throw LifeboatError(.invalidArgument, "prune needs at least one --keep-* rule, or every point would go")
        }
        let lock = try repositoryLock(.shared, wait: true)
        let points = try self.points(machine)
        var reasons = policy.keep(points.map { ($0.id, $0.time) })
        for (point, holders) in try holds(machine) {
            reasons[point, default: []].append(contentsOf: holders.map { "held by \($0)" })
        }
        let kept = points.filter { reasons[$0.id] != nil }.map { PruneResult.Kept(point: $0.id, reasons: reasons[$0.id]!) }
        let removed = points.filter { reasons[$0.id] == nil }.map(\.id)
        if !dryRun {
            let dir = pointsPath(machine)
            for id in removed {
                if sealsManifests { try writePrunedNote(machine, id) }
                let trash = dir + "/" + FileSystem.temporaryName()
                do { try FileSystem.rename(dir + "/" + id, trash) } catch {
                    FileSystem.remove(root + "/" + prunedNoteName(machine, id))
                    throw error
                }
                try FileSystem.syncDirectory(dir)
                FileSystem.removeTree(trash)
            }
        }
        withExtendedLifetime(lock) {}
        return PruneResult(kept: kept, removed: removed, dryRun: dryRun)
    }

    // MARK: Roll-back

    func prunedNoteName(_ machine: String, _ id: String) -> String { "machines/\(machine)/pruned/\(id)" }

    /// Says, sealed, that prune removed `id`: a point gone without it was deleted by someone
    /// else (or the repository rolled back), which `verify` names.
    func writePrunedNote(_ machine: String, _ id: String) throws {
        try FileSystem.makeDirectories(machinePath(machine) + "/pruned")
        try writeManifest(Array("pruned \(id)".utf8), prunedNoteName(machine, id))
    }

    /// True when prune removed point `id` here (its sealed note is there and opens).
    func wasPruned(_ machine: String, _ id: String) -> Bool {
        sealsManifests && (try? readManifest(prunedNoteName(machine, id))) == Array("pruned \(id)".utf8)
    }

    /// Points of `machine` that vanished while a newer one names them as the point before it,
    /// with no note that prune removed them: a deleted point or a rolled-back repository. Only
    /// repositories that seal manifests keep such notes (and only their points cannot be forged).
    public func rolledBackPoints(_ machine: String) throws -> [String] {
        guard sealsManifests else { return [] }
        let points = try self.points(machine)
        let ids = Set(points.map(\.id))
        func pruned(_ id: String) -> Bool { wasPruned(machine, id) }
        return points.compactMap { point in
            if pruned(point.id) {
                return "point \(point.id) of \(machine) was pruned and is back in \(root): someone put an old copy of it there"
            }
            guard let parent = point.parent, !ids.contains(parent), !pruned(parent) else { return nil }
            return "point \(parent) of \(machine) is missing from \(root) while point \(point.id) names it as the point before it: someone deleted it or rolled the repository back"
        }
    }

    // MARK: Holds

    func holdsPath(_ machine: String) -> String { machinePath(machine) + "/holds" }

    /// Keeps `point` from being pruned while `holder` (a drill, a failover) reads it:
    /// `machines/NAME/holds/POINT@HOLDER`, an empty file.
    public func hold(_ machine: String, point: String, by holder: String) throws {
        try FileSystem.makeDirectory(holdsPath(machine), mode: 0o755)
        try FileSystem.writeAtomically([], to: holdsPath(machine) + "/\(point)@\(holder)")
    }

    /// Lets go of every hold of `holder` on `machine`'s points.
    public func release(_ machine: String, by holder: String) {
        for name in (try? FileSystem.list(holdsPath(machine))) ?? [] where name.hasSuffix("@" + holder) {
            FileSystem.remove(holdsPath(machine) + "/" + name)
        }
    }

    /// Point id -> holders.
    public func holds(_ machine: String) throws -> [String: [String]] {
        var result: [String: [String]] = [:]
        for name in (try? FileSystem.list(holdsPath(machine))) ?? [] {
            guard let at = name.firstIndex(of: "@"), !name.hasPrefix(".") else { continue }
            result[String(name[..<at]), default: []].append(String(name[name.index(after: at)...]))
        }
        return result
    }

    /// Deletes every stored chunk no recovery point uses (mark and sweep).
    ///
    /// Runs under the repository's exclusive lock, which backups and `compact` hold shared: it
    /// waits for them to finish, and they wait for it, so a chunk one of them counts on is never
    /// deleted under it. Chunks that frames of used chunks refer to (`compact`'s catalogue) are
    /// used too. Any unreadable index or catalogue stops it before it deletes anything.
    /// - Parameter waiting: called once if gc has to wait for running backups.
    public func gc(dryRun: Bool = false, waiting: () -> Void = {}) throws -> GCResult {
        if let remote { return try offsiteGC(remote, dryRun: dryRun) }
        var lock = try repositoryLock(.exclusive, wait: false)
        if lock == nil {
            waiting()
            lock = try repositoryLock(.exclusive, wait: true)
        }
        let live = try liveChunks()
        let catalogue: [ReferenceRecord]
        do { catalogue = try loadReferenceCatalogue() } catch let error as LifeboatError {
            throw LifeboatError(.damaged, "\(error.message): gc cannot tell which chunks compacted chunks refer to, so it deletes nothing")
        }
        let referenced = closingOverReferences(live, catalogue: catalogue)
        let stored = try store.all()
        var removed = 0, freed = 0
        for id in stored where !referenced.contains(id) {
            removed += 1
            if !dryRun { freed += try store.remove(id) }
        }
        if !dryRun && !catalogue.isEmpty {
            // Records of chunks that are gone say nothing any more; one file instead of many.
            let kept = Array(Set(catalogue.filter { referenced.contains($0.source) }))
            try rewriteReferenceCatalogue(kept.sorted { ($0.source.hex, $0.target.chunk.hex, $0.target.frame) < ($1.source.hex, $1.target.chunk.hex, $1.target.frame) })
        }
        withExtendedLifetime(lock) {}
        return GCResult(referenced: referenced.count, removed: removed, bytesFreed: freed, dryRun: dryRun)
    }
}
