import Foundation
import LifeboatBase
import LifeboatNBD
import LifeboatRepository
import LifeboatVirt
#if canImport(Glibc)
import Glibc
#endif

/// Points of libvirt domains (machines protected with `--domain`).
///
/// A running domain is read through libvirt's backup API in pull mode: every disk at one
/// instant, served by QEMU over NBD while the guest runs on (its writes during the read go to a
/// scratch file). The first point reads the allocated data (base:allocation); each later one
/// reads only what the guest wrote since the previous point's checkpoint (the checkpoint's
/// dirty bitmap), and takes every other chunk from the previous point's index. A shut-off
/// domain is read from its image files (through qemu-nbd, which understands qcow2).
public struct Replication: Sendable {
    public let repository: Repository
    /// Hot storage root: scratch files live under HOT/NAME/backup while a point is read.
    public let hotDirectory: String
    /// Where QEMU's NBD sockets are made (a folder QEMU's user owns).
    public let runDirectory: String
    public let defaultConnectURI: String
    /// How long the guest agent may take to freeze the file systems.
    public var agentTimeout: Int32 = 10
    /// Starts `lifeboat backup-guard` for a running backup job (see `BackupGuard`); nil: no guard.
    public var launcher: SelfLauncher?

    /// Prefix of the checkpoints lifeboat makes: a person sees they are lifeboat's.
    public static let checkpointPrefix = "lifeboat-"

    /// The start of a machine's checkpoint names, `lifeboat-REPO-MACHINE-` (REPO: the first 8
    /// characters of the repository's id): two machines, or two repositories, may protect one
    /// domain, and each chain must only ever delete its own checkpoints.
    func checkpointStem(_ machine: String) -> String {
        Self.checkpointPrefix + String(repository.config.id.prefix(8)) + "-" + machine + "-"
    }

    /// True for a checkpoint `checkpointStem(machine)` + a point id: not one of machine "web-b"'s
    /// when the machine is "web".
    func isCheckpoint(_ name: String, of machine: String) -> Bool {
        let stem = checkpointStem(machine)
        guard name.hasPrefix(stem) else { return false }
        let parts = name.dropFirst(stem.count).split(separator: "-", omittingEmptySubsequences: false)
        return (2...3).contains(parts.count) && parts[0].count == 8 && parts[1].count == 6
            && parts.allSatisfy { !$0.isEmpty && $0.allSatisfy { $0.isASCII && $0.isNumber } }
    }

    public init(repository: Repository, hotDirectory: String, runDirectory: String = "/run/lifeboat",
                defaultConnectURI: String = Connection.uri()) {
        self.repository = repository
        self.hotDirectory = hotDirectory
        self.runDirectory = runDirectory
        self.defaultConnectURI = defaultConnectURI
    }

    /// The domain `machine` names, or a one-line error saying what to do.
    /// The libvirt URI of a machine's domain.
    public func connectURI(of machine: Machine) -> String { machine.connectURI ?? defaultConnectURI }

    public func domain(of machine: Machine) throws -> (Connection, Domain) {
        guard let name = machine.domain else {
            throw LifeboatError(.invalidArgument, "\(machine.name) is not a libvirt domain (it was protected with --disk)")
        }
        let uri = machine.connectURI ?? defaultConnectURI
        let connection: Connection
        do { connection = try Connection(uri: uri) } catch {
            throw LifeboatError(.io, "cannot reach libvirt at \(uri): \(error) (is libvirtd running? start it with libvirtd -d)")
        }
        let found: Domain?
        do { found = try connection.domain(named: name) } catch {
            throw LifeboatError(.io, "looking up domain \(name) at \(uri): \(error)")
        }
        guard let domain = found else {
            throw LifeboatError(.notFound, "domain \(name) not found at \(uri): check the name with virsh -c \(uri) list --all")
        }
        return (connection, domain)
    }

    /// The disks of the domain as machine disks (named by target), and the domain's disks.
    public func disks(of domain: Domain) throws -> [DomainDisk] {
        let disks: [DomainDisk]
        do { disks = try DomainDisk.disks(inDomainXML: try domain.xml()) } catch {
            throw LifeboatError(.io, "reading the disks of domain \(domain.name): \(error)")
        }
        guard !disks.isEmpty else {
            throw LifeboatError(.invalidArgument, "domain \(domain.name) has no file or block disk to protect")
        }
        return disks
    }

