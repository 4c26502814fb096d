import Foundation
import LifeboatBase
import LifeboatConsole
import LifeboatTestSupport
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The console against the attacks a penetration test tries first (issue: console security),
/// each against a real `lifeboat console` on 127.0.0.1.
@Suite("Web console under attack")
struct ConsoleSecurityTests {
    /// The points of the lab's machine, the console's jobs and users: what an attack must not change.
    func state(_ lab: ConsoleLab, _ client: HTTPClient) throws -> String {
        let points = try lab.check(["points", lab.machine, "--json"])
        let users = try lab.check(["users", "--json"])
        let jobs = try client.get("/api/v1/jobs").text
        return [points, users, jobs].joined(separator: "\n")
    }

    @Test("every route that changes anything, taken from the router, refuses a session without the CSRF token in every path variant; paths not in normal form are refused even with it")
    func csrfOnEveryRoute() throws {
        let lab = try ConsoleLab()
        let olga = try lab.login("olga")
        let alice = try lab.login("alice")
        let listed = try JSONSerialization.jsonObject(with: Data(lab.check(["console", "--routes", "--json"]).utf8)) as? [String] ?? []
        let changing = listed.filter { !$0.hasPrefix("GET ") && !$0.hasPrefix("HEAD ") }
            .map { $0.split(separator: " ", maxSplits: 1).map(String.init) }
            .filter { $0[1] != "/login" && $0[1] != "/api/v1/login" }
        #expect(changing.count >= 10, "the router lists the changing routes: \(listed)")
        #expect(changing.contains { $0[1] == "/api/v1/machines/:name/:action" } && changing.contains { $0[1] == "/machines/:name/actions/:action" })
        let actions = ["backup", "test-failover", "stop-test", "failover", "change-point", "commit", "cancel-failover", "failback"]
        var requests: [(method: String, path: String, client: HTTPClient)] = []
        for route in changing {
            let method = route[0], template = route[1]
            let isUsers = template.contains("/users")
            var paths = [template.replacingOccurrences(of: ":name", with: isUsers ? "vic" : lab.machine).replacingOccurrences(of: ":id", with: "x")]
            if template.contains(":action") {
                paths = actions.map { action in paths[0].replacingOccurrences(of: ":action", with: action) }
            }
            for path in paths { requests.append((method, path, isUsers ? alice : olga)) }
        }
        let before = try state(lab, alice)
        func variants(_ path: String) -> [String] {
            var segments = path.split(separator: "/").map(String.init)
            let last = segments.removeLast()
            let encoded = "%" + String(format: "%02X", last.utf8.first!) + last.dropFirst()
            let head = "/" + segments.joined(separator: "/")
            return [path, "/" + path, "/." + path, head + "/./" + last, head + "/x/../" + last, path + "/", head + "/" + encoded,
                    head + "%2F" + last, head + "//" + last]
        }
        for (method, path, client) in requests {
            for variant in variants(path) {
                let api = variant.contains("api/v1")
                let answer = try client.send(method, variant, form: api ? nil : ["confirm": lab.machine], csrf: "")
                #expect(answer.status == 400 || answer.status == 403, "\(method) \(variant) without a token: \(answer.status) \(answer.text)")
                if variant != path {
                    // With the right token a path not in normal form is still refused, before any handler.
                    let withToken = try client.send(method, variant, form: api ? nil : ["confirm": lab.machine, "csrf": client.csrf ?? ""])
                    #expect(withToken.status == 400, "\(method) \(variant) with the token: \(withToken.status)")
                }
            }
            // An API change with the token but no JSON Content-Type (an empty body) is refused too.
            if path.contains("/api/") {
                let untyped = try client.send(method, path, jsonType: false)
                #expect(untyped.status == 415, "\(method) \(path) without Content-Type: \(untyped.status)")
            }
        }
        #expect(try state(lab, alice) == before, "nothing changed: no point, no job, no user")
        // The lab's own session still acts with its token: the refusals were the token's doing.
        let started = try olga.send("POST", "/api/v1/machines/\(lab.machine)/backups")
        #expect(started.status == 202, "\(started.text)")
    }

