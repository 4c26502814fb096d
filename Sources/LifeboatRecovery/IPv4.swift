import LifeboatBase
import LifeboatRepository

/// An IPv4 address.
public struct IPv4: Hashable, Sendable, CustomStringConvertible, Comparable {
    public var value: UInt32

    public init(_ value: UInt32) { self.value = value }

    /// Parses dotted-quad text; nil when it is not an address.
    public init?(_ text: String) {
        let parts = text.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 4 else { return nil }
        var value: UInt32 = 0
        for part in parts {
            guard !part.isEmpty, part.count <= 3, part.allSatisfy(\.isNumber), let byte = UInt32(part), byte <= 255 else { return nil }
            value = value << 8 | byte
        }
        self.value = value
    }

    public var description: String {
        [24, 16, 8, 0].map { String((value >> UInt32($0)) & 0xff) }.joined(separator: ".")
    }

    public static func < (lhs: IPv4, rhs: IPv4) -> Bool { lhs.value < rhs.value }
}

/// An address with its prefix length, as in 192.168.50.10/24.
public struct Interface4: Hashable, Sendable, CustomStringConvertible {
    public var address: IPv4
    public var prefix: Int

    public init(address: IPv4, prefix: Int) {
        self.address = address
        self.prefix = prefix
    }

    /// Parses ADDR/PREFIX; nil when malformed.
    public init?(_ text: String) {
        let parts = text.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 2, let address = IPv4(String(parts[0])), let prefix = Int(parts[1]), (8...30).contains(prefix) else { return nil }
        self.address = address
        self.prefix = prefix
    }

    /// Parses ADDR/PREFIX or throws a sentence naming `what`.
    public static func parse(_ text: String, what: String) throws -> Interface4 {
        guard let parsed = Interface4(text) else {
            throw LifeboatError(.invalidArgument, "\(what) '\(text)' is not ADDR/PREFIX with a prefix of 8 to 30, like 192.168.50.10/24")
        }
        guard parsed.address != parsed.network, parsed.address != parsed.broadcast else {
            throw LifeboatError(.invalidArgument, "\(what) \(text) is the network's \(parsed.address == parsed.network ? "own" : "broadcast") address: give a host address")
        }
        return parsed
    }

    public var mask: UInt32 { prefix == 0 ? 0 : UInt32.max << UInt32(32 - prefix) }
    public var network: IPv4 { IPv4(address.value & mask) }
    public var broadcast: IPv4 { IPv4(address.value | ~mask) }
    public var netmask: IPv4 { IPv4(mask) }
    public var description: String { "\(address)/\(prefix)" }
    /// The subnet itself, as NETWORK/PREFIX.
    public var subnet: String { "\(network)/\(prefix)" }

    public func contains(_ other: IPv4) -> Bool { other.value & mask == address.value & mask }

    /// The host's (bridge) address on a network made around this subnet for a VM at `vm`: the
    /// production gateway when it lies inside, else the first host address, else the last.
    public func bridgeAddress(gateway: IPv4?, vm: IPv4?) -> Interface4 {
        var address = firstHost
        if let gateway, contains(gateway), gateway != vm { address = gateway }
        if address == vm { address = lastHost }
        return Interface4(address: address, prefix: prefix)
    }

    /// First and last usable host addresses.
    public var firstHost: IPv4 { IPv4(network.value + 1) }
    public var lastHost: IPv4 { IPv4(broadcast.value - 1) }
}
