import Foundation
import LifeboatBase
#if canImport(FoundationXML)
import FoundationXML
#endif

/// A source domain's definition (its inactive XML, as a point keeps it) and the recovery VM made
/// from it: the same firmware, machine type, CPU, disks on their buses and targets with their boot
/// order, NICs with their models and MACs, agent channel, TPM and video; its disks pointed at the
/// overlays over the point, its NICs at the networks lifeboat chooses, host-only parts dropped
/// and named.
public struct DomainDefinition {
    public let xml: String
    private let document: XMLDocument

    public init(xml: String) throws {
        self.xml = xml
        do { document = try XMLDocument(xmlString: xml) } catch {
            throw LifeboatError(.damaged, "the stored domain definition does not parse: \(error)")
        }
        guard document.rootElement()?.name == "domain" else {
            throw LifeboatError(.damaged, "the stored domain definition is not a libvirt <domain>")
        }
    }

    private var root: XMLElement { document.rootElement()! }

    private func first(_ path: String) -> XMLElement? {
        (try? document.nodes(forXPath: path))?.first as? XMLElement
    }

    private func all(_ path: String) -> [XMLElement] {
        ((try? document.nodes(forXPath: path)) ?? []).compactMap { $0 as? XMLElement }
    }

    /// The hardware it describes.
    public var hardware: MachineHardware {
        let loader = first("/domain/os/loader")?.stringValue?.trimmingCharacters(in: .whitespacesAndNewlines)
        let efi = loader != nil || first("/domain/os")?.attribute(forName: "firmware")?.stringValue == "efi"
        let memory = first("/domain/memory").map { Self.mebibytes($0) } ?? 0
        let cpu = first("/domain/cpu").flatMap { element in
            element.attribute(forName: "mode")?.stringValue.flatMap { $0 == "custom" ? nil : $0 }
                ?? (element.elements(forName: "model").first?.stringValue)
        }
        let disks = all("/domain/devices/disk").filter { ($0.attribute(forName: "device")?.stringValue ?? "disk") == "disk" }.compactMap { disk -> MachineHardware.Disk? in
            guard let target = disk.elements(forName: "target").first?.attribute(forName: "dev")?.stringValue else { return nil }
            return MachineHardware.Disk(
                target: target, bus: disk.elements(forName: "target").first?.attribute(forName: "bus")?.stringValue ?? "virtio",
                format: disk.elements(forName: "driver").first?.attribute(forName: "type")?.stringValue ?? "raw",
                bootOrder: disk.elements(forName: "boot").first?.attribute(forName: "order")?.stringValue.flatMap { Int($0) })
        }
        let nics = all("/domain/devices/interface").map { nic in
            let source = nic.elements(forName: "source").first
            return MachineHardware.NIC(
                mac: nic.elements(forName: "mac").first?.attribute(forName: "address")?.stringValue ?? "",
                model: nic.elements(forName: "model").first?.attribute(forName: "type")?.stringValue ?? "rtl8139",
                network: source?.attribute(forName: "network")?.stringValue, bridge: source?.attribute(forName: "bridge")?.stringValue)
        }
        let agent = all("/domain/devices/channel/target").contains { $0.attribute(forName: "name")?.stringValue == "org.qemu.guest_agent.0" }
        let tpm = first("/domain/devices/tpm").map { tpm in
            [tpm.attribute(forName: "model")?.stringValue, tpm.elements(forName: "backend").first?.attribute(forName: "version")?.stringValue]
                .compactMap { $0 }.joined(separator: " ")
        }
        return MachineHardware(
            domain: first("/domain/name")?.stringValue ?? "?", firmware: efi ? "uefi" : "bios", loader: loader,
            machine: first("/domain/os/type")?.attribute(forName: "machine")?.stringValue, cpu: cpu,
            vcpus: Int(first("/domain/vcpu")?.stringValue?.trimmingCharacters(in: .whitespaces) ?? "") ?? 1,
            memoryMiB: memory, disks: disks, nics: nics, agent: agent, tpm: tpm,
            video: first("/domain/devices/video/model")?.attribute(forName: "type")?.stringValue)
    }

    /// The domain's UUID, if the definition gives one.
    public var uuid: String? {
        first("/domain/uuid")?.stringValue?.trimmingCharacters(in: .whitespacesAndNewlines).nilIfEmpty
    }

    /// Where a recovery VM's firmware may come from.
    public static let firmwareFolders = ["/usr/share/OVMF/", "/usr/share/qemu/", "/usr/share/seabios/", "/usr/share/edk2/", "/usr/share/AAVMF/"]

    /// The NVRAM file of a UEFI guest, if the definition names one.
    public var nvramPath: String? {
        first("/domain/os/nvram")?.stringValue?.trimmingCharacters(in: .whitespacesAndNewlines).nilIfEmpty
    }

