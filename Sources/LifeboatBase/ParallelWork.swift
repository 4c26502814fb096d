import Dispatch
import Foundation
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Hands out item numbers `0..<count` to a few worker threads and rethrows the first error any
/// worker threw; after a failure `take()` returns nil, so the other workers stop early.
package final class ParallelWork: Sendable {
    private let firstError = Locked<(any Error)?>(nil)
    private let failed = Atomic<Bool>(false)
    private let next = Atomic<Int>(0)
    package let count: Int
    /// Threads `run` starts (at most one per item).
    package let threads: Int

    /// - Parameter threads: nil for `workerCount`; more where workers mostly wait for the disk.
    package init(count: Int, threads: Int? = nil) {
        self.count = count
        self.threads = threads ?? Self.workerCount
    }

    /// One more worker than cores, so that a worker waiting for the disk does not leave a core idle.
    package static var workerCount: Int { max(1, System.coreCount) + 1 }

    /// The next item to work on, or nil when all are taken or a worker failed.
    package func take() -> Int? {
        if failed.load(ordering: .relaxed) { return nil }
        let i = next.add(1, ordering: .relaxed).oldValue
        return i < count ? i : nil
    }

    package func fail(_ error: any Error) {
        firstError.withLock { if $0 == nil { $0 = error } }
        failed.store(true, ordering: .relaxed)
    }

    /// Runs `worker` on `threads` threads at once; each call loops over `take()`.
    /// - Parameter background: the threads run at the lowest CPU priority (nice 19), so that
    ///   any other work on the host (points, guests) comes first.
    package func run(background: Bool = false, _ worker: @escaping @Sendable (ParallelWork) throws -> Void) throws {
        let threads = min(self.threads, max(count, 1))
        let group = DispatchGroup()
        for _ in 0..<threads {
            group.enter()
            let thread = Thread { [self] in
                if background { _ = setpriority(__priority_which_t(PRIO_PROCESS.rawValue), id_t(c_gettid()), 19) }   // this thread only
                do { try worker(self) } catch { fail(error) }
                group.leave()
            }
            thread.stackSize = 1 << 20
            thread.start()
        }
        group.wait()
        if let error = firstError.withLock({ $0 }) { throw error }
    }
}

/// A fixed-size array that workers fill at distinct indexes without locking.
package final class SlotArray<Element: Sendable>: @unchecked Sendable {
    // @unchecked: each slot is written by exactly one worker, and read only after `run` returns.
    private let storage: UnsafeMutableBufferPointer<Element>

    package init(count: Int, initial: Element) {
        storage = .allocate(capacity: count)
        storage.initialize(repeating: initial)
    }

    deinit { storage.deallocate() }

    package subscript(i: Int) -> Element {
        get { storage[i] }
        set { storage[i] = newValue }
    }

    package var array: [Element] { Array(storage) }
}

@_silgen_name("gettid") private func c_gettid() -> pid_t

package enum System {
    package static var coreCount: Int { Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))) }
}