    @Test("30 parallel wrong passwords for one user wait one after another: at most a few are checked in the throttle's time, the rest refused with 429")
    func parallelGuesses() throws {
        let lab = try ConsoleLab()
        let base = lab.url
        let jars = (0..<30).map { lab.scratch.file("guess-\($0)") }
        let answers = Locked<[(status: Int, seconds: Double)]>([])
        let started = Date()
        var threads: [Thread] = []
        for i in 0..<30 {
            let thread = Thread {
                let client = HTTPClient(base: base, jar: jars[i])
                let answer = try? client.send("POST", "/api/v1/login", json: ["user": "alice", "password": "guess-\(i)"])
                answers.withLock { $0.append((answer?.status ?? 0, answer?.seconds ?? 0)) }
            }
            threads.append(thread)
            thread.start()
        }
        while answers.withLock({ $0.count }) < 30 && Date().timeIntervalSince(started) < 180 { Thread.sleep(forTimeInterval: 0.2) }
        let all = answers.withLock { $0 }
        #expect(all.count == 30)
        #expect(all.allSatisfy { $0.status == 401 || $0.status == 429 }, "\(all.map(\.status))")
        let checked = all.filter { $0.status == 401 }.map(\.seconds).sorted()
        // Slots 0, 1, 3, 7, 15, 31 s: six checks in the first half-minute, the rest refused.
        #expect(checked.count >= 1 && checked.count <= 7, "\(checked.count) passwords checked")
        let throttleTime = pow(2, Double(checked.count - 1)) - 1
        #expect((checked.last ?? 0) >= throttleTime - 0.5, "the last checked guess waited \(checked.last ?? 0) s, its slot \(throttleTime) s")
        #expect(Date().timeIntervalSince(started) >= throttleTime - 0.5)
    }

    @Test("an old session dies after a password change, a removal and re-add, a second login and a logout")
    func sessionsEnd() throws {
        let lab = try ConsoleLab()
        let password = ["LIFEBOAT_CONSOLE_PASSWORD": ConsoleLab.passwords["olga"]!]
        // The same password set again is a new password epoch.
        let first = try lab.login("olga")
        #expect(try first.get("/api/v1/machines").status == 200)
        try lab.check(["user", "add", "olga", "--role", "operator"], extra: password)
        #expect(try first.get("/api/v1/machines").status == 401, "a changed password ends the session")
        #expect(try first.send("POST", "/api/v1/machines/\(lab.machine)/backups").status == 401)
        let second = try lab.login("olga")
        try lab.check(["user", "remove", "olga"])
        try lab.check(["user", "add", "olga", "--role", "operator"], extra: password)
        #expect(try second.get("/api/v1/machines").status == 401, "a removed and re-added user's old session ends")
        // Logging in again replaces the earlier session.
        let third = try lab.login("olga")
        let fourth = try lab.login("olga")
        #expect(try third.get("/api/v1/machines").status == 401)
        #expect(try fourth.get("/api/v1/machines").status == 200)
        // A logout ends the user's session, and an admin can read who logged in when.
        #expect(try fourth.send("POST", "/api/v1/logout").status == 204)
        #expect(try fourth.get("/api/v1/machines").status == 401)
        let alice = try lab.login("alice")
        let logins = try #require(alice.get("/api/v1/logins").json as? [[String: Any]])
        #expect(logins.filter { $0["user"] as? String == "olga" && $0["event"] as? String == "login" }.count == 4, "\(logins)")
        #expect(logins.contains { $0["user"] as? String == "olga" && $0["event"] as? String == "logout" })
        #expect(try lab.login("olga").get("/api/v1/session").status == 200)
    }

