import Foundation
import Testing
@testable import LifeboatRepository
#if canImport(Glibc)
import Glibc
#endif

/// A scratch folder removed when the test ends.
final class Scratch {
    let path: String

    init() {
        var template = Array("/tmp/lifeboat-test-XXXXXX".utf8CString)
        path = String(cString: mkdtemp(&template)!)
    }

    deinit { FileSystem.removeTree(path) }

    func file(_ name: String) -> String { path + "/" + name }
}

/// Deterministic bytes: xorshift noise (incompressible) or repeated text (compressible).
struct Bytes {
    static func random(_ count: Int, seed: UInt64) -> [UInt8] {
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

    static func text(_ count: Int, seed: Int) -> [UInt8] {
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

enum Disk {
    /// A sparse file of `size` with `bytes` written at each offset.
    static func make(_ path: String, size: Int, writes: [(Int, [UInt8])]) throws {
        let fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0o644)
        precondition(fd >= 0)
        defer { close(fd) }
        precondition(ftruncate(fd, off_t(size)) == 0)
        for (offset, bytes) in writes { write(fd, at: offset, bytes) }
    }

    static func patch(_ path: String, writes: [(Int, [UInt8])]) {
        let fd = open(path, O_RDWR)
        precondition(fd >= 0)
        defer { close(fd) }
        for (offset, bytes) in writes { write(fd, at: offset, bytes) }
    }

    private static func write(_ fd: CInt, at offset: Int, _ bytes: [UInt8]) {
        bytes.withUnsafeBytes { raw in precondition(pwrite(fd, raw.baseAddress, raw.count, off_t(offset)) == raw.count) }
    }

    static func contents(_ path: String) -> [UInt8] {
        Array(FileManager.default.contents(atPath: path) ?? Data())
    }
}

/// The lifeboat binary next to the test bundle (`swift build` puts both in .build/<config>/).
enum CLI {
    static var binary: String {
        if let env = ProcessInfo.processInfo.environment["LIFEBOAT_BIN"] { return env }
        let packageRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        for config in ["debug", "release"] {
            let candidate = packageRoot.appendingPathComponent(".build/\(config)/lifeboat").path
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        }
        return "lifeboat"
    }

    struct Result { var status: Int32; var stdout: String; var stderr: String }

    /// Runs lifeboat with `arguments`, waiting for it to exit.
    @discardableResult
    static func run(_ arguments: [String], environment: [String: String] = [:]) throws -> Result {
        let process = start(arguments, environment: environment)
        let out = process.standardOutput as! Pipe, err = process.standardError as! Pipe
        let stdoutData = out.fileHandleForReading.readDataToEndOfFile()
        let stderrData = err.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return Result(status: process.terminationStatus, stdout: String(decoding: stdoutData, as: UTF8.self),
                      stderr: String(decoding: stderrData, as: UTF8.self))
    }

    static func start(_ arguments: [String], environment: [String: String] = [:]) -> Process {
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

extension Repository {
    /// Every stored chunk file's path.
    func chunkFiles() throws -> [String] {
        try store.all().map { (store as! LocalChunkStore).path($0) }
    }
}
