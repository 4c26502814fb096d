import Foundation
import LifeboatBase
import Synchronization
import LifeboatRepository
#if canImport(Glibc)
import Glibc
#endif

/// What the process finalising a failover publishes for `status`, twice a second, in
/// HOT/NAME/finaliser.json: who it is, which step it is in, and how far the copy got.
/// Status judges the finaliser by this beat (is the process alive, is the beat fresh, does the
/// copy move), never by which files exist at one instant: files come and go during a pivot.
public struct FinaliserBeat: Codable, Sendable {
    public var pid: Int32
    /// starting, seeding, copying writes, pivoting, merging, finished
    public var step: String
    /// The disk the step works on.
    public var disk: String?
    /// Bytes of `disk` in hot storage (seeding).
    public var done: UInt64?
    public var total: UInt64?
    /// When this step started (the seeding rate is measured from here).
    public var stepSince: Date
    /// When the copy last moved or the step last changed.
    public var progressed: Date
    /// When the beat was written.
    public var updated: Date

    init(pid: Int32, step: String, disk: String? = nil) {
        let now = Date()
        self.pid = pid
        self.step = step
        self.disk = disk
        self.stepSince = now
        self.progressed = now
        self.updated = now
    }
}

/// How the finaliser of a machine is doing, as status sees it.
public enum FinaliserHealth: String, Codable, Sendable {
    /// Its process lives and its beat is fresh.
    case working
    /// Its process lives but its beat is old or its copy has not moved for a long time.
    case stalled
    /// No process finalises this machine.
    case gone
}

/// The finaliser's view of its own work: the step, and the meter of the disk being seeded.
/// Written by the finalising thread, published by a thread of its own every half second.
final class Heartbeat: Sendable {
    private struct State {
        var beat: FinaliserBeat
        var meter: ProgressMeter?
        var lastDone: UInt64 = 0
    }

    private let state: Locked<State>
    private let path: String
    private let stopped = Atomic<Bool>(false)

    init(path: String) {
        self.path = path
        self.state = Locked(State(beat: FinaliserBeat(pid: getpid(), step: "starting")))
    }

    /// Sets the step (and the meter while seeding); a new step counts as progress.
    func set(_ step: String, disk: String? = nil, meter: ProgressMeter? = nil) {
        state.withLock { state in
            guard state.beat.step != step || state.beat.disk != disk || (meter != nil) != (state.meter != nil) else { return }
            let now = Date()
            state.beat.step = step
            state.beat.disk = disk
            state.beat.stepSince = now
            state.beat.progressed = now
            state.beat.done = nil
            state.beat.total = nil
            state.meter = meter
            state.lastDone = 0
        }
        publish()
    }

    /// Writes the beat now.
    func publish() {
        let beat = state.withLock { state -> FinaliserBeat in
            let now = Date()
            if let meter = state.meter {
                let done = UInt64(meter.done)
                if done != state.lastDone { state.beat.progressed = now; state.lastDone = done }
                state.beat.done = done
                state.beat.total = UInt64(meter.total)
            }
            state.beat.updated = now
            return state.beat
        }
        Self.write(beat, to: path)
    }

    /// Publishes every half second on a thread of its own until `stop`.
    func start() {
        Thread { [self] in
            while !stopped.load(ordering: .acquiring) {
                publish()
                Thread.sleep(forTimeInterval: 0.5)
            }
        }.start()
    }

    func stop() { stopped.store(true, ordering: .releasing) }

    static func write(_ beat: FinaliserBeat, to path: String) {
        // Rename into place, no fsync: a beat is worth nothing after a crash anyway.
        guard let bytes = try? JSONEncoder.lifeboat.encode(beat) else { return }
        try? bytes.write(to: URL(fileURLWithPath: path), options: .atomic)
    }
}

extension Recovery {
    /// Longer than this without a beat, a living finaliser is stalled (stopped, or hung in a call).
    static let beatTimeout: TimeInterval = 15
    /// Longer than this without a byte copied, a seeding finaliser is stalled.
    static let seedingTimeout: TimeInterval = 120

    func finaliserPath(_ name: String) -> String { hot.machineDirectory(name) + "/finaliser.json" }

    /// Starts `lifeboat finalise NAME` in the background with this Recovery's settings (it
    /// outlives the command, the console or the plan that started it) and announces it.
    @discardableResult
    public func startFinaliser(_ name: String) throws -> (pid: Int32, log: String) {
        let log = hot.machineDirectory(name) + "/finalise.log"
        var arguments = ["finalise", name] + repository.commandLineArguments + ["--hot", settings.hotDirectory,
                         "--connect", settings.connectURI, "--templates", settings.templates.directory]
        if settings.virtType != .auto { arguments += ["--virt-type", settings.virtType.rawValue] }
        let finaliser = try settings.launcher.start(arguments, log: log)
        announceFinaliser(name, pid: finaliser.pid)
        return (finaliser.pid, log)
    }

    /// Says that process `pid` is (or is about to be) the finaliser of `name`. Written by a
    /// command before it lets go of the machine, so there is no instant without one.
    public func announceFinaliser(_ name: String, pid: Int32 = getpid()) {
        Heartbeat.write(FinaliserBeat(pid: pid, step: "starting"), to: finaliserPath(name))
    }

    /// The finaliser's last beat and how it is doing.
    public func finaliser(_ name: String) -> (beat: FinaliserBeat?, health: FinaliserHealth) {
        guard let data = try? Data(contentsOf: URL(fileURLWithPath: finaliserPath(name))),
              let beat = try? JSONDecoder.lifeboat.decode(FinaliserBeat.self, from: data) else { return (nil, .gone) }
        guard beat.step != "finished", FileSystem.isRunning(beat.pid) else { return (beat, .gone) }
        let now = Date()
        if now.timeIntervalSince(beat.updated) > Self.beatTimeout { return (beat, .stalled) }
        if beat.step == "seeding", now.timeIntervalSince(beat.progressed) > Self.seedingTimeout { return (beat, .stalled) }
        return (beat, .working)
    }

    /// The pid of a lifeboat command at work on `name` right now (holding its lock), if any.
    func commandAtWork(_ name: String) -> pid_t? {
        FileLock.holder(of: hot.lockPath(name))
    }
}
