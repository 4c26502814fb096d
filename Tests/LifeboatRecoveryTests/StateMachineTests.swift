import Foundation
import LifeboatBase
import LifeboatRecovery
import LifeboatRepository
import LifeboatTestSupport
import Testing

@Suite("Recovery server states")
struct StateMachineTests {
    @Test("the transitions of docs/RECOVERY.md, and nothing else")
    func transitions() throws {
        #expect(StateMachine.next(from: .standby, on: .testFailover) == .testingFailover)
        #expect(StateMachine.next(from: .testingFailover, on: .stopTest) == .standby)
        #expect(StateMachine.next(from: .standby, on: .failover) == .finalizing)
        #expect(StateMachine.next(from: .finalizing, on: .finalised) == .failedOver)
        #expect(StateMachine.next(from: .failedOver, on: .commit) == .committed)
        #expect(StateMachine.next(from: .finalizing, on: .cancelFailover) == .standby)
        #expect(StateMachine.next(from: .failedOver, on: .changePoint) == .finalizing)
        #expect(StateMachine.next(from: .committed, on: .changePoint) == nil, "change-point only before commit")
        #expect(StateMachine.next(from: .committed, on: .failback) == .failingBack)
        #expect(StateMachine.next(from: .failingBack, on: .failedBack) == .standby)
        #expect(StateMachine.next(from: .testingFailover, on: .failover) == nil)
        #expect(StateMachine.next(from: .standby, on: .commit) == nil)
    }

    @Test("a refused command names the state and what is allowed")
    func refusal() {
        #expect {
            try StateMachine.check(.failover, machine: "web", state: .testingFailover)
        } throws: { error in
            let message = (error as? LifeboatError)?.message ?? ""
            return message.contains("web is in TestingFailover") && message.contains("allowed now: stop-test")
                && (error as? LifeboatError)?.code == .invalidState
        }
        #expect(StateMachine.allowed(in: .standby).map(\.rawValue) == ["test-failover", "failover"])
    }

    @Test("addresses: parsing, subnets, refusals")
    func addresses() throws {
        let ip = try Interface4.parse("192.168.50.10/24", what: "--ip")
        #expect(ip.subnet == "192.168.50.0/24")
        #expect(ip.netmask.description == "255.255.255.0")
        #expect(ip.contains(IPv4("192.168.50.200")!))
        #expect(!ip.contains(IPv4("192.168.51.1")!))
        #expect(ip.firstHost.description == "192.168.50.1" && ip.lastHost.description == "192.168.50.254")
        #expect(Interface4("10.0.0.1") == nil)
        #expect(Interface4("10.0.0.256/24") == nil)
        #expect(Interface4("10.0.0.1/33") == nil)
        #expect(throws: LifeboatError.self) { try Interface4.parse("192.168.50.0/24", what: "--ip") }
        #expect(throws: LifeboatError.self) { try Interface4.parse("192.168.50.255/24", what: "--ip") }
    }
}

@Suite("Installation")
struct InstallTests {
    @Test("scripts/install puts the binary, the templates and the service's unit in place; the installed binary finds its templates")
    func install() throws {
        let scratch = Scratch()
        let root = scratch.file("root")
        let out = try sh([packageRoot + "/scripts/install", "--root", root, "--no-build", "--repo", scratch.file("repo"), "--metrics", "127.0.0.1:9999"])
        #expect(out.contains("installed lifeboat"))
        let unit = try String(contentsOfFile: root + "/etc/systemd/system/lifeboat-replicate.service", encoding: .utf8)
        #expect(unit.contains("ExecStart=/usr/local/bin/lifeboat replicate") && unit.contains("KillSignal=SIGTERM"))
        let env = root + "/etc/lifeboat/replicate.env"
        #expect(try String(contentsOfFile: env, encoding: .utf8).contains("LIFEBOAT_METRICS=127.0.0.1:9999"))
        let mode = (try FileManager.default.attributesOfItem(atPath: env)[.posixPermissions] as? Int) ?? 0
        #expect(mode == 0o600, "the settings may hold a password: root only")
        // The installed binary finds the installed templates (no --templates, no $LIFEBOAT_TEMPLATES).
        try sh([root + "/usr/local/bin/lifeboat", "init", "--repo", scratch.file("repo")])
        let status = try sh(["env", "-u", "LIFEBOAT_TEMPLATES", root + "/usr/local/bin/lifeboat", "status", "--repo", scratch.file("repo"),
                             "--hot", scratch.file("hot")])
        #expect(status.contains("MACHINE"))
    }
}

@Suite("Replication schedule")
struct BackoffTests {
    @Test("back-off doubles from a quarter of the interval, stops at the interval, and jitters by at most 20 %")
    func backoff() {
        #expect(Recovery.backoff(failures: 1, interval: 3600, jitter: 1) == 60)
        #expect(Recovery.backoff(failures: 2, interval: 3600, jitter: 1) == 120)
        #expect(Recovery.backoff(failures: 5, interval: 3600, jitter: 1) == 960)
        #expect(Recovery.backoff(failures: 9, interval: 3600, jitter: 1) == 1800, "never more than 30 min")
        #expect(Recovery.backoff(failures: 9, interval: 8, jitter: 1) == 8, "never more than the interval")
        #expect(Recovery.backoff(failures: 1, interval: 2, jitter: 1) == 1, "at least a second")
        let samples = (0..<200).map { _ in Recovery.backoff(failures: 3, interval: 3600) }
        #expect(samples.allSatisfy { $0 >= 192 && $0 <= 288 } && Set(samples).count > 100, "jitter spreads retries")
    }
}
