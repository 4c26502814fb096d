import Foundation
#if canImport(FoundationXML)
import FoundationXML
#endif
import LifeboatBase
internal import CVirt

// The only file that touches libvirt's C API. Every call goes through `check`, which reads
// virGetLastError() at once (it is thread-local and the next call overwrites it).

/// An error reported by libvirt, with libvirt's own code and message.
public struct LibvirtError: Error, Sendable, CustomStringConvertible {
    /// libvirt's `virErrorNumber` (VIR_ERR_*).
    public var code: Int32
    /// libvirt's `virErrorDomain` (which part of libvirt raised it).
    public var domain: Int32
    /// libvirt's text, or a description of the call that failed when libvirt gave none.
    public var message: String

    public var description: String { message }

    /// VIR_ERR_NO_DOMAIN, VIR_ERR_NO_NETWORK: the object does not exist.
    public var isNotFound: Bool { code == 42 || code == 43 }
    /// VIR_ERR_OPERATION_INVALID: e.g. destroying a domain that is not running.
    public var isOperationInvalid: Bool { code == 55 }

    static func last(_ what: String) -> LibvirtError {
        guard let error = virGetLastError() else {
            return LibvirtError(code: -1, domain: -1, message: "\(what) failed")
        }
        let text = error.pointee.message.map { String(cString: $0) } ?? "\(what) failed"
        let result = LibvirtError(code: error.pointee.code, domain: error.pointee.domain, message: text)
        virResetLastError()
        return result
    }
}

/// libvirt prints every error on stderr unless a handler takes them; ours drops them,
/// since each is read with virGetLastError() and thrown to the caller.
private func quietErrorHandler(_ userData: UnsafeMutableRawPointer?, _ error: virErrorPtr?) {}

/// libvirt's default event loop runs on a thread of its own for the life of the process;
/// it must be registered before the first connection is opened for that connection's events.
private let initialised: Bool = {
    virSetErrorFunc(nil, quietErrorHandler)
    guard virInitialize() == 0, virEventRegisterDefaultImpl() == 0 else { return false }
    let thread = Thread {
        while virEventRunDefaultImpl() == 0 {}
    }
    thread.name = "libvirt-events"
    thread.start()
    return true
}()

/// A domain lifecycle event (VIR_DOMAIN_EVENT_ID_LIFECYCLE).
public struct DomainEvent: Sendable, CustomStringConvertible {
    /// virDomainEventType: 0 defined, 1 undefined, 2 started, 3 suspended, 4 resumed, 5 stopped, 6 shutdown, 7 pmsuspended, 8 crashed.
    public var type: Int32
    /// The type's detail (for stopped: 0 shutdown, 1 destroyed, 2 crashed, 3 migrated, 4 saved, 5 failed, 6 from snapshot).
    public var detail: Int32
    public var time: Date

    /// The guest is gone: stopped or crashed.
    public var isStop: Bool { type == 5 || type == 8 }

    public var description: String {
        switch (type, detail) {
        case (5, 0): return "the guest shut down"
        case (5, 1): return "the VM was destroyed"
        case (5, 2), (8, _): return "the guest crashed"
        case (5, 5): return "QEMU failed"
        case (5, _): return "the VM stopped"
        case (2, _): return "the VM started"
        case (3, _): return "the VM was paused"
        case (4, _): return "the VM resumed"
        case (6, _): return "the guest is shutting down"
        default: return "domain event \(type)/\(detail)"
        }
    }
}

/// Collects one domain's lifecycle events from libvirt's event thread until `close()`.
public final class DomainEventWatch: Sendable {
    private let events = Locked<[DomainEvent]>([])
    /// The connection (as its address: raw pointers are not Sendable) and the callback id.
    private let registration = Locked<(connection: UInt, id: Int32)?>(nil)

    /// Events received so far, oldest first.
    public var received: [DomainEvent] { events.withLock { $0 } }

    /// The first stop or crash received, if any.
    public var stop: DomainEvent? { received.first { $0.isStop } }

