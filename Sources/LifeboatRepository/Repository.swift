import Foundation
import LifeboatBase
import LifeboatS3
import Synchronization
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// The cold store: chunks plus manifests, self-describing and portable.
///
/// ```
/// config.json
/// chunks/ab/abcd…                        stored chunks (see ChunkCodec)
/// machines/NAME/machine.json             machine and recovery-server settings
/// machines/NAME/points/ID/point.json     a recovery point
/// machines/NAME/points/ID/DISK.idx       its disks' chunk ids (see DiskIndex)
/// ```
/// A `Repository` value is cheap and thread-safe; operations that change it take file locks,
/// so several processes can use one repository at once.
public final class Repository: Sendable {
    /// 1 MiB: chosen by scripts/bench-backup (see docs/FORMAT.md, "Choices").
    public static let defaultChunkSize = 1 << 20
    /// zstd 1 (hash log 16, minimum match 5) for new chunks: 42% faster than level 3 and 2.6%
    /// larger on the bench image's 64 KiB frames; `compact` stores them smaller later (docs/FORMAT.md).
    public static let defaultCompressionLevel = 1
    /// 64 KiB: a random 4 KiB read decodes at most this much (docs/FORMAT.md, "Choices").
    public static let defaultFrameSize = 64 * 1024
    /// 256 KiB: the chunk size of machines protected with --domain. An incremental point rewrites
    /// every chunk a guest write touches: 40 MiB of scattered 64 KiB writes stored 320 MiB of
    /// 1 MiB chunks and about 105 MiB of 256 KiB ones (measured by hand on bench-replicate's disk, docs/REPLICATION.md).
    public static let replicationChunkSize = 256 << 10

    /// The newest format this lifeboat writes (docs/FORMAT.md): 2 since chunks carry a mode per
    /// frame; 3 for encrypted repositories whose manifests are sealed (`sealsManifests`).
    public static let format = 3
    /// The format of new unencrypted repositories, and the one a backup or compact raises older
    /// ones to (manifests written plaintext stay so: such repositories are read as before).
    static let chunkFormat = 2

    public let root: String
    public let config: RepositoryConfig
    let codec: ChunkCodec
    let store: any ChunkStore
    let keys: RepositoryKeys?
    let dictionaries: DictionaryShelf
    /// The bucket this repository is read from (its manifests are mirrored at `root`); nil for a local one.
    public let remote: ObjectRepository?

    init(root: String, config: RepositoryConfig, keys: RepositoryKeys?, store: (any ChunkStore)? = nil, remote: ObjectRepository? = nil) {
        self.root = root
        self.config = config
        self.keys = keys
        self.remote = remote
        self.dictionaries = DictionaryShelf(root: root + "/dictionaries", keys: keys)
        self.codec = ChunkCodec(compression: config.compression, frameSize: config.frameSize, keys: keys, dictionaries: dictionaries)
        self.store = store ?? LocalChunkStore(root: root + "/chunks")
    }

    /// What the user calls this repository: its folder, or its s3:// address.
    public var name: String { remote?.description ?? root }

    /// The options with which a lifeboat helper process (a mount, the finaliser) opens this same
    /// repository: `--repo FOLDER`, or the bucket with its endpoint and this host's cache folder.
    public var commandLineArguments: [String] {
        guard let remote else { return ["--repo", root] }
        return ["--repo", remote.description, "--cache-dir", remote.cacheRoot] + remote.client.settings.commandLineArguments
            + (remote.cacheSize.map { ["--s3-cache-size", "\($0)"] } ?? [])
    }

    /// Refuses work that changes the repository when it is an off-site copy in a bucket.
    func requireLocal(_ what: String) throws {
        if let remote {
            throw LifeboatError(.unsupported, "\(remote.description) is an off-site copy that lifeboat only reads: \(what) works on a local repository, whose points 'lifeboat sync --to \(remote.description)' copies there")
        }
    }

