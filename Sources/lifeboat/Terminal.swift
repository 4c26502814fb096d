import Foundation
import LifeboatRepository
#if canImport(Glibc)
import Glibc
#endif

enum Terminal {
    static var isInteractive: Bool { isatty(2) != 0 }

    static func clearProgressLine() {
        if isInteractive { writeError("\r\u{1b}[K") }
    }

    static func writeError(_ text: String) {
        var bytes = Array(text.utf8)
        _ = bytes.withUnsafeMutableBytes { write(2, $0.baseAddress, $0.count) }
    }

    /// Shows `progress` on stderr every quarter second while `body` runs, only on a terminal.
    static func withProgress<T>(_ label: String, _ progress: ProgressMeter, unit: ByteUnit = .bytes, _ body: () throws -> T) rethrows -> T {
        guard isInteractive else { return try body() }
        let done = DispatchSemaphore(value: 0)
        let started = Date()
        let thread = Thread {
            while done.wait(timeout: .now() + 0.25) == .timedOut {
                let line = progressLine(label, progress, unit: unit, elapsed: Date().timeIntervalSince(started))
                writeError("\r\u{1b}[K" + line)
            }
        }
        thread.start()
        defer {
            done.signal()
            clearProgressLine()
        }
        return try body()
    }

    enum ByteUnit { case bytes, items }

    static func progressLine(_ label: String, _ progress: ProgressMeter, unit: ByteUnit, elapsed: Double) -> String {
        let done = progress.done, total = max(progress.total, 1)
        let rate = elapsed > 0 ? Double(done) / elapsed : 0
        let eta: Double = rate > 0 ? Double(total - done) / rate : 0
        let percent = Int(Double(done) * 100 / Double(total))
        let etaText = DurationText.format(eta)
        switch unit {
        case .bytes:
            let amounts = "\(Format.bytes(done)) / \(Format.bytes(total))"
            return "\(label): \(amounts)  \(percent)%  \(Format.rate(rate))  ETA \(etaText)"
        case .items:
            return "\(label): \(done) / \(total)  \(percent)%  ETA \(etaText)"
        }
    }
}

enum Format {
    static func bytes(_ n: Int) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB"]
        var value = Double(n), unit = 0
        while value >= 1024 && unit < units.count - 1 { value /= 1024; unit += 1 }
        return unit == 0 ? "\(n) B" : String(format: "%.1f %@", value, units[unit])
    }

    static func rate(_ bytesPerSecond: Double) -> String {
        String(format: "%.0f MB/s", bytesPerSecond / 1_000_000)
    }

    static func time(_ date: Date) -> String {
        let formatter = DateFormatter()
        formatter.locale = Locale(identifier: "en_US_POSIX")
        formatter.timeZone = TimeZone(identifier: "UTC")
        formatter.dateFormat = "yyyy-MM-dd HH:mm:ss'Z'"
        return formatter.string(from: date)
    }

    /// Left-aligned columns.
    static func table(_ header: [String], _ rows: [[String]]) -> String {
        let all = [header] + rows
        let widths = header.indices.map { column in all.map { $0[column].count }.max() ?? 0 }
        return all.map { row in
            row.enumerated().map { $1.padding(toLength: widths[$0], withPad: " ", startingAt: 0) }
                .joined(separator: "  ").trimmingCharacters(in: .whitespaces)
        }.joined(separator: "\n")
    }
}
