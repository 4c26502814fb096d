import Crypto
import Foundation
import Hummingbird
import HTTPTypes
import LifeboatBase
import LifeboatRepository
import NIOCore
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

// The console's defences that sit before any handler: paths in normal form, the Host and Origin
// headers, CSRF on every change, the login throttle, the bounded password checks, the sessions a
// login, logout or password change ends, and the limits on connections. docs/API.md has the
// threat model these answer.

/// The console's limits (docs/API.md, "Threat model").
public enum ConsoleLimits {
    /// A connection that has sent no complete request head for this long (from its start, or
    /// since the previous answer) is closed: idle keep-alives, half-sent headers, TLS handshakes
    /// that never finish.
    public static let idleSeconds: Int64 = 10
    /// Connections served at once; more wait in the kernel's backlog.
    public static let connections = 1000
    /// Connections at once from one address other than loopback.
    public static let connectionsPerAddress = 64
    /// A request body without a session (a login) is read up to this size.
    static let anonymousBody = 4 << 10
    /// A request body with a session.
    static let body = 1 << 20
    /// How long a request body may take to arrive.
    static let bodySeconds: Double = 10
    /// A refused login (429) is answered after this pause.
    public static let refusalPause: Int64 = 3
}

/// Paths the console answers only in normal form: no empty, "." or ".." segment, no trailing
/// slash, no percent-encoding or backslash (no name the console serves needs one). Anything
/// else is refused before routing, so no check can see one path and the router another.
enum CanonicalPath {
    /// Why `path` is not in normal form, or nil when it is.
    static func problem(_ path: String) -> String? {
        guard path.hasPrefix("/") else { return "does not start with /" }
        if path == "/" { return nil }
        if path.hasSuffix("/") { return "ends with /" }
        if path.contains("%") { return "has percent-encoding" }
        if path.contains("\\") { return "has a backslash" }
        for segment in path.dropFirst().split(separator: "/", omittingEmptySubsequences: false) {
            if segment.isEmpty { return "has an empty segment (//)" }
            if segment == "." || segment == ".." { return "has a '\(segment)' segment" }
        }
        return nil
    }
}

/// The host names and addresses the console answers to, and the checks of Host and Origin.
public struct ConsoleNames: Sendable {
    /// Lower-case names and addresses (IPv6 without brackets).
    public let names: Set<String>
    /// "http" or "https".
    let scheme: String