    /// Creates an empty repository at `root` (the folder may exist if empty).
    /// - Parameters:
    ///   - password: when given, the repository is encrypted with a random master key wrapped by it.
    ///   - chunkSize: fixed chunk size in bytes, a power of two between 4 KiB and 16 MiB.
    /// - Throws: `.alreadyExists` when a repository or other files are there.
    public static func create(at root: String, password: String? = nil, chunkSize: Int = defaultChunkSize,
                              frameSize: Int? = nil, compressionLevel: Int = defaultCompressionLevel,
                              remote: ObjectRepository? = nil, sealManifests: Bool = true) throws -> Repository {
        try checkChunkSize(chunkSize, from: 4096)
        let frameSize = frameSize ?? min(chunkSize, defaultFrameSize)
        guard frameSize >= 4096, frameSize <= chunkSize, frameSize & (frameSize - 1) == 0 else {
            throw LifeboatError(.invalidArgument, "invalid frame size \(frameSize): use a power of two from 4096 up to the chunk size")
        }
        if let remote {
            if try remote.configBytes() != nil {
                throw LifeboatError(.alreadyExists, "a repository already exists at \(remote.description)")
            }
        } else if FileSystem.exists(root + "/config.json") {
            throw LifeboatError(.alreadyExists, "a repository already exists at \(root)")
        } else if FileSystem.exists(root) {
            guard FileSystem.isDirectory(root) else {
                throw LifeboatError(.invalidArgument, "\(root) exists and is not a directory: choose another --repo")
            }
            let names = try FileSystem.list(root)
            guard names.isEmpty else {
                throw LifeboatError(.alreadyExists, "\(root) is not empty: choose an empty or new folder for the repository")
            }
        } else {
            try FileSystem.makeDirectories(root)
        }
        var master: [UInt8]? = nil
        var wrapping: KeyWrapping? = nil
        if let password {
            guard !password.isEmpty else { throw LifeboatError(.invalidArgument, "the password is empty: give a non-empty password") }
            let key = secureRandomBytes(64)
            master = key
            wrapping = try KeyWrapping.create(master: key, password: password, sealedManifests: sealManifests)
        }
        var compression = RepositoryConfig.Compression(level: compressionLevel)
        if compressionLevel == 3 {
            // Measured on disk images (docs/FORMAT.md): a minimum match of 4 with these tables
            // stores ~1% less than plain level 3 at the same speed.
            (compression.hashLog, compression.chainLog, compression.minMatch) = (17, 16, 4)
        } else if compressionLevel == 1 {
            // 64 KiB frames of the bench image: 2.4% smaller than plain level 1 at its speed.
            (compression.hashLog, compression.minMatch) = (16, 5)
        }
        let config = RepositoryConfig(format: password != nil && sealManifests ? format : chunkFormat, id: UUID().uuidString.lowercased(), chunkSize: chunkSize, frameSize: frameSize,
                                      compression: compression, encryption: wrapping)
        if let remote {
            try remote.client.put(remote.key("config.json"), Array(try JSONEncoder.lifeboat.encode(config)))
            return try open(remote: remote) { password }
        }
        try LocalChunkStore.create(root: root + "/chunks")
        try FileSystem.makeDirectory(root + "/machines")
        // config.json last: a folder without it is not a repository yet.
        try FileSystem.writeAtomically(Array(try JSONEncoder.lifeboat.encode(config)), to: root + "/config.json")
        return Repository(root: root, config: config, keys: master.map { RepositoryKeys(master: $0, sealedManifests: sealManifests) })
    }

