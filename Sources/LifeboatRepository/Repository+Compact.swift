import Foundation
import LifeboatBase
#if canImport(Glibc)
import Glibc
#endif

/// What `compact` did.
public struct CompactResult: Sendable, Codable {
    /// Chunks the recovery points use.
    public var chunks: Int
    /// Of those, rewritten by this run.
    public var compacted: Int
    /// Of those, compacted by an earlier run (left as they are).
    public var alreadyCompacted: Int
    /// Stored bytes of the rewritten chunks before and after.
    public var bytesBefore: Int
    public var bytesAfter: Int
    /// Frames now stored against other frames' plaintext (copies of data found elsewhere).
    public var referenceFrames: Int
    /// The dictionary the rewritten frames use, and whether this run trained it.
    public var dictionary: UInt32?
    public var trainedDictionary: Bool
    /// Chunks that could not be read (verify names them and the points using them).
    public var damaged: [String]
    /// True when `shouldStop` ended the run early (what it did is kept; the next run goes on).
    public var stopped = false
    public var seconds: Double
}

/// How hard `compact` works.
public struct CompactOptions: Sendable {
    /// zstd level (1-22) on the 64 KiB row: 15 measured best for the time (docs/FORMAT.md).
    public var level: Int
    /// Bytes of the dictionary trained on the repository's data at the first run.
    public var dictionarySize: Int
    /// Run at the lowest CPU priority (the replication service compacts beside running points).
    public var background: Bool
    /// Asked between chunks: true ends the run after the chunks under way are put in place.
    public var shouldStop: @Sendable () -> Bool

    public static let defaultLevel = 15
    /// The levels zstd has.
    public static let levels = 1...22

    public init(level: Int = defaultLevel, dictionarySize: Int = 1 << 20, background: Bool = false,
                shouldStop: @escaping @Sendable () -> Bool = { false }) {
        self.level = level
        self.dictionarySize = dictionarySize
        self.background = background
        self.shouldStop = shouldStop
    }
}

/// A frame that refers to another frame: `gc` keeps the referenced chunk while the referring one lives.
struct ReferenceRecord: Hashable, Sendable {
    var source: ChunkID
    var target: FrameReference
}

extension Repository {
    var compactPath: String { root + "/compact" }