    fileprivate func append(_ event: DomainEvent) { events.withLock { $0.append(event) } }

    fileprivate func register(_ connection: OpaquePointer, _ id: Int32) {
        virConnectRef(connection)
        let address = UInt(bitPattern: Int(bitPattern: UnsafeRawPointer(connection)))
        registration.withLock { $0 = (address, id) }
    }

    /// Stops watching. The corresponding C function is `virConnectDomainEventDeregisterAny`.
    public func close() {
        guard let taken = registration.withLock({ value -> (connection: UInt, id: Int32)? in
            defer { value = nil }
            return value
        }), let connection = OpaquePointer(bitPattern: taken.connection) else { return }
        virConnectDomainEventDeregisterAny(connection, taken.id)
        virConnectClose(connection)
    }

    deinit { close() }
}

private func lifecycleCallback(_ connection: OpaquePointer?, _ domain: OpaquePointer?, _ event: Int32, _ detail: Int32,
                               _ opaque: UnsafeMutableRawPointer?) {
    guard let opaque else { return }
    let watch = Unmanaged<DomainEventWatch>.fromOpaque(opaque).takeUnretainedValue()
    watch.append(DomainEvent(type: event, detail: detail, time: Date()))
}

private func releaseWatch(_ opaque: UnsafeMutableRawPointer?) {
    guard let opaque else { return }
    Unmanaged<DomainEventWatch>.fromOpaque(opaque).release()
}

@discardableResult
private func check(_ what: String, _ result: Int32) throws -> Int32 {
    if result < 0 { throw LibvirtError.last(what) }
    return result
}

private func check<T>(_ what: String, _ result: T?) throws -> T {
    guard let result else { throw LibvirtError.last(what) }
    return result
}

/// What the host offers recovery VMs.
public struct HostInfo: Sendable {
    public var cpus: Int
    public var memoryMiB: Int
}

/// A libvirt domain's state (virDomainState).
public enum DomainState: String, Sendable, Codable {
    case running, blocked, paused, shuttingDown = "shutting-down", shutOff = "shut-off", crashed, suspended, unknown

    init(_ raw: Int32) {
        switch raw {
        case 1: self = .running
        case 2: self = .blocked
        case 3: self = .paused
        case 4: self = .shuttingDown
        case 5: self = .shutOff
        case 6: self = .crashed
        case 7: self = .suspended
        default: self = .unknown
        }
    }

    /// Running, blocked or paused: QEMU is alive.
    public var isActive: Bool { self == .running || self == .blocked || self == .paused || self == .shuttingDown }
}

/// A block job's progress (virDomainBlockJobInfo).
public struct BlockJobInfo: Sendable {
    /// virDomainBlockJobType: 1 pull, 2 copy, 3 commit, 4 active commit.
    public var type: Int32
    public var current: UInt64
    public var end: UInt64
    /// True when a copy job has caught up and waits for a pivot.
    public var ready: Bool { end > 0 && current == end }
}

/// A DHCP lease on a libvirt network.
public struct DHCPLease: Sendable {
    public var mac: String
    public var ip: String
    public var prefix: Int
    public var hostname: String?
}

/// A connection to libvirt (`virConnectPtr`). Connections are thread-safe in libvirt, so one
/// connection may be used from any thread; the handle is freed by `close()` or `deinit`.
public final class Connection: @unchecked Sendable {
    /// The URI used when none is given: `given`, else $LIFEBOAT_CONNECT, else qemu:///system.
    public static func uri(_ given: String? = nil) -> String {
        given ?? ProcessInfo.processInfo.environment["LIFEBOAT_CONNECT"].flatMap { $0.isEmpty ? nil : $0 } ?? "qemu:///system"
    }

    public let uri: String
    private let handle: OpaquePointer