    /// Opens the repository at `root`.
    /// - Parameter password: asked only when the repository is encrypted.
    /// - Throws: `.notFound` when there is no repository; `.authentication` on a wrong password.
    public static func open(at root: String, password: () throws -> String? = { nil }) throws -> Repository {
        let configPath = root + "/config.json"
        if S3Location.isS3(root) {
            throw LifeboatError(.invalidArgument, "\(root) is in object storage: pass --s3-endpoint (or set $LIFEBOAT_S3_ENDPOINT) and S3 credentials")
        }
        guard FileSystem.exists(root) else {
            throw LifeboatError(.notFound, "no repository at \(root): create one with 'lifeboat init' or pass --repo")
        }
        guard FileSystem.exists(configPath) else {
            throw LifeboatError(.notFound, "\(root) is not a Lifeboat repository (no config.json): check --repo or $LIFEBOAT_REPO")
        }
        let config = try decodeConfig(try PosixFile.openForReading(configPath, what: "repository config").readAll(), name: configPath)
        return Repository(root: root, config: config, keys: try keys(config, name: root, password: password))
    }

    static func decodeConfig(_ bytes: [UInt8], name: String) throws -> RepositoryConfig {
        let config: RepositoryConfig
        do {
            config = try JSONDecoder.lifeboat.decode(RepositoryConfig.self, from: Data(bytes))
        } catch {
            throw LifeboatError(.damaged, "\(name) is not a valid repository config: \(error)")
        }
        guard (1...format).contains(config.format) else {
            throw LifeboatError(.unsupported, "repository format \(config.format) at \(name) is newer than this lifeboat understands: upgrade lifeboat")
        }
        return config
    }

    static func keys(_ config: RepositoryConfig, name: String, password: () throws -> String?) throws -> RepositoryKeys? {
        guard let wrapping = config.encryption else { return nil }
        guard let password = try password() else {
            throw LifeboatError(.authentication, "repository \(name) is encrypted: set $LIFEBOAT_PASSWORD or pass --password-file")
        }
        let (master, sealedManifests) = try wrapping.unwrap(password: password)
        return RepositoryKeys(master: master, sealedManifests: sealedManifests)
    }

    // MARK: Paths

    var machinesPath: String { root + "/machines" }
    func machinePath(_ name: String) -> String { machinesPath + "/" + name }
    func pointsPath(_ machine: String) -> String { machinePath(machine) + "/points" }
    func pointPath(_ machine: String, _ id: String) -> String { pointsPath(machine) + "/" + id }
    func indexPath(_ machine: String, _ id: String, disk: String) -> String { pointPath(machine, id) + "/" + disk + ".idx" }

    /// A file kept with a point (domain.xml, nvram), opened; nil when the point has none.
    /// - Throws: `.damaged` when it does not authenticate (encrypted repository).
    public func attachment(_ point: RecoveryPoint, _ file: String) throws -> [UInt8]? {
        guard let stored = FileSystem.contents(pointPath(point.machine, point.id) + "/" + file) else { return nil }
        return try codec.openFile(stored, name: "\(point.machine)/\(point.id)/\(file)")
    }

    // MARK: Machines

    /// Registers a machine. Disk names are made unique from the paths' file names.
    /// - Throws: `.alreadyExists` when the name is taken; `.invalidArgument` for a bad name or disk.
    public func protect(_ machine: Machine) throws {
        try requireLocal("protect")
        try Machine.validate(name: machine.name)
        guard !machine.disks.isEmpty else {
            throw LifeboatError(.invalidArgument, "machine \(machine.name) needs at least one --disk PATH")
        }
        for disk in machine.disks { try DiskSource.check(path: disk.path) }
        if let chunkSize = machine.chunkSize { try Self.checkChunkSize(chunkSize, from: config.frameSize) }
        let dir = machinePath(machine.name)
        if FileSystem.exists(dir + "/machine.json") {
            throw LifeboatError(.alreadyExists, "machine \(machine.name) is already protected: pick another name or 'lifeboat unprotect \(machine.name)' first")
        }
        try FileSystem.makeDirectory(dir)
        try FileSystem.makeDirectory(pointsPath(machine.name))
        try save(machine)
    }

    /// Chunks of the second format go only into a repository that says so: lifeboat versions that
    /// know only the first then refuse it in one sentence instead of calling chunks damaged.
    func upgradeFormat() throws {
        guard config.format < Self.chunkFormat else { return }
        var upgraded = config
        upgraded.format = Self.chunkFormat
        try FileSystem.writeAtomically(Array(try JSONEncoder.lifeboat.encode(upgraded)), to: root + "/config.json")
    }

