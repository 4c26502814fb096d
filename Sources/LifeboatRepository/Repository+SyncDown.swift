import Foundation
import LifeboatBase

extension Repository {
    /// Copies points from this repository, an off-site copy in a bucket, into the local
    /// repository at `path` (a second site making its own repository from the bucket, or a site
    /// rebuilt after the disaster): the chunks it lacks, fetched in pack order with one range GET
    /// per run of neighbours and stored as they are (encrypted chunks stay encrypted), then each
    /// point's files, point.json last, so a point is visible there only once all it needs is.
    /// The local repository is created with the bucket's config (same keys, same chunk
    /// parameters) when it does not exist; one made with other keys is refused. Machines already
    /// there keep their own settings. Manifests are sealed there as the repository seals them.
    /// A stopped copy leaves whole chunks behind, which the next one does not fetch again.
    /// - Parameter machines: the machines to copy (empty: all in the bucket).
    /// - Throws: `.invalidState` when the local repository was made with other keys.
    public func sync(toLocal path: String, machines names: [String] = [], progress: ProgressMeter = ProgressMeter()) throws -> SyncResult {
        guard let remote else {
            throw LifeboatError(.invalidArgument, "\(root) is a local repository: sync copies it to a bucket (--to s3://…), or from a bucket to a folder")
        }
        guard remote.problems.isEmpty else {
            throw LifeboatError(.damaged, "\(remote.description) has manifests that cannot be trusted (see 'lifeboat verify --repo \(remote.description)'): sync copies nothing from it")
        }
        let started = Date()
        let requestsBefore = remote.client.requestCounts
        let target = try localTarget(path)
        let lock = try target.repositoryLock(.shared, wait: true)   // gc there waits
        defer { withExtendedLifetime(lock) {} }
        for folder in ["dictionaries", "compact"] where FileSystem.exists(root + "/" + folder) {
            try FileSystem.makeDirectories(target.root + "/" + folder)
            for name in try FileSystem.list(root + "/" + folder) where !name.hasPrefix(".") && !FileSystem.exists(target.root + "/" + folder + "/" + name) {
                guard let bytes = FileSystem.contents(root + "/" + folder + "/" + name) else { continue }
                try FileSystem.writeAtomically(bytes, to: target.root + "/" + folder + "/" + name, syncDirectory: false)
            }
        }
        var result = SyncResult(target: target.root)
        let referring = Self.referenceMap(try loadReferenceCatalogue())
        let chosen = names.isEmpty ? try machineNames() : names
        var plan: [(RecoveryPoint, [ChunkID])] = []
        var planned = Set<ChunkID>()
        for name in chosen {
            let machine = try self.machine(name)
            if !FileSystem.exists(target.machinePath(name) + "/machine.json") {
                try FileSystem.makeDirectories(target.pointsPath(name))
                try target.save(machine)
            }
            let there = Set(try target.pointIDs(name))
            for point in try points(name) {
                // (One pruned there stays pruned: its retention is that repository's business.)
                if there.contains(point.id) || target.wasPruned(name, point.id) { result.pointsAlreadyThere += 1; continue }
                var ids = Set<ChunkID>()
                for disk in point.disks { ids.formUnion(try index(point, disk: disk.name).ids) }
                ids.remove(.zero)
                let missing = closingOverReferences(ids, references: referring).filter { !planned.contains($0) && !target.store.contains($0) }
                planned.formUnion(missing)
                plan.append((point, Array(missing)))
            }
        }
        let packs = store as? PackChunkStore
        progress.start(total: plan.reduce(0) { total, entry in entry.1.reduce(total) { $0 + (packs?.locations[$1]?.length ?? 0) } })
        // Every chunk is decoded before it is stored: what the bucket (or this host's cache) gave
        // is checked against its id, or it would sit in the repository as if it were sound.
        let plaintext = UnsafeMutableRawBufferPointer.allocate(byteCount: plan.reduce(config.chunkSize) { max($0, $1.0.chunkSize) }, alignment: 16)
        defer { plaintext.deallocate() }
        for (point, missing) in plan {
            for run in store.readRuns(missing) ?? missing.map({ [$0] }) {
                var fetched = try store.fetchRun(run)
                for id in run where fetched[id] == nil { fetched[id] = try store.read(id) }   // cached here whole
                for (id, bytes) in fetched {
                    _ = try bytes.withUnsafeBytes { try codec.decode($0, id: id, into: plaintext, references: references) }
                    try bytes.withUnsafeBytes { try target.store.write(id, $0) }
                    result.chunks += 1
                    result.bytes += bytes.count
                    progress.add(bytes.count)
                }
            }
            try target.store.sync()   // every chunk the point names is durable before it is visible
            try copyPoint(point, into: target)
            result.points.append("\(point.machine)/\(point.id)")
        }
        result.requests = remote.client.requestCounts.since(requestsBefore)
        result.seconds = Date().timeIntervalSince(started)
        return result
    }

