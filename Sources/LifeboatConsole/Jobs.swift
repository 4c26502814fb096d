import Foundation
import LifeboatBase
import LifeboatRepository
import Synchronization

/// Long work started from the console (a point, a drill, a failover…): it runs on a thread of
/// its own, and its lines and bytes are what the job page and GET /api/v1/jobs/ID show.
public struct ConsoleJob: Codable, Sendable {
    public enum State: String, Codable, Sendable { case running, succeeded, failed }

    public var id: String
    /// backup, test-failover, stop-test, failover, change-point, commit, cancel-failover, failback.
    public var action: String
    public var machine: String
    public var user: String
    public var started: Date
    public var ended: Date?
    public var state: State
    /// What the work said so far, oldest first.
    public var lines: [String]
    public var bytesDone: Int?
    public var bytesTotal: Int?
    /// Bytes per second and seconds left, while bytes are counted.
    public var rate: Double?
    public var eta: Double?
    /// The outcome in a sentence, once it ended well.
    public var message: String?
    /// Why it failed.
    public var error: String?
    /// What the work made: the drill's id, the point's id.
    public var drill: String?
    public var point: String?
}

/// What a job's work reports through.
public final class JobHandle: Sendable {
    public let id: String
    public let meter = ProgressMeter()
    let board: JobBoard

    init(id: String, board: JobBoard) {
        self.id = id
        self.board = board
    }

    /// A line of progress ("VM started", "boot line seen…").
    public func say(_ line: String) { board.update(id) { $0.lines.append(line) } }

    public func made(drill: String? = nil, point: String? = nil) {
        board.update(id) { job in
            if let drill { job.drill = drill }
            if let point { job.point = point }
        }
    }
}

/// The console's jobs: at most one running per machine; the last 200 kept in memory.
public final class JobBoard: Sendable {
    private let jobs = Locked<[ConsoleJob]>([])
    private let meters = Locked<[String: (meter: ProgressMeter, since: Date)]>([:])
    private let finished = Atomic<Int>(0)
    static let kept = 200

    public init() {}

    /// Counts jobs that ended: the status cache is stale when this changes.
    public var generation: Int { finished.load(ordering: .acquiring) }

    public func all() -> [ConsoleJob] { jobs.withLock { $0 }.map(withProgress).reversed() }

    public func job(_ id: String) -> ConsoleJob? { jobs.withLock { $0.first { $0.id == id } }.map(withProgress) }

    /// Starts `work` for `machine` on a thread; refuses while another job of that machine runs.
    /// The work returns the sentence that ends the job; an error fails it with its message.
    public func start(_ action: String, machine: String, user: String,
                      work: @escaping @Sendable (JobHandle) throws -> String) throws -> ConsoleJob {
        let job = try jobs.withLock { jobs -> ConsoleJob in
            if let busy = jobs.last(where: { $0.machine == machine && $0.state == .running }) {
                throw LifeboatError(.busy, "\(machine) is busy with \(busy.action) started by \(busy.user) at \(Timestamp.format(busy.started)): wait for it to end (job \(busy.id))")
            }
            let id = Repository.pointID(for: Date(), existing: Set(jobs.map(\.id)))
            let job = ConsoleJob(id: id, action: action, machine: machine, user: user, started: Date(), state: .running, lines: [])
            jobs.append(job)
            if jobs.count > Self.kept, let old = jobs.firstIndex(where: { $0.state != .running }) { jobs.remove(at: old) }
            return job
        }
        let handle = JobHandle(id: job.id, board: self)
        meters.withLock { $0[job.id] = (handle.meter, Date()) }
        let thread = Thread { [self] in
            var outcome: Result<String, any Error>
            do { outcome = .success(try work(handle)) } catch { outcome = .failure(error) }
            let meter = meters.withLock { $0.removeValue(forKey: job.id) }
            update(job.id) { job in
                job.ended = Date()
                if let meter, meter.meter.total > 0 {
                    job.bytesDone = meter.meter.done
                    job.bytesTotal = meter.meter.total
                }
                switch outcome {
                case .success(let message):
                    job.state = .succeeded
                    job.message = message
                case .failure(let error):
                    job.state = .failed
                    job.error = (error as? LifeboatError)?.message ?? "\(error)"
                }
            }
            finished.add(1, ordering: .releasing)
        }
        thread.name = "lifeboat-console-\(action)"
        thread.start()
        return job
    }

    func update(_ id: String, _ change: (inout ConsoleJob) -> Void) {
        jobs.withLock { jobs in
            guard let index = jobs.firstIndex(where: { $0.id == id }) else { return }
            change(&jobs[index])
        }
    }

    /// The job with its meter's bytes, rate and ETA while it runs.
    private func withProgress(_ job: ConsoleJob) -> ConsoleJob {
        guard job.state == .running, let (meter, since) = meters.withLock({ $0[job.id] }), meter.total > 0 else { return job }
        var job = job
        job.bytesDone = meter.done
        job.bytesTotal = meter.total
        let elapsed = Date().timeIntervalSince(since)
        if elapsed > 0.5, meter.done > 0 {
            let rate = Double(meter.done) / elapsed
            job.rate = rate
            job.eta = Double(max(0, meter.total - meter.done)) / rate
        }
        return job
    }
}