    /// A chunk size is a power of two from `minimum` (4 KiB, or the repository's frame size) to 16 MiB.
    static func checkChunkSize(_ size: Int, from minimum: Int) throws {
        guard size >= minimum, size <= 16 << 20, size & (size - 1) == 0 else {
            throw LifeboatError(.invalidArgument, "invalid chunk size \(size): use a power of two from \(minimum) to 16777216")
        }
    }

    /// The chunk size of a machine's points: its own, else the repository's.
    public func chunkSize(of machine: Machine) -> Int { machine.chunkSize ?? config.chunkSize }

    /// Rewrites a machine's settings.
    public func save(_ machine: Machine) throws {
        try requireLocal("saving a machine")
        try writeManifest(Array(try JSONEncoder.lifeboat.encode(machine)), "machines/\(machine.name)/machine.json")
    }

    /// Disk names from paths: the file name without extension, made unique with a suffix.
    public static func diskNames(for paths: [String]) -> [MachineDisk] {
        var used = Set<String>()
        return paths.enumerated().map { index, path in
            var base = String(path.split(separator: "/").last ?? "disk")
            if let dot = base.lastIndex(of: "."), dot != base.startIndex { base = String(base[..<dot]) }
            base = String(base.map { $0.isLetter || $0.isNumber || $0 == "-" || $0 == "_" ? $0 : "_" })
            if base.isEmpty { base = "disk\(index)" }
            var name = base
            var n = 1
            while used.contains(name) { name = "\(base)-\(n)"; n += 1 }
            used.insert(name)
            return MachineDisk(name: name, path: path)
        }
    }

    public func machine(_ name: String) throws -> Machine {
        try Machine.validate(name: name)
        let path = machinePath(name) + "/machine.json"
        guard FileSystem.exists(path) else {
            throw LifeboatError(.notFound, "no machine named \(name) in \(root): see 'lifeboat machines'")
        }
        return try decodeManifest(Machine.self, "machines/\(name)/machine.json")
    }

    public func machines() throws -> [Machine] {
        try FileSystem.list(machinesPath).filter { !$0.hasPrefix(".") }.sorted()
            .filter { FileSystem.exists(machinePath($0) + "/machine.json") }
            .map { try machine($0) }
    }

    /// Forgets a machine. Refuses while recovery points exist unless `purge` (then they go too;
    /// their chunks stay until `gc`).
    public func unprotect(_ name: String, purge: Bool) throws {
        try requireLocal("unprotect")
        _ = try machine(name)
        let points = try self.points(name)
        if !points.isEmpty && !purge {
            throw LifeboatError(.invalidState, "machine \(name) has \(points.count) recovery point(s): pass --purge to delete them too")
        }
        guard let lock = try FileLock(path: machinePath(name) + "/backup.lock", mode: .exclusive, wait: false) else {
            throw LifeboatError(.busy, "machine \(name) is being backed up: wait for the backup to finish")
        }
        let trash = machinesPath + "/" + FileSystem.temporaryName()
        try FileSystem.rename(machinePath(name), trash)
        try FileSystem.syncDirectory(machinesPath)
        withExtendedLifetime(lock) {}
        FileSystem.removeTree(trash)
    }

    // MARK: Points

    /// The machine's recovery points, oldest first.
    public func points(_ machine: String) throws -> [RecoveryPoint] {
        _ = try self.machine(machine)
        let dir = pointsPath(machine)
        var points: [RecoveryPoint] = []
        for name in try FileSystem.list(dir) {
            if name.hasPrefix(".") {
                if FileSystem.isStaleTemporary(name) { FileSystem.removeTree(dir + "/" + name) }
                continue
            }
            points.append(try decodeManifest(RecoveryPoint.self, "machines/\(machine)/points/\(name)/point.json"))
        }
        return points.sorted { ($0.time, $0.id) < ($1.time, $1.id) }
    }

