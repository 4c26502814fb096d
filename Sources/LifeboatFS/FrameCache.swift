import Dispatch
import Foundation
import LifeboatRepository
import Synchronization

/// Decoded chunk frames, shared by every open disk (equal chunks of different points are one
/// entry), bounded in bytes. Eviction drops the least recently used frames. A frame that several
/// threads want at once is loaded once; the others wait for it.
public final class FrameCache: Sendable {
    struct Key: Hashable, Sendable {
        let chunk: ChunkID
        let frame: Int
    }

    private final class Pending: @unchecked Sendable {
        // @unchecked: `result` is written once before `done.leave()` and read after `done.wait()`.
        let done = DispatchGroup()
        var result: Result<[UInt8], any Error>?
        init() { done.enter() }
    }

    private struct State {
        var frames: [Key: (bytes: [UInt8], used: UInt64)] = [:]
        var layouts: [ChunkID: ChunkLayout] = [:]
        var warming: Set<ChunkID> = []   // layouts a warmer is reading now
        var pending: [Key: Pending] = [:]
        var bytes = 0
        var clock: UInt64 = 0
    }

    private let state = Mutex(State())
    private let repository: Repository
    public let capacity: Int
    private let maxLayouts = 65536

    public init(repository: Repository, capacity: Int) {
        self.repository = repository
        self.capacity = max(capacity, 2 * repository.config.frameSize)
    }

    /// Bytes of decoded frames held now.
    public var size: Int { state.withLock { $0.bytes } }

    /// The plaintext of frame `frame` of `chunk`, from the cache or the repository. Frames it was
    /// compressed against (compacted chunks) come through the cache too: many frames share them.
    /// - Parameter asReference: the frame is one another frame refers to (it may not refer to others).
    /// - Throws: `.damaged` when the chunk is missing or does not match its id.
    func frame(_ frame: Int, of chunk: ChunkID, asReference: Bool = false) throws -> [UInt8] {
        let key = Key(chunk: chunk, frame: frame)
        enum Step { case hit([UInt8]), wait(Pending), load(Pending) }
        let step: Step = state.withLock { state in
            state.clock += 1
            if let entry = state.frames[key] {
                state.frames[key]!.used = state.clock
                return .hit(entry.bytes)
            }
            if let pending = state.pending[key] { return .wait(pending) }
            let pending = Pending()
            state.pending[key] = pending
            return .load(pending)
        }
        switch step {
        case .hit(let bytes):
            return bytes
        case .wait(let pending):
            pending.done.wait()
            return try pending.result!.get()
        case .load(let pending):
            let result = Result { try load(key, asReference: asReference) }
            pending.result = result
            state.withLock { state in
                state.pending[key] = nil
                if case .success(let bytes) = result { insert(key, bytes, into: &state) }
            }
            pending.done.leave()
            return try result.get()
        }
    }

    /// Loads every frame of `chunk` not cached yet with one read of the chunk file (for reading
    /// ahead: sequential readers need them all, and one large read beats several small ones).
    func prefetch(_ chunk: ChunkID, frames: Int) {
        let missing = state.withLock { state in
            (0..<frames).contains { state.frames[Key(chunk: chunk, frame: $0)] == nil && state.pending[Key(chunk: chunk, frame: $0)] == nil }
        }
        guard missing, let decoded = try? repository.readFrames(chunk, references: referenceReader) else { return }
        state.withLock { state in
            state.layouts[chunk] = decoded.layout
            for (k, bytes) in decoded.frames.enumerated() where state.frames[Key(chunk: chunk, frame: k)] == nil {
                state.clock += 1
                insert(Key(chunk: chunk, frame: k), bytes, into: &state)
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
    /// within a second (docs/MOUNT.md).
    func warmLayouts(_ chunks: [ChunkID], stored: () -> [ChunkID: ChunkLayout] = { [:] }) {
        guard state.withLock({ state in chunks.contains { state.layouts[$0] == nil } }) else { return }
        adopt(stored())
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

    /// Keeps the layouts of chunks it has none of, up to what the layout cache holds.
    private func adopt(_ layouts: [ChunkID: ChunkLayout]) {
        state.withLock { state in
            for (id, layout) in layouts where state.layouts[id] == nil && state.layouts.count < maxLayouts { state.layouts[id] = layout }
        }
    }

    private var referenceReader: ReferenceReader { { try self.frame($0.frame, of: $0.chunk, asReference: true) } }

    private func load(_ key: Key, asReference: Bool) throws -> [UInt8] {
        let known = state.withLock { $0.layouts[key.chunk] }
        var readLayout: ChunkLayout? = nil
        let bytes = try [UInt8](filling: repository.config.frameSize) {
            let (read, length) = try repository.readFrame(key.frame, of: key.chunk, layout: known, into: $0,
                                                          references: asReference ? nil : referenceReader)
            readLayout = read
            return length
        }
        let layout = readLayout!
        if known?.inode != layout.inode {
            state.withLock { state in
                if state.layouts.count >= maxLayouts { state.layouts.removeAll(keepingCapacity: true) }
                state.layouts[key.chunk] = layout
            }
        }
        return bytes
    }

    private func insert(_ key: Key, _ bytes: [UInt8], into state: inout State) {
        state.frames[key] = (bytes, state.clock)
        state.bytes += bytes.count
        guard state.bytes > capacity else { return }
        // Evict the oldest quarter in one pass, so the sort is paid rarely.
        let target = capacity * 3 / 4
        for (victim, entry) in state.frames.sorted(by: { $0.value.used < $1.value.used }) {
            if state.bytes <= target { break }
            state.frames[victim] = nil
            state.bytes -= entry.bytes.count
        }
    }
}
