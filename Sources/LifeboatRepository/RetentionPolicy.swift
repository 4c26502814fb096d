import Foundation
import LifeboatBase

/// Which recovery points to keep, in the manner of restic's `forget` rules.
///
/// Bucketed rules (hourly, daily, weekly, monthly) keep the newest point of each of the N most
/// recent periods that have points; periods are UTC calendar hours, days, ISO weeks and months.
/// `within` keeps every point younger than the duration, measured back from the newest point
/// (not from now, so a machine that stopped backing up does not lose everything).
public struct RetentionPolicy: Codable, Sendable, Equatable {
    public var last = 0
    public var hourly = 0
    public var daily = 0
    public var weekly = 0
    public var monthly = 0
    public var within: TimeInterval? = nil

    public init(last: Int = 0, hourly: Int = 0, daily: Int = 0, weekly: Int = 0, monthly: Int = 0, within: TimeInterval? = nil) {
        (self.last, self.hourly, self.daily, self.weekly, self.monthly, self.within) = (last, hourly, daily, weekly, monthly, within)
    }

    public var isEmpty: Bool { last == 0 && hourly == 0 && daily == 0 && weekly == 0 && monthly == 0 && within == nil }

    /// For each point to keep, the rules that keep it. Points not in the result go.
    /// - Parameter points: oldest first; of two points with the same time, the later one counts as newer.
    public func keep(_ points: [(id: String, time: Date)]) -> [String: [String]] {
        var calendar = Calendar(identifier: .iso8601)
        calendar.timeZone = TimeZone(identifier: "UTC")!
        let newestFirst = points.enumerated().sorted { ($0.element.time, $0.offset) > ($1.element.time, $1.offset) }.map(\.element)
        var reasons: [String: [String]] = [:]
        for point in newestFirst.prefix(last) { reasons[point.id, default: []].append("last") }
        let buckets: [(String, Int, (Date) -> [Int])] = [
            ("hourly", hourly, { let c = calendar.dateComponents([.year, .month, .day, .hour], from: $0); return [c.year!, c.month!, c.day!, c.hour!] }),
            ("daily", daily, { let c = calendar.dateComponents([.year, .month, .day], from: $0); return [c.year!, c.month!, c.day!] }),
            ("weekly", weekly, { let c = calendar.dateComponents([.yearForWeekOfYear, .weekOfYear], from: $0); return [c.yearForWeekOfYear!, c.weekOfYear!] }),
            ("monthly", monthly, { let c = calendar.dateComponents([.year, .month], from: $0); return [c.year!, c.month!] }),
        ]
        for (rule, count, bucket) in buckets where count > 0 {
            var seen: [Int]? = nil
            var kept = 0
            for point in newestFirst where kept < count {
                let key = bucket(point.time)
                if key != seen {
                    reasons[point.id, default: []].append(rule)
                    seen = key
                    kept += 1
                }
            }
        }
        if let within, let newest = newestFirst.first {
            for point in newestFirst where newest.time.timeIntervalSince(point.time) < within {
                reasons[point.id, default: []].append("within")
            }
        }
        return reasons
    }
}

/// Durations as people write them: `90s`, `15m`, `4h`, `7d`, `2w`, `1h30m`.
public enum DurationText {
    public static func parse(_ text: String) throws -> TimeInterval {
        let units: [Character: Double] = ["s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31_536_000]
        var total = 0.0, number = "", sawUnit = false
        for ch in text {
            if ch.isNumber { number.append(ch); continue }
            guard let unit = units[ch], let value = Double(number) else { return try fail(text) }
            total += value * unit
            number = ""
            sawUnit = true
        }
        guard number.isEmpty, sawUnit, total > 0 else { return try fail(text) }
        return total
    }

    private static func fail(_ text: String) throws -> TimeInterval {
        throw LifeboatError(.invalidArgument, "invalid duration '\(text)': write it like 90s, 15m, 4h, 7d, 2w or 1h30m")
    }

    /// `2d 3h`, `15m`, `40s`: the two largest units.
    public static func format(_ seconds: TimeInterval) -> String {
        var s = Int(seconds.rounded())
        if s < 60 { return "\(s)s" }
        let parts: [(Int, String)] = [(86400, "d"), (3600, "h"), (60, "m"), (1, "s")]
        var out: [String] = []
        for (size, unit) in parts where s >= size && out.count < 2 {
            out.append("\(s / size)\(unit)")
            s %= size
        }
        return out.joined(separator: " ")
    }
}
