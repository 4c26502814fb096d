import Foundation
import LifeboatBase
import LifeboatS3
#if canImport(Glibc)
import Glibc
#endif

/// What `sync` sent.
public struct SyncResult: Codable, Sendable {
    public var target: String
    /// Points made visible at the target, as `MACHINE/ID`.
    public var points: [String] = []
    /// Points the target had already.
    public var pointsAlreadyThere = 0
    public var chunks = 0
    /// Stored bytes of the chunks sent (as the source keeps them: compressed, encrypted).
    public var bytes = 0
    public var packs = 0
    public var requests = S3Counts()
    public var seconds = 0.0
}

/// Where a machine's points were last copied off-site, and the newest one there
/// (`machines/NAME/offsite.json`, written by sync at the source; status and the metrics read it).
public struct OffsiteCopy: Codable, Sendable, Equatable {
    public var target: String
    public var newestPoint: String?
    public var newestPointTime: Date?
    /// When a sync last finished for this machine.
    public var syncedAt: Date?
    /// Why the last sync failed, when it did (cleared by the next that works).
    public var lastError: String?
    public var failedAt: Date?
}

/// True for a name the bucket may give a file or folder of the mirror: one path segment of
/// letters, digits and `._@+-`, not starting with a dot (so never `.` or `..`). The bucket is not
/// trusted: anything else is reported and left out, never written.
func isSafeSegment<S: StringProtocol>(_ name: S) -> Bool {
    guard let first = name.utf8.first, first != UInt8(ascii: "."), name.utf8.count <= 128 else { return false }
    return name.utf8.allSatisfy { c in
        (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x5a) || (c >= 0x61 && c <= 0x7a)
            || c == UInt8(ascii: ".") || c == UInt8(ascii: "_") || c == UInt8(ascii: "-") || c == UInt8(ascii: "@") || c == UInt8(ascii: "+")
    }
}

/// point.json as it travels: the point and the point published before it at the target, so a
/// point that vanishes from the bucket while a newer one names it is noticed (a roll-back).
struct PointEnvelope: Codable {
    var previous: String?
    var point: Data
}

extension Repository {
    /// machines/NAME/offsite.json (a manifest: sealed where manifests are, so that nobody makes a
    /// stale copy look current).
    func offsiteName(_ machine: String) -> String { "machines/\(machine)/offsite.json" }

    /// The machine's off-site copy as the last sync left it; nil when it was never synced (or
    /// its record does not open: then the off-site RPO counts as breached).
    public func offsiteCopy(_ machine: String) -> OffsiteCopy? {
        guard let bytes = try? readManifest(offsiteName(machine)) else { return nil }
        return try? JSONDecoder.lifeboat.decode(OffsiteCopy.self, from: Data(bytes))
    }

    /// Records that a sync of the machine to `target` failed (the newest point there stays as known).
    public func recordOffsiteFailure(_ machine: String, target: String, error: String, now: Date = Date()) {
        var copy = offsiteCopy(machine) ?? OffsiteCopy(target: target)
        if copy.target != target { copy = OffsiteCopy(target: target) }
        copy.lastError = error
        copy.failedAt = now
        try? writeManifest(Array((try? JSONEncoder.lifeboat.encode(copy)) ?? Data()), offsiteName(machine), syncDirectory: false)
    }

    /// 64 MiB: 16 packs and 16 pack indexes per GiB stored, 32 PUTs (docs/FORMAT.md, "Object storage").
    public static let packSize = 64 << 20

    // MARK: Reading a repository in a bucket