    /// Opens `uri` (qemu:///system, qemu+ssh://host/system, test:///default …).
    /// The corresponding C function is `virConnectOpen`.
    public init(uri: String) throws {
        guard initialised else { throw LibvirtError(code: -1, domain: -1, message: "libvirt could not initialise") }
        self.uri = uri
        handle = try check("connecting to \(uri)", virConnectOpen(uri))
    }

    deinit { virConnectClose(handle) }

    /// False once the connection broke (libvirtd restarted): open a new one.
    /// The corresponding C function is `virConnectIsAlive`.
    public var isAlive: Bool { virConnectIsAlive(handle) == 1 }

    /// CPUs and memory of the host. The corresponding C function is `virNodeGetInfo`.
    public func hostInfo() throws -> HostInfo {
        var info = virNodeInfo()
        try check("reading the host's CPUs and memory", virNodeGetInfo(handle, &info))
        return HostInfo(cpus: Int(info.cpus), memoryMiB: Int(info.memory) / 1024)
    }

    /// The domain called `name`, or nil when there is none.
    public func domain(named name: String) throws -> Domain? {
        guard let pointer = virDomainLookupByName(handle, name) else {
            let error = LibvirtError.last("looking up domain \(name)")
            if error.isNotFound { return nil }
            throw error
        }
        return Domain(pointer, name: name)
    }

    /// Defines a persistent domain from XML. The corresponding C function is `virDomainDefineXML`.
    public func defineDomain(xml: String) throws -> Domain {
        let pointer = try check("defining the domain", virDomainDefineXML(handle, xml))
        return Domain(pointer, name: virDomainGetName(pointer).map { String(cString: $0) } ?? "?")
    }

    /// The network called `name`, or nil when there is none.
    public func network(named name: String) throws -> Network? {
        guard let pointer = virNetworkLookupByName(handle, name) else {
            let error = LibvirtError.last("looking up network \(name)")
            if error.isNotFound { return nil }
            throw error
        }
        return Network(pointer, name: name)
    }

    /// Defines a persistent network from XML. The corresponding C function is `virNetworkDefineXML`.
    public func defineNetwork(xml: String) throws -> Network {
        let pointer = try check("defining the network", virNetworkDefineXML(handle, xml))
        return Network(pointer, name: virNetworkGetName(pointer).map { String(cString: $0) } ?? "?")
    }

    /// Watches `domain`'s lifecycle events (started, stopped, crashed …) until the watch is closed.
    /// The corresponding C function is `virConnectDomainEventRegisterAny`.
    public func watchLifecycle(of domain: Domain) throws -> DomainEventWatch {
        let watch = DomainEventWatch()
        typealias Lifecycle = @convention(c) (OpaquePointer?, OpaquePointer?, Int32, Int32, UnsafeMutableRawPointer?) -> Void
        let callback = unsafeBitCast(lifecycleCallback as Lifecycle, to: virConnectDomainEventGenericCallback.self)
        let opaque = Unmanaged.passRetained(watch).toOpaque()
        let id = virConnectDomainEventRegisterAny(handle, domain.pointer, Int32(VIR_DOMAIN_EVENT_ID_LIFECYCLE.rawValue),
                                                  callback, opaque, releaseWatch)
        if id < 0 {
            Unmanaged<DomainEventWatch>.fromOpaque(opaque).release()
            throw LibvirtError.last("watching the events of \(domain.name)")
        }
        watch.register(handle, id)
        return watch
    }

    /// Whether libvirt offers the `kvm` domain type for x86_64 guests on this host.
    public func offersKVM() -> Bool {
        guard let text = virConnectGetCapabilities(handle) else { _ = LibvirtError.last("capabilities"); return false }
        defer { free(text) }
        return String(cString: text).contains("<domain type='kvm'")
    }
}

/// A libvirt domain (`virDomainPtr`).
public final class Domain: @unchecked Sendable {
    public let name: String
    private let handle: OpaquePointer
    fileprivate var pointer: OpaquePointer { handle }

    init(_ handle: OpaquePointer, name: String) {
        self.handle = handle
        self.name = name
    }

    deinit { virDomainFree(handle) }