    /// The listen address (unless a wildcard), localhost and the loopback addresses, this host's
    /// name, `extra` (--server-name); with a wildcard listen address, this host's interface addresses.
    public init(listen: ConsoleListen, extra: [String] = []) {
        var names: Set<String> = ["localhost", "127.0.0.1", "::1"]
        let host = listen.host.lowercased()
        let wildcard = host == "0.0.0.0" || host == "::" || host == "*"
        if !wildcard { names.insert(host) }
        var buffer = [CChar](repeating: 0, count: 256)
        if gethostname(&buffer, buffer.count - 1) == 0 {
            let name = String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self).lowercased()
            if !name.isEmpty {
                names.insert(name)
                if let short = name.split(separator: ".").first { names.insert(String(short)) }
            }
        }
        if wildcard { names.formUnion(Self.interfaceAddresses()) }
        names.formUnion(extra.map { $0.lowercased() })
        self.names = names
        self.scheme = listen.usesTLS ? "https" : "http"
    }

    /// Splits "host:port", "[v6]:port", "host" into a lower-case host and an optional port.
    static func split(_ authority: String) -> (host: String, port: Int?)? {
        let text = authority.lowercased()
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]") else { return nil }
            let host = String(text[text.index(after: text.startIndex)..<close])
            let rest = text[text.index(after: close)...]
            if rest.isEmpty { return (host, nil) }
            guard rest.hasPrefix(":"), let port = Int(rest.dropFirst()), (1...65535).contains(port) else { return nil }
            return (host, port)
        }
        let parts = text.split(separator: ":", omittingEmptySubsequences: false)
        guard !parts[0].isEmpty, parts.count <= 2 else { return nil }
        if parts.count == 1 { return (String(parts[0]), nil) }
        guard let port = Int(parts[1]), (1...65535).contains(port) else { return nil }
        return (String(parts[0]), port)
    }

    /// True for an IPv4 or IPv6 address (not a name).
    static func isAddress(_ host: String) -> Bool {
        var v4 = in_addr(), v6 = in6_addr()
        return inet_pton(AF_INET, host, &v4) == 1 || inet_pton(AF_INET6, host, &v6) == 1
    }

    /// True when the Host header names this console.
    func accepts(host authority: String?) -> Bool {
        guard let authority, let (host, _) = Self.split(authority) else { return false }
        return names.contains(host)
    }

    /// True when `origin` is this console as the browser reached it: the same scheme, and the
    /// same host and port as the request's Host header (another port on the same host is
    /// another site's page).
    func sameOrigin(_ origin: String, host authority: String?) -> Bool {
        guard let authority, let (host, port) = Self.split(authority) else { return false }
        let prefix = scheme + "://"
        guard origin.lowercased().hasPrefix(prefix), let (originHost, originPort) = Self.split(String(origin.dropFirst(prefix.count))) else {
            return false
        }
        let standard = scheme == "https" ? 443 : 80
        return originHost == host && (originPort ?? standard) == (port ?? standard)
    }

    /// Every address of this host's interfaces.
    static func interfaceAddresses() -> Set<String> {
        var list: UnsafeMutablePointer<ifaddrs>?
        guard getifaddrs(&list) == 0, let first = list else { return [] }
        defer { freeifaddrs(list) }
        var found: Set<String> = []
        var entry: UnsafeMutablePointer<ifaddrs>? = first
        while let current = entry {
            if let address = current.pointee.ifa_addr {
                let family = Int32(address.pointee.sa_family)
                if family == AF_INET || family == AF_INET6 {
                    var host = [CChar](repeating: 0, count: Int(NI_MAXHOST))
                    let length = socklen_t(family == AF_INET ? MemoryLayout<sockaddr_in>.size : MemoryLayout<sockaddr_in6>.size)
                    if getnameinfo(address, length, &host, socklen_t(host.count), nil, 0, NI_NUMERICHOST) == 0 {
                        // fe80::1%eth0: the zone is not part of what a browser sends.
                        let text = String(decoding: host.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
                        found.insert(String(text.split(separator: "%").first ?? "").lowercased())
                    }
                }
            }
            entry = current.pointee.ifa_next
        }
        return found
    }
}

/// The first check of every request: a path in normal form (else 400), a Host this console
/// answers to (else 421: DNS rebinding), and for a change (any method but GET and HEAD) an
/// Origin, when the browser sends one, that is this console as reached (else 403), and no
/// browser fetch marked cross-site or same-site.
struct RequestShapeMiddleware: RouterMiddleware {
    typealias Context = ConsoleContext
    let names: ConsoleNames

    func handle(_ request: Request, context: ConsoleContext, next: (Request, ConsoleContext) async throws -> Response) async throws -> Response {
        let path = request.uri.path
        if let problem = CanonicalPath.problem(path) {
            throw ConsoleError(.badRequest, "the path \(path.prefix(200)) \(problem): the console answers paths in normal form only")
        }
        guard names.accepts(host: request.head.authority) else {
            throw ConsoleError(.misdirectedRequest, "this console does not answer to the host name \(request.head.authority.map { String($0.prefix(100)) } ?? "(none)"): use its address, or start it with --server-name NAME")
        }
        if request.method != .get && request.method != .head {
            if let origin = request.headers[.origin], !names.sameOrigin(origin, host: request.head.authority) {
                throw ConsoleError(.forbidden, "a change from another site (Origin \(origin.prefix(100))) is refused: use the console's own pages")
            }
            if let site = request.headers[Self.fetchSite], site != "same-origin" && site != "none" {
                throw ConsoleError(.forbidden, "a change from another site (Sec-Fetch-Site: \(site.prefix(20))) is refused: use the console's own pages")
            }
        }
        return try await next(request, context)
    }

    static let fetchSite = HTTPField.Name("Sec-Fetch-Site")!
}

