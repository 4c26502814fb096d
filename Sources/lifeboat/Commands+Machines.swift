import ArgumentParser
import Foundation
import LifeboatBase
import LifeboatRecovery
import LifeboatReplication
import LifeboatRepository
import LifeboatVirt

extension Lifeboat {
    struct Init: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Create an empty repository.")
        @OptionGroup var repository: RepositoryOptions
        @Flag(help: "Encrypt chunks with AES-256-GCM under a key wrapped by the password.")
        var encrypt = false
        @Option(help: "Chunk size in bytes (power of two).")
        var chunkSize = Repository.defaultChunkSize
        @Option(help: "Size of the independently compressed frames inside a chunk (default 64 KiB).")
        var frameSize: Int?
        @Option(help: "zstd level for new chunks (negative = faster, larger).")
        var compressionLevel = Repository.defaultCompressionLevel

        func run() throws {
            var password: String? = nil
            if encrypt {
                guard let given = try repository.password(confirm: true) else {
                    throw LifeboatError(.invalidArgument, "--encrypt needs a password: set $LIFEBOAT_PASSWORD, pass --password-file or run on a terminal")
                }
                password = given
            }
            let repo = try Repository.create(at: repository.path, password: password, chunkSize: chunkSize,
                                             frameSize: frameSize, compressionLevel: compressionLevel, remote: try repository.remote)
            print("created \(repo.config.isEncrypted ? "encrypted " : "")repository \(repo.name) (chunk size \(Format.bytes(chunkSize)))")
        }
    }

    struct Protect: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Register a machine, its disks and its recovery-server settings.")
        @OptionGroup var repository: RepositoryOptions
        @Argument(help: "Machine name.") var name: String
        @Option(name: .customLong("disk"), help: "Disk image (raw or qcow2) or block device (repeat for more disks).") var disks: [String] = []
        @Option(help: "A libvirt domain: its disks are read from its XML, points of it running come from libvirt's backup API.")
        var domain: String?
        @Option(help: "libvirt URI of that domain (default: $LIFEBOAT_CONNECT, else qemu:///system).") var connect: String?
        @Option(help: "Hot storage folder (scratch files while a running domain is read; default: $LIFEBOAT_HOT, else /var/lib/lifeboat/hot).")
        var hot: String?
        @Option(name: .customLong("chunk-size"),
                help: "Chunk size of this machine's points in bytes (default: 262144 for --domain, else the repository's).")
        var chunkSize: Int?
        @OptionGroup var settings: ServerSettingsOptions

        func validate() throws { try settings.check() }

        func run() throws {
            if domain == nil && disks.isEmpty {
                throw LifeboatError(.invalidArgument, "give the machine's disks (--disk FILE) or its libvirt domain (--domain NAME)")
            }
            if domain != nil && !disks.isEmpty {
                throw LifeboatError(.invalidArgument, "give --disk or --domain, not both: a domain's disks come from its XML")
            }
            if connect != nil && domain == nil { throw LifeboatError(.invalidArgument, "--connect goes with --domain") }
            let repo = try repository.open()
            var machine: Machine
            if let domain {
                let uri = connect ?? ProcessInfo.processInfo.environment["LIFEBOAT_CONNECT"].flatMap { $0.isEmpty ? nil : $0 }
                machine = Machine(name: name, disks: [], macs: [MachineSettings.randomMAC()])
                machine.domain = domain
                machine.connectURI = uri
                let replication = Replication(repository: repo, hotDirectory: ReplicationOptions.hotDirectory(hot),
                                              defaultConnectURI: Connection.uri(uri))
                let (_, found) = try replication.domain(of: machine)
                // Its recovery VM is built as the domain is: start from its vCPUs, memory and MAC.
                if let hardware = try? DomainDefinition(xml: found.xml(inactive: true)).hardware {
                    machine.vcpus = hardware.vcpus
                    machine.memoryMiB = hardware.memoryMiB
                    if let mac = hardware.nics.first?.mac, !mac.isEmpty { machine.macs = [mac] }
                }
                machine.disks = try replication.disks(of: found).map { disk in
                    _ = try DiskImage.inspect(disk.source, declared: disk.format, what: "disk \(disk.target) of domain \(domain)")
                    return MachineDisk(name: disk.target, path: disk.source, format: disk.format)
                }
            } else {
                var disks = Repository.diskNames(for: disks.map { $0.hasPrefix("/") ? $0 : FileManager.default.currentDirectoryPath + "/" + $0 })
                for index in disks.indices {
                    // Probed once, here, and kept: never guessed again from bytes a guest wrote.
                    disks[index].format = try DiskImage.inspect(disks[index].path).format
                }
                machine = Machine(name: name, disks: disks, macs: [MachineSettings.randomMAC()])
            }
            try settings.apply(to: &machine)
            // Changed-block points rewrite whole chunks: smaller ones store less per guest write.
            machine.chunkSize = chunkSize ?? (domain != nil ? max(repo.config.frameSize, min(repo.config.chunkSize, Repository.replicationChunkSize)) : nil)
            if machine.chunkSize == repo.config.chunkSize { machine.chunkSize = nil }
            try repo.protect(machine)
            print("protected \(name)" + (domain.map { " (libvirt domain \($0))" } ?? "") + ": "
                + machine.disks.map { "\($0.name)=\($0.path)" }.joined(separator: ", "))
        }
    }

    struct Configure: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Change a machine's recovery-server settings (vCPUs, memory, MAC, IPs, RPO, network, domain type, boot line).",
            discussion: "Give an empty value (--ip '') to clear an optional setting. Takes effect at the next test failover or failover.")
        @OptionGroup var repository: RepositoryOptions
        @Argument(help: "Machine name.") var name: String
        @OptionGroup var settings: ServerSettingsOptions
        @OptionGroup var output: OutputOptions

        func validate() throws { try settings.check() }

        func run() throws {
            let repo = try repository.open()
            var machine = try repo.machine(name)
            try settings.apply(to: &machine)
            try repo.save(machine)
            if output.json { return try JSON.print(machine) }
            print("configured \(name): \(machine.vcpus) vCPU, \(machine.memoryMiB) MiB, MAC \(machine.macs.first ?? "-"), IP \(machine.ip ?? "-"), test IP \(machine.testIP ?? "-"), network \(machine.bridge.map { "bridge " + $0 } ?? machine.network ?? "(from template)"), virt type \(machine.virtType ?? "host default")")
        }
    }

    struct Machines: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List protected machines.")
        @OptionGroup var repository: RepositoryOptions
        @OptionGroup var output: OutputOptions

        func run() throws {
            let repo = try repository.open()
            let machines = try repo.machines()
            if output.json { return try JSON.print(machines) }
            var rows: [[String]] = []
            for machine in machines {
                let last = try repo.points(machine.name).last
                rows.append([
                    machine.name, machine.disks.map(\.name).joined(separator: ","), "\(machine.vcpus)", "\(machine.memoryMiB)",
                    machine.ip ?? "-", machine.rpoSeconds.map { DurationText.format(Double($0)) } ?? "-",
                    last.map { Format.time($0.time) } ?? "never",
                ])
            }
            print(Format.table(["NAME", "DISKS", "VCPUS", "MEMORY_MIB", "IP", "RPO", "LAST_POINT"], rows))
        }
    }

    struct Unprotect: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Forget a machine (refuses while it has points, unless --purge).")
        @OptionGroup var repository: RepositoryOptions
        @Argument var name: String
        @Flag(help: "Delete its recovery points too (their chunks go at the next gc).") var purge = false

        func run() throws {
            try repository.open().unprotect(name, purge: purge)
            print("unprotected \(name)")
        }
    }
}