    /// Starts a defined domain. The corresponding C function is `virDomainCreate`.
    public func start() throws { try check("starting \(name)", virDomainCreate(handle)) }

    /// Pulls the plug. Succeeds when the domain is already off.
    /// The corresponding C function is `virDomainDestroy`.
    public func destroy() throws {
        if virDomainDestroy(handle) < 0 {
            let error = LibvirtError.last("stopping \(name)")
            if !error.isOperationInvalid { throw error }
        }
    }

    /// Asks the guest to shut down (ACPI). The corresponding C function is `virDomainShutdown`.
    public func shutdown() throws { try check("shutting down \(name)", virDomainShutdown(handle)) }

    /// Removes the definition (and any managed save image, snapshots' metadata and NVRAM).
    /// The corresponding C function is `virDomainUndefineFlags`.
    public func undefine() throws {
        let flags = UInt32(VIR_DOMAIN_UNDEFINE_MANAGED_SAVE.rawValue | VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA.rawValue
            | VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA.rawValue | VIR_DOMAIN_UNDEFINE_NVRAM.rawValue)
        if virDomainUndefineFlags(handle, flags) < 0 {
            let error = LibvirtError.last("undefining \(name)")
            if !error.isNotFound && !error.isOperationInvalid { throw error }
        }
    }

    /// The domain's state. The corresponding C function is `virDomainGetState`.
    public func state() throws -> DomainState {
        var state: Int32 = 0
        var reason: Int32 = 0
        try check("reading the state of \(name)", virDomainGetState(handle, &state, &reason, 0))
        return DomainState(state)
    }

    /// The live XML (the inactive one when the domain is off); with `inactive`, the persistent
    /// definition (what the domain boots with next), secure parts left out.
    public func xml(inactive: Bool = false) throws -> String {
        let flags = inactive ? UInt32(VIR_DOMAIN_XML_INACTIVE.rawValue) : 0
        let text = try check("reading the XML of \(name)", virDomainGetXMLDesc(handle, flags))
        defer { free(text) }
        return String(cString: text)
    }

    /// Sets autostart with the host's libvirtd.
    public func setAutostart(_ on: Bool) throws {
        try check("setting autostart of \(name)", virDomainSetAutostart(handle, on ? 1 : 0))
    }

    /// A screenshot of the graphical console: (MIME type, bytes).
    /// The corresponding C function is `virDomainScreenshot`.
    public func screenshot() throws -> (mime: String, bytes: [UInt8]) {
        let stream = try check("opening a stream", virStreamNew(connectionHandle(), 0))
        defer { virStreamFree(stream) }
        let mimePointer = try check("taking a screenshot of \(name)", virDomainScreenshot(handle, stream, 0, 0))
        defer { free(mimePointer) }
        var bytes: [UInt8] = []
        var buffer = [CChar](repeating: 0, count: 65536)
        while true {
            let got = buffer.withUnsafeMutableBufferPointer { virStreamRecv(stream, $0.baseAddress, $0.count) }
            if got < 0 {
                let error = LibvirtError.last("reading the screenshot of \(name)")
                virStreamAbort(stream)
                throw error
            }
            if got == 0 { break }
            buffer.withUnsafeBufferPointer { pointer in
                bytes.append(contentsOf: UnsafeRawBufferPointer(start: pointer.baseAddress, count: Int(got)))
            }
        }
        try check("finishing the screenshot stream", virStreamFinish(stream))
        return (String(cString: mimePointer), bytes)
    }

    private func connectionHandle() -> OpaquePointer? { virDomainGetConnect(handle) }