    /// The local repository at `path`, made with this bucket's config when there is none yet.
    private func localTarget(_ path: String) throws -> Repository {
        let configBytes = try PosixFile.openForReading(root + "/config.json", what: "repository config").readAll()
        if FileSystem.exists(path + "/config.json") {
            let there = try Self.decodeConfig(try PosixFile.openForReading(path + "/config.json", what: "repository config").readAll(),
                                              name: path + "/config.json")
            guard there.id == config.id, there.hasSameKeys(as: config) else {
                throw LifeboatError(.invalidState, "the repository at \(path) was not made from \(name) (another id or other keys): copy into a new folder (sync creates it)")
            }
            return Repository(root: path, config: there, keys: keys)
        }
        if FileSystem.exists(path) {
            // Empty, or what a copy stopped before config.json left (empty folders).
            let names = Set(try FileSystem.list(path))
            guard FileSystem.isDirectory(path), names.isSubset(of: ["chunks", "machines"]),
                  (try? FileSystem.list(path + "/machines"))?.isEmpty ?? true else {
                throw LifeboatError(.alreadyExists, "\(path) is not empty and holds no repository: give an empty or new folder")
            }
            FileSystem.removeTree(path + "/chunks")
            FileSystem.removeTree(path + "/machines")
        } else {
            try FileSystem.makeDirectories(path)
        }
        try LocalChunkStore.create(root: path + "/chunks")
        try FileSystem.makeDirectory(path + "/machines")
        // config.json last: a folder without it is not a repository yet.
        try FileSystem.writeAtomically(configBytes, to: path + "/config.json")
        return Repository(root: path, config: config, keys: keys)
    }

    /// A point's files from the mirror into `target`, manifests sealed as it seals them, point.json
    /// last (in a staging folder renamed into place). A point whose parent is not there (pruned
    /// in the bucket, or a machine copied from its middle) gets a note saying so, so that verify
    /// there does not take the gap for a roll-back.
    private func copyPoint(_ point: RecoveryPoint, into target: Repository) throws {
        let folder = pointPath(point.machine, point.id)
        let staging = target.pointsPath(point.machine) + "/" + FileSystem.temporaryName()
        try FileSystem.makeDirectory(staging)
        do {
            let files = try FileSystem.list(folder).filter { !$0.hasPrefix(".") && $0 != "point.json" }.sorted() + ["point.json"]
            for file in files {
                let name = "machines/\(point.machine)/points/\(point.id)/\(file)"
                let bytes = try PosixFile.openForReading(folder + "/" + file, what: "point file").readAll()
                try FileSystem.writeAtomically(Self.isPointManifest(file) ? try target.sealManifest(bytes, name: name) : bytes, to: staging + "/" + file,
                                               syncDirectory: false)
            }
            if let parent = point.parent, target.sealsManifests, !target.hasPoint(point.machine, parent) {
                try target.writePrunedNote(point.machine, parent)
            }
            try FileSystem.rename(staging, target.pointPath(point.machine, point.id))
            try FileSystem.syncDirectory(target.pointsPath(point.machine))
        } catch {
            FileSystem.removeTree(staging)
            throw error
        }
    }
}