    /// Takes one recovery point of the domain machine `name`.
    /// - Parameters:
    ///   - progress: advanced by the bytes of disk covered.
    ///   - cancelled: polled between steps and while reading; true ends the point cleanly (backup
    ///     job aborted, scratch files and socket gone, nothing written).
    public func takePoint(_ name: String, progress: ProgressMeter = ProgressMeter(),
                          cancelled: @escaping @Sendable () -> Bool = { false }) throws -> RecoveryPoint {
        var machine = try repository.machine(name)
        Trace.mark("point of \(name): machine read")
        let (_, domain) = try self.domain(of: machine)
        let connectURI = self.connectURI(of: machine)
        let disks = try self.disks(of: domain)
        var notes: [String] = []
        Trace.mark("domain and its disks")

        // Disks that appeared or went since the machine was last read.
        let before = Set(machine.disks.map(\.name)), now = Set(disks.map(\.target))
        for added in disks.map(\.target) where !before.contains(added) && !before.isEmpty { notes.append("disk \(added) was added") }
        for removed in machine.disks.map(\.name) where !now.contains(removed) { notes.append("disk \(removed) was removed") }
        for disk in disks where !DiskImage.formats.contains(disk.format) {
            throw LifeboatError(.unsupported, "disk \(disk.target) of domain \(domain.name) is a \(disk.format) image, which lifeboat does not read: convert it to qcow2")
        }
        let current = disks.map { MachineDisk(name: $0.target, path: $0.source, format: $0.format) }
        if current != machine.disks {
            machine.disks = current
            try repository.save(machine)
        }
        let uuid = try? domain.uuid()
        let previous = try repository.points(name).last
        let active = (try? domain.state().isActive) ?? false
        Trace.mark("previous point, domain state")
        if !active {
            return try offlinePoint(name, domain: domain, disks: disks, previous: previous, uuid: uuid, notes: notes,
                                    progress: progress, cancelled: cancelled)
        }
        return try onlinePoint(name, domain: domain, connectURI: connectURI, disks: disks, previous: previous, uuid: uuid,
                               notes: notes, progress: progress, cancelled: cancelled)
    }

    // MARK: - a running domain: libvirt's backup API

    private func onlinePoint(_ name: String, domain: Domain, connectURI: String, disks: [DomainDisk], previous: RecoveryPoint?, uuid: String?,
                             notes: [String], progress: ProgressMeter, cancelled: @escaping @Sendable () -> Bool) throws -> RecoveryPoint {
        var notes = notes
        let bitmaps = disks.allSatisfy(\.canHoldBitmaps)
        var base: String? = nil
        let checkpoints = (try? domain.checkpoints()) ?? []
        if !bitmaps {
            let raw = disks.filter { !$0.canHoldBitmaps }.map { "\($0.target) (\($0.format))" }.joined(separator: ", ")
            notes.append("read in full: disk \(raw) cannot hold a dirty bitmap (convert it to qcow2 for incremental points)")
        } else {
            let (usable, why) = incrementalBase(domain: domain, checkpoints: checkpoints, disks: disks, previous: previous, uuid: uuid)
            base = usable
            if let why { notes.append(why) }
        }
        let stem = checkpointStem(name)
        let taken = Set(checkpoints.filter { isCheckpoint($0, of: name) }.map { String($0.dropFirst(stem.count)) })
        let checkpoint = bitmaps ? stem + Repository.pointID(for: Date(), existing: taken) : nil
        Trace.mark("checkpoint chain checked")
        do {
            return try readRunning(name, domain: domain, connectURI: connectURI, disks: disks, previous: previous, base: base, checkpoint: checkpoint,
                                   uuid: uuid, notes: notes, progress: progress, cancelled: cancelled)
        } catch let refused as IncrementalRefused {
            // The checkpoint's bitmap is not usable (a host crash left it inconsistent, say): full.
            notes.append("read in full: libvirt refused the incremental backup from \(base ?? "?") (\(refused.error))")
            return try readRunning(name, domain: domain, connectURI: connectURI, disks: disks, previous: previous, base: nil, checkpoint: checkpoint,
                                   uuid: uuid, notes: notes, progress: progress, cancelled: cancelled)
        }
    }

