import Foundation
import LifeboatBase
import LifeboatFS
import LifeboatRepository
import LifeboatVirt
#if canImport(Glibc)
import Glibc
#endif

/// What a drill is asked to do; nil fields come from the machine's settings.
public struct DrillOptions: Sendable {
    public var point: String?
    public var vcpus: Int?
    public var memoryMiB: Int?
    /// ADDR/PREFIX on the test network.
    public var ip: String?
    /// Regular expression for the boot line.
    public var waitFor: String?
    public var timeout: TimeInterval
    /// Shell command run once the boot line is seen.
    public var check: String?
    /// Where the check runs (a plan's folder); nil: the current folder.
    public var checkDirectory: String?
    /// More variables for the check (a plan's name and group).
    public var checkEnvironment: [String: String] = [:]

    public init(point: String? = nil, vcpus: Int? = nil, memoryMiB: Int? = nil, ip: String? = nil,
                waitFor: String? = nil, timeout: TimeInterval = 300, check: String? = nil) {
        self.point = point
        self.vcpus = vcpus
        self.memoryMiB = memoryMiB
        self.ip = ip
        self.waitFor = waitFor
        self.timeout = timeout
        self.check = check
    }
}

/// What stop-test removed.
public struct StopReport: Codable, Sendable {
    public var machine: String
    public var domainRemoved: Bool
    public var overlaysRemoved: Int
    public var networkRemoved: Bool
    public var mountReleased: String?
}

extension Recovery {
    /// The default boot line: a login prompt.
    public static let defaultBootPattern = "login:"