    /// Resolves `latest`, an id, or nil (latest).
    /// - Throws: `.notFound` naming the machine when it has no points or no such point.
    public func point(_ machine: String, _ id: String?) throws -> RecoveryPoint {
        let points = try self.points(machine)
        guard let last = points.last else {
            throw LifeboatError(.notFound, "machine \(machine) has no recovery points yet: take one with 'lifeboat backup \(machine)'")
        }
        guard let id, id != "latest" else { return last }
        guard let point = points.first(where: { $0.id == id }) else {
            throw LifeboatError(.notFound, "machine \(machine) has no recovery point \(id): see 'lifeboat points \(machine)'")
        }
        return point
    }

    public func index(_ point: RecoveryPoint, disk: String) throws -> DiskIndex {
        let path = indexPath(point.machine, point.id, disk: disk)
        do {
            return try DiskIndex(decoding: try readManifest(indexName(point.machine, point.id, disk: disk)), path: path)
        } catch let error as LifeboatError where error.code == .damaged {
            throw error
        } catch {
            throw LifeboatError(.damaged, "index \(path) cannot be read (\((error as? Errno)?.lifeboatText ?? "\(error)")): the point is damaged")
        }
    }

    /// Reads one chunk's plaintext into `buffer`; returns its length.
    /// - Parameters:
    ///   - deep: check every frame's plaintext digest also where AES-GCM authenticated it (verify).
    ///   - referenced: told of every frame the chunk's frames refer to (verify).
    /// - Throws: `.damaged` naming the chunk when it is missing or does not match its id.
    public func readChunk(_ id: ChunkID, into buffer: UnsafeMutableRawBufferPointer, deep: Bool = false,
                          referenced: (FrameReference) -> Void = { _ in }) throws -> Int {
        let stored = try store.read(id)
        return try withoutActuallyEscaping(referenced) { referenced in
            try stored.withUnsafeBytes {
                try codec.decode($0, id: id, into: buffer, deep: deep) { reference in
                    referenced(reference)
                    return try self.referencedFrame(reference, deep: deep)
                }
            }
        }
    }

    /// The plaintext of a frame that another frame was compressed against (read from the store;
    /// such a frame refers to none itself).
    func referencedFrame(_ reference: FrameReference, deep: Bool = false) throws -> [UInt8] {
        try [UInt8](filling: config.frameSize) {
            try readFrame(reference.frame, of: reference.chunk, layout: nil, into: $0, deep: deep, references: nil).length
        }
    }

    /// The reader of referenced frames that decoding a stored chunk needs.
    var references: @Sendable (FrameReference) throws -> [UInt8] { { try self.referencedFrame($0) } }

    /// Reads frame `k` of a chunk into `buffer` (at least the frame size); returns the chunk's
    /// layout (pass it back next time to skip reading the header) and the frame's length.
    /// One open of the chunk file; a 4 KiB read of a disk needs one such frame, never the whole chunk.
    /// A layout that no longer describes the file (`compact` replaced it) is read again.
    /// - Parameters:
    ///   - deep: check the plaintext digest also where AES-GCM authenticated it (verify).
    ///   - references: reads the frames this frame may refer to (nil: it may not).
    /// - Throws: `.damaged` naming the chunk when it is missing or does not match its id.
    public func readFrame(_ k: Int, of id: ChunkID, layout known: ChunkLayout?, into buffer: UnsafeMutableRawBufferPointer,
                          deep: Bool = false, references: ReferenceReader?) throws -> (layout: ChunkLayout, length: Int) {
        // A store that fetches parts (a bucket) reads just the frame where the layout is known;
        // its plaintext digest is checked whatever the mode (a layout that does not fit the
        // bytes the bucket has must not decode into wrong bytes: a GET costs far more than the hash).
        if let known, k < known.frameCount,
           let stored = try store.readPart(id, known.storedRange(ofFrame: k), storedSize: known.storedSize),
           let length = try? stored.withUnsafeBytes({
               try codec.decodeFrame(k, of: known, stored: $0, into: buffer, deep: true, references: references)
           }) {
            return (known, length)
        }
        do {
            return try readFrameFromFile(k, of: id, layout: known, into: buffer, deep: deep, references: references)
        } catch let error as LifeboatError where error.code == .damaged && store.forget(id) {
            // A copy a cache kept did not decode (left wrong by a crash): once more from the source.
            return try readFrameFromFile(k, of: id, layout: nil, into: buffer, deep: deep, references: references)
        }
    }

