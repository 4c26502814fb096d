import Foundation
import LifeboatBase
import LifeboatRepository

/// A change to a machine's recovery-server settings, as `protect` and `configure` (and anything
/// else that edits a machine) take it: nil leaves a setting as it is, an empty text clears an
/// optional one. Checked here, once, with the same parsers the recovery code uses (an address
/// `protect` takes is one a drill can use).
public struct MachineSettings: Sendable {
    public var vcpus: Int?
    public var memoryMiB: Int?
    public var mac: String?
    public var ip: String?
    public var gateway: String?
    public var testIP: String?
    public var rpo: String?
    public var description: String?
    public var virtType: String?
    public var bootPattern: String?
    /// bios or uefi; machine type (pc, q35 …); disk bus (virtio, sata, scsi): for disk-file
    /// machines (a domain's recovery VM has its domain's).
    public var firmware: String?
    public var machineType: String?
    public var diskBus: String?
    public var network: String?
    public var bridge: String?
    public var every: String?
    public var bandwidthMiB: Int?
    public var keepLast: Int?
    public var keepHourly: Int?
    public var keepDaily: Int?
    public var keepWeekly: Int?
    public var keepMonthly: Int?
    public var keepWithin: String?

    public init() {}

    /// Refuses the first setting that is wrong, in a sentence naming its option and what it takes.
    public func validate() throws {
        func bad(_ text: String) -> LifeboatError { LifeboatError(.invalidArgument, text) }
        if let vcpus, vcpus < 1 { throw bad("--vcpus must be at least 1") }
        if let bandwidthMiB, bandwidthMiB < 0 { throw bad("--bandwidth is in MiB/s and must be 0 (no limit) or more") }
        if let memoryMiB, memoryMiB < 32 { throw bad("--memory is in MiB and must be at least 32") }
        if let mac, !Self.isMAC(mac) { throw bad("--mac \(mac) is not a MAC address like 52:54:00:12:34:56") }
        for (flag, value) in [("--ip", ip), ("--test-ip", testIP)] {
            if let value, !value.isEmpty { _ = try Interface4.parse(value, what: flag) }
        }
        if let gateway, !gateway.isEmpty, IPv4(gateway) == nil { throw bad("--gateway \(gateway) is not an IPv4 address") }
        if let virtType, !virtType.isEmpty { _ = try VirtType.parse(virtType, what: "--virt-type") }
        if let bootPattern { _ = try Recovery.bootPattern(bootPattern, what: "--boot-pattern") }
        if let firmware, !firmware.isEmpty, !["bios", "uefi"].contains(firmware) { throw bad("--firmware takes bios or uefi, not \(firmware)") }
        if let diskBus, !diskBus.isEmpty, !["virtio", "sata", "scsi"].contains(diskBus) {
            throw bad("--disk-bus takes virtio, sata or scsi, not \(diskBus)")
        }
        if let machineType, !machineType.isEmpty,
           !machineType.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "-" || $0 == "." || $0 == "_") }) {
            throw bad("--machine \(machineType) is not a QEMU machine type like pc, q35 or pc-q35-7.2")
        }
        if let network, let bridge, !network.isEmpty, !bridge.isEmpty { throw bad("give --network or --bridge, not both") }
        for (flag, value) in [("--rpo", rpo), ("--every", every), ("--keep-within", keepWithin)] {
            if let value, !value.isEmpty, (try? DurationText.parse(value)) == nil {
                throw bad("\(flag) \(value) is not a duration like 30s, 15m, 4h or 7d")
            }
        }
        for (flag, value) in [("--keep-last", keepLast), ("--keep-hourly", keepHourly), ("--keep-daily", keepDaily),
                              ("--keep-weekly", keepWeekly), ("--keep-monthly", keepMonthly)] {
            if let value, value < 0 { throw bad("\(flag) must be 0 or more") }
        }
    }

    /// Applies the given settings to `machine` (validate first).
    public func apply(to machine: inout Machine) throws {
        func optional(_ value: String?, _ current: String?) -> String? {
            guard let value else { return current }
            return value.isEmpty ? nil : value
        }
        if let vcpus { machine.vcpus = vcpus }
        if let memoryMiB { machine.memoryMiB = memoryMiB }
        if let mac { machine.macs = [mac.lowercased()] + machine.macs.dropFirst() }
        machine.ip = optional(ip, machine.ip)
        machine.gateway = optional(gateway, machine.gateway)
        machine.testIP = optional(testIP, machine.testIP)
        if let rpo { machine.rpoSeconds = rpo.isEmpty ? nil : Int(try DurationText.parse(rpo)) }
        machine.description = optional(description, machine.description)
        machine.virtType = optional(virtType, machine.virtType)
        machine.bootPattern = optional(bootPattern, machine.bootPattern)
        machine.firmware = optional(firmware, machine.firmware)
        machine.machineType = optional(machineType, machine.machineType)
        machine.diskBus = optional(diskBus, machine.diskBus)
        machine.network = optional(network, machine.network)
        machine.bridge = optional(bridge, machine.bridge)
        if network?.isEmpty == false { machine.bridge = nil }
        if bridge?.isEmpty == false { machine.network = nil }
        if let bandwidthMiB { machine.bandwidth = bandwidthMiB == 0 ? nil : bandwidthMiB }
        if let every { machine.everySeconds = every.isEmpty ? nil : max(1, Int(try DurationText.parse(every))) }
        if keepLast != nil || keepHourly != nil || keepDaily != nil || keepWeekly != nil || keepMonthly != nil || keepWithin != nil {
            var policy = machine.retention ?? RetentionPolicy()
            if let keepLast { policy.last = keepLast }
            if let keepHourly { policy.hourly = keepHourly }
            if let keepDaily { policy.daily = keepDaily }
            if let keepWeekly { policy.weekly = keepWeekly }
            if let keepMonthly { policy.monthly = keepMonthly }
            if let keepWithin { policy.within = keepWithin.isEmpty ? nil : try DurationText.parse(keepWithin) }
            machine.retention = policy.isEmpty ? nil : policy
        }
    }

    /// Six pairs of hex digits separated by colons.
    public static func isMAC(_ text: String) -> Bool {
        let parts = text.split(separator: ":", omittingEmptySubsequences: false)
        return parts.count == 6 && parts.allSatisfy { $0.count == 2 && $0.allSatisfy(\.isHexDigit) }
    }

    /// A random locally administered MAC in QEMU's 52:54:00 range.
    public static func randomMAC() -> String {
        "52:54:00:" + (0..<3).map { _ in String(format: "%02x", Int.random(in: 0...255)) }.joined(separator: ":")
    }
}
