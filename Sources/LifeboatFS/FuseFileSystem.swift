import Foundation
import LifeboatBase
import SystemPackage

/// What a file system served through FUSE answers. Paths are absolute inside the mount
/// ("/", "/web1", …). Errors thrown as `Errno` reach the caller as that errno; any other error
/// becomes EIO. Called from many libfuse threads at once.
public protocol FuseFileSystem: AnyObject, Sendable {
    func attributes(of path: String) throws -> FileAttributes
    func list(_ path: String) throws -> [String]
    func link(_ path: String) throws -> String
    /// Opens a regular file; returns a handle passed to `read`, `seek` and `close`.
    func open(_ path: String) throws -> OpenedFile
    func read(_ handle: UInt64, into buffer: UnsafeMutableRawBufferPointer, at offset: Int) throws -> Int
    /// SEEK_DATA / SEEK_HOLE.
    func seek(_ handle: UInt64, to offset: Int, whence: Int32) throws -> Int
    func close(_ handle: UInt64)
}

public struct FileAttributes: Sendable {
    public enum Kind: Sendable { case directory, file, symlink }
    public var kind: Kind
    public var size: Int
    /// Permission bits only (0o440, 0o550 …).
    public var permissions: UInt32
    public var uid: UInt32
    public var gid: UInt32
    public var modified: Date

    public init(kind: Kind, size: Int, permissions: UInt32, uid: UInt32, gid: UInt32, modified: Date) {
        (self.kind, self.size, self.permissions, self.uid, self.gid, self.modified) = (kind, size, permissions, uid, gid, modified)
    }
}

/// An open file: its handle, and whether reads bypass the kernel's page cache.
public struct OpenedFile: Sendable {
    public var handle: UInt64
    /// Reads go straight to `read` in the caller's size, copied once (no page cache). Also lets
    /// callers open the file with O_DIRECT (QEMU's cache=none).
    public var directIO: Bool
}