    /// Opens the repository in a bucket for reading: its manifests are mirrored into
    /// `remote.cacheRoot/mirror` (points new at the target fetched, points gone from it dropped;
    /// a point appears only once its point.json is there), its chunks read from packs with range GETs.
    public static func open(remote: ObjectRepository, password: () throws -> String? = { nil }) throws -> Repository {
        let mirror = remote.cacheRoot + "/mirror"
        let fetched: [UInt8]?
        do {
            fetched = try remote.configBytes()
        } catch let error as LifeboatError where error.code == .io {
            // The endpoint does not answer: a host that looked before goes on with what it mirrored
            // (a drill or a mount starts warm); chunks not in its cache fail until the endpoint is back.
            guard let configBytes = FileSystem.contents(mirror + "/config.json") else { throw error }
            let config = try decodeConfig(configBytes, name: remote.description + "config.json")
            let keys = try keys(config, name: remote.description, password: password)
            remote.report("\(remote.description) cannot be reached now (\(error.message)): this host reads the manifests it mirrored at its last look")
            let store = try PackChunkStore(remote: remote, locations: try remote.cachedPackIndexes())
            return Repository(root: mirror, config: config, keys: keys, store: store, remote: remote)
        }
        guard let configBytes = fetched else {
            throw LifeboatError(.notFound, "no repository at \(remote.description): copy points there with 'lifeboat sync --to \(remote.description)'")
        }
        let config = try decodeConfig(configBytes, name: remote.description + "config.json")
        // Pinned: a config.json that changed since this host's last look (another id, other keys,
        // encryption gone) is not the repository it read before, and is not believed.
        if let seen = FileSystem.contents(mirror + "/config.json"), seen != configBytes,
           let before = try? JSONDecoder.lifeboat.decode(RepositoryConfig.self, from: Data(seen)) {
            if before.id != config.id || !before.hasSameKeys(as: config) {
                throw LifeboatError(.damaged, "the config.json of \(remote.description) is not the one this host read before (another id or other keys): someone replaced it; check the bucket, or read it with a new --cache-dir if that is what you meant")
            }
        }
        let keys = try keys(config, name: remote.description, password: password)
        try FileSystem.makeDirectories(mirror + "/machines")
        try FileSystem.writeAtomically(configBytes, to: mirror + "/config.json", syncDirectory: false)
        try mirrorManifests(remote, into: mirror, keys: keys)
        let store = try PackChunkStore(remote: remote, locations: try remote.loadPackIndexes())
        return Repository(root: mirror, config: config, keys: keys, store: store, remote: remote)
    }