/// Recovery-server settings shared by `protect` (defaults apply) and `configure` (only what is given changes).
struct ServerSettingsOptions: ParsableArguments {
    @Option(help: "vCPUs of the recovery VM (default 1).") var vcpus: Int?
    @Option(help: "Memory of the recovery VM in MiB (default 512).") var memory: Int?
    @Option(help: "MAC address of the recovery VM's NIC (default: a random 52:54:00 one).") var mac: String?
    @Option(help: "Production IP, ADDR/PREFIX.") var ip: String?
    @Option(help: "Production gateway.") var gateway: String?
    @Option(help: "IP on the isolated test network, ADDR/PREFIX (default: the production IP).") var testIp: String?
    @Option(help: "Recovery point objective, e.g. 15m, 4h, 1d.") var rpo: String?
    @Option(help: "Free text.") var description: String?
    @Option(help: "Domain type of its recovery VM: kvm, qemu or auto.") var virtType: String?
    @Option(help: "Regular expression on the serial console meaning 'booted' (default: a login prompt).") var bootPattern: String?
    @Option(help: "Firmware of the recovery VM of a --disk machine: bios or uefi (OVMF, secure boot off; default bios).") var firmware: String?
    @Option(help: "Machine type of the recovery VM of a --disk machine: pc, q35 … (default pc).") var machine: String?
    @Option(help: "Bus of the recovery VM's disks for a --disk machine: virtio, sata or scsi (default virtio; Windows guests installed on SATA need sata).")
    var diskBus: String?
    @Option(help: "Production libvirt network for failover.") var network: String?
    @Option(help: "Production host bridge for failover (instead of a libvirt network).") var bridge: String?
    @Option(help: "The replication service takes a point this often, e.g. 15m (default: half the RPO).") var every: String?
    @Option(help: "Limit the reading of the machine's disks by a point to this many MiB/s (default: no limit; 0 clears).")
    var bandwidth: Int?
    @Option(help: "Retention after each point of the replication service: keep the newest N points.") var keepLast: Int?
    @Option(help: "... and the newest point of each of the last N hours.") var keepHourly: Int?
    @Option(help: "... of each of the last N days.") var keepDaily: Int?
    @Option(help: "... of each of the last N weeks.") var keepWeekly: Int?
    @Option(help: "... of each of the last N months.") var keepMonthly: Int?
    @Option(help: "... and every point younger than this, e.g. 2d.") var keepWithin: String?

    /// The settings as the library takes them.
    var settings: MachineSettings {
        var settings = MachineSettings()
        settings.vcpus = vcpus
        settings.memoryMiB = memory
        settings.mac = mac
        settings.ip = ip
        settings.gateway = gateway
        settings.testIP = testIp
        settings.rpo = rpo
        settings.description = description
        settings.virtType = virtType
        settings.bootPattern = bootPattern
        settings.firmware = firmware
        settings.machineType = machine
        settings.diskBus = diskBus
        settings.network = network
        settings.bridge = bridge
        settings.every = every
        settings.bandwidthMiB = bandwidth
        settings.keepLast = keepLast
        settings.keepHourly = keepHourly
        settings.keepDaily = keepDaily
        settings.keepWeekly = keepWeekly
        settings.keepMonthly = keepMonthly
        settings.keepWithin = keepWithin
        return settings
    }

    /// The library's checks, reported as usage errors.
    func check() throws {
        do { try settings.validate() } catch let error as LifeboatError { throw ValidationError(error.message) }
    }

    func apply(to machine: inout Machine) throws { try settings.apply(to: &machine) }
}

