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