    private func readFrameFromFile(_ k: Int, of id: ChunkID, layout known: ChunkLayout?, into buffer: UnsafeMutableRawBufferPointer,
                                   deep: Bool, references: ReferenceReader?) throws -> (layout: ChunkLayout, length: Int) {
        let file = try openForParts(id)
        if var known, let st = try? file.stat(), Int(st.st_size) == known.storedSize {
            if known.inode == UInt64(st.st_ino) {
                return (known, try readFrame(k, of: known, from: file, into: buffer, deep: deep, references: references))
            }
            // A layout from DISK.layouts (no inode) matches the file's size but may still be of
            // a file `compact` replaced: when its frame does not decode, the header is read.
            if known.inode == 0 {
                known.inode = UInt64(st.st_ino)
                if let length = try? readFrame(k, of: known, from: file, into: buffer, deep: deep, references: references) {
                    return (known, length)
                }
            }
        }
        let layout = try chunkLayout(id, file)
        return (layout, try readFrame(k, of: layout, from: file, into: buffer, deep: deep, references: references))
    }

    private func readFrame(_ k: Int, of layout: ChunkLayout, from file: PosixFile, into buffer: UnsafeMutableRawBufferPointer,
                           deep: Bool, references: ReferenceReader?) throws -> Int {
        guard k < layout.frameCount else { throw LifeboatError(.damaged, "chunk \(layout.id.hex) is damaged: it has no frame \(k)") }
        let range = layout.storedRange(ofFrame: k)
        let stored: [UInt8]
        do { stored = try [UInt8](filling: range.count) { try file.read(into: $0, at: range.lowerBound) } } catch {
            throw LifeboatError.io(error, "cannot read chunk", file.path)
        }
        guard stored.count == range.count else {
            throw LifeboatError(.damaged, "chunk \(layout.id.hex) is damaged: shorter than its frame table says")
        }
        return try stored.withUnsafeBytes {
            try codec.decodeFrame(k, of: layout, stored: $0, into: buffer, deep: deep, references: references)
        }
    }

    /// The layout of a stored chunk (its header and frame table, checked).
    func chunkLayout(_ id: ChunkID) throws -> ChunkLayout { try chunkLayout(id, try openForParts(id)) }

    /// Opens a chunk to read its header or one frame. The kernel is told not to read ahead: its
    /// guess doubled the bytes a random read of a cold mount took from the disk (docs/MOUNT.md).
    /// Whole-chunk reads keep read-ahead (cold sequential reads of a mount were about 10% slower without it).
    private func openForParts(_ id: ChunkID) throws -> PosixFile {
        let file = try store.open(id)
        file.advise(sequential: false)
        return file
    }

    /// The layouts of many chunks, read with several reads in flight (chunks that cannot be read
    /// are left out: reading them later says why). What a mount reads when a disk is opened, so
    /// that a random read of a cold disk costs one read of the frame, not a header read first.
    public func chunkLayouts(_ ids: [ChunkID]) -> [ChunkID: ChunkLayout] {
        chunkTables(ids).compactMapValues { try? layout(of: $0) }
    }

