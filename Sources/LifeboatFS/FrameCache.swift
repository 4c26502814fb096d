import Dispatch
import Foundation
import LifeboatBase
import LifeboatRepository
#if canImport(Glibc)
import Glibc
#endif

/// Decoded chunk frames, shared by every open disk (equal chunks of different points are one
/// entry), bounded in bytes. Eviction drops the least recently used frames. A frame that several
/// threads want at once is loaded once; the others wait for it.
///
/// Frames live in the fixed slots of one memory mapping (`FrameSlots`), whose pages are faulted
/// in ahead of use: a cold random read wrote its 64 KiB frame into fresh memory, and the 16 page
/// faults cost as much as decoding it on this host's virtual machines (docs/MOUNT.md). Readers
/// copy out of a slot while it is pinned; eviction passes pinned frames by.
public final class FrameCache: Sendable {
    struct Key: Hashable, Sendable {
        let chunk: ChunkID
        let frame: Int
    }

    private final class Pending: @unchecked Sendable {
        // @unchecked: `error` is written once before `done.leave()` and read after `done.wait()`.
        let done = DispatchGroup()
        var error: (any Error)?
        init() { done.enter() }
    }

    private struct Entry {
        let slot: Int
        let length: Int
        var used: UInt64
        var pins: Int   // readers copying out of the slot now
    }

    private enum Step { case hit(Entry), wait(Pending), load(Pending, slot: Int?) }

    private struct State {
        var frames: [Key: Entry] = [:]
        var free: [Int] = []     // slots frames were evicted from
        var fresh = 0            // slots below it have been handed out at least once
        var layouts: [ChunkID: ChunkLayout] = [:]
        var warming: Set<ChunkID> = []   // layouts a warmer is reading now
        var pending: [Key: Pending] = [:]
        var bytes = 0
        var clock: UInt64 = 0
    }

    private let state = Locked(State())
    private let repository: Repository
    private let slots: FrameSlots
    /// Bytes of frames it holds at most.
    public var capacity: Int { slots.count * slots.size }
    private let maxLayouts = 65536

    /// - Throws: `.noSpace` when `capacity` bytes of address space cannot be mapped.
    public init(repository: Repository, capacity: Int) throws {
        self.repository = repository
        let frameSize = repository.config.frameSize
        slots = try FrameSlots(size: frameSize, count: max(2, capacity / frameSize))
        slots.prepare(upTo: 0)
    }

    /// Bytes of decoded frames held now.
    public var size: Int { state.withLock { $0.bytes } }

    /// Calls `body` with the plaintext of frame `frame` of `chunk`, from the cache or the
    /// repository; the bytes are valid during the call only. Frames it was compressed against
    /// (compacted chunks) come through the cache too: many frames share them.
    /// - Parameter asReference: the frame is one another frame refers to (it may not refer to others).
    /// - Throws: `.damaged` when the chunk is missing or does not match its id.
    func withFrame<R>(_ frame: Int, of chunk: ChunkID, asReference: Bool = false, _ body: (UnsafeRawBufferPointer) throws -> R) throws -> R {
        let key = Key(chunk: chunk, frame: frame)
        while true {
            let step: Step = state.withLock { state in
                state.clock += 1
                if var entry = state.frames[key] {
                    entry.used = state.clock
                    entry.pins += 1
                    state.frames[key] = entry
                    return .hit(entry)
                }
                if let pending = state.pending[key] { return .wait(pending) }
                let pending = Pending()
                state.pending[key] = pending
                return .load(pending, slot: takeSlot(&state))
            }
            switch step {
            case .hit(let entry):
                defer { unpin(key) }
                return try body(slots.bytes(entry.slot, entry.length))
            case .wait(let pending):
                RequestLoop.willBlock()
                pending.done.wait()
                if let error = pending.error { throw error }
                continue   // loaded: a hit now (or evicted already: loaded again)
            case .load(let pending, nil):
                // Every slot is being read from: decoded for this reader alone.
                RequestLoop.willBlock()
                let bytes: [UInt8]
                do { bytes = try [UInt8](filling: repository.config.frameSize) { try load(key, into: $0, asReference: asReference) } } catch {
                    finish(key, pending, slot: nil, error: error)
                    throw error
                }
                finish(key, pending, slot: nil, error: nil)
                return try bytes.withUnsafeBytes(body)
            case .load(let pending, let slot?):
                RequestLoop.willBlock()
                let length: Int
                do { length = try load(key, into: slots.buffer(slot), asReference: asReference) } catch {
                    finish(key, pending, slot: slot, error: error)
                    throw error
                }
                state.withLock { state in
                    state.frames[key] = Entry(slot: slot, length: length, used: state.clock, pins: 1)
                    state.bytes += length
                }
                finish(key, pending, slot: nil, error: nil)
                defer { unpin(key) }
                return try body(slots.bytes(slot, length))
            }
        }
    }

