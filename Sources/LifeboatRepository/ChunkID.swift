import Crypto
#if canImport(Glibc)
import Glibc
#endif

/// A chunk's name: SHA-256 of its plaintext, or HMAC-SHA-256 under the repository's id key when
/// the repository is encrypted (so ids say nothing about the content). The all-zero id stands
/// for a hole: an all-zero chunk that is never stored.
public struct ChunkID: Hashable, Sendable, CustomStringConvertible {
    // Four words rather than 32 bytes: cheap to hash and compare in the dedup set.
    var a: UInt64, b: UInt64, c: UInt64, d: UInt64

    public static let zero = ChunkID(a: 0, b: 0, c: 0, d: 0)
    public var isZero: Bool { a == 0 && b == 0 && c == 0 && d == 0 }

    init(a: UInt64, b: UInt64, c: UInt64, d: UInt64) { (self.a, self.b, self.c, self.d) = (a, b, c, d) }

    /// Reads 32 bytes.
    init(bytes: UnsafeRawBufferPointer) {
        precondition(bytes.count >= 32)
        a = bytes.loadUnaligned(fromByteOffset: 0, as: UInt64.self)
        b = bytes.loadUnaligned(fromByteOffset: 8, as: UInt64.self)
        c = bytes.loadUnaligned(fromByteOffset: 16, as: UInt64.self)
        d = bytes.loadUnaligned(fromByteOffset: 24, as: UInt64.self)
    }

    init<D: Sequence>(digest: D) where D.Element == UInt8 {
        let bytes = Array(digest)
        self = bytes.withUnsafeBytes { ChunkID(bytes: $0) }
    }

    /// Parses 64 hex digits.
    public init?(hex: String) {
        let utf8 = Array(hex.utf8)
        guard utf8.count == 64 else { return nil }
        var bytes = [UInt8](repeating: 0, count: 32)
        for i in 0..<32 {
            guard let hi = Self.nibble(utf8[2 * i]), let lo = Self.nibble(utf8[2 * i + 1]) else { return nil }
            bytes[i] = hi << 4 | lo
        }
        self.init(digest: bytes)
    }

    func write(to buffer: UnsafeMutableRawBufferPointer) {
        buffer.storeBytes(of: a, toByteOffset: 0, as: UInt64.self)
        buffer.storeBytes(of: b, toByteOffset: 8, as: UInt64.self)
        buffer.storeBytes(of: c, toByteOffset: 16, as: UInt64.self)
        buffer.storeBytes(of: d, toByteOffset: 24, as: UInt64.self)
    }

    public var bytes: [UInt8] {
        var out = [UInt8](repeating: 0, count: 32)
        out.withUnsafeMutableBytes { write(to: $0) }
        return out
    }

    public var hex: String {
        let digits = Array("0123456789abcdef".utf8)
        var out = [UInt8]()
        out.reserveCapacity(64)
        for byte in bytes {
            out.append(digits[Int(byte >> 4)])
            out.append(digits[Int(byte & 15)])
        }
        return String(decoding: out, as: UTF8.self)
    }

    public var description: String { hex }

    private static func nibble(_ c: UInt8) -> UInt8? {
        switch c {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return c - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return c - UInt8(ascii: "a") + 10
        default: return nil
        }
    }
}

extension UnsafeRawBufferPointer {
    /// True when every byte is zero (compares the buffer with itself shifted by one word).
    var isAllZero: Bool {
        guard let base = baseAddress, count > 0 else { return true }
        let words = count / 8
        if words > 0 {
            if base.loadUnaligned(as: UInt64.self) != 0 { return false }
            if memcmp(base, base + 8, (words - 1) * 8) != 0 { return false }
        }
        for i in (words * 8)..<count where self[i] != 0 { return false }
        return true
    }
}