    static func mebibytes(_ element: XMLElement) -> Int {
        let value = Int(element.stringValue?.trimmingCharacters(in: .whitespaces) ?? "") ?? 0
        switch element.attribute(forName: "unit")?.stringValue ?? "KiB" {
        case "b", "bytes": return value >> 20
        case "KiB", "k": return value >> 10
        case "MiB", "M": return value
        case "GiB", "G": return value << 10
        case "KB": return (value * 1000) >> 20
        case "MB": return (value * 1_000_000) >> 20
        case "GB": return (value * 1_000_000_000) >> 20
        default: return value >> 10
        }
    }

    /// What a recovery VM built from the definition differs in, given by the recovery code.
    public struct Recovery: Sendable {
        public var name: String
        public var title: String
        public var description: String
        /// kvm or qemu
        public var type: String
        public var vcpus: Int?
        public var memoryMiB: Int?
        /// Source disk target -> (overlay file, its raw backing file).
        public var disks: [String: (file: String, backing: String?)]
        /// The network (or host bridge) for the source NIC with this index and source network.
        public var network: @Sendable (_ index: Int, _ sourceNetwork: String?) -> (network: String?, bridge: String?)
        public var consoleLog: String
        /// The copy of the point's NVRAM variables for this VM (UEFI guests).
        public var nvram: String?
        /// The VM's UUID (nil: libvirt makes one); given when its TPM state was placed for it.
        public var uuid: String?

        public init(name: String, title: String, description: String, type: String, vcpus: Int?, memoryMiB: Int?,
                    disks: [String: (file: String, backing: String?)],
                    network: @escaping @Sendable (Int, String?) -> (network: String?, bridge: String?), consoleLog: String, nvram: String?) {
            self.name = name
            self.title = title
            self.description = description
            self.type = type
            self.vcpus = vcpus
            self.memoryMiB = memoryMiB
            self.disks = disks
            self.network = network
            self.consoleLog = consoleLog
            self.nvram = nvram
        }
    }