    /// Rewrites every stored chunk the recovery points use, once, smaller: each frame is
    /// compressed again at a high zstd level with a dictionary trained on this repository, or,
    /// where 4 KiB blocks of it are stored in another frame (a file that is also elsewhere on
    /// the disk, not at a 64 KiB boundary), against that frame's plaintext. Frame boundaries,
    /// digests and chunk ids stay: indexes, random reads and dedup are unchanged.
    ///
    /// Runs beside backups, mounts and drills (it holds the repository lock shared; `gc` waits
    /// for it); one compact at a time. Each rewritten chunk replaces the old file in one rename
    /// after it is durable, and the references of a batch are recorded (for `gc`) before its
    /// chunks go in place: a killed compact leaves every chunk readable, old or new.
    public func compact(_ options: CompactOptions = CompactOptions(), progress: ProgressMeter = ProgressMeter()) throws -> CompactResult {
        try requireLocal("compact")
        let started = Date()
        guard CompactOptions.levels.contains(options.level) else {
            throw LifeboatError(.invalidArgument, "invalid compact level \(options.level): use a zstd level from 1 to 22")
        }
        let compactLock = try FileLock.exclusive(root + "/compact.lock") {
            "a compact of this repository is already running\($0): wait for it to finish"
        }
        let repoLock = try repositoryLock(.shared, wait: true)
        try upgradeFormat()
        if !FileSystem.exists(compactPath) { try FileSystem.makeDirectory(compactPath) }

        var result = CompactResult(chunks: 0, compacted: 0, alreadyCompacted: 0, bytesBefore: 0, bytesAfter: 0, referenceFrames: 0,
                                   dictionary: nil, trainedDictionary: false, damaged: [], seconds: 0)
        let live = try liveChunks()
        result.chunks = live.count
        var work: [ChunkID] = []
        var rawLengths: [ChunkID: Int] = [:]
        for id in live.sorted(by: { $0.hex < $1.hex }) {
            do {
                let layout = try chunkLayout(id)
                if layout.compacted {
                    result.alreadyCompacted += 1
                } else {
                    work.append(id)
                    rawLengths[id] = layout.rawLength
                }
            } catch let error as LifeboatError {
                result.damaged.append(error.message)
            }
        }
        Trace.mark("compact: \(work.count) of \(live.count) chunks to compact")
        let catalogue = try loadReferenceCatalogue()
        let table = Locked(try BlockTable.load(self) ?? BlockTable())
        let pinned = Set(catalogue.map(\.target)).union(table.withLock { Set($0.targets) })

        var dictionaryNumber = dictionaries.numbers().last
        if dictionaryNumber == nil, !work.isEmpty, let trained = trainDictionary(on: work, capacity: options.dictionarySize) {
            dictionaryNumber = try dictionaries.add(trained)
            result.trainedDictionary = true
            Trace.mark("compact: dictionary \(dictionaryNumber!) trained (\(trained.count) bytes)")
        }
        result.dictionary = dictionaryNumber
        let dictionary = dictionaryNumber
        let frameSize = config.frameSize
        let parameters = ZstdParameters.pinned(level: Int32(options.level), sourceSize: frameSize)
        let compressor = Zstd(parameters, dictionary: try dictionary.map { try dictionaries.dictionary($0) })
        var prefixParameters = parameters
        prefixParameters.windowLog = max(parameters.windowLog, 19)   // the prefix (two frames) and the frame
        let prefixCompressor = Zstd(prefixParameters)

        progress.start(total: rawLengths.values.reduce(0, +))
        let lengths = rawLengths
        let codec = self.codec, store = self.store
        let tally = Locked(result)
        // Batches of about 64 MiB: their chunks are staged, made durable, then put in place together.
        var batches: [[ChunkID]] = [[]]
        var batchBytes = 0
        for id in work {
            if batchBytes >= 64 << 20 { batches.append([]); batchBytes = 0 }
            batches[batches.count - 1].append(id)
            batchBytes += rawLengths[id] ?? 0
        }
        var rewritten = Set<ChunkID>()
        for batch in batches where !batch.isEmpty {
            if options.shouldStop() {
                tally.withLock { $0.stopped = true }
                break
            }
            let staged = Locked<[(id: ChunkID, path: String, records: [ReferenceRecord])]>([])
            let work = ParallelWork(count: batch.count)
            defer { staged.withLock { $0.forEach { unlink($0.path) } } }   // none left once put in place
            try work.run(background: options.background) { work in
                let plain = UnsafeMutableRawBufferPointer.allocate(byteCount: 16 << 20, alignment: 64)
                let trial = UnsafeMutableRawBufferPointer.allocate(byteCount: codec.storedFrameBound, alignment: 64)
                var scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: codec.scratchSize(chunkSize: 1 << 20), alignment: 64)
                defer { plain.deallocate(); trial.deallocate(); scratch.deallocate() }
                while !options.shouldStop(), let i = work.take() {
                    let id = batch[i]
                    defer { progress.add(lengths[id] ?? 0) }
                    let stored: [UInt8]
                    let layout: ChunkLayout
                    do {
                        stored = try store.read(id)
                        layout = try stored.withUnsafeBytes { try codec.layout($0, id: id, storedSize: $0.count) }
                        guard layout.rawLength <= plain.count else { throw LifeboatError(.damaged, "chunk \(id.hex) is damaged: longer than a chunk") }
                        _ = try stored.withUnsafeBytes { try codec.decode($0, id: id, into: plain, references: self.references) }
                    } catch let error as LifeboatError {
                        tally.withLock { $0.damaged.append(error.message) }
                        continue
                    }
                    if scratch.count < codec.scratchSize(chunkSize: layout.rawLength) {
                        scratch.deallocate()
                        scratch = .allocate(byteCount: codec.scratchSize(chunkSize: layout.rawLength), alignment: 64)
                    }
                    var records: [ReferenceRecord] = []
                    var referringFrames = 0
                    let data = UnsafeRawBufferPointer(rebasing: plain[0..<layout.rawLength])
                    let encoded = try codec.encodeCompacted(rawLength: layout.rawLength, id: id, digests: layout.frames.map(\.digest),
                                                            scratch: scratch) { k, out in
                        let frame = codec.frame(k, of: data)
                        let blocks = BlockTable.hashes(of: frame)
                        var length = try codec.writeBody(frame, into: out, compressor: compressor, dictionary: dictionary, filter: true)
                        let me = FrameReference(chunk: id, frame: k)
                        let candidates = pinned.contains(me) ? [] : table.withLock { $0.candidates(for: blocks) }
                        var referenced = false
                        if !candidates.isEmpty, let prefix = try? candidates.flatMap({ try self.referencedFrame($0) }) {
                            let n = try prefix.withUnsafeBytes {
                                try codec.writeBody(frame, into: trial, compressor: prefixCompressor, references: candidates, prefix: $0)
                            }
                            if n < length - length / 20 {   // worth a second read when this frame is read
                                out.copyMemory(from: UnsafeRawBufferPointer(rebasing: trial[0..<n]))
                                length = n
                                referenced = true
                                referringFrames += 1
                                records += candidates.map { ReferenceRecord(source: id, target: $0) }
                            }
                        }
                        if !referenced { table.withLock { $0.insert(blocks, target: me) } }
                        return length
                    }
                    let path = try store.stage(id, encoded)
                    staged.withLock { $0.append((id, path, records)) }
                    tally.withLock {
                        $0.compacted += 1
                        $0.bytesBefore += stored.count
                        $0.bytesAfter += encoded.count
                        $0.referenceFrames += referringFrames
                    }
                }
            }
            let ready = staged.withLock { $0 }
            let records = ready.flatMap(\.records)
            if !records.isEmpty { try appendReferenceCatalogue(records) }   // durable before any referring chunk is in place
            try store.sync()
            for chunk in ready { try store.replace(chunk.id, with: chunk.path) }
            rewritten.formUnion(ready.map(\.id))
            staged.withLock { $0.removeAll() }
        }
        if options.shouldStop() { tally.withLock { $0.stopped = true } }
        try store.sync()
        try table.withLock { try $0.save(self) }
        let runRecords = try loadReferenceCatalogue()
        if runRecords.count > catalogue.count { try rewriteReferenceCatalogue(runRecords) }   // one file, not one per batch
        refreshLayouts(rewritten: rewritten)
        Trace.mark("compact: done")
        withExtendedLifetime((compactLock, repoLock)) {}
        result = tally.withLock { $0 }
        result.seconds = Date().timeIntervalSince(started)
        return result
    }

    /// A dictionary trained on frames spread over `chunks` (at most 64 MiB of them), or nil when
    /// they are too few or too alike to train on.
    private func trainDictionary(on chunks: [ChunkID], capacity: Int) -> [UInt8]? {
        let frameSize = config.frameSize
        let framesWanted = max(1, (64 << 20) / frameSize)
        let framesPerChunk = max(1, config.chunkSize / frameSize)
        let step = max(1, chunks.count * framesPerChunk / framesWanted)
        var samples: [[UInt8]] = []
        var buffer = [UInt8](repeating: 0, count: 16 << 20)
        var i = 0
        while i < chunks.count && samples.count < framesWanted {
            let id = chunks[i]
            i += max(1, step / framesPerChunk)
            guard let n = try? buffer.withUnsafeMutableBytes({ try readChunk(id, into: $0) }) else { continue }
            for start in stride(from: 0, to: n, by: frameSize) {
                let frame = Array(buffer[start..<min(n, start + frameSize)])
                if !frame.withUnsafeBytes({ $0.isAllZero }) { samples.append(frame) }
            }
        }
        let sampleBytes = samples.reduce(0) { $0 + $1.count }
        guard sampleBytes >= 256 << 10 else { return nil }
        return try? ZstdDictionary.train(samples: samples, capacity: min(capacity, max(4096, sampleBytes / 32)))
    }

    /// Every chunk id some recovery point's index names.
    func liveChunks() throws -> Set<ChunkID> {
        var live = Set<ChunkID>()
        for machine in try machines() {
            for point in try points(machine.name) {
                for disk in point.disks {
                    for id in try index(point, disk: disk.name).ids where !id.isZero { live.insert(id) }
                }
            }
        }
        return live
    }

    /// `chunks` and every chunk their compacted frames refer to, directly or through others
    /// (`catalogue`: `loadReferenceCatalogue`): what gc keeps, what sync sends.
    func closingOverReferences(_ chunks: Set<ChunkID>, catalogue: [ReferenceRecord]) -> Set<ChunkID> {
        closingOverReferences(chunks, references: Self.referenceMap(catalogue))
    }

    /// Referring chunk -> the chunks its frames refer to.
    static func referenceMap(_ catalogue: [ReferenceRecord]) -> [ChunkID: [ChunkID]] {
        var bySource: [ChunkID: [ChunkID]] = [:]
        for record in catalogue { bySource[record.source, default: []].append(record.target.chunk) }
        return bySource
    }

    func closingOverReferences(_ chunks: Set<ChunkID>, references bySource: [ChunkID: [ChunkID]]) -> Set<ChunkID> {
        var closed = chunks
        var pending = Array(chunks)
        while let id = pending.popLast() {
            for target in bySource[id] ?? [] where closed.insert(target).inserted { pending.append(target) }
        }
        return closed
    }

    // MARK: The reference catalogue

    private static let catalogueMagic = Array("LBREFS1\0".utf8)
    private static let recordSize = 32 + 32 + 2

    /// Every frame reference compacted chunks hold, from `compact/references-*` (one file per
    /// batch that made any; `gc` merges them).
    /// - Throws: `.damaged` when a file cannot be read: gc must then not delete anything.
    func loadReferenceCatalogue() throws -> [ReferenceRecord] {
        var records: [ReferenceRecord] = []
        for name in try catalogueFiles() {
            let path = compactPath + "/" + name
            let bytes = try SealedFile.read(path, magic: Self.catalogueMagic, purpose: "references", keys: keys)
            guard bytes.count % Self.recordSize == 0 else { throw LifeboatError(.damaged, "\(path) is damaged (wrong length)") }
            bytes.withUnsafeBytes { raw in
                for offset in stride(from: 0, to: raw.count, by: Self.recordSize) {
                    let source = ChunkID(bytes: UnsafeRawBufferPointer(rebasing: raw[offset..<(offset + 32)]))
                    let target = ChunkID(bytes: UnsafeRawBufferPointer(rebasing: raw[(offset + 32)..<(offset + 64)]))
                    let frame = Int(UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: offset + 64, as: UInt16.self)))
                    records.append(ReferenceRecord(source: source, target: FrameReference(chunk: target, frame: frame)))
                }
            }
        }
        return records
    }

    private func catalogueFiles() throws -> [String] {
        guard FileSystem.exists(compactPath) else { return [] }
        return try FileSystem.list(compactPath).filter { $0.hasPrefix("references-") }.sorted()
    }

    private func encodeCatalogue(_ records: [ReferenceRecord]) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: records.count * Self.recordSize)
        bytes.withUnsafeMutableBytes { raw in
            for (i, record) in records.enumerated() {
                let offset = i * Self.recordSize
                record.source.write(to: UnsafeMutableRawBufferPointer(rebasing: raw[offset..<(offset + 32)]))
                record.target.chunk.write(to: UnsafeMutableRawBufferPointer(rebasing: raw[(offset + 32)..<(offset + 64)]))
                raw.storeBytes(of: UInt16(record.target.frame).littleEndian, toByteOffset: offset + 64, as: UInt16.self)
            }
        }
        return bytes
    }

    /// Records references durably, in a file of their own.
    func appendReferenceCatalogue(_ records: [ReferenceRecord]) throws {
        let name = "references-\(Self.pointID(for: Date(), existing: []))-\(getpid())-\(String(UInt64.random(in: 0...UInt64.max), radix: 36))"
        try SealedFile.write(encodeCatalogue(records), to: compactPath + "/" + name, magic: Self.catalogueMagic,
                             purpose: "references", keys: keys)
    }

    /// Replaces the catalogue by `records` in one file (gc, under the exclusive lock): the new
    /// file is durable before the old ones go, so a crash leaves at worst duplicates.
    func rewriteReferenceCatalogue(_ records: [ReferenceRecord]) throws {
        let old = try catalogueFiles()
        if !records.isEmpty { try appendReferenceCatalogue(records) }
        for name in old { FileSystem.remove(compactPath + "/" + name) }
        if !old.isEmpty { try FileSystem.syncDirectory(compactPath) }
    }
}