    static func mirrorManifests(_ remote: ObjectRepository, into mirror: String, keys: RepositoryKeys?) throws {
        func fetch(_ name: String) throws -> [UInt8]? { try remote.client.get(remote.key(name)) }
        for folder in ["dictionaries", "compact"] {   // sealed files of their own: as they are
            for object in try remote.client.list(prefix: remote.key(folder + "/")) {
                let name = object.key.dropFirst(remote.key(folder + "/").count)
                guard isSafeSegment(name) else { remote.report("\(object.key) in \(remote.description) has a name lifeboat does not write: left out"); continue }
                let path = mirror + "/" + folder + "/" + name
                if FileSystem.exists(path) { continue }
                guard let bytes = try remote.client.get(object.key) else { continue }
                try FileSystem.makeDirectories(FileSystem.parent(of: path))
                try FileSystem.writeAtomically(bytes, to: path, syncDirectory: false)
            }
        }
        try FileSystem.makeDirectories(mirror + "/plans")
        let plans = try remote.client.list(prefix: remote.key("plans/")).map { String($0.key.dropFirst(remote.location.prefix.count)) }
            .filter { name in
                guard isSafeSegment(name.dropFirst("plans/".count)) else { remote.report("\(name) in \(remote.description) has a name lifeboat does not write: left out"); return false }
                return true
            }
        for name in plans {
            do {
                guard let stored = try fetch(name) else { continue }
                try FileSystem.writeAtomically(try remote.unseal(stored, name: name, keys: keys), to: mirror + "/" + name, syncDirectory: false)
            } catch let error as LifeboatError where error.code == .damaged { remote.report(error.message + ": the plan is left out") }
        }
        for file in try FileSystem.list(mirror + "/plans") where !file.hasPrefix(".") && !plans.contains("plans/" + file) {
            FileSystem.remove(mirror + "/plans/" + file)
        }
        // machines/NAME/machine.json, machines/NAME/points/ID/FILE
        var machineFiles: Set<String> = []
        var pointFiles: [String: [String]] = [:]
        var pruned: Set<String> = []   // "machine/points/ID" with a note that prune removed it
        for object in try remote.client.list(prefix: remote.key("machines/")) {
            let parts = object.key.dropFirst(remote.location.prefix.count).split(separator: "/", omittingEmptySubsequences: false).map(String.init)
            guard parts.count >= 3, parts.dropFirst().allSatisfy(isSafeSegment), (try? Machine.validate(name: parts[1])) != nil else {
                remote.report("\(object.key) in \(remote.description) has a name lifeboat does not write: left out")
                continue
            }
            if parts.count == 3, parts[2] == "machine.json" { machineFiles.insert(parts[1]) }
            if parts.count == 4, parts[2] == "pruned" { pruned.insert(parts[1] + "/points/" + parts[3]) }
            if parts.count == 5, parts[2] == "points" { pointFiles[parts[1] + "/points/" + parts[3], default: []].append(parts[4]) }
        }
        let visible = pointFiles.filter { $0.value.contains("point.json") }
        /// True when prune removed the point: its note is there and opens under the repository key.
        func prunedOnPurpose(_ name: String) -> Bool {
            let note = "machines/" + name.replacingOccurrences(of: "/points/", with: "/pruned/")
            guard pruned.contains(name), let stored = try? fetch(note), let opened = try? remote.unseal(stored, name: note, keys: keys) else { return false }
            return opened == Array("pruned \(name.split(separator: "/").last!)".utf8)
        }
        for machine in try FileSystem.list(mirror + "/machines") where !machine.hasPrefix(".") && !machineFiles.contains(machine) {
            FileSystem.removeTree(mirror + "/machines/" + machine)
        }
        var usable: Set<String> = []
        for machine in machineFiles {
            let folder = mirror + "/machines/" + machine
            do {
                guard let stored = try fetch("machines/\(machine)/machine.json") else { continue }
                try FileSystem.makeDirectories(folder + "/points")
                try FileSystem.writeAtomically(try remote.unseal(stored, name: "machines/\(machine)/machine.json", keys: keys),
                                               to: folder + "/machine.json", syncDirectory: false)
                usable.insert(machine)
            } catch let error as LifeboatError where error.code == .damaged {
                remote.report(error.message + ": machine \(machine) is left out")
                FileSystem.removeTree(folder)
                continue
            }
            for point in try FileSystem.list(folder + "/points") where !point.hasPrefix(".") && visible["\(machine)/points/\(point)"] == nil {
                if prunedOnPurpose("\(machine)/points/\(point)") { FileSystem.removeTree(folder + "/points/" + point); continue }
                remote.report("point \(point) of \(machine) was in \(remote.description) when this host last looked and is gone now: someone deleted it or rolled the bucket back")
                FileSystem.removeTree(folder + "/points/" + point)
            }
        }
        var previous: [String: String] = [:]   // "machine/points/ID" -> the point published before it
        for (name, files) in visible.sorted(by: { $0.key < $1.key }) {
            let machine = String(name.prefix { $0 != "/" })
            guard usable.contains(machine) else {
                remote.report("point \(name.split(separator: "/").last!) of \(machine) is in \(remote.description) without a readable machine.json: left out")
                continue
            }
            let final = mirror + "/machines/" + name
            do {
                guard let stored = try fetch("machines/\(name)/point.json") else { continue }
                let opened = try remote.unseal(stored, name: "machines/\(name)/point.json", keys: keys)
                guard let envelope = try? JSONDecoder.lifeboat.decode(PointEnvelope.self, from: Data(opened)) else {
                    throw LifeboatError(.damaged, "\(remote.description)machines/\(name)/point.json is damaged (not a point)")
                }
                previous[name] = envelope.previous
                if FileSystem.exists(final) { continue }
                let staging = FileSystem.parent(of: final) + "/" + FileSystem.temporaryName()
                try FileSystem.makeDirectory(staging)
                defer { FileSystem.removeTree(staging) }
                for file in files where file != "point.json" {
                    let key = "machines/\(name)/\(file)"
                    guard let bytes = try fetch(key) else { continue }
                    try FileSystem.writeAtomically(try remote.unseal(bytes, name: key, keys: keys), to: staging + "/" + file, syncDirectory: false)
                }
                try FileSystem.writeAtomically(Array(envelope.point), to: staging + "/point.json", syncDirectory: false)
                try FileSystem.rename(staging, final)
            } catch let error as LifeboatError where error.code == .damaged {
                remote.report(error.message + ": the point is left out")
                FileSystem.removeTree(final)
            }
        }
        for (name, before) in previous {
            let machine = String(name.prefix { $0 != "/" })
            if visible["\(machine)/points/\(before)"] == nil && !prunedOnPurpose("\(machine)/points/\(before)") {
                remote.report("point \(before) of \(machine) is missing from \(remote.description) while point \(name.split(separator: "/").last!) names it as the point before it: someone deleted it or rolled the bucket back")
            }
        }
    }