    /// The plaintext of a frame, copied out of the cache.
    func frame(_ frame: Int, of chunk: ChunkID, asReference: Bool = false) throws -> [UInt8] {
        try withFrame(frame, of: chunk, asReference: asReference) { Array($0) }
    }

    /// Ends a load: gives back `slot` (a failed load's), lets the waiters go.
    private func finish(_ key: Key, _ pending: Pending, slot: Int?, error: (any Error)?) {
        state.withLock { state in
            state.pending[key] = nil
            if let slot { state.free.append(slot) }
        }
        pending.error = error
        pending.done.leave()
    }

    private func unpin(_ key: Key) {
        state.withLock { $0.frames[key]!.pins -= 1 }
    }

    /// A slot to decode a frame into: a free one, a never used one, or one eviction frees; nil
    /// when every frame held is pinned.
    private func takeSlot(_ state: inout State) -> Int? {
        if let slot = state.free.popLast() { return slot }
        if state.fresh < slots.count {
            state.fresh += 1
            slots.prepare(upTo: state.fresh)
            return state.fresh - 1
        }
        // Evict the oldest quarter in one pass, so the sort is paid rarely.
        let victims = state.frames.filter { $0.value.pins == 0 }.sorted { $0.value.used < $1.value.used }.prefix(max(1, slots.count / 4))
        for (key, entry) in victims {
            state.frames[key] = nil
            state.bytes -= entry.length
            state.free.append(entry.slot)
        }
        return state.free.popLast()
    }

    /// Loads every frame of `chunk` not cached yet with one read of the chunk file (for reading
    /// ahead: sequential readers need them all, and one large read beats several small ones).
    /// It does not make readers of these frames wait: one that loads a frame first keeps its own.
    func prefetch(_ chunk: ChunkID, frames: Int) {
        let claimed: [Int: Int] = state.withLock { state in
            var claimed: [Int: Int] = [:]
            for k in 0..<frames where state.frames[Key(chunk: chunk, frame: k)] == nil && state.pending[Key(chunk: chunk, frame: k)] == nil {
                guard let slot = takeSlot(&state) else { break }
                claimed[k] = slot
            }
            return claimed
        }
        guard !claimed.isEmpty else { return }
        var lengths: [Int: Int] = [:]
        let layout = try? repository.readFrames(chunk, references: referenceReader) { k, length in
            guard let slot = claimed[k] else { return nil }
            lengths[k] = length
            return slots.buffer(slot)
        }
        state.withLock { state in
            if let layout, state.layouts.count < maxLayouts { state.layouts[chunk] = layout }
            for (k, slot) in claimed {
                let key = Key(chunk: chunk, frame: k)
                guard layout != nil, let length = lengths[k], state.frames[key] == nil else {
                    state.free.append(slot)
                    continue
                }
                state.clock += 1
                state.frames[key] = Entry(slot: slot, length: length, used: state.clock, pins: 0)
                state.bytes += length
            }
        }
    }

    /// Layouts held now.
    var layoutCount: Int { state.withLock { $0.layouts.count } }

    /// Reads the layouts of `chunks` not known yet, several at a time (on the caller's thread:
    /// call it from a background one), up to what the layout cache holds. `stored` gives those
    /// a point's DISK.layouts has (one read instead of one per chunk); it is called only when
    /// some layout is missing. Layouts that another warmer is reading are left to it: opening a
    /// disk starts a warmer, and `qemu-img create` then QEMU open the same disk several times
    /// within a second (docs/MOUNT.md). The files of the chunks whose layouts this call took
    /// from `stored` are looked up, so that the first read of each does not wait for its inode
    /// (`lookUpChunkFiles`); a warmer that took none (another had them) looks nothing up.
    func warmLayouts(_ chunks: [ChunkID], stored: () -> [ChunkID: ChunkLayout] = { [:] }) {
        guard state.withLock({ state in chunks.contains { state.layouts[$0] == nil } }) else { return }
        repository.lookUpChunkFiles(adopt(stored()))
        let wanted = state.withLock { state in
            let wanted = Array(chunks.filter { state.layouts[$0] == nil && !state.warming.contains($0) }
                .prefix(max(0, maxLayouts - state.layouts.count - state.warming.count)))
            state.warming.formUnion(wanted)
            return wanted
        }
        guard !wanted.isEmpty else { return }
        let layouts = repository.chunkLayouts(wanted)
        state.withLock { $0.warming.subtract(wanted) }
        adopt(layouts)
    }