    /// The checkpoint the next point can be incremental from, or why there is none.
    private func incrementalBase(domain: Domain, checkpoints: [String], disks: [DomainDisk], previous: RecoveryPoint?,
                                 uuid: String?) -> (String?, String?) {
        guard let previous else { return (nil, "read in full: the first point of this domain") }
        if let was = previous.hardware?.domain, was != domain.name {
            return (nil, "read in full, with dedup: the first point of domain \(domain.name) (points came from domain \(was) before; protection follows the machine)")
        }
        guard let checkpoint = previous.checkpoint else {
            return (nil, "read in full: the previous point \(previous.id) has no checkpoint to start from")
        }
        if let uuid, let old = previous.domainUUID, old != uuid {
            return (nil, "read in full: domain \(domain.name) was redefined (its UUID changed) since point \(previous.id)")
        }
        guard checkpoints.contains(checkpoint) else {
            return (nil, "read in full: checkpoint \(checkpoint) of point \(previous.id) is gone (deleted, or the domain was redefined)")
        }
        let had = Set(previous.disks.map(\.name))
        if let added = disks.first(where: { !had.contains($0.target) }) {
            return (nil, "read in full: disk \(added.target) has no bitmap since point \(previous.id)")
        }
        return (checkpoint, nil)
    }

    private func readRunning(_ name: String, domain: Domain, connectURI: String, disks: [DomainDisk], previous: RecoveryPoint?, base: String?,
                             checkpoint: String?, uuid: String?, notes: [String], progress: ProgressMeter,
                             cancelled: @escaping @Sendable () -> Bool) throws -> RecoveryPoint {
        var notes = notes
        let session = try BackupSession(replication: self, machine: name, domain: domain)
        defer { session.end() }
        // A job left by a killed lifeboat would refuse ours: it is gone with its process.
        if domain.hasBackupJob() { try? domain.abortJob() }

        // From here a guard process undoes what this point leaves, should this process die.
        session.watch(checkpoint: checkpoint, connectURI: connectURI, launcher: launcher)
        Trace.mark("session and guard")

        // Freeze the guest's file systems around the instant of the checkpoint, thaw always.
        var consistency = "crash-consistent"
        var frozen = false
        do {
            try domain.setAgentTimeout(agentTimeout)
            do { _ = try domain.freezeFileSystems() } catch let error as LibvirtError where error.message.contains("frozen state") {
                // A point that died while the guest was frozen: thaw it, then freeze for this one.
                try domain.thawFileSystems()
                _ = try domain.freezeFileSystems()
            }
            frozen = true
            Trace.mark("guest frozen")
        } catch {
            notes.append("crash-consistent: the guest agent did not freeze the file systems (\(error))")
            // A hung agent may still freeze after the timeout: a thaw must follow whatever happened.
            if let error = error as? LibvirtError, !error.message.contains("not configured") {
                try? domain.setAgentTimeout(2)
                _ = try? domain.thawFileSystems()
            }
        }
        do {
            defer {
                if frozen {
                    do { try domain.thawFileSystems() } catch {
                        notes.append("thawing the guest's file systems failed (\(error)): check the guest")
                    }
                }
            }
            do {
                try domain.beginBackup(backupXML: session.backupXML(disks: disks, incrementalFrom: base),
                                       checkpointXML: checkpoint.map { Self.checkpointXML(name: $0, machine: name, disks: disks) })
            } catch let error as LibvirtError where base != nil {
                throw IncrementalRefused(error: error)
            } catch {
                throw LifeboatError(.io, "libvirt could not start the backup of domain \(domain.name): \(error)")
            }
            if frozen { consistency = "application-consistent" }
            Trace.mark("backup job begun")
        }
        if cancelled() { throw LifeboatError(.invalidState, "the point of \(name) was cancelled") }

        Trace.mark("guest thawed")
        var captures: [DiskCapture] = []
        for disk in disks {
            let context = base != nil ? "qemu:dirty-bitmap:backup-\(disk.target)" : NBDConnection.allocationContext
            let status = try session.connect(export: disk.target, contexts: [context])
            defer { status.close() }
            guard status.supports(context) else {
                throw LifeboatError(.io, "QEMU's export of \(disk.target) does not offer \(context): take the point again")
            }
            let extents = try session.nbd("reading the changed blocks of \(disk.target)") { try status.extents(context) }
            let ranges: [Range<Int>]
            if base != nil {
                ranges = Self.merged(extents.filter { $0.flags & 1 != 0 }.map { Int($0.offset)..<Int($0.offset + $0.length) })
            } else {
                ranges = Self.merged(extents.filter { $0.flags & NBDConnection.zeroFlag == 0 }
                    .map { Int($0.offset)..<Int($0.offset + $0.length) })
            }
            let baseIndex = try base.flatMap { _ in try previous.map { try repository.index($0, disk: disk.target) } }
            Trace.mark("extents of \(disk.target): \(ranges.count) ranges, base index read")
            let socket = session.socket, export = disk.target
            captures.append(DiskCapture(name: disk.target, origin: "libvirt \(domain.name) \(disk.target) (\(disk.source))",
                                        size: Int(status.size), ranges: ranges, base: baseIndex) {
                NBDBlockDevice(try NBDConnection(socket: socket, export: export), cancelled: cancelled)
            })
        }
        var details = PointDetails(consistency: consistency, readMode: base == nil ? "full" : "incremental",
                                   note: notes.isEmpty ? nil : notes.joined(separator: "; "), checkpoint: checkpoint, domainUUID: uuid)
        Self.keepDefinition(of: domain, in: &details)
        let point = try repository.backup(name, captures: captures, details: details, progress: progress) {
            if cancelled() { throw LifeboatError(.invalidState, "the point of \(name) was cancelled") }
            guard domain.hasBackupJob() else {
                throw LifeboatError(.io, "the backup job of domain \(domain.name) is gone (libvirtd restarted, or the guest was destroyed): the point was not written")
            }
        }
        session.committed()
        Trace.mark("point written")
        // Only the newest checkpoint is a base from now on: this machine's older ones go (and the
        // previous point's, named before names carried the repository and machine).
        for old in ((try? domain.checkpoints()) ?? []) where (isCheckpoint(old, of: name) || old == previous?.checkpoint) && old != checkpoint {
            try? domain.deleteCheckpoint(old)
        }
        Trace.mark("old checkpoints deleted")
        return point
    }