    /// Looks up the files of many chunks, several lookups in flight, so that their directory
    /// entries and inodes are in the kernel's caches when reads open them: on a cold host a
    /// chunk's first open otherwise reads its directory block and inode from the disk first
    /// (about a tenth of a cold random read's time through a mount, docs/MOUNT.md). What a mount
    /// does after taking the layouts of an opened disk from its DISK.layouts.
    public func lookUpChunkFiles(_ ids: [ChunkID]) {
        let work = ParallelWork(count: ids.count, threads: Self.directReadWorkers)
        try? work.run { work in
            while let i = work.take() { _ = self.store.contains(ids[i]) }
        }
    }

    /// Gets the chunks a sequential reader will want next from a store that does that better
    /// together (a bucket: one range GET for neighbours in a pack); nothing for a local one.
    public func fetchAhead(_ ids: [ChunkID]) { store.fetchAhead(ids) }

    /// The headers and frame tables of many chunks, as their files hold them, read with several
    /// reads in flight (chunks that cannot be read are left out).
    func chunkTables(_ ids: [ChunkID]) -> [ChunkID: ChunkTable] {
        let tables = Locked<[ChunkID: ChunkTable]>([:])
        let work = ParallelWork(count: ids.count, threads: Self.directReadWorkers)
        try? work.run { work in
            while let i = work.take() {
                if let table = try? self.chunkTable(ids[i], self.openForParts(ids[i])) { tables.withLock { $0[ids[i]] = table } }
            }
        }
        return tables.withLock { $0 }
    }

    /// Reads and checks a chunk's header and frame table from its open file.
    private func chunkLayout(_ id: ChunkID, _ file: PosixFile) throws -> ChunkLayout {
        try layout(of: try chunkTable(id, file))
    }

    /// The layout a chunk table describes, checked against its id.
    func layout(of table: ChunkTable) throws -> ChunkLayout {
        var layout = try table.bytes.withUnsafeBytes { try codec.layout($0, id: table.id, storedSize: table.storedSize) }
        layout.inode = table.inode
        return layout
    }