    /// Takes layouts a point's DISK.layouts gives, now (a disk served from a bucket: its first
    /// reads then fetch just their frames, and frames kept in the cache folder are found).
    func adoptLayouts(_ layouts: [ChunkID: ChunkLayout]) { adopt(layouts) }

    /// Keeps the layouts of chunks it has none of, up to what the layout cache holds; returns
    /// the chunks whose layouts it kept.
    @discardableResult
    private func adopt(_ layouts: [ChunkID: ChunkLayout]) -> [ChunkID] {
        state.withLock { state in
            var kept: [ChunkID] = []
            for (id, layout) in layouts where state.layouts[id] == nil && state.layouts.count < maxLayouts {
                state.layouts[id] = layout
                kept.append(id)
            }
            return kept
        }
    }

    private var referenceReader: ReferenceReader { { try self.frame($0.frame, of: $0.chunk, asReference: true) } }

    /// Decodes a frame into `buffer`; returns its length.
    private func load(_ key: Key, into buffer: UnsafeMutableRawBufferPointer, asReference: Bool) throws -> Int {
        let known = state.withLock { $0.layouts[key.chunk] }
        let (layout, length) = try repository.readFrame(key.frame, of: key.chunk, layout: known, into: buffer,
                                                        references: asReference ? nil : referenceReader)
        if known?.inode != layout.inode {
            state.withLock { state in
                if state.layouts.count >= maxLayouts { state.layouts.removeAll(keepingCapacity: true) }
                state.layouts[key.chunk] = layout
            }
        }
        return length
    }
}

/// Fixed-size slots for decoded frames in one anonymous memory mapping. Slots are handed out in
/// order, and the pages of the next ones are faulted in on a background queue before they are
/// used (`MADV_POPULATE_WRITE`, which fills page tables without touching the bytes, so it may
/// run beside a writer); freed slots are reused and their pages kept. On a kernel without it
/// (before Linux 5.14) pages are faulted in where they are first written, as before.
final class FrameSlots: @unchecked Sendable {
    // @unchecked: the mapping never changes; which slot holds what is the cache's state, under its lock.
    let size: Int
    let count: Int
    private let base: UnsafeMutableRawPointer
    private let populated = Locked(0)   // slots below it are faulted in or queued to be
    private let populating = DispatchQueue(label: "lifeboat.frame-slots", qos: .utility)
    /// Slots faulted in ahead of the last one handed out, at most (4 MiB of 64 KiB frames).
    static let ahead = 64
    private static let populateWrite: Int32 = 23   // MADV_POPULATE_WRITE, <linux/mman.h>

    init(size: Int, count: Int) throws {
        self.size = size
        self.count = count
        // MAP_NORESERVE: memory is taken as frames fill the slots, not for the whole capacity.
        guard let mapping = mmap(nil, size * count, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0),
              mapping != MAP_FAILED else {
            throw LifeboatError(.noSpace, "cannot map \(size * count) bytes for the frame cache: \(String(cString: strerror(errno))); give a smaller --cache-size")
        }
        base = mapping
    }

    deinit { munmap(base, size * count) }

    func buffer(_ slot: Int) -> UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(start: base + slot * size, count: size)
    }

    func bytes(_ slot: Int, _ length: Int) -> UnsafeRawBufferPointer {
        UnsafeRawBufferPointer(start: base + slot * size, count: length)
    }

    /// Slots below `used` have been handed out: faults in the next ones, in the background.
    func prepare(upTo used: Int) {
        let range: Range<Int>? = populated.withLock { populated in
            guard populated < count, used + Self.ahead / 2 >= populated else { return nil }
            let range = populated..<min(count, used + Self.ahead)
            populated = range.upperBound
            return range
        }
        guard let range else { return }
        populating.async { [self] in
            _ = madvise(base + range.lowerBound * size, range.count * size, Self.populateWrite)
        }
    }
}