/// Where 4 KiB blocks of compacted frames are, by a 32-bit hash of their bytes: how `compact`
/// finds the frames that hold a copy of the blocks of the frame it compresses. Kept in
/// `compact/blocks` (sealed: the hashes say something of the plaintext). Only a guide: a
/// candidate's plaintext is read and compressed against, so a collision or a stale entry costs
/// compression, never correctness.
struct BlockTable: Sendable {
    static let blockSize = 4096
    /// Frames that blocks are in.
    private(set) var targets: [FrameReference] = []
    private var keys: [UInt32] = Array(repeating: 0, count: 1 << 16)
    private var values: [UInt32] = Array(repeating: 0, count: 1 << 16)
    private var count = 0
    /// Beyond this many blocks (64 GiB of distinct compacted data) no more are added.
    private static let maxEntries = 1 << 24
    private static let magic = Array("LBBLKS1\0".utf8)

    /// The hash of each 4 KiB block of a frame, 0 for an all-zero block (never looked up).
    /// 32 bits are plenty for a guide (a false match costs one trial compression) and keep the
    /// table at 8 bytes per block, in memory and in the repository.
    static func hashes(of frame: UnsafeRawBufferPointer) -> [UInt32] {
        stride(from: 0, to: frame.count - blockSize + 1, by: blockSize).map { offset in
            hash(UnsafeRawBufferPointer(rebasing: frame[offset..<(offset + blockSize)]))
        }
    }

