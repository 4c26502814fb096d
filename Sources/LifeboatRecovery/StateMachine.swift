import LifeboatBase
import LifeboatRepository

/// Where a machine's recovery server stands (docs/RECOVERY.md, "States").
public enum ServerState: String, Codable, Sendable, CaseIterable {
    case standby = "Standby"
    case testingFailover = "TestingFailover"
    case finalizing = "Finalizing"
    case failedOver = "FailedOver"
    case committed = "Committed"
    case failingBack = "FailingBack"

    /// What the state means, for messages.
    var meaning: String {
        switch self {
        case .standby: return "protected, no recovery VM"
        case .testingFailover: return "a drill is running"
        case .finalizing: return "failed over, copying its disks into hot storage"
        case .failedOver: return "failed over, disks in hot storage"
        case .committed: return "failover committed"
        case .failingBack: return "failing back"
        }
    }

    /// True while the recovery VM reads from the FUSE mount.
    public var usesMount: Bool { self == .testingFailover || self == .finalizing }
}

/// The commands that move a recovery server between states.
public enum RecoveryCommand: String, Sendable, CaseIterable {
    case testFailover = "test-failover"
    case stopTest = "stop-test"
    case failover
    case finalised
    case changePoint = "change-point"
    case cancelFailover = "cancel-failover"
    case commit
    case failback
    case failedBack = "failed-back"
    case resume

    /// Commands a person types (the internal `finalised`, `failed-back` are not offered).
    var isUserCommand: Bool { self != .finalised && self != .failedBack }
}

/// The transitions, as a pure table: no I/O, no clock. The coordinator asks it before acting.
public enum StateMachine {
    static let transitions: [ServerState: [RecoveryCommand: ServerState]] = [
        .standby: [.testFailover: .testingFailover, .failover: .finalizing],
        .testingFailover: [.stopTest: .standby],
        .finalizing: [.finalised: .failedOver, .changePoint: .finalizing, .cancelFailover: .standby, .resume: .finalizing],
        .failedOver: [.commit: .committed, .changePoint: .finalizing, .cancelFailover: .standby, .failback: .failingBack],
        .committed: [.failback: .failingBack],
        .failingBack: [.failedBack: .standby, .failback: .failingBack, .resume: .failingBack],
    ]

    /// The state `command` leads to from `state`, or nil when it is not allowed.
    public static func next(from state: ServerState, on command: RecoveryCommand) -> ServerState? {
        transitions[state]?[command]
    }

    /// Commands a person may give in `state`.
    public static func allowed(in state: ServerState) -> [RecoveryCommand] {
        RecoveryCommand.allCases.filter { $0.isUserCommand && next(from: state, on: $0) != nil }
    }

    /// The next state, or an `.invalidState` error whose sentence names the current state
    /// and what is allowed in it.
    public static func check(_ command: RecoveryCommand, machine: String, state: ServerState) throws -> ServerState {
        if let next = next(from: state, on: command) { return next }
        let allowed = allowed(in: state).map(\.rawValue)
        let hint = allowed.isEmpty ? "" : "; allowed now: " + allowed.joined(separator: ", ")
        throw LifeboatError(.invalidState,
            "\(machine) is in \(state.rawValue) (\(state.meaning)): \(command.rawValue) is not allowed\(hint)")
    }
}
