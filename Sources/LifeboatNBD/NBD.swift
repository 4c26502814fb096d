import CNbd

/// An error from libnbd: what Lifeboat was doing and libnbd's own message.
public struct NBDError: Error, Sendable, CustomStringConvertible {
    public var what: String
    public var message: String
    public var errno: Int32

    public var description: String { "\(what): \(message)" }

    /// Reads libnbd's thread-local error at once, as every failed call must.
    static func last(_ what: String) -> NBDError {
        let message = nbd_get_error().map { String(cString: $0) } ?? "unknown libnbd error"
        return NBDError(what: what, message: message, errno: nbd_get_errno())
    }
}

/// One extent of a block-status answer: `length` bytes from `offset` with the context's flags.
public struct NBDExtent: Sendable, Equatable {
    public var offset: UInt64
    public var length: UInt64
    public var flags: UInt32

    public var range: Range<UInt64> { offset..<(offset + length) }
}

/// A connection to one export of an NBD server over a Unix socket (QEMU's, during a libvirt
/// pull-mode backup, or qemu-nbd's). One connection serves one thread at a time: open one per
/// reader thread for parallel reads.
public final class NBDConnection: @unchecked Sendable {
    // @unchecked: the handle is used by one thread at a time (documented above) and freed in close().
    private var handle: OpaquePointer?
    public let socket: String
    public let export: String
    /// Size of the export in bytes.
    public let size: UInt64

    /// base:allocation: flags say hole (1) and zero (2).
    public static let allocationContext = "base:allocation"
    public static let holeFlag: UInt32 = UInt32(LIBNBD_STATE_HOLE)
    public static let zeroFlag: UInt32 = UInt32(LIBNBD_STATE_ZERO)

    /// Connects to `export` at `socket`, asking for the block-status `contexts` (e.g. base:allocation,
    /// qemu:dirty-bitmap:backup-vda).
    /// The corresponding C functions are `nbd_create`, `nbd_add_meta_context`, `nbd_connect_unix`.
    public init(socket: String, export: String, contexts: [String] = []) throws {
        guard let handle = nbd_create() else { throw NBDError.last("creating an NBD handle") }
        self.handle = handle
        self.socket = socket
        self.export = export
        do {
            guard nbd_set_export_name(handle, export) == 0 else { throw NBDError.last("choosing export \(export)") }
            for context in contexts where nbd_add_meta_context(handle, context) != 0 {
                throw NBDError.last("asking for \(context)")
            }
            guard nbd_connect_unix(handle, socket) == 0 else { throw NBDError.last("connecting to \(socket) (export \(export))") }
            let size = nbd_get_size(handle)
            guard size >= 0 else { throw NBDError.last("reading the size of export \(export)") }
            self.size = UInt64(size)
        } catch {
            nbd_close(handle)
            self.handle = nil
            throw error
        }
    }

    /// True when the server agreed to answer block status in `context`.
    public func supports(_ context: String) -> Bool {
        guard let handle else { return false }
        return nbd_can_meta_context(handle, context) == 1
    }

    /// Reads `buffer.count` bytes at `offset`.
    /// The corresponding C function is `nbd_pread`.
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        guard let handle else { throw NBDError(what: "reading \(export)", message: "the connection is closed", errno: 0) }
        guard nbd_pread(handle, buffer.baseAddress, buffer.count, offset, 0) == 0 else {
            throw NBDError.last("reading \(buffer.count) bytes at \(offset) of \(export)")
        }
    }

    /// Writes `buffer` at `offset` (an export served writable).
    /// The corresponding C function is `nbd_pwrite`.
    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        guard let handle else { throw NBDError(what: "writing \(export)", message: "the connection is closed", errno: 0) }
        guard nbd_pwrite(handle, buffer.baseAddress, buffer.count, offset, 0) == 0 else {
            throw NBDError.last("writing \(buffer.count) bytes at \(offset) of \(export)")
        }
    }

    /// Asks the server to make every write so far durable.
    /// The corresponding C function is `nbd_flush`.
    public func flush() throws {
        guard let handle else { throw NBDError(what: "flushing \(export)", message: "the connection is closed", errno: 0) }
        guard nbd_flush(handle, 0) == 0 else { throw NBDError.last("flushing \(export)") }
    }

    /// Every extent of `context` from `range`, in order, as the server describes them (it may
    /// answer a request with less than asked: this asks again until the range is covered).
    /// The corresponding C function is `nbd_block_status`.
    public func extents(_ context: String, in range: Range<UInt64>? = nil) throws -> [NBDExtent] {
        guard let handle else { throw NBDError(what: "block status of \(export)", message: "the connection is closed", errno: 0) }
        let range = range ?? 0..<size
        let collector = ExtentCollector(context: context)
        var offset = range.lowerBound
        while offset < range.upperBound {
            collector.start(at: offset)
            // Requests are limited to 32 bits: ask for at most 2 GiB at a time.
            let count = min(range.upperBound - offset, 1 << 31)
            let callback = nbd_extent_callback(callback: extentCallback,
                                               user_data: Unmanaged.passUnretained(collector).toOpaque(), free: nil)
            guard nbd_block_status(handle, count, offset, callback, 0) == 0 else {
                throw NBDError.last("reading \(context) of \(export) at \(offset)")
            }
            let reached = collector.end
            guard reached > offset else {
                throw NBDError(what: "reading \(context) of \(export)", message: "the server described no extent at \(offset)", errno: 0)
            }
            offset = reached
        }
        withExtendedLifetime(collector) {}
        return collector.extents.filter { $0.offset < range.upperBound }.map { extent in
            var clipped = extent
            clipped.length = min(extent.length, range.upperBound - extent.offset)
            return clipped
        }
    }

    /// Disconnects. Idempotent.
    /// The corresponding C functions are `nbd_shutdown` and `nbd_close`.
    public func close() {
        guard let handle else { return }
        _ = nbd_shutdown(handle, 0)
        nbd_close(handle)
        self.handle = nil
    }

    deinit { close() }
}

/// Gathers the extents libnbd hands to `extentCallback` during one `nbd_block_status` call.
private final class ExtentCollector {
    let context: String
    var extents: [NBDExtent] = []
    private var next: UInt64 = 0

    init(context: String) { self.context = context }

    func start(at offset: UInt64) { next = offset }
    var end: UInt64 { next }

    func append(length: UInt64, flags: UInt32) {
        guard length > 0 else { return }
        extents.append(NBDExtent(offset: next, length: length, flags: flags))
        next += length
    }
}

/// libnbd calls this once per meta context with (length, flags) pairs.
private func extentCallback(_ userData: UnsafeMutableRawPointer?, _ metacontext: UnsafePointer<CChar>?, _ offset: UInt64,
                            _ entries: UnsafeMutablePointer<UInt32>?, _ count: Int, _ error: UnsafeMutablePointer<Int32>?) -> Int32 {
    guard let userData, let metacontext, let entries else { return 0 }
    let collector = Unmanaged<ExtentCollector>.fromOpaque(userData).takeUnretainedValue()
    guard String(cString: metacontext) == collector.context else { return 0 }
    collector.start(at: offset)
    var i = 0
    while i + 1 < count {
        collector.append(length: UInt64(entries[i]), flags: entries[i + 1])
        i += 2
    }
    return 0
}