    @Test("500 idle and half-sent connections are closed by the server within its timeout while a logged-in page answers")
    func idleConnections() throws {
        let lab = try ConsoleLab()
        let vic = try lab.login("vic")
        let port = UInt16(try #require(lab.url.firstMatch(of: /:(\d+)\/$/)?.1).description)!
        var sockets: [Int32] = []
        defer { sockets.forEach { close($0) } }
        for i in 0..<500 {
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            #expect(fd >= 0)
            var address = sockaddr_in()
            address.sin_family = sa_family_t(AF_INET)
            address.sin_port = port.bigEndian
            address.sin_addr.s_addr = inet_addr("127.0.0.1")
            let connected = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
            }
            #expect(connected == 0, "connection \(i): errno \(errno)")
            if i % 2 == 1 {   // a request head that never ends
                let partial = "GET /api/v1/machines HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
                _ = partial.withCString { send(fd, $0, strlen($0), 0) }
            }
            sockets.append(fd)
        }
        let opened = Date()
        let page = try vic.get("/api/v1/machines")
        #expect(page.status == 200 && page.seconds < 5, "a logged-in page answers beside 500 idle connections: \(page.status) in \(page.seconds) s")
        // Every one of them is closed by the server: EOF (or a reset) on each.
        var open = Set(sockets)
        let deadline = opened.addingTimeInterval(Double(ConsoleLimits.idleSeconds) + 10)
        while !open.isEmpty && Date() < deadline {
            for fd in open {
                var byte: UInt8 = 0
                let got = recv(fd, &byte, 1, Int32(MSG_DONTWAIT))
                if got == 0 || (got < 0 && errno != EAGAIN && errno != EWOULDBLOCK) { open.remove(fd) }
            }
            if !open.isEmpty { Thread.sleep(forTimeInterval: 0.25) }
        }
        #expect(open.isEmpty, "\(open.count) of 500 connections still open \(Date().timeIntervalSince(opened)) s after they were made")
        #expect(Date().timeIntervalSince(opened) >= Double(ConsoleLimits.idleSeconds) - 1, "not closed before the timeout")
        #expect(try vic.get("/api/v1/machines").status == 200)
    }

    @Test("a wrong Host is refused with 421, a change from another origin with 403, and nothing changes")
    func hostAndOrigin() throws {
        let lab = try ConsoleLab()
        let olga = try lab.login("olga")
        let before = try state(lab, olga)
        let port = try #require(lab.url.firstMatch(of: /:(\d+)\/$/)?.1).description
        let rebound = try olga.send("POST", "/api/v1/machines/\(lab.machine)/backups", headers: ["Host: attacker.example:\(port)"])
        #expect(rebound.status == 421 && rebound.error.contains("does not answer to the host name"), "\(rebound.status) \(rebound.text)")
        #expect(try olga.send("GET", "/api/v1/machines", headers: ["Host: attacker.example"]).status == 421)
        let otherPort = try olga.send("POST", "/api/v1/machines/\(lab.machine)/backups", headers: ["Origin: http://127.0.0.1:1"])
        #expect(otherPort.status == 403 && otherPort.error.contains("another site"), "\(otherPort.status)")
        let sameSite = try olga.send("POST", "/api/v1/machines/\(lab.machine)/backups", headers: ["Sec-Fetch-Site: same-site"])
        #expect(sameSite.status == 403)
        #expect(try state(lab, olga) == before)
        // localhost and the console's own origin are fine.
        let local = try lab.client().send("GET", "/login", headers: ["Host: localhost:\(port)"])
        #expect(local.status == 200, "\(local.status)")
        let own = try olga.send("POST", "/api/v1/machines/\(lab.machine)/backups", headers: ["Origin: http://127.0.0.1:\(port)"])
        #expect(own.status == 202, "\(own.status) \(own.text)")
    }

