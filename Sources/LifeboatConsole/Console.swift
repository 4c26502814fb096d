import Foundation
import LifeboatBase
import LifeboatRecovery
import LifeboatReplication
import LifeboatRepository
import Synchronization

/// What every page and API call reads: all machines' status (checked against libvirt, as
/// `lifeboat status` does), their last drills, the plans. Taken at most once a second, however
/// many viewers poll, and again as soon as a console job ends.
struct Snapshot: Sendable {
    var taken: Date
    var generation: Int
    var statuses: [ServerStatus]
    var lastDrills: [String: Drill]
    var plans: [Plan]
}

/// The web console and JSON API over one repository and its hot storage: the data, the jobs
/// that act, the users. `application(_:)` makes the Hummingbird server.
public final class Console: Sendable {
    /// For reads only, and only on `queue` (it holds one libvirt connection).
    let reader: Recovery
    let replication: Replication
    public let users: UserStore
    public let jobs = JobBoard()
    let throttle = LoginThrottle()
    let passwordChecks = PasswordChecks()
    let book = SessionBook()
    public let logins: LoginLog
    let devices: DeviceCookies
    let pages: Pages
    private let queue = DispatchQueue(label: "lifeboat.console.reads")
    private let cached = Locked<Snapshot?>(nil)
    private let refreshing = Atomic<Bool>(false)
    private let renderedDashboard = Locked<(taken: Date, html: String)?>(nil)
    /// How long a snapshot is served without taking a new one.
    static let freshFor: TimeInterval = 2
    /// How long an older snapshot is served while a new one is taken.
    static let servedStaleFor: TimeInterval = 30

    /// After a failover or change-point a console job starts `lifeboat finalise` (it outlives
    /// the console) through `recovery`'s launcher.
    public init(recovery: Recovery, replication: Replication) async throws {
        self.reader = recovery.acting(for: nil)
        self.replication = replication
        self.users = UserStore(hotDirectory: recovery.settings.hotDirectory)
        self.logins = LoginLog(hotDirectory: recovery.settings.hotDirectory)
        self.devices = DeviceCookies(hotDirectory: recovery.settings.hotDirectory)
        self.pages = try await Pages(directory: recovery.settings.templates.directory + "/console")
    }

    var repository: Repository { reader.repository }

    /// Runs `body` with the reading Recovery on the console's read queue (libvirt and file
    /// reads block: they are kept off the server's event loops).
    func read<T: Sendable>(_ body: @escaping @Sendable (Recovery) throws -> T) async throws -> T {
        try await withCheckedThrowingContinuation { continuation in
            queue.async { [reader] in continuation.resume(with: Result { try body(reader) }) }
        }
    }

    /// The current snapshot. A fresh one (younger than `freshFor`) is served as it is; an older
    /// one is served too while a new one is taken in the background, so no viewer waits for
    /// libvirt; but after a console job ended, or when it is very old, the caller waits for a new
    /// one (the person who acted sees the outcome at once).
    func snapshot() async throws -> Snapshot {
        let generation = jobs.generation
        if let snapshot = cached.withLock({ $0 }), snapshot.generation == generation {
            let age = Date().timeIntervalSince(snapshot.taken)
            if age < Self.freshFor { return snapshot }
            if age < Self.servedStaleFor {
                if refreshing.compareExchange(expected: false, desired: true, ordering: .acquiringAndReleasing).exchanged {
                    queue.async { [self] in
                        _ = try? takeSnapshot(generation: generation)
                        refreshing.store(false, ordering: .releasing)
                    }
                }
                return snapshot
            }
        }
        return try await read { [self] _ in
            // Another caller may have taken one while this one queued.
            if let snapshot = cached.withLock({ $0 }), snapshot.generation == generation,
               Date().timeIntervalSince(snapshot.taken) < Self.freshFor {
                return snapshot
            }
            return try takeSnapshot(generation: generation)
        }
    }

    /// Reads everything the pages show; only on `queue`.
    private func takeSnapshot(generation: Int) throws -> Snapshot {
        let statuses = try reader.status()
        var drills: [String: Drill] = [:]
        for status in statuses { drills[status.machine] = reader.hot.drills(status.machine).last }
        let snapshot = Snapshot(taken: Date(), generation: generation, statuses: statuses, lastDrills: drills, plans: reader.plans())
        cached.withLock { $0 = snapshot }
        return snapshot
    }

    /// The dashboard's main part for `snapshot`, rendered once per snapshot however many look.
    func dashboard(_ snapshot: Snapshot) throws -> String {
        if let (taken, html) = renderedDashboard.withLock({ $0 }), taken == snapshot.taken { return html }
        let html = try pages.render("dashboard-main", DashboardPage(snapshot))
        renderedDashboard.withLock { $0 = (snapshot.taken, html) }
        return html
    }

    /// One machine's status, or a 404 naming it.
    func status(_ name: String) async throws -> ServerStatus {
        guard let status = try await snapshot().statuses.first(where: { $0.machine == name }) else {
            throw LifeboatError(.notFound, "no machine \(name) in this repository: see the dashboard or GET /api/v1/machines")
        }
        return status
    }
}

/// The actions the console offers, each the CLI command of the same name.
public enum ConsoleAction: String, Sendable, CaseIterable {
    case backup
    case testFailover = "test-failover"
    case stopTest = "stop-test"
    case failover
    case changePoint = "change-point"
    case commit
    case cancelFailover = "cancel-failover"
    case failback

    /// The state machine's command (nil for a backup, which any state allows).
    var command: RecoveryCommand? {
        switch self {
        case .backup: return nil
        case .testFailover: return .testFailover
        case .stopTest: return .stopTest
        case .failover: return .failover
        case .changePoint: return .changePoint
        case .commit: return .commit
        case .cancelFailover: return .cancelFailover
        case .failback: return .failback
        }
    }

