import Crypto
import LifeboatBase

/// repo/machines/NAME/points/ID/DISK.idx: the chunk ids of one disk, in order.
///
/// Layout (little-endian): `"LBIDX1\0\0"` | chunk size (u64) | disk size (u64) | count (u64) |
/// count x 32-byte ids (all-zero id = hole) | SHA-256 of everything before it.
public struct DiskIndex: Sendable, Equatable {
    public var chunkSize: Int
    public var diskSize: Int
    public var ids: [ChunkID]

    static let magic: [UInt8] = Array("LBIDX1".utf8) + [0, 0]

    public init(chunkSize: Int, diskSize: Int, ids: [ChunkID]) {
        self.chunkSize = chunkSize
        self.diskSize = diskSize
        self.ids = ids
    }

    public static func chunkCount(diskSize: Int, chunkSize: Int) -> Int { (diskSize + chunkSize - 1) / chunkSize }

    /// Bytes of chunk `i` (the last one may be short).
    public func length(ofChunk i: Int) -> Int { min(chunkSize, diskSize - i * chunkSize) }

    func encoded() -> [UInt8] {
        var bytes = [UInt8]()
        bytes.reserveCapacity(32 + ids.count * 32 + 32)
        bytes += Self.magic
        for value in [chunkSize, diskSize, ids.count] {
            bytes += withUnsafeBytes(of: UInt64(value).littleEndian, Array.init)
        }
        var chunk = [UInt8](repeating: 0, count: 32)
        for id in ids {
            chunk.withUnsafeMutableBytes { id.write(to: $0) }
            bytes += chunk
        }
        bytes += Array(SHA256.hash(data: bytes))
        return bytes
    }

    /// - Throws: `.damaged` naming `path` when the bytes are not a whole, unaltered index.
    init(decoding bytes: [UInt8], path: String) throws {
        func damaged(_ why: String) -> LifeboatError {
            LifeboatError(.damaged, "index \(path) is damaged (\(why)): restore from another point or run 'lifeboat verify'")
        }
        guard bytes.count >= 64, Array(bytes[0..<8]) == Self.magic else { throw damaged("bad header") }
        let body = bytes[0..<(bytes.count - 32)]
        guard Array(SHA256.hash(data: body)) == Array(bytes[(bytes.count - 32)...]) else { throw damaged("checksum mismatch") }
        func u64(_ offset: Int) -> Int {
            bytes.withUnsafeBytes { Int(UInt64(littleEndian: $0.loadUnaligned(fromByteOffset: offset, as: UInt64.self))) }
        }
        chunkSize = u64(8)
        diskSize = u64(16)
        let count = u64(24)
        guard chunkSize > 0, count == Self.chunkCount(diskSize: diskSize, chunkSize: chunkSize),
              bytes.count == 32 + count * 32 + 32 else { throw damaged("wrong length") }
        ids = bytes.withUnsafeBytes { raw in
            (0..<count).map { ChunkID(bytes: UnsafeRawBufferPointer(rebasing: raw[(32 + $0 * 32)..<(64 + $0 * 32)])) }
        }
    }
}
