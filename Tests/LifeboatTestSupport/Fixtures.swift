import Foundation
import LifeboatRepository
#if canImport(Glibc)
import Glibc
#endif

/// A scratch folder removed when the test ends.
public final class Scratch {
    public let path: String

    public init() {
        var template = Array("/tmp/lifeboat-test-XXXXXX".utf8CString)
        path = String(cString: mkdtemp(&template)!)
    }

    deinit {
        // Unmount anything a failed test left below the scratch folder before deleting it.
        let mounts = (try? String(contentsOfFile: "/proc/self/mounts", encoding: .utf8)) ?? ""
        for line in mounts.split(separator: "\n").reversed() {
            let target = line.split(separator: " ")[1]
            if target.hasPrefix(path + "/") { umount2(String(target), Int32(MNT_DETACH)) }
        }
        _ = try? FileManager.default.removeItem(atPath: path)
    }

    public func file(_ name: String) -> String { path + "/" + name }
}

/// Deterministic bytes: xorshift noise (incompressible) or repeated text (compressible).
public struct Bytes {
    public static func random(_ count: Int, seed: UInt64) -> [UInt8] {
        var state = seed | 1
        var out = [UInt8](repeating: 0, count: count)
        out.withUnsafeMutableBytes { raw in
            let words = raw.bindMemory(to: UInt64.self)
            for i in 0..<words.count {
                state ^= state << 13; state ^= state >> 7; state ^= state << 17
                words[i] = state
            }
        }
        return out
    }

    public static func text(_ count: Int, seed: Int) -> [UInt8] {
        var out = [UInt8]()
        out.reserveCapacity(count + 100)
        var line = seed
        while out.count < count {
            out += Array("line \(line) of a compressible file, seed \(seed)\n".utf8)
            line += 1
        }
        return Array(out.prefix(count))
    }
}

public enum Disk {
    /// A sparse file of `size` with `bytes` written at each offset.
    public static func make(_ path: String, size: Int, writes: [(Int, [UInt8])]) throws {
        let fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0o644)
        precondition(fd >= 0)
        defer { close(fd) }
        precondition(ftruncate(fd, off_t(size)) == 0)
        for (offset, bytes) in writes { write(fd, at: offset, bytes) }
    }

    public static func patch(_ path: String, writes: [(Int, [UInt8])]) {
        let fd = open(path, O_RDWR)
        precondition(fd >= 0)
        defer { close(fd) }
        for (offset, bytes) in writes { write(fd, at: offset, bytes) }
    }

    private static func write(_ fd: CInt, at offset: Int, _ bytes: [UInt8]) {
        bytes.withUnsafeBytes { raw in precondition(pwrite(fd, raw.baseAddress, raw.count, off_t(offset)) == raw.count) }
    }

    public static func contents(_ path: String) -> [UInt8] {
        Array(FileManager.default.contents(atPath: path) ?? Data())
    }
}

/// The lifeboat binary next to the test bundle (`swift build` puts both in .build/<config>/).
public enum CLI {
    public static var binary: String {
        if let env = ProcessInfo.processInfo.environment["LIFEBOAT_BIN"] { return env }
        for config in ["debug", "release"] {
            let candidate = packageRoot + "/.build/\(config)/lifeboat"
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        }
        return "lifeboat"
    }

    public struct Result { public var status: Int32; public var stdout: String; public var stderr: String }

    /// Runs lifeboat with `arguments`, waiting for it to exit.
    @discardableResult
    public static func run(_ arguments: [String], environment: [String: String] = [:]) throws -> Result {
        let process = start(arguments, environment: environment)
        let out = process.standardOutput as! Pipe, err = process.standardError as! Pipe
        let stdoutData = out.fileHandleForReading.readDataToEndOfFile()
        let stderrData = err.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return Result(status: process.terminationStatus, stdout: String(decoding: stdoutData, as: UTF8.self),
                      stderr: String(decoding: stderrData, as: UTF8.self))
    }