    @Test("LIFEBOAT_PASSWORD alone does not give a console user a password")
    func repositoryPasswordIsNotAConsolePassword() throws {
        let lab = try ConsoleLab()
        let result = try CLI.run(["user", "add", "bob", "--role", "viewer"],
                                 environment: lab.environment.merging(["LIFEBOAT_PASSWORD": "repository-secret"]) { $1 })
        #expect(result.status != 0)
        #expect(result.stderr.contains("LIFEBOAT_CONSOLE_PASSWORD"), "\(result.stderr)")
        #expect(!(try lab.check(["users"])).contains("bob"))
        let added = try lab.check(["user", "add", "otto", "--role", "operator"], extra: ["LIFEBOAT_CONSOLE_PASSWORD": "otto-secret"])
        #expect(added.contains("otto is an operator"), "\(added)")
    }

    @Test("a device cookie vouches for its user only, unaltered and unexpired, and survives a restart of the console")
    func deviceCookies() {
        let scratch = Scratch()
        let devices = DeviceCookies(hotDirectory: scratch.file("hot"))
        let cookie = devices.value(for: "alice")
        #expect(devices.vouches(cookie, for: "alice"))
        #expect(!devices.vouches(cookie, for: "bob") && !devices.vouches(nil, for: "alice"))
        #expect(!devices.vouches(cookie.replacingOccurrences(of: "alice:", with: "bob:"), for: "bob"))
        #expect(!devices.vouches(cookie, for: "alice", now: Date().addingTimeInterval(31 * 86_400)))
        #expect(DeviceCookies(hotDirectory: scratch.file("hot")).vouches(cookie, for: "alice"), "the key is kept in hot storage")
    }

    @Test("loopback is decided from the resolved address, not the text")
    func loopbackFromAddress() {
        #expect(ConsoleListen(host: "127.0.0.1").isLoopback && ConsoleListen(host: "127.0.0.2").isLoopback)
        #expect(ConsoleListen(host: "localhost").isLoopback && ConsoleListen(host: "::1").isLoopback)
        #expect(!ConsoleListen(host: "127.attacker.invalid").isLoopback && ConsoleListen(host: "127.attacker.invalid").usesTLS)
        #expect(!ConsoleListen(host: "0.0.0.0").isLoopback)
    }

    @Test("the throttle gives parallel tries successive slots, refuses far ones, and a success forgives its user only")
    func throttleSlots() {
        let throttle = LoginThrottle()
        let now = Date(timeIntervalSince1970: 1_000_000)
        let waits = (0..<8).map { _ in throttle.admit(address: "10.0.0.1", user: "alice", now: now).wait }
        #expect(waits.prefix(6).map { $0 ?? -1 } == [0, 1, 3, 7, 15, 31] && waits[6] == nil && waits[7] == nil, "\(waits)")
        // Another user from another address is not slowed; from the same address it is.
        #expect(throttle.admit(address: "10.0.0.2", user: "vic", now: now).wait == 0)
        throttle.succeeded(address: "10.0.0.2", user: "vic")
        #expect(throttle.admit(address: "10.0.0.1", user: "vic", now: now).wait == nil, "the address's slots are taken")
        // alice from a new address still waits for her name's slot.
        #expect(throttle.admit(address: "10.0.0.3", user: "alice", now: now).wait == nil)
        // alice's own browser (her device cookie: no count of her name) from another address is not held.
        #expect(throttle.admit(address: "10.0.0.4", user: nil, now: now).wait == 0)
        // An IPv6 host counts as its /64.
        _ = throttle.admit(address: "2001:db8::1", user: nil, now: now)
        #expect(throttle.admit(address: "2001:db8::2", user: nil, now: now).wait == 1)
        #expect(throttle.admit(address: "2001:db9::1", user: nil, now: now).wait == 0)
        // Forgotten after 15 minutes.
        #expect(throttle.admit(address: "10.0.0.1", user: "alice", now: now.addingTimeInterval(3600)).wait == 0)
    }
}