/// Slows password guessing, counted per address (IPv6 by its /64) and per existing user name
/// (exactly as written). Each try is counted as a failure before its password is checked and is
/// given its own time slot: after n failures on a key, the next try on it starts 2^(n-1) s (at
/// most 30 s) after the previous try's start or answer, whichever is later, so parallel tries wait
/// one after another, not side by side. A try whose slot is further away than `refuseBeyond` is
/// answered 429 at once, without a check. A success takes back its own count; it forgives the user
/// name it proved, never the address (another user's success does not open the way to guess an
/// admin's password). A try from a browser that logged in as that user before (a device cookie,
/// `DeviceCookies`) is not held by the name's count, so guessing at a name from elsewhere cannot
/// lock its owner out. Keys are forgotten 15 minutes after their last failure; when the table is
/// full, addresses are dropped, never names (there are only as many as users).
public final class LoginThrottle: Sendable {
    struct Entry {
        var failures: Int
        /// When the next try on this key may start.
        var next: Date
        var last: Date
    }
    private let entries = Locked<[String: Entry]>([:])
    private let lastTidy = Locked(Date.distantPast)
    static let forget: TimeInterval = 900
    static let longest: Double = 30
    /// Tries further than this in the future are refused (429), not queued.
    static let refuseBeyond: Double = 60

    public init() {}

    /// The wait before the n-th failure's successor may start.
    static func delay(afterFailures n: Int) -> Double { n <= 0 ? 0 : min(longest, pow(2, Double(n - 1))) }

    /// The address's key: IPv6 by its /64 (one host has a whole /64 to try from).
    static func addressKey(_ address: String) -> String {
        var parsed = in6_addr()
        guard address.contains(":"), inet_pton(AF_INET6, address, &parsed) == 1 else { return "address " + address }
        let bytes = withUnsafeBytes(of: parsed) { Array($0) }
        if bytes.prefix(10).allSatisfy({ $0 == 0 }) && bytes[10] == 0xff && bytes[11] == 0xff {
            return "address " + bytes.suffix(4).map(String.init).joined(separator: ".")   // IPv4-mapped
        }
        return "address " + bytes.prefix(8).map { String(format: "%02x", $0) }.joined() + "/64"
    }

    /// The keys of a try: its address, and the user name when it names a user (`user` nil: none).
    static func keys(address: String, user: String?) -> [String] { [addressKey(address)] + (user.map { ["user " + $0] } ?? []) }

    /// Counts a try from `address` at the user `user` (nil: no user's count, for an unknown name
    /// or a device that logged in as that user before) as a failure and gives it a slot. Returns
    /// the seconds to wait before checking its password, or nil when the try must be refused: its
    /// slot is more than `refuseBeyond` away (the second value: seconds until a try could start).
    public func admit(address: String, user: String?, now: Date = Date()) -> (wait: Double?, retryAfter: Double) {
        entries.withLock { entries in
            if entries.count > 10_000, lastTidy.withLock({ now.timeIntervalSince($0) > 10 }) {
                lastTidy.withLock { $0 = now }
                entries = entries.filter { now.timeIntervalSince($0.value.last) < Self.forget }
                if entries.count > 50_000 {
                    let oldest = entries.filter { $0.key.hasPrefix("address ") }.sorted { $0.value.last < $1.value.last }
                        .prefix(entries.count - 40_000).map(\.key)
                    oldest.forEach { entries.removeValue(forKey: $0) }
                }
            }
            let keys = Self.keys(address: address, user: user)
            var current = keys.map { key -> Entry in
                guard let entry = entries[key], now.timeIntervalSince(entry.last) < Self.forget else { return Entry(failures: 0, next: now, last: now) }
                return entry
            }
            let start = current.map(\.next).reduce(now, max)
            let wait = start.timeIntervalSince(now)
            if wait > Self.refuseBeyond { return (nil, wait - Self.refuseBeyond) }
            for i in current.indices {
                current[i].failures += 1
                current[i].next = start.addingTimeInterval(Self.delay(afterFailures: current[i].failures))
                current[i].last = now
                entries[keys[i]] = current[i]
            }
            return (wait, 0)
        }
    }

