import Foundation
import LifeboatBase
import LifeboatRepository
import LifeboatVirt

/// The isolated test network all drills share (`lifeboat-test`, no forward element).
extension Recovery {
    /// The subnet used when neither the machine nor the command gives an IP.
    static let defaultTestSubnet = Interface4(address: IPv4(0xC0A8_D501), prefix: 24)   // 192.168.213.1/24

    /// The subnet of an existing network, read from its XML.
    static func subnet(ofNetworkXML xml: String) -> Interface4? {
        guard let ip = LibvirtXML.networkAddress(xml), let address = IPv4(ip.address) else { return nil }
        if let prefix = ip.prefix { return Interface4(address: address, prefix: prefix) }
        guard let mask = ip.netmask.flatMap(IPv4.init) else { return nil }
        return Interface4(address: address, prefix: mask.value.nonzeroBitCount)
    }

    /// Machines whose drills use the test network, other than `machine`.
    func otherTestNetworkUsers(except machine: String) -> [String] {
        hot.records().filter { $0.machine != machine && $0.state == .testingFailover && $0.network == Self.testNetworkName }.map(\.machine)
    }

    /// Makes sure `lifeboat-test` runs and contains `ip`, and reserves `ip` for `mac` by DHCP.
    /// - Returns: the host's address and prefix on the network.
    func ensureTestNetwork(machine: String, mac: String, ip: Interface4?, gateway: IPv4?) throws -> Interface4 {
        let _lock = try hot.sharedLock()
        defer { withExtendedLifetime(_lock) {} }
        let connection = try connection()
        let name = Self.testNetworkName
        var network = try virt("looking up network \(name)") { try connection.network(named: name) }
        let users = otherTestNetworkUsers(except: machine)
        if let existing = network {
            let subnet = try virt("reading network \(name)") { Self.subnet(ofNetworkXML: try existing.xml()) }
            if let ip, let subnet, !subnet.contains(ip.address) {
                if users.isEmpty {
                    // Nobody uses it: make it again around this machine's subnet.
                    try virt("replacing network \(name)") { try existing.destroy(); try existing.undefine() }
                    network = nil
                } else {
                    throw LifeboatError(.invalidArgument,
                        "IP \(ip) is outside the test network \(name) (\(subnet.subnet)) that the drills of \(users.joined(separator: ", ")) use: give --ip inside it, or stop those drills first")
                }
            }
        }
        let host: Interface4
        if let network {
            host = try virt("reading network \(name)") { Self.subnet(ofNetworkXML: try network.xml()) } ?? Self.defaultTestSubnet
        } else {
            let around = ip ?? Self.defaultTestSubnet
            host = around.bridgeAddress(gateway: gateway, vm: ip?.address)
            let parameters = Self.networkParameters(name: name, host: host, avoiding: ip?.address)
            let xml = try virt("rendering the test network") { try settings.templates.render(Templates.testNetwork, parameters) }
            network = try virt("creating the isolated test network \(name) (\(host.subnet))") { try connection.defineNetwork(xml: xml) }
        }
        guard let network else { throw LifeboatError(.io, "network \(name) vanished") }
        if !(try virt("reading network \(name)") { try network.isActive() }) {
            try virt("starting the test network \(name) (\(host.subnet))") { try network.start() }
        }
        if let ip {
            let entry = Self.hostEntry(mac: mac, ip: ip.address, machine: machine)
            try? network.updateDHCPHost(Self.hostEntry(mac: mac, ip: nil, machine: machine), remove: true)
            do {
                try network.updateDHCPHost(entry)
            } catch let error as LibvirtError {
                throw LifeboatError(.alreadyExists,
                    "cannot reserve \(ip.address) for \(machine) on \(name) (\(error.message)): is it another drilled machine's IP? Give --ip", cause: error)
            }
        }
        return host
    }

    /// Drops the machine's DHCP reservation; removes the network when no other drill uses it.
    /// - Returns: true when the network was removed.
    func releaseTestNetwork(machine: String, mac: String?) -> Bool {
        guard let _lock = try? hot.sharedLock(), let connection = try? connection(),
              let network = try? connection.network(named: Self.testNetworkName) else { return false }
        defer { withExtendedLifetime(_lock) {} }
        if let mac { try? network.updateDHCPHost(Self.hostEntry(mac: mac, ip: nil, machine: machine), remove: true) }
        guard otherTestNetworkUsers(except: machine).isEmpty else { return false }
        // A VM of someone else's (not a lifeboat drill) may still be attached: libvirt then refuses.
        do {
            try network.destroy()
            try network.undefine()
            return true
        } catch {
            return false
        }
    }

    static func hostEntry(mac: String, ip: IPv4?, machine: String) -> String {
        LibvirtXML.dhcpHost(mac: mac, ip: ip?.description, name: machine.replacingOccurrences(of: "_", with: "-"))
    }

    /// DHCP hands out the upper quarter of the subnet (reservations may sit anywhere).
    static func networkParameters(name: String, host: Interface4, avoiding: IPv4?) -> NetworkParameters {
        let size = host.lastHost.value - host.firstHost.value + 1
        var start = IPv4(host.lastHost.value - size / 4)
        if start <= host.address { start = IPv4(host.address.value + 1) }
        return NetworkParameters(name: name, address: host.address.description, netmask: host.netmask.description,
                                 dhcpStart: start.description, dhcpEnd: host.lastHost.description)
    }
}
