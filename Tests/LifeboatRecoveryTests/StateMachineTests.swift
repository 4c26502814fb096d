import LifeboatRecovery
import LifeboatRepository
import Testing

@Suite("Recovery server states")
struct StateMachineTests {
    @Test("the transitions of DESIGN.md, and nothing else")
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