    static func checkpointXML(name: String, machine: String, disks: [DomainDisk]) -> String {
        LibvirtXML.checkpoint(name: name, description: "lifeboat recovery point of \(machine): the next point reads what changed since",
                              targets: disks.map(\.target))
    }

    /// Sorted, disjoint ranges from possibly adjacent ones.
    static func merged(_ ranges: [Range<Int>]) -> [Range<Int>] {
        var out: [Range<Int>] = []
        for range in ranges.sorted(by: { $0.lowerBound < $1.lowerBound }) where !range.isEmpty {
            if let last = out.last, last.upperBound >= range.lowerBound {
                out[out.count - 1] = last.lowerBound..<max(last.upperBound, range.upperBound)
            } else {
                out.append(range)
            }
        }
        return out
    }

    // MARK: - a shut-off domain: its image files, through qemu-nbd

    private func offlinePoint(_ name: String, domain: Domain, disks: [DomainDisk], previous: RecoveryPoint?, uuid: String?,
                              notes: [String], progress: ProgressMeter, cancelled: @escaping @Sendable () -> Bool) throws -> RecoveryPoint {
        // Nothing changes while the domain is off: the previous checkpoint stays the base of the
        // next incremental point (it covers every write since, these included).
        var details = PointDetails(consistency: "consistent", readMode: "full",
                                   note: (notes + ["read in full from the image files: domain \(domain.name) is shut off"]).joined(separator: "; "),
                                   checkpoint: previous?.checkpoint, domainUUID: uuid)
        Self.keepDefinition(of: domain, in: &details)
        return try readImages(name, disks: disks, details: details, progress: progress, cancelled: cancelled) {
            if (try? domain.state().isActive) == true {
                throw LifeboatError(.busy, "domain \(domain.name) started while its images were read: take the point again")
            }
        }
    }