    /// Starts a block copy (mirror) of `disk` (target name, e.g. vda) to `destinationXML`, a
    /// `<disk>` element, while the guest runs; writes are mirrored to both until
    /// `abortBlockJob(disk:pivot: true)` switches the guest to the copy.
    /// - Parameters:
    ///   - shallow: copy only the top image; the destination must then already have a backing
    ///     chain with the same content as the source's (given in the XML's `<backingStore>`).
    ///   - reuseExisting: the destination file exists (made by the caller) and is used as it is.
    ///   - bandwidth: bytes per second (0: no limit).
    /// The job is not made recoverable, which is what lets libvirt 9 run it on a persistent
    /// domain. The corresponding C function is `virDomainBlockCopy`.
    public func blockCopy(disk: String, destinationXML: String, shallow: Bool, reuseExisting: Bool, bandwidth: UInt64 = 0) throws {
        var params: virTypedParameterPtr? = nil
        var count: Int32 = 0
        var capacity: Int32 = 0
        defer { virTypedParamsFree(params, count) }
        if bandwidth > 0 {
            try check("setting the copy bandwidth", virTypedParamsAddULLong(&params, &count, &capacity, VIR_DOMAIN_BLOCK_COPY_BANDWIDTH, bandwidth))
        }
        var flags = UInt32(VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB.rawValue)
        if shallow { flags |= UInt32(VIR_DOMAIN_BLOCK_COPY_SHALLOW.rawValue) }
        if reuseExisting { flags |= UInt32(VIR_DOMAIN_BLOCK_COPY_REUSE_EXT.rawValue) }
        try check("starting the block copy of \(name) \(disk)", virDomainBlockCopy(handle, disk, destinationXML, params, count, flags))
    }

    /// Puts a new, empty qcow2 image on top of each of `disks` (target -> new file) at one instant
    /// while the guest runs (an external disk-only snapshot without metadata): the guest writes
    /// into the new images from then on, and their dirty bitmaps can track changes.
    /// The corresponding C function is `virDomainSnapshotCreateXML`.
    public func addOverlays(_ disks: [(target: String, file: String)]) throws {
        let elements = disks.map { disk in
            DomainDisk.element("disk", ["name": disk.target, "snapshot": "external"], [
                DomainDisk.element("driver", ["type": "qcow2"]), DomainDisk.element("source", ["file": disk.file]),
            ])
        }
        let xml = DomainDisk.element("domainsnapshot", [:], [DomainDisk.element("disks", [:], elements)]).xmlString
        let flags = UInt32(VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY.rawValue | VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA.rawValue
            | VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC.rawValue)
        guard let snapshot = virDomainSnapshotCreateXML(handle, xml, flags) else {
            throw LibvirtError.last("putting qcow2 images on the disks of \(name)")
        }
        virDomainSnapshotFree(snapshot)
    }

    /// Starts an active block commit: the top image of `disk` is merged into its backing file
    /// while the guest runs; `abortBlockJob(disk:pivot: true)` then makes the backing file the
    /// disk. The corresponding C function is `virDomainBlockCommit`.
    public func blockCommitActive(disk: String) throws {
        try check("starting the block commit of \(name) \(disk)",
                  virDomainBlockCommit(handle, disk, nil, nil, 0, UInt32(VIR_DOMAIN_BLOCK_COMMIT_ACTIVE.rawValue)))
    }

    /// The block job on `disk`, or nil when none runs. The corresponding C function is `virDomainGetBlockJobInfo`.
    public func blockJob(disk: String) throws -> BlockJobInfo? {
        var info = virDomainBlockJobInfo()
        let result = try check("reading the block job of \(name) \(disk)",
                               virDomainGetBlockJobInfo(handle, disk, &info, UInt32(VIR_DOMAIN_BLOCK_JOB_INFO_BANDWIDTH_BYTES.rawValue)))
        if result == 0 { return nil }
        return BlockJobInfo(type: info.type, current: UInt64(info.cur), end: UInt64(info.end))
    }

    /// Cancels the block job on `disk` (or pivots a ready copy when `pivot`).
    /// The corresponding C function is `virDomainBlockJobAbort`.
    public func abortBlockJob(disk: String, pivot: Bool = false) throws {
        let flags = pivot ? UInt32(VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT.rawValue) : 0
        try check("ending the block job of \(name) \(disk)", virDomainBlockJobAbort(handle, disk, flags))
    }
}