    // MARK: Sync

    /// Copies points to a repository in a bucket: the chunks the target lacks, as stored
    /// (encrypted chunks stay encrypted: the target has this repository's keys), in packs; then
    /// each point's files, point.json last, so a point is visible there only once all it needs is.
    /// A sync that is stopped resends only the pack it was writing: packs whose index arrived
    /// are known from the target's listing the next time.
    /// - Parameters:
    ///   - machines: the machines to copy (empty: all).
    ///   - objectLockDays: write packs and points under S3 Object Lock in compliance mode for so many days.
    /// - Throws: `.invalidState` when the target was made with other keys.
    public func sync(to target: ObjectRepository, machines names: [String] = [], objectLockDays: Int? = nil,
                     progress: ProgressMeter = ProgressMeter(), packSize: Int = Repository.packSize) throws -> SyncResult {
        try requireLocal("sync from a bucket")
        let started = Date()
        // One sync to a target at a time on this host (the replication service's syncs wait their turn).
        guard let lock = try FileLock(path: target.cacheRoot + "/sync.lock", mode: .exclusive, wait: true) else {
            throw LifeboatError(.busy, "another sync to \(target.description) is running on this host: wait for it to finish")
        }
        let sourceLock = try repositoryLock(.shared, wait: true)  // gc waits: no chunk vanishes mid-sync
        // No compact meanwhile: it could make a chunk refer to one this sync did not plan to send.
        let compactLock = try FileLock.exclusive(root + "/compact.lock") {
            "a compact of \(self.root) is running\($0): sync after it"
        }
        defer { withExtendedLifetime((lock, sourceLock, compactLock)) {} }
        let retainUntil = objectLockDays.map { started.addingTimeInterval(Double($0) * 86400) }
        try prepareTarget(target)
        var result = SyncResult(target: target.description)
        var locations = try target.loadPackIndexes()

        for folder in ["dictionaries", "compact"] where FileSystem.exists(root + "/" + folder) {
            let there = Set(try target.client.list(prefix: target.key(folder + "/")).map(\.key))
            for name in try FileSystem.list(root + "/" + folder) where !name.hasPrefix(".") && !name.hasSuffix(".lock") {
                let key = target.key(folder + "/" + name)
                guard !there.contains(key), let bytes = FileSystem.contents(root + "/" + folder + "/" + name) else { continue }
                try target.client.put(key, bytes, retainUntil: retainUntil)
            }
        }

        try uploadPlans(to: target)

        // Which points are missing at the target, and which of their chunks.
        let chosen = names.isEmpty ? try machines().map(\.name) : names
        let references = Self.referenceMap(try loadReferenceCatalogue())
        /// Every chunk a point reads: its disks' and those their compacted frames refer to.
        func neededChunks(_ point: RecoveryPoint) throws -> Set<ChunkID> {
            var ids = Set<ChunkID>()
            for disk in point.disks { ids.formUnion(try self.index(point, disk: disk.name).ids) }
            ids.remove(.zero)
            return closingOverReferences(ids, references: references)
        }
        var plan: [(RecoveryPoint, [ChunkID])] = []
        var planned = Set<ChunkID>()
        var total = 0
        var newestThere: [String: String] = [:]
        for name in chosen {
            let machine = try self.machine(name)
            let there = try target.visiblePoints(machine.name)
            newestThere[name] = there.max()   // ids are times: yyyymmdd-hhmmss
            try uploadMachine(machine.name, to: target)
            for point in try points(machine.name) {
                if there.contains(point.id) { result.pointsAlreadyThere += 1; continue }
                var chunks: [ChunkID] = []
                var stack: [ChunkID] = []
                for disk in point.disks { stack += try index(point, disk: disk.name).ids }
                while let id = stack.popLast() {
                    guard !id.isZero, locations[id] == nil, planned.insert(id).inserted else { continue }
                    chunks.append(id)
                    total += storedSize(id)
                    stack += references[id] ?? []
                }
                plan.append((point, chunks))
            }
        }
        progress.start(total: total)

        // Packs fill across points; a point is published once the pack holding its last chunk is.
        var pack: [UInt8] = []
        var index = PackIndex()
        var waiting: [RecoveryPoint] = []
        func put() throws {
            guard !index.entries.isEmpty else { return }
            let name = try target.putPack(pack, index: index, retainUntil: retainUntil)
            for entry in index.entries { locations[entry.id] = PackLocation(pack: name, offset: entry.offset, length: entry.length) }
            result.packs += 1
            progress.add(pack.count)
            pack.removeAll(keepingCapacity: true)
            index = PackIndex()
        }
        func add(_ id: ChunkID) throws {
            let stored = try store.read(id)
            index.entries.append((id, pack.count, stored.count))
            pack += stored
            result.chunks += 1
            result.bytes += stored.count
        }
        var listed = Date()
        func flush(last: Bool = false) throws {
            try put()
            guard !waiting.isEmpty, last || Date().timeIntervalSince(listed) > 600 else { return }
            // Before points are published, every pack they need must still be there: a gc at the
            // target (from another host, of old packs no visible point used) may have removed one.
            // Checked with one listing at the end and every 10 minutes of a long sync (not per pack:
            // a listing of 16,000 packs is 16 requests).
            let present = Set(try target.client.list(prefix: target.key("packs/")).map(\.key))
            listed = Date()
            var needed = Set<ChunkID>()
            for point in waiting { needed.formUnion(try neededChunks(point)) }
            let gone = needed.filter { id in
                guard let location = locations[id] else { return true }
                return !present.contains(target.key(location.pack + ".pack"))
            }
            if !gone.isEmpty {
                for id in gone { try add(id) }
                try put()
            }
            for point in waiting {
                try publish(point, previous: newestThere[point.machine], to: target, retainUntil: retainUntil)
                newestThere[point.machine] = point.id
                result.points.append(point.machine + "/" + point.id)
            }
            waiting.removeAll()
        }
        pack.reserveCapacity(packSize + (16 << 20))
        for (point, chunks) in plan {
            for id in chunks {
                try add(id)
                if pack.count >= packSize { try flush() }
            }
            waiting.append(point)
        }
        try flush(last: true)
        for name in chosen {
            let there = try target.visiblePoints(name)
            let newest = try points(name).last { there.contains($0.id) }
            let copy = OffsiteCopy(target: target.description, newestPoint: newest?.id, newestPointTime: newest?.time, syncedAt: Date())
            try writeManifest(Array(try JSONEncoder.lifeboat.encode(copy)), offsiteName(name), syncDirectory: false)
        }
        result.requests = target.client.requestCounts
        result.seconds = Date().timeIntervalSince(started)
        return result
    }

