import LifeboatBase
/// The header and frame table of one stored chunk, as its file holds them (not checked yet).
struct ChunkTable: Sendable {
    let id: ChunkID
    /// Bytes of the chunk file.
    let storedSize: Int
    /// Header and frame table (`ChunkCodec`).
    let bytes: [UInt8]
    /// The inode of the file it was read from (0: from a DISK.layouts file; not stored there).
    var inode: UInt64 = 0
}

/// repo/machines/NAME/points/ID/DISK.layouts: the header and frame table of each of the disk's
/// first distinct chunks, so that a mount opening the disk learns where every frame is with one
/// sequential read instead of one header read per chunk (docs/MOUNT.md). A hint, never trusted
/// blindly: every entry is checked against its chunk id when read and against its chunk file's
/// size before use, and a frame that does not decode with it is read again with the file's own
/// header. A point without the file (older points), or with a damaged or stale one, costs only
/// those header reads.
///
/// Layout (little-endian): `"LBLAY1\0\0"` | count (u64) | count x (chunk id (32) | stored size of
/// the chunk file (u64) | its header and frame table as the file holds them: 16 + 36 x frames bytes).
/// Entries are in the order their chunks first appear in the index.
enum DiskLayouts {
    static let magic: [UInt8] = Array("LBLAY1".utf8) + [0, 0]
    /// Distinct chunks described: what a mount's layout cache holds (64 Ki, 64 GiB of disk at 1 MiB chunks).
    static let limit = 1 << 16

    static func encode(_ tables: [ChunkTable]) -> [UInt8] {
        var bytes = magic
        bytes.reserveCapacity(16 + tables.reduce(0) { $0 + 40 + $1.bytes.count })
        bytes += withUnsafeBytes(of: UInt64(tables.count).littleEndian, Array.init)
        var id = [UInt8](repeating: 0, count: 32)
        for table in tables {
            id.withUnsafeMutableBytes { table.id.write(to: $0) }
            bytes += id
            bytes += withUnsafeBytes(of: UInt64(table.storedSize).littleEndian, Array.init)
            bytes += table.bytes
        }
        return bytes
    }

    /// The entries of a layouts file, up to the first that is cut short or malformed.
    static func decode(_ bytes: [UInt8]) -> [ChunkTable] {
        guard bytes.count >= 16, Array(bytes[0..<8]) == magic else { return [] }
        return bytes.withUnsafeBytes { raw in
            let count = Int(clamping: UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: 8, as: UInt64.self)))
            var tables: [ChunkTable] = []
            tables.reserveCapacity(min(count, limit))
            var offset = 16
            while tables.count < min(count, limit), offset + 40 + ChunkCodec.headerSize <= raw.count {
                let frames = Int(UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: offset + 40 + 12, as: UInt32.self)))
                let tableSize = ChunkCodec.headerSize + frames * ChunkCodec.tableEntrySize
                guard offset + 40 + tableSize <= raw.count else { break }
                let id = ChunkID(bytes: UnsafeRawBufferPointer(rebasing: raw[offset..<(offset + 32)]))
                let size = Int(clamping: UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: offset + 32, as: UInt64.self)))
                tables.append(ChunkTable(id: id, storedSize: size, bytes: Array(raw[(offset + 40)..<(offset + 40 + tableSize)])))
                offset += 40 + tableSize
            }
            return tables
        }
    }
}

extension DiskIndex {
    /// The distinct ids of the first `limit` chunks that are not holes, in index order.
    func distinctIDs(limit: Int) -> [ChunkID] { Self.distinct(ids.prefix(limit)) }

    /// The distinct ids of `ids` that are not holes, in their order.
    static func distinct(_ ids: some Sequence<ChunkID>) -> [ChunkID] {
        var seen = Set<ChunkID>()
        return ids.filter { !$0.isZero && seen.insert($0).inserted }
    }
}

extension Repository {
    func layoutsPath(_ machine: String, _ id: String, disk: String) -> String { root + "/" + layoutsName(machine, id, disk: disk) }
    func layoutsName(_ machine: String, _ id: String, disk: String) -> String { "machines/\(machine)/points/\(id)/\(disk).layouts" }

    /// The chunk layouts a point's DISK.layouts gives, each checked against its chunk id (none
    /// when the point has no such file or it cannot be read: the caller reads the headers).
    /// Their inode is unknown: `readFrame` checks them against the chunk file's size.
    public func storedLayouts(_ point: RecoveryPoint, disk: String) -> [ChunkID: ChunkLayout] {
        var layouts: [ChunkID: ChunkLayout] = [:]
        for table in storedTables(layoutsName(point.machine, point.id, disk: disk)) {
            if let layout = try? layout(of: table) { layouts[table.id] = layout }
        }
        return layouts
    }

    /// The entries of the layouts file `name` (none when it is missing or unreadable).
    func storedTables(_ name: String) -> [ChunkTable] {
        guard let bytes = try? readManifest(name) else { return [] }
        return DiskLayouts.decode(bytes)
    }

    /// Writes the layouts file of a disk whose first distinct chunks are `ids` (at most
    /// `DiskLayouts.limit`: `DiskIndex.distinctIDs(limit:)`): entries from
    /// `carried` (the parent point's file, not checked again: readers check), the rest read
    /// from the chunk files (those a backup has just written are in the page cache).
    func writeLayouts(of ids: [ChunkID], carrying carried: [ChunkTable], name: String, at path: String? = nil) throws {
        var known: [ChunkID: ChunkTable] = [:]
        for table in carried { known[table.id] = table }
        for (id, table) in chunkTables(ids.filter { known[$0] == nil }) { known[id] = table }
        try writeManifest(DiskLayouts.encode(ids.compactMap { known[$0] }), name, at: path, syncDirectory: false)
    }

    /// After `compact`: rewrites the layouts files that describe chunks it replaced (their
    /// frames moved), and writes those that points taken before layouts files existed lack.
    /// Best effort: a file that cannot be written is read around, as before.
    func refreshLayouts(rewritten: Set<ChunkID>) {
        for machine in (try? machineNames()) ?? [] {
            for point in (try? points(machine)) ?? [] {
                for disk in point.disks {
                    let name = layoutsName(machine, point.id, disk: disk.name)
                    var carried: [ChunkTable] = []
                    if FileSystem.exists(root + "/" + name) {
                        guard !rewritten.isEmpty else { continue }
                        let tables = storedTables(name)
                        carried = tables.filter { !rewritten.contains($0.id) }
                        guard carried.count < tables.count else { continue }
                    }
                    guard let index = try? index(point, disk: disk.name) else { continue }
                    try? writeLayouts(of: index.distinctIDs(limit: DiskLayouts.limit), carrying: carried, name: name)
                }
            }
        }
    }
}
