import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// The user and group libvirt runs QEMU as: the one place that knows them. The FUSE mount lets
/// that group read served disks; recovery VMs' overlays, logs and NBD sockets are given to that
/// user.
public enum QemuUser {
    /// The user from libvirt's qemu.conf (`user = "…"`), else Debian's default `libvirt-qemu`.
    public static func userName(config: String = "/etc/libvirt/qemu.conf") -> String {
        setting("user", config: config) ?? "libvirt-qemu"
    }

    /// The group from libvirt's qemu.conf (`group = "…"`), else Debian's default `libvirt-qemu`.
    public static func groupName(config: String = "/etc/libvirt/qemu.conf") -> String {
        setting("group", config: config) ?? "libvirt-qemu"
    }

    /// A `key = "value"` line of qemu.conf.
    static func setting(_ key: String, config: String) -> String? {
        guard let text = try? String(contentsOfFile: config, encoding: .utf8) else { return nil }
        for line in text.split(separator: "\n") {
            let trimmed = line.trimmingCharacters(in: .whitespaces)
            guard trimmed.hasPrefix(key), let eq = trimmed.firstIndex(of: "=") else { continue }
            guard trimmed[..<eq].trimmingCharacters(in: .whitespaces) == key else { continue }
            let value = trimmed[trimmed.index(after: eq)...].trimmingCharacters(in: .whitespaces)
                .trimmingCharacters(in: CharacterSet(charactersIn: "\""))
            if !value.isEmpty { return value }
        }
        return nil
    }

    /// The gid of that group, or 0 (root only) when it does not exist.
    public static func gid() -> UInt32 {
        let name = groupName()
        if let number = UInt32(name.trimmingCharacters(in: CharacterSet(charactersIn: "+"))) { return number }
        guard let group = getgrnam(name) else { return 0 }
        return group.pointee.gr_gid
    }

    /// Where libvirt keeps a domain's emulated TPM state (swtpm), by domain UUID.
    /// nil for anything but a UUID (the UUID may come from a stored definition: no path from it).
    public static func tpmStatePath(uuid: String) -> String? {
        let hex = uuid.lowercased()
        guard hex.count == 36, hex.allSatisfy({ $0 == "-" || $0.isHexDigit }), UUID(uuidString: hex) != nil else { return nil }
        return "/var/lib/libvirt/swtpm/\(hex)/tpm2/tpm2-00.permall"
    }

    /// Where libvirt keeps UEFI variables files: a stored definition's NVRAM is written back only there.
    public static let nvramFolder = "/var/lib/libvirt/qemu/nvram"

    /// True for a file directly in `nvramFolder` with a plain name (no traversal, no other folder).
    public static func isNVRAMPath(_ path: String) -> Bool {
        let name = (path as NSString).lastPathComponent
        return (path as NSString).deletingLastPathComponent == nvramFolder && !name.hasPrefix(".")
            && name.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || "-_.".contains($0)) }
    }

    /// Puts a TPM state file where libvirt's swtpm for domain `uuid` reads it, owned by the
    /// swtpm user (qemu.conf `swtpm_user`, else Debian's default tss).
    public static func placeTPMState(_ bytes: [UInt8], uuid: String) throws {
        guard let path = tpmStatePath(uuid: uuid) else {
            throw LifeboatError(.invalidArgument, "\(uuid) is not a domain UUID: the TPM state was not placed")
        }
        let folder = (path as NSString).deletingLastPathComponent
        try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
        try FileSystem.writeAtomically(bytes, to: path)
        let name = setting("swtpm_user", config: "/etc/libvirt/qemu.conf") ?? "tss"
        guard let user = getpwnam(name) else { return }
        for item in [(folder as NSString).deletingLastPathComponent, folder, path] {
            chown(item, user.pointee.pw_uid, user.pointee.pw_gid)
        }
        chmod(path, 0o600)
    }

    /// QEMU's uid and gid, or nil when the user does not exist.
    public static func ids() -> (uid: uid_t, gid: gid_t)? {
        let name = userName()
        if let uid = uid_t(name.trimmingCharacters(in: CharacterSet(charactersIn: "+"))) { return (uid, gid()) }
        guard let user = getpwnam(name) else { return nil }
        return (user.pointee.pw_uid, user.pointee.pw_gid)
    }

    /// Makes `path` belong to QEMU's user (mode 0600 for images, 0640 for logs).
    public static func give(_ path: String, mode: mode_t = 0o600) {
        if let ids = ids() { chown(path, ids.uid, ids.gid) }
        chmod(path, mode)
    }
}
