/// A reversible transform that makes x86 machine code compress better: the 32-bit relative
/// operand after each call (E8) or jump (E9) opcode becomes the absolute target, so calls of one
/// function from many places are the same bytes. (The idea of the BCJ filters of xz and LZX's
/// E8 translation; written here for 64 KiB frames.)
///
/// Reversibility: the scan steps over the four operand bytes after every E8/E9 whether it
/// changes them or not, so encoder and decoder visit the same positions (the opcodes are never
/// changed). An operand is changed only when its top byte is 0x00 or 0xFF (a target within 16
/// MiB), and it is mapped within that same 25-bit range, so the decoder knows which to change back.
enum X86Filter {
    /// True when the frame has as many candidate call/jump operands as code does (one in 128 bytes).
    static func looksLikeCode(_ data: UnsafeRawBufferPointer) -> Bool {
        guard data.count >= 5, let base = data.baseAddress?.assumingMemoryBound(to: UInt8.self) else { return false }
        var candidates = 0
        var i = 0
        let end = data.count - 4
        while i < end {
            let byte = base[i]
            if byte == 0xE8 || byte == 0xE9 {
                let top = base[i + 4]
                if top == 0 || top == 0xFF { candidates += 1 }
            }
            i += 1
        }
        return candidates > data.count / 128
    }

    static func encode(_ data: UnsafeMutableRawBufferPointer) { transform(data, encoding: true) }
    static func decode(_ data: UnsafeMutableRawBufferPointer) { transform(data, encoding: false) }

    /// True when one of the eight bytes of `word` is 0xE8 or 0xE9 (a SWAR test: the scan skips
    /// eight bytes at a time through data without opcodes, most of any frame).
    @inline(__always)
    private static func mayHoldOpcode(_ word: UInt64) -> Bool {
        let ones: UInt64 = 0x0101_0101_0101_0101
        let x = (word & 0xFEFE_FEFE_FEFE_FEFE) ^ 0xE8E8_E8E8_E8E8_E8E8
        return (x &- ones) & ~x & (ones << 7) != 0
    }

    private static func transform(_ data: UnsafeMutableRawBufferPointer, encoding: Bool) {
        guard data.count >= 5, let base = data.baseAddress?.assumingMemoryBound(to: UInt8.self) else { return }
        let raw = UnsafeRawPointer(base)
        var i = 0
        let end = data.count - 4
        while i < end {
            if i + 8 <= data.count && !mayHoldOpcode(raw.loadUnaligned(fromByteOffset: i, as: UInt64.self)) {
                i += 8
                continue
            }
            let byte = base[i]
            guard byte == 0xE8 || byte == 0xE9 else { i += 1; continue }
            let top = base[i + 4]
            if top == 0 || top == 0xFF {
                let operand = UnsafeMutableRawPointer(base + i + 1)
                let value = UInt32(littleEndian: operand.loadUnaligned(as: UInt32.self))
                let position = UInt32(truncatingIfNeeded: i + 5)
                var mapped = (encoding ? value &+ position : value &- position) & 0x01FF_FFFF
                if mapped & 0x0100_0000 != 0 { mapped |= 0xFF00_0000 }
                operand.storeBytes(of: mapped.littleEndian, as: UInt32.self)
            }
            i += 5
        }
    }
}