    /// The try failed: its count stays, and the next try on its keys waits from now too.
    public func failed(address: String, user: String?, now: Date = Date()) {
        entries.withLock { entries in
            for key in Self.keys(address: address, user: user) {
                guard var entry = entries[key] else { continue }
                entry.next = max(entry.next, now.addingTimeInterval(Self.delay(afterFailures: entry.failures)))
                entry.last = now
                entries[key] = entry
            }
        }
    }

    /// The try succeeded: the user name is forgiven; the address only loses this try's count.
    public func succeeded(address: String, user: String) {
        entries.withLock { entries in
            let keys = Self.keys(address: address, user: user)
            entries.removeValue(forKey: keys[1])
            guard var entry = entries[keys[0]] else { return }
            entry.failures -= 1
            if entry.failures <= 0 { entries.removeValue(forKey: keys[0]) } else { entries[keys[0]] = entry }
        }
    }
}

/// Password checks (scrypt: 32 MiB and about 0.1 s of a core each) run one at a time on a
/// thread of their own, with at most `waiting` queued; a check beyond that is refused (429), so
/// a flood of logins takes one core at most and never the pages of people logged in.
public final class PasswordChecks: Sendable {
    private let queue = DispatchQueue(label: "lifeboat.console.passwords", qos: .utility)
    private let pending = Locked(0)
    let capacity: Int

    public init(capacity: Int = 16) { self.capacity = capacity }

    /// Runs `body` on the check thread; nil when the queue is full.
    func run<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T? {
        let admitted = pending.withLock { count -> Bool in
            guard count < capacity else { return false }
            count += 1
            return true
        }
        guard admitted else { return nil }
        return try await withCheckedThrowingContinuation { continuation in
            queue.async {
                let result = Result { try body() }
                self.pending.withLock { $0 -= 1 }
                continuation.resume(with: result)
            }
        }
    }
}

/// Which login of each user is the live one: logging in replaces the user's earlier session,
/// logging out ends all of them. Sessions also carry the user's password epoch (the salt of the
/// password hash, new at every `user add`), so a changed password or a removed and re-added
/// user ends every older session.
public final class SessionBook: Sendable {
    private let current = Locked<[String: String]>([:])

    public init() {}

    /// A new login of `user`: its id, which ends the user's earlier sessions.
    func open(_ user: String) -> String {
        let id = Answer.newToken()
        current.withLock { $0[user] = id }
        return id
    }

    func isCurrent(_ session: ConsoleSession) -> Bool {
        current.withLock { $0[session.user] } == session.login
    }

    /// Ends every session of `user`.
    func close(_ user: String) {
        _ = current.withLock { $0.removeValue(forKey: user) }
    }
}

/// Browsers that logged in as a user before: a long-lived cookie, signed with a key of the
/// console's own (`HOT/.console/device.key`, made once, mode 0600), that names the user. A try
/// that carries one for the name it tries is not held by that name's failure count (see
/// `LoginThrottle`): whoever guesses at a name from elsewhere cannot lock its owner out.
public final class DeviceCookies: Sendable {
    private let key: SymmetricKey
    static let lifetime: TimeInterval = 30 * 86_400

    public init(hotDirectory: String) {
        let path = hotDirectory + "/.console/device.key"
        if let bytes = FileSystem.contents(path), bytes.count == 32 {
            key = SymmetricKey(data: bytes)
            return
        }
        let bytes = secureRandomBytes(32)
        try? UserStore.prepareFolder(of: path)
        try? FileSystem.writeAtomically(bytes, to: path)   // mode 0600
        key = SymmetricKey(data: FileSystem.contents(path).flatMap { $0.count == 32 ? $0 : nil } ?? bytes)
    }

    static func name(secure: Bool) -> String { secure ? "__Host-lifeboat_device" : "lifeboat_device" }

    /// A cookie value for `user`, good for `lifetime`.
    public func value(for user: String, now: Date = Date()) -> String {
        let body = "\(user):\(Int(now.addingTimeInterval(Self.lifetime).timeIntervalSince1970))"
        return body + ":" + mac(body)
    }

