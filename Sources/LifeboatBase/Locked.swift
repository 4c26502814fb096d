import Foundation

/// A value guarded by a pthread mutex (Foundation's NSLock).
///
/// Lifeboat uses it instead of `Synchronization.Mutex`: the standard library's Mutex waits on a
/// futex in code built without the thread sanitizer, so a sanitizer run reports every access
/// it guards as a race; a pthread mutex is seen, and real races stay visible.
public final class Locked<Value: ~Copyable>: @unchecked Sendable {
    private let lock = NSLock()
    private var value: Value

    public init(_ value: consuming sending Value) {
        self.value = value
    }

    public func withLock<Result: ~Copyable, E: Error>(
        _ body: (inout sending Value) throws(E) -> sending Result
    ) throws(E) -> sending Result {
        lock.lock()
        defer { lock.unlock() }
        return try body(&value)
    }
}
