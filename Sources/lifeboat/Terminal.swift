import Foundation
import LifeboatBase
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
    static func bytes(_ n: Int) -> String { Units.bytes(n) }
    static func rate(_ bytesPerSecond: Double) -> String { Units.rate(bytesPerSecond) }
    static func time(_ date: Date) -> String { Units.time(date) }

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
