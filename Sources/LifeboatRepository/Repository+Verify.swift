import Foundation
import LifeboatBase
import Synchronization

/// Where a chunk is used: which point, which disk, at what offset.
public struct ChunkUsage: Sendable, Codable, Equatable {
    public var machine: String
    public var point: String
    public var disk: String
    public var offset: Int
}

/// A chunk that could not be read back as its id says, and everything that needs it.
public struct DamagedChunk: Sendable, Codable {
    public var id: String
    public var reason: String
    public var usages: [ChunkUsage]
}

public struct VerifyReport: Sendable, Codable {
    public var points: Int
    public var chunks: Int
    public var bytes: Int
    public var damagedChunks: [DamagedChunk]
    /// Points whose manifest or index could not be read, with the reason.
    public var damagedPoints: [String]
    /// Other repository files that are damaged or incomplete (compact's catalogue), with the reason.
    public var damagedFiles: [String] = []

    public var isClean: Bool { damagedChunks.isEmpty && damagedPoints.isEmpty && damagedFiles.isEmpty }
}

extension Repository {
    /// Re-reads every chunk the selected points use, checks it decrypts, decompresses and hashes
    /// to its id, and reports each damaged chunk with the points and disk offsets that use it.
    /// - Parameters:
    ///   - machine: only this machine's points; nil for all machines.
    ///   - point: only this point (needs `machine`).
    public func verify(machine: String? = nil, point: String? = nil, progress: ProgressMeter = ProgressMeter()) throws -> VerifyReport {
        var selected: [RecoveryPoint] = []
        var damagedPoints: [String] = []
        let names = try machine.map { [$0] } ?? machines().map(\.name)
        for name in names {
            if let point {
                selected.append(try self.point(name, point))
            } else {
                do {
                    selected += try points(name)
                    damagedPoints += try rolledBackPoints(name)
                } catch let error as LifeboatError where error.code == .damaged {
                    damagedPoints.append(error.message)
                }
            }
        }
        // chunk -> first usage; all usages are gathered again only for damaged chunks.
        var firstUse: [ChunkID: ChunkUsage] = [:]
        var indexes: [(RecoveryPoint, String, DiskIndex)] = []
        for point in selected {
            for disk in point.disks {
                do {
                    let index = try self.index(point, disk: disk.name)
                    indexes.append((point, disk.name, index))
                    for (i, id) in index.ids.enumerated() where !id.isZero && firstUse[id] == nil {
                        firstUse[id] = ChunkUsage(machine: point.machine, point: point.id, disk: disk.name, offset: i * index.chunkSize)
                    }
                } catch let error as LifeboatError {
                    damagedPoints.append(error.message)
                }
            }
        }
        let ids = Array(firstUse.keys)
        progress.start(total: ids.count)
        let damaged = Locked<[ChunkID: String]>([:])
        let bytes = Atomic<Int>(0)
        let work = ParallelWork(count: ids.count)
        let chunkSize = indexes.reduce(config.chunkSize) { max($0, $1.2.chunkSize) }
        var damagedFiles: [String] = []
        let catalogue: Set<ReferenceRecord>
        do { catalogue = Set(try loadReferenceCatalogue()) } catch let error as LifeboatError {
            catalogue = []
            damagedFiles.append(error.message)
        }
        let unrecorded = Locked<[ReferenceRecord]>([])
        try work.run { work in
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: chunkSize, alignment: 4096)
            defer { buffer.deallocate() }
            while let i = work.take() {
                defer { progress.add(1) }
                var references: [FrameReference] = []
                do {
                    bytes.add(try self.readChunk(ids[i], into: buffer, deep: true) { references.append($0) }, ordering: .relaxed)
                } catch let error as LifeboatError {
                    damaged.withLock { $0[ids[i]] = error.message }
                }
                let missing = references.map { ReferenceRecord(source: ids[i], target: $0) }.filter { !catalogue.contains($0) }
                if !missing.isEmpty { unrecorded.withLock { $0 += missing } }
            }
        }
        // gc keeps a referenced chunk only through the catalogue: one missing from it could go.
        for record in unrecorded.withLock({ $0 }).sorted(by: { $0.source.hex < $1.source.hex }) {
            damagedFiles.append("chunk \(record.source.hex) refers to frame \(record.target.frame) of chunk \(record.target.chunk.hex), which compact's catalogue does not record: gc could delete it: do not run gc until compact/ is restored from a copy of the repository")
        }
        let bad = damaged.withLock { $0 }
        var usages: [ChunkID: [ChunkUsage]] = [:]
        if !bad.isEmpty {
            for (point, disk, index) in indexes {
                for (i, id) in index.ids.enumerated() where bad[id] != nil {
                    usages[id, default: []].append(ChunkUsage(machine: point.machine, point: point.id, disk: disk, offset: i * index.chunkSize))
                }
            }
        }
        let damagedChunks = bad.map { DamagedChunk(id: $0.key.hex, reason: $0.value, usages: usages[$0.key] ?? []) }
            .sorted { $0.id < $1.id }
        return VerifyReport(points: selected.count, chunks: ids.count, bytes: bytes.load(ordering: .relaxed),
                            damagedChunks: damagedChunks, damagedPoints: damagedPoints + (remote?.problems ?? []), damagedFiles: damagedFiles)
    }
}
