import Synchronization

/// Bytes done out of a total, updated by workers and read by whoever shows progress.
public final class ProgressMeter: Sendable {
    private let totalBytes = Atomic<Int>(0)
    private let doneBytes = Atomic<Int>(0)

    public init() {}

    public var total: Int { totalBytes.load(ordering: .relaxed) }
    public var done: Int { doneBytes.load(ordering: .relaxed) }

    func start(total: Int) {
        totalBytes.store(total, ordering: .relaxed)
        doneBytes.store(0, ordering: .relaxed)
    }

    func add(_ bytes: Int) { doneBytes.add(bytes, ordering: .relaxed) }
}
