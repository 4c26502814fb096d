import Foundation
import LifeboatBase
import LifeboatFS
import LifeboatRepository
import LifeboatVirt
#if canImport(Glibc)
import Glibc
#endif

/// The one way a recovery VM boots, for drills, failovers, change-point and plans: overlays over
/// the point's served disks, the domain defined and started, then the boot line, a screenshot and
/// the check with the same environment.
extension Recovery {
    /// The point's disks as qcow2 overlays in `folder` over the disks `mount` serves; with
    /// `finals`, each also names the raw hot file finalisation writes (a leftover one is removed).
    func makeOverlays(of point: RecoveryPoint, machine name: String, mount: String, in folder: String, finals: Bool) throws -> [HotDisk] {
        try FileSystem.makeDirectories(folder)
        chmod(folder, 0o755)
        // A point that keeps its domain's definition names its disks by their targets there (sda,
        // vdb …), and the recovery VM keeps them; other points' disks become vda, vdb … (sda … on
        // the machine's --disk-bus sata or scsi) in order.
        let bus = (try? repository.machine(name))?.diskBus
        return try point.disks.enumerated().map { index, disk in
            let target = point.hardware != nil ? disk.name : Self.target(index, bus: bus)
            let backing = "\(mount)/\(name)/\(point.id)/\(disk.name).raw"
            guard FileSystem.exists(backing) else {
                throw LifeboatError(.notFound, "the FUSE mount \(mount) does not serve \(backing): is it a mount of another repository?")
            }
            let overlay = folder + "/\(disk.name).qcow2"
            try createOverlay(overlay, backing: backing)
            guard finals else { return HotDisk(name: disk.name, target: target, path: overlay, backing: backing, size: disk.size) }
            let final = folder + "/\(disk.name).raw"
            unlink(final)
            return HotDisk(name: disk.name, target: target, path: overlay, backing: backing, size: disk.size, final: final, seeded: false)
        }
    }

    /// A qcow2 image at `path` over the raw file `backing` (an overlay over a served disk, or a
    /// finalisation's top image over the hot file); a leftover one at `path` goes first.
    func createOverlay(_ path: String, backing: String) throws {
        unlink(path)
        let result = try ChildProcess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", backing, "-F", "raw", path])
        guard result.status == 0 else {
            throw LifeboatError(.io, "cannot create the overlay \(path) over \(backing): \(result.stderr)")
        }
        QemuUser.give(path)
    }

    /// Defines (persistently) and starts a recovery VM on `disks`; with `watch`, its lifecycle
    /// events are watched from before the start (a guest that stops at once is seen).
    ///
    /// A point that keeps its domain's definition (protect --domain) makes the VM that domain:
    /// its firmware and NVRAM, machine type, buses, NICs and MACs (every NIC on `interfaces`'
    /// network); what the recovery host cannot give is dropped and reported. Other points use
    /// the domain template.
    @discardableResult
    func defineAndStart(name: String, type: String, vcpus: Int, memoryMiB: Int, title: String, description: String,
                        disks: [HotDisk], interfaces: [DomainParameters.Interface], console: String, point: RecoveryPoint? = nil,
                        networkMap: [String: String] = [:], machine: Machine? = nil,
                        watch: Bool = false, report: (String) -> Void = { _ in }) throws -> (domain: Domain, events: DomainEventWatch?) {
        if !FileSystem.exists(console) { _ = FileManager.default.createFile(atPath: console, contents: nil) }
        QemuUser.give(console, mode: 0o640)
        let xml: String
        if let point, let stored = try repository.attachment(point, "domain.xml") {
            let definition = try DomainDefinition(xml: String(decoding: stored, as: UTF8.self))
            var nvram: String? = nil
            if let variables = try repository.attachment(point, "nvram") {
                let path = FileSystem.parent(of: disks.first?.path ?? console) + "/\(name)_VARS.fd"
                try FileSystem.writeAtomically(variables, to: path)
                QemuUser.give(path)
                nvram = path
            }
            // The TPM's state (keys sealed by the guest, BitLocker's among them) goes where
            // libvirt's swtpm for this VM's UUID reads it.
            let tpmState = try repository.attachment(point, "tpm-state")
            let uuid = tpmState == nil ? nil : UUID().uuidString.lowercased()
            let network = interfaces.first
            var recovery = DomainDefinition.Recovery(
                name: name, title: title, description: description, type: type, vcpus: vcpus, memoryMiB: memoryMiB,
                disks: Dictionary(uniqueKeysWithValues: disks.map { ($0.name, (file: $0.path, backing: $0.backing)) }),
                network: { _, source in
                    if let source, let mapped = networkMap[source] { return (mapped, nil) }
                    return (network?.network, network?.bridge)
                }, consoleLog: console, nvram: nvram)
            recovery.uuid = uuid
            let (derived, dropped) = try definition.recoveryXML(recovery)
            xml = derived
            if let tpmState, let uuid { try QemuUser.placeTPMState(tpmState, uuid: uuid) }   // once the VM will be defined
            report("VM built from the definition of domain \(point.hardware?.domain ?? "?") kept with point \(point.id)"
                   + (point.hardware.map { ": " + $0.summary } ?? ""))
            if !dropped.isEmpty { report("left out (host-only or not available here): " + dropped.joined(separator: "; ")) }
        } else {
            // A disk-file machine: the template, with the machine's firmware, machine type and disk bus.
            var parameters = DomainParameters(
                name: name, type: type, vcpus: vcpus, memoryMiB: memoryMiB, title: title, description: description,
                disks: disks.map {
                    .init(target: $0.target, bus: $0.target.hasPrefix("sd") ? machine?.diskBus ?? "sata" : "virtio", file: $0.path,
                          format: $0.path.hasSuffix(".raw") ? "raw" : "qcow2", backingFile: $0.backing)
                },
                interfaces: interfaces, consoleLog: console)
            parameters.machine = machine?.machineType ?? "pc"
            parameters.uefi = machine?.firmware == "uefi"
            xml = try virt("rendering the domain") { try settings.templates.render(Templates.domain, parameters) }
        }
        let connection = try connection()
        let domain = try virt("defining the VM \(name)") { try connection.defineDomain(xml: xml) }
        let events = watch ? try? connection.watchLifecycle(of: domain) : nil
        try virt("starting the VM \(name)") { try domain.start() }
        return (domain, events)
    }