// MARK: - backups and checkpoints (changed-block tracking)

extension Domain {
    /// The domain's UUID: a redefined domain with the same name has another one.
    /// The corresponding C function is `virDomainGetUUIDString`.
    public func uuid() throws -> String {
        var buffer = [CChar](repeating: 0, count: Int(VIR_UUID_STRING_BUFLEN))
        try check("reading the UUID of \(name)", virDomainGetUUIDString(pointer, &buffer))
        return String(cString: buffer)
    }

    /// Starts a backup job (pull mode: QEMU serves the disks at the instant of the call over NBD,
    /// and keeps the guest's later writes out of it with a scratch file per disk), creating the
    /// checkpoint `checkpointXML` at the same instant when given.
    /// The corresponding C function is `virDomainBackupBegin`.
    public func beginBackup(backupXML: String, checkpointXML: String?) throws {
        try check("starting a backup of \(name)", virDomainBackupBegin(pointer, backupXML, checkpointXML, 0))
    }

    /// Ends the domain's job (a pull-mode backup ends this way; libvirt removes its scratch files
    /// and socket). Succeeds when no job runs. The corresponding C function is `virDomainAbortJob`.
    public func abortJob() throws {
        if virDomainAbortJob(pointer) < 0 {
            let error = LibvirtError.last("ending the job of \(name)")
            if !error.isOperationInvalid { throw error }
        }
    }

    /// What job runs on a domain, as far as libvirt can say.
    public enum JobState: Sendable { case none, backup, other, unknown }

    /// The domain's job. The corresponding C function is `virDomainGetJobStats`.
    public func jobState() -> JobState {
        var type: Int32 = 0
        var params: virTypedParameterPtr? = nil
        var count: Int32 = 0
        guard virDomainGetJobStats(pointer, &type, &params, &count, 0) == 0 else {
            virResetLastError()
            return .unknown
        }
        defer { virTypedParamsFree(params, count) }
        if type == Int32(VIR_DOMAIN_JOB_NONE.rawValue) { return .none }
        var operation: Int32 = 0
        _ = virTypedParamsGetInt(params, count, VIR_DOMAIN_JOB_OPERATION, &operation)
        return operation == Int32(VIR_DOMAIN_JOB_OPERATION_BACKUP.rawValue) ? .backup : .other
    }

    /// True while a backup job runs on the domain (or libvirt cannot tell, as while one starts).
    public func hasBackupJob() -> Bool {
        let state = jobState()
        return state == .backup || state == .unknown
    }

    /// Names of the domain's checkpoints. The corresponding C function is `virDomainListAllCheckpoints`.
    public func checkpoints() throws -> [String] {
        var list: UnsafeMutablePointer<OpaquePointer?>? = nil
        let count = try check("listing the checkpoints of \(name)", virDomainListAllCheckpoints(pointer, &list, 0))
        defer { free(list) }
        var names: [String] = []
        for i in 0..<Int(count) {
            guard let checkpoint = list?[i] else { continue }
            if let text = virDomainCheckpointGetName(checkpoint) { names.append(String(cString: text)) }
            virDomainCheckpointFree(checkpoint)
        }
        return names
    }

    /// Deletes checkpoint `checkpoint` (its bitmap is merged into its parent's by libvirt).
    /// Succeeds when it does not exist. The corresponding C function is `virDomainCheckpointDelete`.
    public func deleteCheckpoint(_ checkpoint: String) throws {
        guard let handle = virDomainCheckpointLookupByName(pointer, checkpoint, 0) else {
            virResetLastError()
            return
        }
        defer { virDomainCheckpointFree(handle) }
        try check("deleting checkpoint \(checkpoint) of \(name)", virDomainCheckpointDelete(handle, 0))
    }

