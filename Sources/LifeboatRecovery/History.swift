import Foundation
import LifeboatRepository

/// One step in a recovery server's life (`HOT/NAME/history.jsonl`, one JSON object per line).
public struct HistoryEvent: Codable, Sendable {
    public var time: Date
    /// test-failover, stop-test, failover, finalised, change-point, cancel-failover, commit, failback, …
    public var event: String
    /// The state after the step.
    public var state: ServerState
    public var point: String?
    public var detail: String
    /// Who asked for it: a console user, or the Unix user of the CLI (nil: not known).
    public var user: String?

    public init(time: Date = Date(), event: String, state: ServerState, point: String? = nil, detail: String, user: String? = nil) {
        self.time = time
        self.event = event
        self.state = state
        self.point = point
        self.detail = detail
        self.user = user
    }
}

extension HotStorage {
    func historyPath(_ name: String) -> String { machineDirectory(name) + "/history.jsonl" }

    /// Appends an event (O_APPEND, one write per line, so concurrent writers do not interleave).
    func record(_ name: String, _ event: HistoryEvent) {
        try? prepare(name)
        var event = event
        if event.user == nil { event.user = user }
        guard var line = try? JSONEncoder.compactLifeboat.encode(event) else { return }
        line.append(0x0a)
        let fd = open(historyPath(name), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
        guard fd >= 0 else { return }
        defer { close(fd) }
        _ = line.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        fsync(fd)
    }

    public func history(_ name: String) -> [HistoryEvent] {
        guard let text = try? String(contentsOfFile: historyPath(name), encoding: .utf8) else { return [] }
        return text.split(separator: "\n").compactMap { try? JSONDecoder.lifeboat.decode(HistoryEvent.self, from: Data($0.utf8)) }
    }
}

extension JSONEncoder {
    /// Like `.lifeboat`, on one line.
    package static var compactLifeboat: JSONEncoder {
        let encoder = JSONEncoder.lifeboat
        encoder.outputFormatting = [.sortedKeys]
        return encoder
    }
}