    /// Reads a chunk's header and frame table from its open file (not checked yet).
    private func chunkTable(_ id: ChunkID, _ file: PosixFile) throws -> ChunkTable {
        let st: Glibc.stat
        do { st = try file.stat() } catch { throw LifeboatError.io(error, "cannot read chunk", file.path) }
        let size = Int(st.st_size)
        func readHead(_ count: Int) throws -> [UInt8] {
            var head = [UInt8](repeating: 0, count: min(size, count))
            do { _ = try head.withUnsafeMutableBytes { try file.read(into: $0, at: 0) } } catch {
                throw LifeboatError.io(error, "cannot read chunk", file.path)
            }
            return head
        }
        var head = try readHead(4096)
        if head.count >= ChunkCodec.headerSize {  // a table longer than 4 KiB (small frames): read all of it
            let frames = Int(UInt32(littleEndian: head.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: 12, as: UInt32.self) }))
            let tableSize = ChunkCodec.headerSize + frames * ChunkCodec.tableEntrySize
            if tableSize > head.count && tableSize <= size { head = try readHead(tableSize) }
            if tableSize < head.count { head.removeLast(head.count - tableSize) }
        }
        return ChunkTable(id: id, storedSize: size, bytes: head, inode: UInt64(st.st_ino))
    }

    /// Reads a whole chunk with one read and decodes the frames `output(k, length)` gives a
    /// buffer for (at least `length` bytes; nil: not wanted) into those buffers. Returns the
    /// chunk's layout; the frames it decoded are the ones it was given buffers for.
    /// - Parameter references: reads the frames the chunk's frames refer to (a cache's reader, say).
    public func readFrames(_ id: ChunkID, references: ReferenceReader? = nil,
                           into output: (_ frame: Int, _ length: Int) -> UnsafeMutableRawBufferPointer?) throws -> ChunkLayout {
        let file = try store.open(id)
        let stored: [UInt8]
        do { stored = try file.readAll() } catch { throw LifeboatError.io(error, "cannot read chunk", file.path) }
        let inode = (try? file.stat()).map { UInt64($0.st_ino) } ?? 0
        return try stored.withUnsafeBytes { raw in
            var layout = try codec.layout(raw, id: id, storedSize: raw.count)
            layout.inode = inode
            for k in 0..<layout.frameCount {
                guard let buffer = output(k, layout.rawLength(ofFrame: k)) else { continue }
                _ = try codec.decodeFrame(k, of: layout, stored: UnsafeRawBufferPointer(rebasing: raw[layout.storedRange(ofFrame: k)]),
                                          into: buffer, references: references ?? self.references)
            }
            return layout
        }
    }

    // MARK: Manifests

    /// True when this repository keeps its manifests (machine.json, point.json, DISK.idx,
    /// DISK.layouts, plans, prune notes) sealed with AES-256-GCM under the repository key, each
    /// bound to its path from the root, so that one moved under another name does not open:
    /// encrypted repositories made by format 3 on, whose wrapped key says so (a `format` lowered
    /// in config.json does not turn it off). Older ones are read as before (plaintext).
    /// A bucket's mirror holds the manifests it opened.
    public var sealsManifests: Bool { keys?.sealedManifests == true && remote == nil }

    /// True for the files of a point folder that are manifests (sealed as such); the others
    /// (domain.xml, nvram, tpm-state) are attachments, sealed on their own (`attachment`).
    static func isPointManifest(_ file: String) -> Bool { file == "point.json" || file.hasSuffix(".idx") || file.hasSuffix(".layouts") }

    func indexName(_ machine: String, _ id: String, disk: String) -> String { "machines/\(machine)/points/\(id)/\(disk).idx" }

    /// A manifest's bytes as they are stored at `name` (its path from the root).
    public func sealManifest(_ bytes: [UInt8], name: String) throws -> [UInt8] {
        sealsManifests ? try codec.sealFile(bytes, name: "manifest:" + name) : bytes
    }

    /// Opens the stored bytes of the manifest at `name`.
    /// - Throws: `.damaged` naming it when it does not authenticate (altered, or moved from another name).
    public func openManifest(_ stored: [UInt8], name: String) throws -> [UInt8] {
        guard sealsManifests else { return stored }
        do { return try codec.openFile(stored, name: "manifest:" + name) } catch {
            throw LifeboatError(.damaged, "\(root)/\(name) is damaged or was altered (it does not authenticate under the repository key, or belongs under another name)")
        }
    }

    /// The manifest at `name` (its path from the root), opened.
    /// - Throws: `.notFound` when it is missing, `.damaged` when it does not authenticate.
    public func readManifest(_ name: String) throws -> [UInt8] {
        try openManifest(try PosixFile.openForReading(root + "/" + name, what: "file").readAll(), name: name)
    }

    /// Writes the manifest `name` (its path from the root) at `path` (its final place, or a
    /// staging folder's file that is renamed there), sealed when the repository seals manifests.
    public func writeManifest(_ bytes: [UInt8], _ name: String, at path: String? = nil, syncDirectory: Bool = true) throws {
        try FileSystem.writeAtomically(try sealManifest(bytes, name: name), to: path ?? root + "/" + name, syncDirectory: syncDirectory)
    }

    /// The JSON manifest at `name`, opened and decoded.
    func decodeManifest<T: Decodable>(_ type: T.Type, _ name: String) throws -> T {
        let bytes = try readManifest(name)
        do {
            return try JSONDecoder.lifeboat.decode(type, from: Data(bytes))
        } catch {
            throw LifeboatError(.damaged, "\(root)/\(name) is damaged: \(error)")
        }
    }

    /// Held for the length of work that must not overlap a `gc` (backups take it shared).
    func repositoryLock(_ mode: FileLock.Mode, wait: Bool) throws -> FileLock? {
        try FileLock(path: root + "/lock", mode: mode, wait: wait)
    }
}

/// Checks on a disk path before reading it.
enum DiskSource {
    static func check(path: String) throws { _ = try FileSystem.checkDisk(path) }
}
