import Foundation
import Synchronization

/// Bytes done out of a total, updated by workers and read by whoever shows progress.
/// With a `limit`, workers that get ahead of it are made to wait (a bandwidth cap).
public final class ProgressMeter: Sendable {
    private let totalBytes = Atomic<Int>(0)
    private let doneBytes = Atomic<Int>(0)
    private let limitBytes = Atomic<Int>(0)
    private let dataBytes = Atomic<Int>(0)
    private let startedNanos = Atomic<UInt64>(0)

    /// - Parameter limit: bytes per second the work may go at (0: no limit).
    public init(limit: Int = 0) {
        limitBytes.store(limit, ordering: .relaxed)
    }

    public var total: Int { totalBytes.load(ordering: .relaxed) }
    public var done: Int { doneBytes.load(ordering: .relaxed) }

    /// Changes the bandwidth cap while the work runs (0: none).
    public func setLimit(_ bytesPerSecond: Int) { limitBytes.store(bytesPerSecond, ordering: .relaxed) }

    package func start(total: Int) {
        totalBytes.store(total, ordering: .relaxed)
        doneBytes.store(0, ordering: .relaxed)
        dataBytes.store(0, ordering: .relaxed)
        startedNanos.store(DispatchTime.now().uptimeNanoseconds, ordering: .relaxed)
    }

    /// Counts `bytes` as done; `data` bytes (read or written, not holes) count against the limit.
    package func add(_ bytes: Int, data: Bool = true) { add(bytes, moved: data ? bytes : 0) }

    /// Counts `bytes` as done, of which `moved` were read or written (the rest: holes, chunks
    /// taken from the previous point); those count against the limit: the caller waits until the
    /// average since `start` is back under it. The wait is taken in short slices, so a limit
    /// lifted meanwhile (`setLimit(0)`) takes effect at once.
    package func add(_ bytes: Int, moved: Int) {
        doneBytes.add(bytes, ordering: .relaxed)
        guard moved > 0, limitBytes.load(ordering: .relaxed) > 0 else { return }
        let moved = dataBytes.add(moved, ordering: .relaxed).newValue
        while true {
            let limit = limitBytes.load(ordering: .relaxed)
            guard limit > 0 else { return }
            let due = Double(moved) / Double(limit)
            let elapsed = Double(DispatchTime.now().uptimeNanoseconds - startedNanos.load(ordering: .relaxed)) / 1e9
            guard due > elapsed else { return }
            Thread.sleep(forTimeInterval: min(due - elapsed, 0.25))
        }
    }
}

/// Amounts and times as people read them: in the CLI's tables and the console's pages.
public enum Units {
    /// 1.5 GiB, 312.0 KiB, 12 B.
    public static func bytes(_ n: Int) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB"]
        var value = Double(n), unit = 0
        while value >= 1024 && unit < units.count - 1 { value /= 1024; unit += 1 }
        return unit == 0 ? "\(n) B" : String(format: "%.1f %@", value, units[unit])
    }

    public static func rate(_ bytesPerSecond: Double) -> String {
        String(format: "%.0f MB/s", bytesPerSecond / 1_000_000)
    }

    /// 2026-11-22 10:04:05Z.
    public static func time(_ date: Date) -> String {
        timeFormatter.withLock { $0.string(from: date) }
    }

    private static let timeFormatter: Locked<DateFormatter> = {
        let formatter = DateFormatter()
        formatter.locale = Locale(identifier: "en_US_POSIX")
        formatter.timeZone = TimeZone(identifier: "UTC")
        formatter.dateFormat = "yyyy-MM-dd HH:mm:ss'Z'"
        return Locked(formatter)
    }()
}

/// Phase timings on standard error when LIFEBOAT_TRACE is set (`LIFEBOAT_TRACE=1 lifeboat backup …`):
/// where a command's time goes, without a profiler.
public enum Trace {
    public static let enabled = ProcessInfo.processInfo.environment["LIFEBOAT_TRACE"] != nil
    private static let start = Date()

    /// Prints the time since the process's first trace call and `what`.
    public static func mark(_ what: @autoclosure () -> String) {
        guard enabled else { return }
        FileHandle.standardError.write(Data(String(format: "trace %8.1f ms  %@\n", Date().timeIntervalSince(start) * 1000, what()).utf8))
    }
}

/// ADDR:PORT as the console and the metrics listen on it; [ADDR]:PORT for IPv6; port 0 lets
/// the system choose one.
public enum ListenAddress {
    public static func parse(_ text: String) -> (host: String, port: Int)? {
        guard let colon = text.lastIndex(of: ":"), let port = Int(text[text.index(after: colon)...]), (0...65535).contains(port) else { return nil }
        var host = String(text[..<colon])
        if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        return host.isEmpty ? nil : (host, port)
    }
}