    /// The recovery VM's XML, and what of the source was left out (host-only parts), in words.
    /// - Throws: one line when the recovery host lacks what the source needs (the UEFI firmware).
    public func recoveryXML(_ recovery: Recovery) throws -> (xml: String, dropped: [String]) {
        guard let copy = try? XMLDocument(xmlString: xml), let domain = copy.rootElement() else {
            throw LifeboatError(.damaged, "the stored domain definition does not parse")
        }
        var dropped: [String] = []
        func children(_ element: XMLElement, _ name: String) -> [XMLElement] { element.elements(forName: name) }
        func remove(_ element: XMLElement) { element.detach() }
        func set(_ name: String, _ text: String, in parent: XMLElement) {
            children(parent, name).forEach(remove)
            parent.addChild(XMLElement(name: name, stringValue: text))
        }
        domain.removeAttribute(forName: "id")
        domain.addAttribute(XMLNode.attribute(withName: "type", stringValue: recovery.type) as! XMLNode)
        // Only what describes the guest's hardware stays (an allowlist): anything else, QEMU
        // pass-through (qemu:commandline) and host tuning included, is dropped and named.
        let kept: Set<String> = ["name", "memory", "currentMemory", "vcpu", "os", "features", "cpu", "clock", "on_poweroff",
                                 "on_reboot", "on_crash", "pm", "devices", "iothreads"]
        let quiet: Set<String> = ["uuid", "title", "description", "metadata", "seclabel", "genid"]
        for element in domain.children?.compactMap({ $0 as? XMLElement }) ?? [] where !kept.contains(element.name ?? "") {
            if !quiet.contains(element.name ?? "") { dropped.append("<\(element.name ?? "?")> (host-specific)") }
            remove(element)
        }
        set("name", recovery.name, in: domain)
        if let uuid = recovery.uuid { set("uuid", uuid, in: domain) }
        set("title", recovery.title, in: domain)
        set("description", recovery.description, in: domain)
        if let memory = recovery.memoryMiB {
            for name in ["memory", "currentMemory"] {
                children(domain, name).forEach(remove)
                let element = XMLElement(name: name, stringValue: String(memory))
                element.addAttribute(XMLNode.attribute(withName: "unit", stringValue: "MiB") as! XMLNode)
                domain.addChild(element)
            }
        }
        if let vcpus = recovery.vcpus, vcpus != hardware.vcpus {
            // Another count than the source's: its sockets/cores/threads no longer add up.
            set("vcpu", String(vcpus), in: domain)
            for cpu in children(domain, "cpu") { children(cpu, "topology").forEach(remove) }
        }
        // Firmware: the loader must exist here; the NVRAM is the point's copy.
        if let os = children(domain, "os").first {
            for element in os.children?.compactMap({ $0 as? XMLElement }) ?? []
            where !["type", "loader", "nvram", "boot", "bootmenu", "smbios", "bios", "firmware"].contains(element.name ?? "") {
                dropped.append("<os><\(element.name ?? "?")> (a host file: direct kernel boot, ACPI tables)")
                remove(element)
            }
            if let loader = children(os, "loader").first, let path = loader.stringValue?.trimmingCharacters(in: .whitespacesAndNewlines), !path.isEmpty {
                // Firmware is read from the system's firmware folders only, never from a path a
                // stored definition chose.
                guard Self.firmwareFolders.contains(where: { path.hasPrefix($0) }), !path.contains("/../") else {
                    throw LifeboatError(.invalidArgument,
                        "the machine's firmware \(path) is outside the system firmware folders (\(Self.firmwareFolders.joined(separator: ", "))): lifeboat will not boot a VM from it")
                }
                guard FileManager.default.fileExists(atPath: path) else {
                    throw LifeboatError(.unsupported,
                        "this recovery host has no UEFI firmware \(path), which the machine boots with: install it (apt install ovmf) and try again")
                }
            }
            for nvram in children(os, "nvram") {
                if let path = recovery.nvram { nvram.stringValue = path } else { remove(nvram) }
            }
            if let path = recovery.nvram, children(os, "nvram").isEmpty {
                os.addChild(XMLElement(name: "nvram", stringValue: path))
            }
        }
        // CPU: the host's CPU cannot be passed through under software emulation.
        if recovery.type == "qemu", let cpu = children(domain, "cpu").first,
           let mode = cpu.attribute(forName: "mode")?.stringValue, mode == "host-passthrough" || mode == "host-model" {
            cpu.removeAttribute(forName: "mode")
            cpu.removeAttribute(forName: "check")
            cpu.removeAttribute(forName: "migratable")
            children(cpu, "model").forEach(remove)
            children(cpu, "feature").forEach(remove)
            dropped.append("CPU \(mode) (software emulation here: QEMU's default CPU instead)")
            if children(cpu, "topology").isEmpty { remove(cpu) }
        }
        guard let devices = children(domain, "devices").first else {
            throw LifeboatError(.damaged, "the stored domain definition has no <devices>")
        }
        // Devices: an allowlist too (memory devices backed by host files, vsock, host input,
        // redirection, shared folders, passthrough of any kind are dropped and named).
        let devicesKept: Set<String> = ["disk", "controller", "interface", "channel", "tpm", "video", "input", "memballoon", "rng",
                                        "watchdog", "panic", "hub", "serial", "console", "graphics"]
        for element in devices.children?.compactMap({ $0 as? XMLElement }) ?? [] where !devicesKept.contains(element.name ?? "") {
            if element.name != "emulator" {
                dropped.append("\(element.name ?? "?") \(element.attribute(forName: "type")?.stringValue ?? element.attribute(forName: "model")?.stringValue ?? "")"
                    .trimmingCharacters(in: .whitespaces))
            }
            remove(element)
        }
        for input in children(devices, "input") where !["mouse", "keyboard", "tablet"].contains(input.attribute(forName: "type")?.stringValue ?? "") {
            dropped.append("input \(input.attribute(forName: "type")?.stringValue ?? "?") (host input)")
            remove(input)
        }
        for tpm in children(devices, "tpm") where tpm.elements(forName: "backend").first?.attribute(forName: "type")?.stringValue != "emulator" {
            dropped.append("TPM passthrough (the host's TPM)")
            remove(tpm)
        }
        for rng in children(devices, "rng") where rng.elements(forName: "backend").first?.attribute(forName: "model")?.stringValue != "random" {
            dropped.append("rng \(rng.elements(forName: "backend").first?.attribute(forName: "model")?.stringValue ?? "?") (a host source)")
            remove(rng)
        }
        for channel in children(devices, "channel") {
            let isAgent = channel.elements(forName: "target").first?.attribute(forName: "name")?.stringValue == "org.qemu.guest_agent.0"
            if !isAgent {
                dropped.append("channel \(channel.elements(forName: "target").first?.attribute(forName: "name")?.stringValue ?? "?")")
                remove(channel)
            } else {
                channel.addAttribute(XMLNode.attribute(withName: "type", stringValue: "unix") as! XMLNode)
            }
        }
        for disk in children(devices, "disk") {
            let device = disk.attribute(forName: "device")?.stringValue ?? "disk"
            let target = children(disk, "target").first?.attribute(forName: "dev")?.stringValue ?? "?"
            if device == "lun" {
                dropped.append("lun \(target) (SCSI passthrough of a host device)")
                remove(disk)
                continue
            }
            guard device == "disk" else {
                if !children(disk, "source").isEmpty { dropped.append("\(device) \(target): its medium (a host file)") }
                children(disk, "source").forEach(remove)
                disk.addAttribute(XMLNode.attribute(withName: "type", stringValue: "file") as! XMLNode)
                continue
            }
            guard let overlay = recovery.disks[target] else {
                dropped.append("disk \(target): not in the point")
                remove(disk)
                continue
            }
            disk.addAttribute(XMLNode.attribute(withName: "type", stringValue: "file") as! XMLNode)
            for name in ["source", "backingStore", "alias", "driver"] { children(disk, name).forEach(remove) }
            let format = overlay.file.hasSuffix(".raw") ? "raw" : "qcow2"
            let driver = DomainDisk.element("driver", ["name": "qemu", "type": format, "cache": "writeback", "discard": "unmap"])
            disk.insertChild(driver, at: 0)
            disk.insertChild(DomainDisk.element("source", ["file": overlay.file]), at: 1)
            if let backing = overlay.backing {
                disk.insertChild(DomainDisk.element("backingStore", ["type": "file"], [
                    DomainDisk.element("format", ["type": "raw"]),
                    DomainDisk.element("source", ["file": backing], [DomainDisk.element("seclabel", ["model": "dac", "relabel": "no"])]),
                    DomainDisk.element("backingStore"),
                ]), at: 2)
            }
        }
        for (index, nic) in children(devices, "interface").enumerated() {
            let type = nic.attribute(forName: "type")?.stringValue ?? "network"
            guard type != "hostdev" && type != "vdpa" else {
                dropped.append("NIC \(index + 1) (\(type) passthrough)")
                remove(nic)
                continue
            }
            let sourceNetwork = children(nic, "source").first?.attribute(forName: "network")?.stringValue
            let (network, bridge) = recovery.network(index, sourceNetwork)
            for element in nic.children?.compactMap({ $0 as? XMLElement }) ?? []
            where !["mac", "model", "address", "boot", "driver", "mtu"].contains(element.name ?? "") {
                remove(element)
            }
            nic.addAttribute(XMLNode.attribute(withName: "type", stringValue: network != nil ? "network" : "bridge") as! XMLNode)
            let source = network.map { DomainDisk.element("source", ["network": $0]) } ?? DomainDisk.element("source", ["bridge": bridge ?? "virbr0"])
            nic.insertChild(source, at: 0)
        }
        // The serial console goes to lifeboat's log (the boot line is read there); graphics on loopback.
        (children(devices, "serial") + children(devices, "console") + children(devices, "graphics")).forEach(remove)
        for channel in children(devices, "channel") { children(channel, "source").forEach(remove) }
        devices.addChild(DomainDisk.element("serial", ["type": "file"], [
            DomainDisk.element("source", ["path": recovery.consoleLog, "append": "on"]), DomainDisk.element("target", ["port": "0"]),
        ]))
        devices.addChild(DomainDisk.element("graphics", ["type": "vnc", "autoport": "yes", "listen": "127.0.0.1"], [
            DomainDisk.element("listen", ["type": "address", "address": "127.0.0.1"]),
        ]))
        if children(devices, "video").isEmpty {
            devices.addChild(DomainDisk.element("video", [:], [DomainDisk.element("model", ["type": "vga"])]))
        }
        return (copy.xmlString(options: [.nodePrettyPrint]), dropped)
    }

    /// The definition with its disks' sources changed (failback onto other paths than the
    /// original ones), for defining the original domain again.
    public func withDiskSources(_ sources: [String: (path: String, format: String)]) -> String {
        guard let copy = try? XMLDocument(xmlString: xml), let domain = copy.rootElement() else { return xml }
        for disk in domain.elements(forName: "devices").first?.elements(forName: "disk") ?? [] {
            guard let target = disk.elements(forName: "target").first?.attribute(forName: "dev")?.stringValue,
                  let given = sources[target], let source = disk.elements(forName: "source").first else { continue }
            let block = FileSystem.isBlockDevice(given.path)
            source.removeAttribute(forName: block ? "file" : "dev")
            source.addAttribute(XMLNode.attribute(withName: block ? "dev" : "file", stringValue: given.path) as! XMLNode)
            disk.addAttribute(XMLNode.attribute(withName: "type", stringValue: block ? "block" : "file") as! XMLNode)
            disk.elements(forName: "driver").first?.addAttribute(XMLNode.attribute(withName: "type", stringValue: given.format) as! XMLNode)
        }
        return copy.xmlString(options: [.nodePrettyPrint])
    }
}

extension String {
    var nilIfEmpty: String? { isEmpty ? nil : self }
}