    /// A multiply-xorshift hash over 8-byte words, four lanes wide, folded to 32 bits; 0 only for zeros.
    static func hash(_ block: UnsafeRawBufferPointer) -> UInt32 {
        let m: UInt64 = 0x9E37_79B9_7F4A_7C15
        var a: UInt64 = 0, b: UInt64 = 0, c: UInt64 = 0, d: UInt64 = 0
        var offset = 0
        while offset < block.count {
            a = (a ^ block.loadUnaligned(fromByteOffset: offset, as: UInt64.self)) &* m
            b = (b ^ block.loadUnaligned(fromByteOffset: offset + 8, as: UInt64.self)) &* m
            c = (c ^ block.loadUnaligned(fromByteOffset: offset + 16, as: UInt64.self)) &* m
            d = (d ^ block.loadUnaligned(fromByteOffset: offset + 24, as: UInt64.self)) &* m
            a ^= a >> 29; b ^= b >> 31; c ^= c >> 27; d ^= d >> 33
            offset += 32
        }
        if a | b | c | d == 0 { return 0 }
        var h = a &+ (b << 1 | b >> 63) &+ (c << 2 | c >> 62) &+ (d << 3 | d >> 61)
        h = (h ^ (h >> 32)) &* m
        let folded = UInt32(truncatingIfNeeded: h >> 32)
        return folded == 0 ? 1 : folded
    }