    /// Actions that throw away or replace a running machine: the person types its name.
    var needsConfirmation: Bool { self == .failover || self == .cancelFailover }

    var title: String {
        switch self {
        case .backup: return "Back up now"
        case .testFailover: return "Start a drill"
        case .stopTest: return "Stop the drill"
        case .failover: return "Fail over"
        case .changePoint: return "Change point"
        case .commit: return "Commit"
        case .cancelFailover: return "Cancel failover"
        case .failback: return "Fail back"
        }
    }

    /// The actions allowed in `state`, in the order a person meets them.
    static func offered(in state: ServerState) -> [ConsoleAction] {
        let allowed = Set(StateMachine.allowed(in: state))
        return allCases.filter { action in action.command.map(allowed.contains) ?? true }
    }
}

/// What an action takes (JSON body or form fields); each field as the CLI option of that name.
public struct ActionRequest: Codable, Sendable {
    public var point: String?
    /// The machine's name, typed to confirm a failover or cancel-failover.
    public var confirm: String?
    public var planned: Bool?
    public var vcpus: Int?
    public var memory: Int?
    public var ip: String?

    public init(point: String? = nil, confirm: String? = nil, planned: Bool? = nil, vcpus: Int? = nil, memory: Int? = nil, ip: String? = nil) {
        self.point = point
        self.confirm = confirm
        self.planned = planned
        self.vcpus = vcpus
        self.memory = memory
        self.ip = ip
    }
}

extension Console {
    /// Checks `action` on `machine` as the CLI would (unknown machine, a state that does not
    /// allow it, a missing confirmation, a machine busy with another job), then starts it as a
    /// job acting for `user`. Nothing is changed when it throws.
    public func start(_ action: ConsoleAction, machine: String, _ request: ActionRequest, user: String) async throws -> ConsoleJob {
        if action.needsConfirmation && request.confirm != machine {
            throw LifeboatError(.invalidArgument, "\(action.rawValue) of \(machine) must be confirmed: type the machine's name '\(machine)' (field confirm)")
        }
        if action == .changePoint && (request.point ?? "").isEmpty {
            throw LifeboatError(.invalidArgument, "change-point needs the point to go to: give point (an id or 'latest')")
        }
        try await read { recovery in
            if let command = action.command {
                try recovery.preflight(command, machine: machine)
            } else {
                _ = try recovery.repository.machine(machine)
            }
            if let point = request.point, point != "latest" {
                guard try recovery.repository.points(machine).contains(where: { $0.id == point }) else {
                    throw LifeboatError(.notFound, "\(machine) has no recovery point \(point): see its points")
                }
            }
        }
        let base = reader
        let replication = replication
        return try jobs.start(action.rawValue, machine: machine, user: user) { job in
            // A Recovery of its own per job: a libvirt connection of its own (no queueing behind the reads),
            // and history events that carry the user's name.
            let recovery = base.acting(for: user)
            let point = request.point.flatMap { $0 == "latest" ? nil : $0 }
            switch action {
            case .backup:
                let (made, _) = try recovery.takePoint(machine, using: replication, progress: job.meter)
                job.made(point: made.id)
                return "point \(made.id) of \(machine): \(Units.bytes(made.bytesRead)) read, \(Units.bytes(made.storedBytes)) stored, \(made.consistency)"
            case .testFailover:
                let options = DrillOptions(point: point, vcpus: request.vcpus, memoryMiB: request.memory, ip: request.ip)
                let drill = try recovery.testFailover(machine, options) { job.say($0) }
                job.made(drill: drill.id, point: drill.point)
                guard drill.result == .passed else {
                    throw LifeboatError(.invalidState, "drill \(drill.id) of \(machine) failed: \(drill.reason ?? "see its console log"); stop it with stop-test")
                }
                return String(format: "drill %@ of %@ passed: VM running after %.1f s, boot line after %.1f s; stop it with stop-test",
                              drill.id, machine, drill.secondsToRunning ?? 0, drill.secondsToBootLine ?? 0)
            case .stopTest:
                let report = try recovery.stopTest(machine)
                return "drill of \(machine) stopped: VM " + (report.domainRemoved ? "destroyed" : "already gone")
                    + ", \(report.overlaysRemoved) overlay(s) deleted; \(machine) is in Standby"
            case .failover:
                let options = FailoverOptions(point: point, planned: request.planned ?? false, vcpus: request.vcpus,
                                              memoryMiB: request.memory, ip: request.ip)
                let record = try recovery.failover(machine, options) { job.say($0) }
                job.made(point: record.point)
                try recovery.startFinaliser(machine)
                return "\(machine) failed over from point \(record.point ?? "?"): VM running at \(record.ip ?? "its address"); finalising into hot storage"
            case .changePoint:
                let record = try recovery.changePoint(machine, to: request.point ?? "latest") { job.say($0) }
                job.made(point: record.point)
                try recovery.startFinaliser(machine)
                return "\(machine) restarted from point \(record.point ?? "?"); finalising again"
            case .commit:
                let committed = try recovery.commit(machine)
                return "failover of \(machine) committed: backups now read " + committed.disks.map(\.path).joined(separator: ", ")
            case .cancelFailover:
                try recovery.cancelFailover(machine)
                return "failover of \(machine) cancelled: VM destroyed, hot disks deleted; \(machine) is in Standby"
            case .failback:
                let report = try recovery.failback(machine) { job.say($0) }
                let written = report.restores.reduce(0) { $0 + $1.bytesWritten }
                return "\(machine) failed back: \(Units.bytes(written)) written to its disks; the source is live again (Standby)"
            }
        }
    }
}