    /// What to look for once a recovery VM runs.
    struct BootWatch {
        var machine: String
        var point: String
        var domain: Domain
        var events: DomainEventWatch?
        var consoleLog: String
        /// Where in the console log this boot starts (a failover's log keeps earlier boots).
        var offset = 0
        var pattern: String
        var timeout: TimeInterval
        var deadline: Date
        var screenshot: String
        var check: String?
        var checkLog: String
        var checkDirectory: String?
        /// LIFEBOAT_PLAN, LIFEBOAT_DRILL …: beside LIFEBOAT_MACHINE, _POINT, _VM, _VM_IP and _CONSOLE_LOG.
        var environment: [String: String] = [:]
        /// The VM's address once it booted (a DHCP lease, the record's IP).
        var address: () -> String? = { nil }
    }

    struct BootOutcome {
        var line: String?
        var bootLineAt: Date?
        /// Why it failed: no boot line, the VM stopped, the check failed.
        var reason: String?
        var screenshot: String?
        var ip: String?
        var checkStatus: Int32?
        var checkLog: String?
        var checkedAt: Date?
        var passed: Bool { line != nil && reason == nil }
    }

    /// The boot line or why it did not come; then a screenshot and the VM's address, handed to
    /// `booted` (the caller records them before the check runs); then the check.
    func watchBoot(_ watch: BootWatch, report: (String) -> Void, booted: (BootOutcome) throws -> Void = { _ in }) throws -> BootOutcome {
        let pattern = try Self.bootPattern(watch.pattern, what: "the boot line")
        var outcome = BootOutcome()
        let (line, problem) = waitForBootLine(log: watch.consoleLog, pattern: pattern, domain: watch.domain, events: watch.events,
                                              deadline: watch.deadline, from: watch.offset)
        guard let line else {
            outcome.reason = problem ?? "the boot line /\(watch.pattern)/ did not appear within \(DurationText.format(watch.timeout))"
            return outcome
        }
        outcome.line = line
        outcome.bootLineAt = Date()
        outcome.screenshot = Self.saveScreenshot(of: watch.domain, to: watch.screenshot)
        outcome.ip = watch.address()
        try booted(outcome)
        if let check = watch.check {
            report("running the check: \(check)")
            let environment = watch.environment.merging([
                "LIFEBOAT_MACHINE": watch.machine, "LIFEBOAT_POINT": watch.point, "LIFEBOAT_VM": watch.domain.name,
                "LIFEBOAT_VM_IP": outcome.ip ?? "", "LIFEBOAT_CONSOLE_LOG": watch.consoleLog,
            ]) { $1 }
            let (status, failure) = try Self.runCheck(check, environment: environment, log: watch.checkLog, deadline: watch.deadline,
                                                      directory: watch.checkDirectory)
            outcome.checkStatus = status
            outcome.checkLog = watch.checkLog
            outcome.reason = failure
            if failure == nil { outcome.checkedAt = Date() }
        }
        return outcome
    }

    /// A boot line pattern, or a one-line error naming it.
    static func bootPattern(_ text: String, what: String) throws -> NSRegularExpression {
        do { return try NSRegularExpression(pattern: text) } catch {
            throw LifeboatError(.invalidArgument, "\(what) '\(text)' is not a regular expression: \(error.localizedDescription)")
        }
    }
}