    /// True when `value` was made here for `user` and has not expired.
    public func vouches(_ value: String?, for user: String, now: Date = Date()) -> Bool {
        guard let value else { return false }
        let parts = value.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 3, parts[0] == user, let expiry = Int(parts[1]), Double(expiry) > now.timeIntervalSince1970 else { return false }
        return Answer.same(String(parts[2]), mac("\(parts[0]):\(parts[1])"))
    }

    private func mac(_ text: String) -> String {
        Data(HMAC<SHA256>.authenticationCode(for: Data(text.utf8), using: key)).base64EncodedString()
            .replacingOccurrences(of: "+", with: "-").replacingOccurrences(of: "/", with: "_").replacingOccurrences(of: "=", with: "")
    }
}

/// Logins and logouts, kept in `HOT/.console/logins.jsonl` (one JSON object a line; the file is
/// started anew beside a `.1` copy past 1 MiB) and logged. Never a password. Refused tries are
/// written at most once a minute per address, so a flood cannot push the record of logins out.
public struct LoginRecord: Codable, Sendable {
    public var time: Date
    /// login, login-failed, login-refused (throttled or too many at once), logout.
    public var event: String
    public var user: String
    public var address: String
}

public final class LoginLog: Sendable {
    public let path: String
    private let lock = Locked(())
    private let refusalsWritten = Locked<[String: Date]>([:])

    public init(hotDirectory: String) { path = hotDirectory + "/.console/logins.jsonl" }

    /// Whether a refused try from `address` is written now (at most once a minute per address).
    func shouldRecordRefusal(from address: String, now: Date = Date()) -> Bool {
        refusalsWritten.withLock { written in
            if written.count > 10_000 { written = written.filter { now.timeIntervalSince($0.value) < 60 } }
            if let last = written[address], now.timeIntervalSince(last) < 60 { return false }
            written[address] = now
            return true
        }
    }

    func record(_ record: LoginRecord) {
        guard var line = try? JSONEncoder.compactLifeboat.encode(record) else { return }
        line.append(0x0a)
        lock.withLock { _ in
            var info = stat()
            if stat(path, &info) == 0, info.st_size > 1 << 20 { rename(path, path + ".1") }
            try? UserStore.prepareFolder(of: path)
            let fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o600)
            guard fd >= 0 else { return }
            defer { close(fd) }
            _ = line.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        }
    }

    /// The newest `limit` records, oldest first.
    public func records(limit: Int = 1000) -> [LoginRecord] {
        let text = [path + ".1", path].compactMap { try? String(contentsOfFile: $0, encoding: .utf8) }.joined()
        let lines = text.split(separator: "\n").suffix(limit)
        return lines.compactMap { try? JSONDecoder.lifeboat.decode(LoginRecord.self, from: Data($0.utf8)) }
    }
}

/// Closes connections from one address beyond `ConsoleLimits.connectionsPerAddress` (loopback
/// excepted: every SSH tunnel arrives from there).
final class ConnectionsPerAddress: Sendable {
    private let counts = Locked<[String: Int]>([:])

    func handler() -> AddressLimitHandler { AddressLimitHandler(book: self) }

    /// Counts a connection from `address`; false when it is one too many.
    func add(_ address: String) -> Bool {
        counts.withLock { counts in
            let count = (counts[address] ?? 0) + 1
            counts[address] = count
            return count <= ConsoleLimits.connectionsPerAddress
        }
    }

    func remove(_ address: String) {
        counts.withLock { counts in
            let count = (counts[address] ?? 1) - 1
            if count <= 0 { counts.removeValue(forKey: address) } else { counts[address] = count }
        }
    }
}

/// One per connection, in the HTTP pipeline (see `ConnectionsPerAddress`).
final class AddressLimitHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = NIOAny   // passed on untouched
    let book: ConnectionsPerAddress
    var counted: String?

    init(book: ConnectionsPerAddress) { self.book = book }

    func handlerAdded(context: ChannelHandlerContext) {
        guard let address = context.channel.remoteAddress?.ipAddress, !Self.isLoopback(address) else { return }
        counted = address
        if !book.add(address) { context.close(promise: nil) }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        if let counted { book.remove(counted) }
        counted = nil
    }

    static func isLoopback(_ address: String) -> Bool {
        address.hasPrefix("127.") || address == "::1" || address.hasPrefix("::ffff:127.")
    }
}