    /// Creates the target with this repository's config (its key material and chunk parameters)
    /// when there is none; refuses one made with other keys.
    private func prepareTarget(_ target: ObjectRepository) throws {
        let local = try PosixFile.openForReading(root + "/config.json", what: "repository config").readAll()
        guard let bytes = try target.configBytes() else {
            try target.client.put(target.key("config.json"), local)
            return
        }
        let there = try Self.decodeConfig(bytes, name: target.description + "config.json")
        guard there.hasSameKeys(as: config) else {
            throw LifeboatError(.invalidState, "the repository at \(target.description) was made with other keys than \(root): sync to a new prefix (sync creates it with this repository's keys)")
        }
    }

    private func storedSize(_ id: ChunkID) -> Int {
        guard let local = store as? LocalChunkStore else { return 0 }
        var st = stat()
        return stat(local.path(id), &st) == 0 ? Int(st.st_size) : 0
    }

    /// machine.json, when it differs from what this host last sent there.
    private func uploadMachine(_ name: String, to target: ObjectRepository) throws {
        let bytes = try readManifest("machines/\(name)/machine.json")
        let sent = target.cacheRoot + "/sent-machine-" + name + ".json"
        let key = "machines/\(name)/machine.json"
        // Sent before and still there (a bucket emptied since would have lost it).
        if FileSystem.contents(sent) == bytes, try target.client.exists(target.key(key)) { return }
        try target.client.put(target.key(key), try ObjectRepository.seal(bytes, name: key, keys: keys))
        try FileSystem.writeAtomically(bytes, to: sent, syncDirectory: false)
    }

