/// A libvirt domain's hardware as a point keeps it: what its recovery VM is built from and what
/// `points --json` shows. Read from the domain XML by LifeboatVirt, stored by the repository.
public struct MachineHardware: Codable, Sendable, Equatable {
    public struct Disk: Codable, Sendable, Equatable {
        /// vda, sda …
        public var target: String
        /// virtio, sata, scsi, ide …
        public var bus: String
        /// raw, qcow2
        public var format: String
        /// Its place in the boot order (`<boot order=N/>`), if it has one.
        public var bootOrder: Int?

        public init(target: String, bus: String, format: String, bootOrder: Int?) {
            self.target = target
            self.bus = bus
            self.format = format
            self.bootOrder = bootOrder
        }
    }

    public struct NIC: Codable, Sendable, Equatable {
        public var mac: String
        /// virtio, e1000e, rtl8139 …
        public var model: String
        /// The libvirt network or host bridge it joined.
        public var network: String?
        public var bridge: String?

        public init(mac: String, model: String, network: String?, bridge: String?) {
            self.mac = mac
            self.model = model
            self.network = network
            self.bridge = bridge
        }
    }

    /// The libvirt domain's name at the point.
    public var domain: String
    /// bios or uefi
    public var firmware: String
    /// The UEFI loader (OVMF_CODE…) when firmware is uefi.
    public var loader: String?
    /// i440fx or q35 machine type, as the domain names it (pc-q35-7.2, q35, pc …).
    public var machine: String?
    /// host-passthrough, host-model or the CPU model's name.
    public var cpu: String?
    public var vcpus: Int
    public var memoryMiB: Int
    public var disks: [Disk]
    public var nics: [NIC]
    /// A QEMU guest agent channel.
    public var agent: Bool
    /// The TPM's model and version (tpm-crb 2.0 …), if it has one.
    public var tpm: String?
    public var video: String?

    public init(domain: String, firmware: String, loader: String?, machine: String?, cpu: String?, vcpus: Int, memoryMiB: Int,
                disks: [Disk], nics: [NIC], agent: Bool, tpm: String?, video: String?) {
        self.domain = domain
        self.firmware = firmware
        self.loader = loader
        self.machine = machine
        self.cpu = cpu
        self.vcpus = vcpus
        self.memoryMiB = memoryMiB
        self.disks = disks
        self.nics = nics
        self.agent = agent
        self.tpm = tpm
        self.video = video
    }

    /// One line for people: "uefi q35, 2 vCPU, 1024 MiB, sda scsi (boot 1), sdb sata, 2 NICs, agent, TPM".
    public var summary: String {
        var parts = ["\(firmware) \(machine ?? "pc")", "\(vcpus) vCPU", "\(memoryMiB) MiB"]
        parts += disks.map { "\($0.target) \($0.bus)" + ($0.bootOrder.map { " (boot \($0))" } ?? "") }
        parts += nics.map { "NIC \($0.model) \($0.mac)" }
        if agent { parts.append("agent") }
        if let tpm { parts.append("TPM \(tpm)") }
        return parts.joined(separator: ", ")
    }
}