    private func slot(of hash: UInt32) -> Int {
        let mask = keys.count - 1
        var i = Int(truncatingIfNeeded: hash) & mask
        while keys[i] != 0 && keys[i] != hash { i = (i + 1) & mask }
        return i
    }

    /// Up to two frames holding the most of these blocks.
    func candidates(for hashes: [UInt32]) -> [FrameReference] {
        var votes: [UInt32: Int] = [:]
        for hash in hashes where hash != 0 {
            let i = slot(of: hash)
            if keys[i] == hash { votes[values[i], default: 0] += 1 }
        }
        return votes.sorted { ($0.value, $1.key) > ($1.value, $0.key) }.prefix(2).map { targets[Int($0.key)] }
            .sorted { ($0.chunk.hex, $0.frame) < ($1.chunk.hex, $1.frame) }
    }

    /// Records that these blocks are in `target` (blocks already known keep their first frame).
    mutating func insert(_ hashes: [UInt32], target: FrameReference) {
        guard count < Self.maxEntries, hashes.contains(where: { $0 != 0 }) else { return }
        let number = UInt32(targets.count)
        targets.append(target)
        for hash in hashes where hash != 0 {
            if (count + 1) * 2 > keys.count { grow() }
            let i = slot(of: hash)
            if keys[i] == 0 {
                keys[i] = hash
                values[i] = number
                count += 1
            }
        }
    }