    /// Sets how long libvirt waits for the guest agent (seconds; -2 block, -1 default, 0 no wait).
    /// The corresponding C function is `virDomainAgentSetResponseTimeout`.
    public func setAgentTimeout(_ seconds: Int32) throws {
        try check("setting the guest agent timeout of \(name)", virDomainAgentSetResponseTimeout(pointer, seconds, 0))
    }

    /// Freezes the guest's file systems through the guest agent.
    /// - Returns: how many were frozen. The corresponding C function is `virDomainFSFreeze`.
    public func freezeFileSystems() throws -> Int {
        Int(try check("freezing the file systems of \(name)", virDomainFSFreeze(pointer, nil, 0, 0)))
    }

    /// Thaws them. The corresponding C function is `virDomainFSThaw`.
    @discardableResult
    public func thawFileSystems() throws -> Int {
        Int(try check("thawing the file systems of \(name)", virDomainFSThaw(pointer, nil, 0, 0)))
    }
}

/// A libvirt virtual network (`virNetworkPtr`).
public final class Network: @unchecked Sendable {
    public let name: String
    private let handle: OpaquePointer

    init(_ handle: OpaquePointer, name: String) {
        self.handle = handle
        self.name = name
    }

    deinit { virNetworkFree(handle) }

    public func isActive() throws -> Bool { try check("reading the state of network \(name)", virNetworkIsActive(handle)) == 1 }

    /// The corresponding C function is `virNetworkCreate`.
    public func start() throws { try check("starting network \(name)", virNetworkCreate(handle)) }

    /// Stops the network; succeeds when it is not running. The corresponding C function is `virNetworkDestroy`.
    public func destroy() throws {
        if virNetworkDestroy(handle) < 0 {
            let error = LibvirtError.last("stopping network \(name)")
            if !error.isOperationInvalid { throw error }
        }
    }

    /// The corresponding C function is `virNetworkUndefine`.
    public func undefine() throws {
        if virNetworkUndefine(handle) < 0 {
            let error = LibvirtError.last("undefining network \(name)")
            if !error.isNotFound && !error.isOperationInvalid { throw error }
        }
    }

    public func xml() throws -> String {
        let text = try check("reading the XML of network \(name)", virNetworkGetXMLDesc(handle, 0))
        defer { free(text) }
        return String(cString: text)
    }

    /// Adds (or, with `remove`, deletes) a `<host mac= ip= name=/>` DHCP reservation in the
    /// running network and its persistent definition. The corresponding C function is `virNetworkUpdate`.
    public func updateDHCPHost(_ hostXML: String, remove: Bool = false) throws {
        let command = remove ? VIR_NETWORK_UPDATE_COMMAND_DELETE : VIR_NETWORK_UPDATE_COMMAND_ADD_LAST
        var flags = UInt32(VIR_NETWORK_UPDATE_AFFECT_CONFIG.rawValue)
        if (try? isActive()) == true { flags |= UInt32(VIR_NETWORK_UPDATE_AFFECT_LIVE.rawValue) }
        try check("updating the DHCP hosts of network \(name)",
                  virNetworkUpdate(handle, command.rawValue, VIR_NETWORK_SECTION_IP_DHCP_HOST.rawValue, -1, hostXML, flags))
    }

    /// Current DHCP leases. The corresponding C function is `virNetworkGetDHCPLeases`.
    public func leases() throws -> [DHCPLease] {
        var list: UnsafeMutablePointer<virNetworkDHCPLeasePtr?>?
        let count = try check("reading the DHCP leases of network \(name)", virNetworkGetDHCPLeases(handle, nil, &list, 0))
        defer { free(list) }
        return (0..<Int(count)).compactMap { index in
            guard let lease = list?[index] else { return nil }
            defer { virNetworkDHCPLeaseFree(lease) }
            return DHCPLease(mac: lease.pointee.mac.map { String(cString: $0) } ?? "",
                             ip: lease.pointee.ipaddr.map { String(cString: $0) } ?? "",
                             prefix: Int(lease.pointee.prefix),
                             hostname: lease.pointee.hostname.map { String(cString: $0) })
        }
    }
}