    /// Test failover: boots `name`'s recovery VM from a recovery point on the isolated test
    /// network, waits for its boot line, runs the check, and records the drill. The VM keeps
    /// running until `stopTest`. A drill that fails (no boot line, failing check) is recorded
    /// as failed and returned; errors before the VM starts undo what was made and throw.
    /// - Parameter report: called with a line per step, for a terminal.
    public func testFailover(_ name: String, _ options: DrillOptions, report: (String) -> Void = { _ in }) throws -> Drill {
        let started = Date()
        let machine = try repository.machine(name)
        let point = try resolvePoint(name, options.point)
        try hot.checkReachableByQemu()
        var lock: FileLock? = try hot.lock(name)
        defer { withExtendedLifetime(lock) {} }
        let state = try reconciledState(name, record: try hot.record(name))
        _ = try StateMachine.check(.testFailover, machine: name, state: state)

        let vcpus = options.vcpus ?? machine.vcpus
        let memory = options.memoryMiB ?? machine.memoryMiB
        try checkResources(vcpus: vcpus, memoryMiB: memory)
        let ipText = options.ip ?? machine.testIP ?? machine.ip
        let ip = try ipText.map { try Interface4.parse($0, what: options.ip != nil ? "--ip" : "the test IP of \(name)") }
        let patternText = options.waitFor ?? machine.bootPattern ?? Self.defaultBootPattern
        _ = try Self.bootPattern(patternText, what: "--wait-for")
        guard let mac = machine.macs.first else {
            throw LifeboatError(.invalidArgument, "\(name) has no MAC address: protect it again with --mac")
        }
        let virtType = try virtType(for: machine)
        let domainName = Self.testDomainName(name)

        // Written first, so that a crash from here on leaves a record stop-test can follow.
        let drillID = Repository.pointID(for: started, existing: Set((try? FileSystem.list(hot.drillsDirectory(name))) ?? []))
        try hot.prepare(name)
        let drillFolder = hot.drillDirectory(name, drillID)
        try FileSystem.makeDirectories(drillFolder)
        chmod(drillFolder, 0o755)
        var record = ServerRecord(machine: name, state: .testingFailover, repository: repository.root)
        record.point = point.id
        record.pointTime = point.time
        record.vm = domainName
        record.network = Self.testNetworkName
        record.ip = ip?.address.description
        record.mac = mac
        record.vcpus = vcpus
        record.memoryMiB = memory
        record.virtType = virtType
        record.drill = drillID
        record.phase = "starting"
        try hot.save(record)
        let consoleLog = drillFolder + "/console.log"
        var drill = Drill(id: drillID, machine: name, point: point.id, pointTime: point.time, started: started, result: .running,
                          vm: domainName, network: Self.testNetworkName, ip: ip?.address.description, vcpus: vcpus, memoryMiB: memory,
                          virtType: virtType, bootPattern: patternText, check: options.check, consoleLog: consoleLog)
        try hot.save(drill)
        try repository.hold(name, point: point.id, by: "test-failover")   // prune must not take it away meanwhile

        let domain: Domain
        let events: DomainEventWatch?
        do {
            report("serving \(repository.root) for QEMU")
            let mount = try ensureMount()
            record.mount = mount
            record.disks = try makeOverlays(of: point, machine: name, mount: mount, in: hot.testDirectory(name), finals: false)
            try hot.save(record)
            report("overlays in \(hot.testDirectory(name)) over point \(point.id)")
            let host = try ensureTestNetwork(machine: name, mac: mac, ip: ip, gateway: machine.gateway.flatMap(IPv4.init))
            report("test network \(Self.testNetworkName) (\(host.subnet), isolated)")

            _ = FileManager.default.createFile(atPath: consoleLog, contents: nil)
            if try removeDomain(domainName) { report("removed a leftover \(domainName)") }
            (domain, events) = try defineAndStart(
                name: domainName, type: virtType, vcpus: vcpus, memoryMiB: memory, title: "lifeboat drill of \(name)",
                description: "Test failover of \(name) from recovery point \(point.id) (\(ISO8601DateFormatter().string(from: point.time))), drill \(drillID). Remove with: lifeboat stop-test \(name)",
                disks: record.disks, interfaces: [.init(network: Self.testNetworkName, mac: mac)], console: consoleLog, point: point,
                machine: machine, watch: true, report: report)
        } catch {
            drill.result = .failed
            drill.reason = "\(error)"
            drill.ended = Date()
            try? hot.save(drill)
            _ = try? cleanUpTest(name, record: record)
            throw error
        }
        drill.secondsToRunning = Date().timeIntervalSince(started)
        record.phase = nil
        try hot.save(record)
        try hot.save(drill)
        report(String(format: "VM %@ running after %.1f s (%@, %d vCPU, %d MiB)", domainName, drill.secondsToRunning!, virtType, vcpus, memory))
        hot.record(name, HistoryEvent(event: "test-failover", state: .testingFailover, point: point.id,
                                      detail: "drill \(drillID): VM \(domainName) running on \(Self.testNetworkName)"))
        lock = nil   // stop-test may now run while the drill waits for the guest

        let deadline = started.addingTimeInterval(options.timeout)
        defer { events?.close() }
        let knownIP = ip?.address.description
        let watch = BootWatch(machine: name, point: point.id, domain: domain, events: events, consoleLog: consoleLog, pattern: patternText,
                              timeout: options.timeout, deadline: deadline, screenshot: drillFolder + "/screenshot.png",
                              check: options.check, checkLog: drillFolder + "/check.log", checkDirectory: options.checkDirectory,
                              environment: options.checkEnvironment.merging(["LIFEBOAT_DRILL": drillID]) { $1 },
                              address: { [self] in knownIP ?? waitForLease(mac: mac, until: min(deadline, Date().addingTimeInterval(10))) })
        let outcome = try watchBoot(watch, report: report) { booted in
            drill.bootLine = booted.line
            drill.secondsToBootLine = booted.bootLineAt?.timeIntervalSince(started)
            drill.screenshot = booted.screenshot
            drill.ip = booted.ip
            try hot.save(drill)
            report(String(format: "boot line after %.1f s: %@", drill.secondsToBootLine ?? 0, booted.line ?? ""))
        }
        guard outcome.line != nil else {
            drill.result = .failed
            drill.reason = outcome.reason
            drill.ended = Date()
            try hot.save(drill)
            hot.record(name, HistoryEvent(event: "drill-failed", state: .testingFailover, point: point.id, detail: "drill \(drillID): \(drill.reason ?? "?")"))
            return drill
        }
        drill.checkLog = outcome.checkLog
        drill.checkStatus = outcome.checkStatus
        if let failure = outcome.reason {
            drill.result = .failed
            drill.reason = failure
        }
        drill.secondsToCheckEnd = Date().timeIntervalSince(started)
        if drill.result == .running { drill.result = .passed }
        drill.ended = Date()
        try hot.save(drill)
        hot.record(name, HistoryEvent(event: "drill-\(drill.result.rawValue)", state: .testingFailover, point: point.id,
                                      detail: "drill \(drillID): " + (drill.reason ?? String(format: "boot line after %.1f s", drill.secondsToBootLine ?? 0))))
        return drill
    }

    /// Saves the VM's screen as PNG at `path`; nil when libvirt gives none or it cannot be written.
    static func saveScreenshot(of domain: Domain, to path: String) -> String? {
        guard let shot = try? domain.screenshot(), let png = shot.mime.contains("png") ? shot.bytes : PNG.fromPPM(shot.bytes),
              FileManager.default.createFile(atPath: path, contents: Data(png)) else { return nil }
        return path
    }