    public static func start(_ arguments: [String], environment: [String: String] = [:]) -> Process {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: binary)
        process.arguments = arguments
        process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        process.standardOutput = Pipe()
        process.standardError = Pipe()
        process.standardInput = FileHandle.nullDevice
        try! process.run()
        return process
    }
}

/// The package's root folder (for scripts/).
public var packageRoot: String {
    URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path
}

/// Runs a script or system command, failing the caller on a non-zero exit.
@discardableResult
public func sh(_ arguments: [String], environment: [String: String] = [:]) throws -> String {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    process.arguments = arguments
    process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
    let out = Pipe(), err = Pipe()
    process.standardOutput = out
    process.standardError = err
    try process.run()
    let stdout = out.fileHandleForReading.readDataToEndOfFile()
    let stderr = err.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    guard process.terminationStatus == 0 else {
        throw ShellError(description: "\(arguments.joined(separator: " ")) failed (\(process.terminationStatus)): \(String(decoding: stderr, as: UTF8.self))")
    }
    return String(decoding: stdout, as: UTF8.self)
}

/// Starts a program that daemonizes (libvirtd -d). It gets /dev/null and none of this process's
/// other file descriptors: a daemon that kept a pipe of ours open would make `sh` wait for ever.
public func startDaemon(_ arguments: [String]) throws {
    let code = "import subprocess, sys; sys.exit(subprocess.Popen(sys.argv[1:], close_fds=True, stdin=subprocess.DEVNULL, "
        + "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).wait())"
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
    process.arguments = ["-c", code] + arguments
    process.standardInput = FileHandle.nullDevice
    process.standardOutput = FileHandle.nullDevice
    process.standardError = FileHandle.nullDevice
    try process.run()
    process.waitUntilExit()
    guard process.terminationStatus == 0 else {
        throw ShellError(description: "\(arguments.joined(separator: " ")) failed (\(process.terminationStatus))")
    }
}

public struct ShellError: Error, CustomStringConvertible {
    public let description: String
    public init(description: String) { self.description = description }
}

/// The bootable demo disk from scripts/make-demo-disk (its kernel and initramfs are cached).
public enum DemoDisk {
    public static let dataOffset = 64 << 20

    /// With `uefi`: a GPT disk with an EFI system partition (syslinux-efi), booted by OVMF.
    public static func make(_ path: String, marker: String, uefi: Bool = false) throws {
        try sh([packageRoot + "/scripts/make-demo-disk", path, "--marker", marker] + (uefi ? ["--uefi"] : []))
    }

    public static func setMarker(_ path: String, _ marker: String) throws {
        try sh([packageRoot + "/scripts/set-demo-marker", path, marker])
    }

    /// Writes `/NAME` on the data partition (`boot.sh` there runs at every boot).
    public static func writeFile(_ path: String, name: String, _ text: String) throws {
        try sh([packageRoot + "/scripts/set-demo-marker", path, text, "--file", name])
    }

    /// Reads `/NAME` from the data partition.
    public static func readFile(_ path: String, name: String) throws -> String {
        try sh(["debugfs", "-R", "cat /\(name)", "\(path)?offset=\(dataOffset)"])
    }
}

/// The second radosgw scripts/ceph-rgw starts over the same store, for tests that stop an
/// endpoint: they hold `outage` while they run, so two of them never stop it at once, and tests
/// using the first gateway never see it go.
public enum SpareGateway {
    nonisolated(unsafe) public static let outage = NSLock()

    public static var endpoint: String {
        ProcessInfo.processInfo.environment["LIFEBOAT_S3_ENDPOINT_SPARE"] ?? "http://127.0.0.1:7481"
    }

    public static func stop() throws { try sh([packageRoot + "/scripts/ceph-rgw", "stop-gateway", "spare"]) }
    public static func start() throws { try sh([packageRoot + "/scripts/ceph-rgw", "start-gateway", "spare"]) }

    /// Runs `body` holding the outage lock; the spare gateway is running again afterwards.
    public static func exclusively<T>(_ body: () throws -> T) throws -> T {
        outage.lock()
        defer {
            _ = try? start()
            outage.unlock()
        }
        return try body()
    }
}
