import Foundation
import LifeboatBase
#if canImport(Glibc)
import Glibc
#endif

/// What a disk image holds, as QEMU reads it: its format and the size the guest sees.
///
/// Nothing in Lifeboat reads or writes an image as bytes without knowing this: a raw file or a
/// block device holds the guest's bytes; a qcow2 file holds a container that only QEMU's block
/// layer (qemu-nbd) turns into them.
public struct DiskImage: Sendable, Equatable {
    public var path: String
    /// raw or qcow2.
    public var format: String
    /// Bytes the guest sees.
    public var virtualSize: Int
    public var isBlockDevice: Bool

    /// The formats Lifeboat reads and writes (through qemu-nbd when not raw).
    public static let formats: Set<String> = ["raw", "qcow2"]

    public init(path: String, format: String, virtualSize: Int, isBlockDevice: Bool = false) {
        self.path = path
        self.format = format
        self.virtualSize = virtualSize
        self.isBlockDevice = isBlockDevice
    }

    /// Reads an image's format and virtual size with `qemu-img info`. `declared` (the domain XML's,
    /// the one recorded at protect) is trusted and never probed; without it a block device is raw
    /// and a file is probed (at protect only: a guest could write any header into its disk).
    /// - Throws: one line naming the disk and what to do: it cannot be read, or its format is one
    ///   Lifeboat does not handle.
    public static func inspect(_ path: String, declared: String? = nil, what: String = "disk") throws -> DiskImage {
        let block = try FileSystem.checkDisk(path, what: what)
        let format = declared ?? (block ? "raw" : nil)
        if let format, !formats.contains(format) {
            throw unsupported(path, format: format, what: what)
        }
        var arguments = ["qemu-img", "info", "--output=json", "-U"]
        if let format { arguments += ["-f", format] }
        let result: ChildProcess.Output
        do { result = try ChildProcess.run(arguments + [path]) } catch {
            throw LifeboatError(.unsupported, "cannot run qemu-img to read \(what) \(path) (\(error)): install qemu-utils")
        }
        guard result.status == 0 else {
            let reason = result.stderr.split(separator: "\n").first.map(String.init) ?? "exit \(result.status)"
            throw LifeboatError(.invalidArgument, "\(what) \(path) cannot be read as a disk image (\(reason)): check the path and the format")
        }
        struct Info: Decodable {
            var format: String
            var virtualSize: Int
            enum CodingKeys: String, CodingKey { case format, virtualSize = "virtual-size" }
        }
        guard let info = try? JSONDecoder().decode(Info.self, from: Data(result.stdout.utf8)) else {
            throw LifeboatError(.io, "qemu-img info of \(what) \(path) printed what lifeboat cannot read: \(result.stdout.prefix(200))")
        }
        guard formats.contains(info.format) else { throw unsupported(path, format: info.format, what: what) }
        return DiskImage(path: path, format: info.format, virtualSize: info.virtualSize, isBlockDevice: block)
    }

    static func unsupported(_ path: String, format: String, what: String) -> LifeboatError {
        LifeboatError(.unsupported,
            "\(what) \(path) is a \(format) image, which lifeboat does not read: convert it to qcow2 (qemu-img convert -O qcow2 \(path) NEW.qcow2) and use the copy")
    }

    /// Creates an empty qcow2 image of `size` guest bytes (an original disk that is gone, for failback).
    public static func createQcow2(_ path: String, size: Int) throws {
        let result = try ChildProcess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, String(size)])
        guard result.status == 0 else {
            throw LifeboatError(.io, "cannot create the qcow2 image \(path): \(result.stderr)")
        }
    }
}

/// A disk image served over NBD by qemu-nbd on a Unix socket, so that its guest bytes can be
/// read (and, when writable, written) whatever its format. Stopped by `stop()` or deinit.
public final class ImageExport: @unchecked Sendable {
    // @unchecked: all stored properties are constants.
    public let socket: String
    public let export: String
    private let pidFile: String

    /// Starts qemu-nbd for `image` with its socket and pid file in `folder` (QEMU's user need not
    /// reach it: qemu-nbd runs as root).
    public init(_ image: DiskImage, name: String, in folder: String, writable: Bool = false) throws {
        self.export = name
        socket = folder + "/\(name).sock"
        pidFile = folder + "/\(name).pid"
        unlink(socket)
        var arguments = ["qemu-nbd", "--fork", "--persistent", "--shared=16", "--format=\(image.format)",
                         "--export-name=\(name)", "--socket=\(socket)", "--pid-file=\(pidFile)"]
        arguments += writable ? ["--cache=writeback", "--discard=unmap"] : ["--read-only"]
        let result = try ChildProcess.run(arguments + [image.path])
        guard result.status == 0 else {
            throw LifeboatError(.io, "cannot serve \(image.path) with qemu-nbd: \(result.stderr.split(separator: "\n").first ?? "")")
        }
    }

    /// Stops qemu-nbd (it flushes a writable image to disk on SIGTERM) and waits for it to exit.
    public func stop() {
        guard let text = try? String(contentsOfFile: pidFile, encoding: .utf8),
              let pid = pid_t(text.trimmingCharacters(in: .whitespacesAndNewlines)) else { return }
        kill(pid, SIGTERM)
        for _ in 0..<300 where kill(pid, 0) == 0 { usleep(20_000) }
        if kill(pid, 0) == 0 { kill(pid, SIGKILL) }   // it flushed what it was asked to (flush is explicit)
        unlink(pidFile)
        unlink(socket)
    }

    deinit { stop() }
}