    /// Runs a check or a plan's script; returns its status and, when it failed, why in a sentence.
    static func runCheck(_ script: String, environment: [String: String], log: String, deadline: Date,
                         directory: String?, what: String = "the check") throws -> (status: Int32, failure: String?) {
        let outcome = try ChildProcess.runScript(script, environment: environment, log: log,
                                                 timeout: max(10, deadline.timeIntervalSinceNow), workingDirectory: directory)
        if outcome.timedOut { return (outcome.status, "\(what) did not finish within the timeout (see \(log))") }
        guard outcome.status != 0 else { return (0, nil) }
        let last = (try? String(contentsOfFile: log, encoding: .utf8))?.split(separator: "\n").last.map(String.init)
        return (outcome.status, "\(what) exited with status \(outcome.status)" + (last.map { ": \($0)" } ?? "") + " (see \(log))")
    }

    /// Ends a drill: destroys the VM, deletes the overlays, drops the network when no other drill
    /// uses it, releases the mount when nothing reads from it. Works on whatever a killed
    /// test-failover left behind.
    public func stopTest(_ name: String) throws -> StopReport {
        let lock = try hot.lock(name)
        defer { withExtendedLifetime(lock) {} }
        let record = try hot.record(name)
        let state = try reconciledState(name, record: record)
        _ = try StateMachine.check(.stopTest, machine: name, state: state)
        let mac = record?.mac ?? (try? repository.machine(name))?.macs.first
        var base = record ?? ServerRecord(machine: name, state: .testingFailover, repository: repository.root)
        base.mac = mac
        return try cleanUpTest(name, record: base)
    }

    /// Removes a drill's domain, overlays, DHCP reservation, network and mount use; records Standby.
    func cleanUpTest(_ name: String, record: ServerRecord) throws -> StopReport {
        let domainRemoved = try removeDomain(Self.testDomainName(name))
        let folder = hot.testDirectory(name)
        let overlays = testLeftovers(name).overlays
        FileSystem.removeTree(folder)
        try backToStandby(name, event: "stop-test", point: record.point,
                          detail: domainRemoved ? "VM \(Self.testDomainName(name)) destroyed, \(overlays) overlay(s) deleted" : "leftovers removed")
        repository.release(name, by: "test-failover")
        let networkRemoved = releaseTestNetwork(machine: name, mac: record.mac)
        let released = releaseMountIfUnused(except: name)
        if let id = record.drill, var drill = hot.drills(name).first(where: { $0.id == id }), drill.result == .running {
            drill.result = .failed
            drill.reason = "stopped before it finished (test-failover was interrupted or stop-test ran during the wait)"
            drill.ended = Date()
            try? hot.save(drill)
        }
        return StopReport(machine: name, domainRemoved: domainRemoved, overlaysRemoved: overlays,
                          networkRemoved: networkRemoved, mountReleased: released)
    }

    /// The state to act on: the record's, or TestingFailover when a drill left things behind
    /// without a record saying so.
    func reconciledState(_ name: String, record: ServerRecord?) throws -> ServerState {
        let recorded = record?.state ?? .standby
        guard recorded == .standby else { return recorded }
        let left = testLeftovers(name)
        return left.domain != nil || left.overlays > 0 ? .testingFailover : .standby
    }

    /// What a drill left: its domain, if any, and how many overlays.
    func testLeftovers(_ name: String) -> (domain: Domain?, overlays: Int) {
        let domain = (try? connection().domain(named: Self.testDomainName(name))) ?? nil
        let overlays = ((try? FileSystem.list(hot.testDirectory(name))) ?? []).filter { $0.hasSuffix(".qcow2") }.count
        return (domain, overlays)
    }

    /// The IP the network's DHCP server gave `mac`, waiting a little for the lease.
    func waitForLease(mac: String, until: Date) -> String? {
        repeat {
            if let leases = try? connection().network(named: Self.testNetworkName)?.leases(),
               let lease = leases.first(where: { $0.mac.lowercased() == mac.lowercased() }) {
                return lease.ip
            }
            Thread.sleep(forTimeInterval: 0.5)
        } while Date() < until
        return nil
    }

    /// The guest device name of disk `index` on `bus`: vda … on virtio, sda … on sata and scsi.
    static func target(_ index: Int, bus: String? = nil) -> String {
        (bus == nil || bus == "virtio" ? "vd" : "sd") + String(UnicodeScalar(UInt8(97 + index % 26)))
    }
}
