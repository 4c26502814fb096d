import Foundation
import Subprocess
import Synchronization
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// The one way Lifeboat runs other programs, on swift-subprocess: a command whose output is
/// collected, a script in a process group of its own with a time limit, and a detached daemon.
///
/// The functions block the calling thread until swift-subprocess is done; the library is
/// synchronous above this point. Never call them from an async context (a cooperative thread
/// blocked here could be the one the subprocess needs): async code awaits swift-subprocess itself.
package enum ChildProcess {
    /// What a finished command left.
    package struct Output: Sendable {
        /// Exit status; 128+signal when a signal ended it.
        package var status: Int32
        package var stdout: String
        package var stderr: String
    }

    /// Runs `arguments` (the first is looked up in PATH) with stdin from /dev/null and waits.
    ///
    /// Output goes through temporary files rather than pipes: a command that leaves a daemon
    /// behind (fusefat, for one) would otherwise hold a pipe open forever.
    /// - Throws: `.notFound` when the program cannot be started.
    package static func run(_ arguments: [String]) throws -> Output {
        let base = "/tmp/lifeboat-command-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { unlink(base + ".out"); unlink(base + ".err") }
        let out = try openLog(base + ".out", append: false)
        let err = try openLog(base + ".err", append: false)
        let status = try blocking { () async throws -> Int32 in
            let result = try await Subprocess.run(
                .name(arguments[0]), arguments: Arguments(Array(arguments.dropFirst())),
                input: .none, output: .fileDescriptor(out, closeAfterSpawningProcess: true),
                error: .fileDescriptor(err, closeAfterSpawningProcess: true))
            return exitCode(result.terminationStatus)
        } failed: { error in
            LifeboatError(.notFound, "cannot run \(arguments[0]): \(reason(error)) (is it installed?)")
        }
        let stdout = (try? String(contentsOfFile: base + ".out", encoding: .utf8)) ?? ""
        let stderr = (try? String(contentsOfFile: base + ".err", encoding: .utf8)) ?? ""
        return Output(status: status, stdout: stdout, stderr: stderr.trimmingCharacters(in: .whitespacesAndNewlines))
    }

    /// How a script run ended.
    package struct Outcome: Sendable {
        /// Exit status; 128+signal when a signal ended it.
        package var status: Int32
        /// True when the time limit ran out and the process group was killed.
        package var timedOut: Bool
    }

    /// Runs `/bin/sh -c script` in a process group of its own, with `environment` added to ours,
    /// stdin from /dev/null and stdout and stderr into `log` (truncated first). When `timeout`
    /// runs out, the whole group gets SIGTERM, then SIGKILL a second later. It runs in
    /// `workingDirectory` when given, else in ours.
    package static func runScript(_ script: String, environment: [String: String], log: String,
                                  timeout: TimeInterval, workingDirectory: String? = nil) throws -> Outcome {
        let output = try openLog(log, append: false, mode: 0o644)
        let options = { var options = PlatformOptions(); options.processGroupID = 0; return options }()
        let updates = Dictionary(uniqueKeysWithValues: environment.compactMap { key, value in
            Environment.Key(rawValue: key).map { ($0, Optional(value)) }
        })
        let watch = ScriptWatch()
        let status = try blocking { () async throws -> Int32 in
            let timer = Task { [watch] in
                try await Task.sleep(for: .seconds(timeout))
                let pid = watch.group.load(ordering: .acquiring)
                guard pid > 0, !watch.finished.load(ordering: .acquiring) else { return }
                watch.timedOut.store(true, ordering: .releasing)
                kill(-pid, SIGTERM)
                try await Task.sleep(for: .seconds(1))
                if !watch.finished.load(ordering: .acquiring) { kill(-pid, SIGKILL) }
            }
            defer { timer.cancel() }
            let result = try await Subprocess.run(
                .path("/bin/sh"), arguments: ["-c", script], environment: .inherit.updating(updates),
                workingDirectory: workingDirectory.map { FilePath($0) }, platformOptions: options, input: .none, output: .fileDescriptor(output, closeAfterSpawningProcess: true),
                error: .combinedWithOutput
            ) { execution in
                watch.group.store(execution.processIdentifier.value, ordering: .releasing)
            }
            watch.finished.store(true, ordering: .releasing)
            return exitCode(result.terminationStatus)
        } failed: { error in
            LifeboatError(.io, "cannot run the script \(script): \(reason(error))")
        }
        return Outcome(status: status, timedOut: watch.timedOut.load(ordering: .acquiring))
    }

    /// What the time limit of `runScript` needs to see: the script's process group and whether it ended.
    private final class ScriptWatch: Sendable {
        let group = Atomic<pid_t>(0)
        let finished = Atomic<Bool>(false)
        let timedOut = Atomic<Bool>(false)
    }

    /// A program started by `startDetached`.
    package final class Detached: Sendable {
        package let pid: pid_t
        private let ended = Atomic<Bool>(false)

        init(pid: pid_t) { self.pid = pid }

        /// True once it exited (it is reaped here while this process lives).
        package var hasExited: Bool { ended.load(ordering: .acquiring) }

        func markEnded() { ended.store(true, ordering: .releasing) }
    }

    /// Starts `executable arguments` in a session of its own (not killed with our terminal), stdin
    /// from `input`, stdout and stderr appended to `log`, holding none of our file descriptors.
    /// It outlives this process; while this process lives, it is reaped here when it exits.
    package static func startDetached(_ executable: String, _ arguments: [String], input: [UInt8], log: String) throws -> Detached {
        let output = try openLog(log, append: true)
        let options = { var options = PlatformOptions(); options.createSession = true; return options }()
        let started = Locked<Result<Detached, LifeboatError>?>(nil)
        let signal = DispatchSemaphore(value: 0)
        Task.detached {
            do {
                _ = try await Subprocess.run(
                    .path(FilePath(executable)), arguments: Arguments(arguments), platformOptions: options,
                    input: .array(input), output: .fileDescriptor(output, closeAfterSpawningProcess: true),
                    error: .combinedWithOutput
                ) { execution in
                    started.withLock { $0 = .success(Detached(pid: execution.processIdentifier.value)) }
                    signal.signal()
                }
                started.withLock { if case .success(let process) = $0 { process.markEnded() } }
            } catch {
                let failed = started.withLock { state -> Bool in
                    guard state == nil else { return false }
                    state = .failure(LifeboatError(.io, "cannot start \(executable): \(reason(error))"))
                    return true
                }
                if failed { signal.signal() }
            }
        }
        signal.wait()
        return try started.withLock { $0! }.get()
    }

    // MARK: - helpers

    /// Runs `body` on the concurrency pool and waits for it on this (non-async) thread.
    private static func blocking<T: Sendable>(_ body: @escaping @Sendable () async throws -> T,
                                              failed: @escaping @Sendable (any Error) -> LifeboatError) throws -> T {
        let result = Locked<Result<T, LifeboatError>?>(nil)
        let done = DispatchSemaphore(value: 0)
        Task.detached {
            do {
                let value = try await body()
                result.withLock { $0 = .success(value) }
            } catch {
                result.withLock { $0 = .failure(failed(error)) }
            }
            done.signal()
        }
        done.wait()
        return try result.withLock { $0! }.get()
    }

    private static func openLog(_ path: String, append: Bool, mode: mode_t = 0o600) throws -> FileDescriptor {
        do {
            return try FileDescriptor.open(FilePath(path), .writeOnly,
                                           options: append ? [.create, .append, .closeOnExec] : [.create, .truncate, .closeOnExec],
                                           permissions: FilePermissions(rawValue: mode))
        } catch {
            throw LifeboatError.io(error, "cannot open", path)
        }
    }

    private static func exitCode(_ status: TerminationStatus) -> Int32 {
        switch status {
        case .exited(let code): return code
        case .signaled(let signal): return 128 + signal
        }
    }

    /// swift-subprocess's error without its code prefix: the underlying errno text when there is one.
    private static func reason(_ error: any Error) -> String {
        if let error = error as? SubprocessError, let underlying = error.underlyingError {
            return String(cString: strerror(underlying.rawValue))
        }
        return "\(error)"
    }
}

/// Re-runs the lifeboat binary for its helper processes: the mount daemon (LifeboatFS), the
/// finaliser (LifeboatRecovery), the backup guard (LifeboatReplication). Each module adds the
/// arguments of its own helper; the CLI only says where the binary is and what the repository's
/// password is (given to helpers on stdin, never in their arguments).
public struct SelfLauncher: Sendable {
    public var executable: String
    public var password: String?

    public init(executable: String = SelfLauncher.currentExecutable(), password: String? = nil) {
        self.executable = executable
        self.password = password
    }

    /// This process's binary.
    public static func currentExecutable() -> String {
        (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
    }

    /// `lifeboat ARGUMENTS [--password-stdin]` in a session of its own, its output appended to `log`.
    package func start(_ arguments: [String], log: String, passPassword: Bool = true) throws -> ChildProcess.Detached {
        let withPassword = passPassword && password != nil
        return try ChildProcess.startDetached(executable, arguments + (withPassword ? ["--password-stdin"] : []),
                                              input: withPassword ? Array((password! + "\n").utf8) : [], log: log)
    }
}