    private mutating func grow() {
        let (oldKeys, oldValues) = (keys, values)
        keys = Array(repeating: 0, count: oldKeys.count * 2)
        values = Array(repeating: 0, count: oldKeys.count * 2)
        for (i, key) in oldKeys.enumerated() where key != 0 {
            let j = slot(of: key)
            keys[j] = key
            values[j] = oldValues[i]
        }
    }

    private static func path(_ repository: Repository) -> String { repository.compactPath + "/blocks" }

    /// The stored table, or nil when none was stored yet.
    static func load(_ repository: Repository) throws -> BlockTable? {
        let path = path(repository)
        guard FileSystem.exists(path) else { return nil }
        let bytes = try SealedFile.read(path, magic: magic, purpose: "blocks", keys: repository.keys)
        return try bytes.withUnsafeBytes { raw -> BlockTable in
            guard raw.count >= 16 else { throw LifeboatError(.damaged, "\(path) is damaged (short)") }
            let targetCount = Int(raw.loadUnaligned(fromByteOffset: 0, as: UInt64.self).littleEndian)
            let entryCount = Int(raw.loadUnaligned(fromByteOffset: 8, as: UInt64.self).littleEndian)
            guard raw.count == 16 + targetCount * 34 + entryCount * 8 else { throw LifeboatError(.damaged, "\(path) is damaged (wrong length)") }
            var table = BlockTable()
            var capacity = 1 << 16
            while capacity < entryCount * 2 { capacity *= 2 }
            table.keys = Array(repeating: 0, count: capacity)
            table.values = Array(repeating: 0, count: capacity)
            var offset = 16
            for _ in 0..<targetCount {
                let chunk = ChunkID(bytes: UnsafeRawBufferPointer(rebasing: raw[offset..<(offset + 32)]))
                let frame = Int(UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: offset + 32, as: UInt16.self)))
                table.targets.append(FrameReference(chunk: chunk, frame: frame))
                offset += 34
            }
            for _ in 0..<entryCount {
                let hash = UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: offset, as: UInt32.self))
                let value = UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: offset + 4, as: UInt32.self))
                guard Int(value) < targetCount, hash != 0 else { throw LifeboatError(.damaged, "\(path) is damaged (bad entry)") }
                let i = table.slot(of: hash)
                table.keys[i] = hash
                table.values[i] = value
                table.count += 1
                offset += 8
            }
            return table
        }
    }

    func save(_ repository: Repository) throws {
        var bytes = [UInt8](repeating: 0, count: 16 + targets.count * 34 + count * 8)
        bytes.withUnsafeMutableBytes { raw in
            raw.storeBytes(of: UInt64(targets.count).littleEndian, toByteOffset: 0, as: UInt64.self)
            raw.storeBytes(of: UInt64(count).littleEndian, toByteOffset: 8, as: UInt64.self)
            var offset = 16
            for target in targets {
                target.chunk.write(to: UnsafeMutableRawBufferPointer(rebasing: raw[offset..<(offset + 32)]))
                raw.storeBytes(of: UInt16(target.frame).littleEndian, toByteOffset: offset + 32, as: UInt16.self)
                offset += 34
            }
            for (i, key) in keys.enumerated() where key != 0 {
                raw.storeBytes(of: key.littleEndian, toByteOffset: offset, as: UInt32.self)
                raw.storeBytes(of: values[i].littleEndian, toByteOffset: offset + 4, as: UInt32.self)
                offset += 8
            }
        }
        try SealedFile.write(bytes, to: Self.path(repository), magic: Self.magic, purpose: "blocks", keys: repository.keys)
    }
}