    /// Recovery plans (plans/), each when it differs from what this host last sent there.
    private func uploadPlans(to target: ObjectRepository) throws {
        let folder = root + "/plans"
        guard FileSystem.exists(folder) else { return }
        try FileSystem.makeDirectories(target.cacheRoot + "/sent-plans")
        for file in try FileSystem.list(folder) where !file.hasPrefix(".") {
            let bytes: [UInt8]
            do { bytes = try readManifest("plans/" + file) } catch {
                throw LifeboatError(.damaged, "plan \(root)/plans/\(file) cannot be read (\(error)): apply it again, or remove it, then sync")
            }
            let sent = target.cacheRoot + "/sent-plans/" + file
            if FileSystem.contents(sent) == bytes, try target.client.exists(target.key("plans/" + file)) { continue }
            try target.client.put(target.key("plans/" + file), try ObjectRepository.seal(bytes, name: "plans/" + file, keys: keys))
            try FileSystem.writeAtomically(bytes, to: sent, syncDirectory: false)
        }
    }

    /// A point's files, point.json last (in its envelope, naming the point published before it
    /// there): the point is visible from then on.
    private func publish(_ point: RecoveryPoint, previous: String?, to target: ObjectRepository, retainUntil: Date?) throws {
        let folder = pointPath(point.machine, point.id)
        let files = try FileSystem.list(folder).filter { !$0.hasPrefix(".") && $0 != "point.json" }.sorted() + ["point.json"]
        for file in files {
            let key = "machines/\(point.machine)/points/\(point.id)/\(file)"
            // Manifests go opened (the bucket's seal binds them to their key there); attachments as kept here.
            var bytes = Self.isPointManifest(file) ? try readManifest(key) : try PosixFile.openForReading(folder + "/" + file, what: "point file").readAll()
            if file == "point.json" {
                bytes = Array(try JSONEncoder.lifeboat.encode(PointEnvelope(previous: previous, point: Data(bytes))))
            }
            try target.client.put(target.key(key), try ObjectRepository.seal(bytes, name: key, keys: keys), retainUntil: retainUntil)
        }
    }
}

extension ObjectRepository {
    /// The machine's points visible at the target (those whose point.json is there).
    func visiblePoints(_ machine: String) throws -> Set<String> {
        let prefix = key("machines/\(machine)/points/")
        return Set(try client.list(prefix: prefix).compactMap { object -> String? in
            let rest = object.key.dropFirst(prefix.count).split(separator: "/")
            return rest.count == 2 && rest[1] == "point.json" ? String(rest[0]) : nil
        })
    }
}