    /// The domain's definition travels with the point: its inactive XML, its hardware, and the
    /// UEFI variables file of a UEFI guest.
    static func keepDefinition(of domain: Domain, in details: inout PointDetails) {
        guard let xml = try? domain.xml(inactive: true), let definition = try? DomainDefinition(xml: xml) else { return }
        details.hardware = definition.hardware
        details.attachments["domain.xml"] = Array(xml.utf8)
        // libvirt may name the NVRAM file only in the live XML (firmware chosen at start).
        let nvram = definition.nvramPath ?? (try? domain.xml()).flatMap { try? DomainDefinition(xml: $0).nvramPath }
        if let nvram, let bytes = FileSystem.contents(nvram) { details.attachments["nvram"] = bytes }
        if definition.hardware.tpm != nil, let uuid = try? domain.uuid(), let path = QemuUser.tpmStatePath(uuid: uuid),
           let state = FileSystem.contents(path) {
            details.attachments["tpm-state"] = state
        }
    }

    /// A point of a disk-file machine (protect --disk) whose images are not all raw: the guests'
    /// bytes through qemu-nbd, which takes QEMU's image lock (a VM writing the image refuses it).
    public func imagePoint(_ name: String, progress: ProgressMeter = ProgressMeter(),
                           cancelled: @escaping @Sendable () -> Bool = { false }) throws -> RecoveryPoint {
        let machine = try repository.machine(name)
        let disks = machine.disks.map { disk in
            DomainDisk(target: disk.name, type: FileSystem.isBlockDevice(disk.path) ? "block" : "file", source: disk.path, format: disk.format ?? "raw")
        }
        let details = PointDetails(consistency: "consistent", readMode: "full", note: nil, checkpoint: nil, domainUUID: nil)
        return try readImages(name, disks: disks, details: details, progress: progress, cancelled: cancelled) {}
    }

    /// Reads `disks` whole (their allocated extents) through qemu-nbd into a point.
    private func readImages(_ name: String, disks: [DomainDisk], details: PointDetails, progress: ProgressMeter,
                            cancelled: @escaping @Sendable () -> Bool, stillValid: @escaping () throws -> Void) throws -> RecoveryPoint {
        let session = try BackupSession(replication: self, machine: name, domain: nil)
        defer { session.end() }
        var captures: [DiskCapture] = []
        for disk in disks {
            let socket = try session.serveImage(disk)
            let status = try session.connect(export: disk.target, contexts: [NBDConnection.allocationContext], socket: socket)
            defer { status.close() }
            let extents = try session.nbd("reading the allocation of \(disk.target)") { try status.extents(NBDConnection.allocationContext) }
            let ranges = Self.merged(extents.filter { $0.flags & NBDConnection.zeroFlag == 0 }.map { Int($0.offset)..<Int($0.offset + $0.length) })
            let export = disk.target
            captures.append(DiskCapture(name: disk.target, origin: disk.source, size: Int(status.size), ranges: ranges, base: nil) {
                NBDBlockDevice(try NBDConnection(socket: socket, export: export), cancelled: cancelled)
            })
        }
        return try repository.backup(name, captures: captures, details: details, progress: progress) {
            if cancelled() { throw LifeboatError(.invalidState, "the point of \(name) was cancelled") }
            try stillValid()
        }
    }
}

/// libvirt would not start a backup incremental from the previous checkpoint.
struct IncrementalRefused: Error {
    var error: LibvirtError
}

/// One worker's view of an NBD export (a backup job's, or qemu-nbd's): reads for a point,
/// reads and writes for failback into an image in its own format. One connection of its own.
public final class NBDBlockDevice: BlockWriter {
    let connection: NBDConnection
    let cancelled: @Sendable () -> Bool

    public init(_ connection: NBDConnection, cancelled: @escaping @Sendable () -> Bool = { false }) {
        self.connection = connection
        self.cancelled = cancelled
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int) throws -> Int {
        if cancelled() { throw LifeboatError(.invalidState, "the point was cancelled") }
        do { try connection.read(into: buffer, at: UInt64(offset)) } catch {
            throw LifeboatError(.io, "\(error) (the backup job may be gone: libvirtd restarted, or the guest was destroyed)")
        }
        return buffer.count
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: Int) throws {
        do { try connection.write(buffer, at: UInt64(offset)) } catch {
            throw LifeboatError(.io, "\(error)")
        }
    }

    public func flush() throws {
        do { try connection.flush() } catch { throw LifeboatError(.io, "\(error)") }
    }

    deinit { connection.close() }
}
