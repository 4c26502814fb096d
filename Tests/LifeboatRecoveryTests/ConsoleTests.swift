import Foundation
import LifeboatTestSupport
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// A repository with a protected disk-file machine and three console users (admin, operator,
/// viewer), and a real `lifeboat console` serving it on 127.0.0.1 (a port of its own). The
/// console is stopped when the lab goes away.
final class ConsoleLab {
    let scratch = Scratch()
    let machine: String
    let environment: [String: String]
    var process: Process?
    var url = ""
    var output = ""
    static let passwords = ["alice": "alice-secret", "olga": "olga-secret", "vic": "vic-secret"]

    /// A new repository with one backed-up disk-file machine; or, given `environment` and
    /// `machine`, that repository as it is.
    init(listen: String = "127.0.0.1:0", environment givenEnvironment: [String: String]? = nil, machine given: String? = nil) throws {
        machine = given ?? "web-\(getpid())-\(UInt16.random(in: 0...UInt16.max))"
        environment = givenEnvironment ?? ["LIFEBOAT_REPO": scratch.file("repo"), "LIFEBOAT_HOT": scratch.file("hot"),
                                                      "LIFEBOAT_VIRT_TYPE": "qemu", "LIFEBOAT_TEMPLATES": packageRoot + "/templates"]
        if givenEnvironment == nil {
            try check(["init"])
            let path = scratch.file("disk.raw")
            try Disk.make(path, size: 8 << 20, writes: [(0, Bytes.text(1 << 20, seed: 1))])
            try check(["protect", machine, "--disk", path, "--rpo", "1h"])
            try check(["backup", machine])
        }
        for (user, role) in [("alice", "admin"), ("olga", "operator"), ("vic", "viewer")] {
            try check(["user", "add", user, "--role", role], extra: ["LIFEBOAT_CONSOLE_PASSWORD": Self.passwords[user]!])
        }
        try start(listen: listen)
    }

    /// Starts the console and waits for the line with its URL.
    func start(listen: String = "127.0.0.1:0", command: [String]? = nil) throws {
        output = ""
        let process = CLI.start(command ?? ["console", "--listen", listen], environment: environment)
        self.process = process
        let pipe = process.standardOutput as! Pipe
        let deadline = Date().addingTimeInterval(30)
        while Date() < deadline, process.isRunning {
            let data = pipe.fileHandleForReading.availableData
            if data.isEmpty { break }
            output += String(decoding: data, as: UTF8.self)
            if let match = output.firstMatch(of: /lifeboat console at (\S+)/) {
                url = String(match.1)
                return
            }
        }
        let err = String(decoding: (process.standardError as! Pipe).fileHandleForReading.availableData, as: UTF8.self)
        throw ShellError(description: "lifeboat console did not start: \(output) \(err)")
    }

    func stop() {
        guard let process, process.isRunning else { return }
        process.terminate()
        process.waitUntilExit()
    }

    deinit { stop() }

    @discardableResult
    func check(_ arguments: [String], extra: [String: String] = [:], sourceLocation: SourceLocation = #_sourceLocation) throws -> String {
        let result = try CLI.run(arguments, environment: environment.merging(extra) { $1 })
        #expect(result.status == 0, "lifeboat \(arguments.joined(separator: " ")): \(result.stderr)", sourceLocation: sourceLocation)
        return result.stdout
    }

    func client() -> HTTPClient { HTTPClient(base: url, jar: scratch.file("jar-\(UInt32.random(in: 0...UInt32.max))")) }

    /// A client logged in as `user`, with the session's CSRF token.
    func login(_ user: String) throws -> HTTPClient {
        let client = client()
        let answer = try client.send("POST", "/api/v1/login", json: ["user": user, "password": Self.passwords[user]!])
        #expect(answer.status == 200, "login of \(user): \(answer.text)")
        client.csrf = (answer.json as? [String: Any])?["csrf"] as? String
        return client
    }
}

/// HTTP through curl, with a cookie jar of its own (a browser's session).
final class HTTPClient {
    let base: String
    let jar: String
    var csrf: String?

    init(base: String, jar: String) {
        self.base = base.hasSuffix("/") ? String(base.dropLast()) : base
        self.jar = jar
    }

    struct Answer {
        var status: Int
        var headers: String
        var text: String
        var seconds: Double
        var json: Any? { try? JSONSerialization.jsonObject(with: Data(text.utf8)) }
        var error: String { ((json as? [String: Any])?["error"] as? String) ?? "" }
    }

    /// A well-behaved client: an API change says it is JSON even with no body (`jsonType: false`
    /// leaves that out); `headers` are added as they are.
    func send(_ method: String, _ path: String, json: [String: Any]? = nil, form: [String: String]? = nil,
              csrf: String? = nil, insecure: Bool = false, jsonType: Bool = true, headers: [String] = []) throws -> Answer {
        let folder = FileManager.default.temporaryDirectory.path
        let headersFile = folder + "/lb-headers-\(UInt32.random(in: 0...UInt32.max))"
        defer { unlink(headersFile) }
        var arguments = ["curl", "-s", "--path-as-is", "--globoff", "-X", method, "-b", jar, "-c", jar, "-D", headersFile,
                         "-w", "\n%{http_code} %{time_total}", base + path]
        if insecure { arguments.append("-k") }
        if let token = csrf ?? self.csrf, !token.isEmpty { arguments += ["-H", "X-CSRF-Token: \(token)"] }
        for header in headers { arguments += ["-H", header] }
        if json == nil, form == nil, jsonType, method != "GET", path.hasPrefix("/api/") {
            arguments += ["-H", "Content-Type: application/json"]
        }
        if let json {
            let body = String(decoding: try JSONSerialization.data(withJSONObject: json), as: UTF8.self)
            arguments += ["-H", "Content-Type: application/json", "--data-binary", body]
        }
        if let form {
            for (key, value) in form { arguments += ["--data-urlencode", "\(key)=\(value)"] }
        }
        let output = try sh(arguments)
        let split = output.lastIndex(of: "\n").map { (String(output[..<$0]), String(output[output.index(after: $0)...])) } ?? ("", output)
        let figures = split.1.split(separator: " ")
        let headers = (try? String(contentsOfFile: headersFile, encoding: .utf8)) ?? ""
        return Answer(status: Int(figures.first ?? "") ?? 0, headers: headers, text: split.0,
                      seconds: Double(figures.last ?? "") ?? 0)
    }

    func get(_ path: String) throws -> Answer { try send("GET", path) }

    /// Polls a job until it ends; returns it.
    func waitForJob(_ id: String, timeout: TimeInterval = 60) throws -> [String: Any] {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            let job = try get("/api/v1/jobs/\(id)").json as? [String: Any] ?? [:]
            if let state = job["state"] as? String, state != "running" { return job }
            Thread.sleep(forTimeInterval: 0.2)
        }
        throw ShellError(description: "job \(id) did not end within \(timeout) s")
    }
}

/// JSON values compared as parsed objects.
func sameJSON(_ a: Any?, _ b: Any?) -> Bool {
    guard let a, let b else { return a == nil && b == nil }
    func canonical(_ value: Any) -> Data? { try? JSONSerialization.data(withJSONObject: [value], options: [.sortedKeys]) }
    guard let x = canonical(a), let y = canonical(b) else { return false }
    return x == y
}

@Suite("Web console and API")
struct ConsoleHTTPTests {
    @Test("without a session the API answers 401 and pages send to the login page")
    func needsSession() throws {
        let lab = try ConsoleLab()
        let client = lab.client()
        for path in ["/api/v1/machines", "/api/v1/machines/\(lab.machine)/points", "/api/v1/jobs", "/api/v1/users"] {
            let answer = try client.get(path)
            #expect(answer.status == 401, "\(path): \(answer.status)")
            #expect(answer.error.contains("POST /api/v1/login"))
        }
        let backup = try client.send("POST", "/api/v1/machines/\(lab.machine)/backups")
        #expect(backup.status == 401)
        let page = try client.get("/")
        #expect(page.status == 303 && page.headers.lowercased().contains("location: /login"))
        // A session that logged out is no session.
        let alice = try lab.login("alice")
        #expect(try alice.get("/api/v1/machines").status == 200)
        #expect(try alice.send("POST", "/api/v1/logout").status == 204)
        #expect(try alice.get("/api/v1/machines").status == 401)
    }

    @Test("a session cookie is HttpOnly and SameSite=Strict; pages carry a strict content security policy")
    func cookieAndHeaders() throws {
        let lab = try ConsoleLab()
        let client = lab.client()
        let answer = try client.send("POST", "/api/v1/login", json: ["user": "vic", "password": "vic-secret"])
        let cookie = answer.headers.split(whereSeparator: \.isNewline).first { $0.lowercased().hasPrefix("set-cookie: lifeboat_session=") } ?? ""
        #expect(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"), "\(cookie)")
        #expect(!cookie.contains("Secure"), "plain HTTP on loopback: no Secure flag, or the browser would drop it")
        let page = try client.get("/")
        #expect(page.status == 200)
        #expect(page.headers.contains("script-src 'self'") && page.headers.contains("frame-ancestors 'none'") && page.headers.contains("base-uri 'none'"))
        #expect(!page.headers.lowercased().contains("strict-transport-security"), "no HSTS over plain HTTP")
        #expect(page.text.contains("id=\"machine-\(lab.machine)\""))
    }

    @Test("a viewer sees everything and changes nothing (403); only admins manage users")
    func roles() throws {
        let lab = try ConsoleLab()
        let vic = try lab.login("vic")
        #expect(try vic.get("/api/v1/machines").status == 200)
        #expect(try vic.get("/api/v1/machines/\(lab.machine)/points").status == 200)
        let pointsBefore = try #require(vic.get("/api/v1/machines/\(lab.machine)/points").json as? [Any]).count
        let backup = try vic.send("POST", "/api/v1/machines/\(lab.machine)/backups")
        #expect(backup.status == 403)
        #expect(backup.error.contains("vic is a viewer"), "\(backup.error)")
        let page = try vic.get("/machines/\(lab.machine)")
        #expect(page.status == 200 && !page.text.contains("id=\"action-"), "a viewer's page offers no action")
        let form = try vic.send("POST", "/machines/\(lab.machine)/actions/backup", form: ["csrf": vic.csrf ?? ""])
        #expect(form.status == 403)
        #expect(try vic.get("/api/v1/machines/\(lab.machine)/points").json as? [Any] != nil)
        #expect(try #require(vic.get("/api/v1/machines/\(lab.machine)/points").json as? [Any]).count == pointsBefore)

        let olga = try lab.login("olga")
        #expect(try olga.send("POST", "/api/v1/users", json: ["name": "eve", "role": "admin", "password": "eve-secret"]).status == 403)
        #expect(try olga.get("/api/v1/users").status == 403)
        let alice = try lab.login("alice")
        #expect(try alice.send("POST", "/api/v1/users", json: ["name": "eve", "role": "viewer", "password": "eve-secret"]).status == 201)
        let users = try #require(alice.get("/api/v1/users").json as? [[String: Any]])
        #expect(users.map { $0["name"] as? String } == ["alice", "eve", "olga", "vic"])
        #expect(users.allSatisfy { $0["password"] == nil }, "never a hash in a listing")
        // A removed user's session ends at once.
        #expect(try alice.send("DELETE", "/api/v1/users/vic").status == 204)
        #expect(try vic.get("/api/v1/machines").status == 401)
        #expect(try alice.send("DELETE", "/api/v1/users/alice").status == 409)
        // The user file is root's alone.
        var info = stat()
        #expect(stat(lab.scratch.file("hot/.console/users.json"), &info) == 0 && info.st_mode & 0o777 == 0o600)
        #expect(!(try String(contentsOfFile: lab.scratch.file("hot/.console/users.json"), encoding: .utf8)).contains("olga-secret"))
    }

    @Test("changes need the session's CSRF token: missing or wrong is refused and changes nothing")
    func csrf() throws {
        let lab = try ConsoleLab()
        let olga = try lab.login("olga")
        let points = { try #require(olga.get("/api/v1/machines/\(lab.machine)/points").json as? [Any]).count }
        let before = try points()
        let missing = try olga.send("POST", "/api/v1/machines/\(lab.machine)/backups", csrf: "")
        #expect(missing.status == 403 && missing.error.contains("X-CSRF-Token"), "\(missing.status) \(missing.error)")
        let wrong = try olga.send("POST", "/api/v1/machines/\(lab.machine)/backups", csrf: "forged-token")
        #expect(wrong.status == 403)
        let form = try olga.send("POST", "/machines/\(lab.machine)/actions/backup", form: ["csrf": "forged-token"])
        #expect(form.status == 403 && form.text.contains("CSRF token does not match"), "\(form.status)")
        #expect(try points() == before)

        // With the token: 202, the job runs, the point is there, history names the user.
        let started = try olga.send("POST", "/api/v1/machines/\(lab.machine)/backups")
        #expect(started.status == 202, "\(started.text)")
        let id = try #require((started.json as? [String: Any])?["id"] as? String)
        let job = try olga.waitForJob(id)
        #expect(job["state"] as? String == "succeeded", "\(job)")
        #expect(try points() == before + 1)
        let history = try #require(olga.get("/api/v1/machines/\(lab.machine)/history").json as? [[String: Any]])
        #expect(history.last?["event"] as? String == "backup" && history.last?["user"] as? String == "olga", "\(history)")
        // The page's form, with its token, starts a job too.
        let page = try olga.send("POST", "/machines/\(lab.machine)/actions/backup", form: ["csrf": olga.csrf ?? ""])
        #expect(page.status == 303 && page.headers.contains("/jobs/"))
        // The login form has its own token, in a SameSite=Strict cookie and the form: a form
        // posted from elsewhere (no cookie) logs nobody in.
        let stranger = lab.client()
        let forged = try stranger.send("POST", "/login", form: ["user": "olga", "password": "olga-secret", "csrf": "forged"])
        #expect(forged.status == 403 && !forged.headers.contains("lifeboat_session="), "\(forged.status)")
        let loginPage = try stranger.get("/login")
        let token = try #require(loginPage.text.firstMatch(of: /name="csrf" value="([^"]+)"/)?.1).description
        let loggedIn = try stranger.send("POST", "/login", form: ["user": "olga", "password": "olga-secret", "csrf": token])
        #expect(loggedIn.status == 303 && loggedIn.headers.contains("lifeboat_session="), "\(loggedIn.status)")
        #expect(try stranger.get("/").status == 200)
        // The API takes JSON only when it says it is JSON (a cross-site form cannot).
        let plain = try sh(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", "Content-Type: text/plain",
                            "--data-binary", "{\"user\": \"olga\", \"password\": \"olga-secret\"}", lab.url + "api/v1/login"])
        #expect(plain == "415")
        // That login replaced olga's earlier session: one session per user.
        #expect(try olga.get("/api/v1/machines").status == 401)
    }

    @Test("wrong passwords are answered slower and slower for the same name and address; a viewer's success forgives nothing against an admin")
    func slowedLogins() throws {
        let lab = try ConsoleLab()
        let client = lab.client()
        var times: [Double] = []
        for _ in 0..<3 {
            let answer = try client.send("POST", "/api/v1/login", json: ["user": "alice", "password": "wrong-password"])
            #expect(answer.status == 401 && answer.error.contains("wrong user name or password"))
            times.append(answer.seconds)
        }
        #expect(times[1] >= 1.0 && times[2] >= 2.0, "waits after 1 and 2 failures: \(times)")
        // An unknown user costs as much as a known one (scrypt runs either way), and fails the
        // same way; the address's count slows it.
        let unknown = try client.send("POST", "/api/v1/login", json: ["user": "nobody", "password": "wrong-password"])
        #expect(unknown.status == 401 && unknown.seconds >= 4.0, "\(unknown.seconds)")
        // A viewer's own right password works (after the address's wait)...
        let viewer = try lab.client().send("POST", "/api/v1/login", json: ["user": "vic", "password": "vic-secret"])
        #expect(viewer.status == 200 && viewer.seconds >= 7.5, "\(viewer.status) after \(viewer.seconds) s")
        // ... and clears no count: the next guess at alice's password still waits (before, a
        // success from the address reset it and this answer came at once).
        let guess = try client.send("POST", "/api/v1/login", json: ["user": "alice", "password": "wrong-again"])
        #expect(guess.status == 401 && guess.seconds >= 4.0, "\(guess.seconds)")
        // Every try is in the console's login log, with user and address, never a password.
        let file = try String(contentsOfFile: lab.scratch.file("hot/.console/logins.jsonl"), encoding: .utf8)
        let logins = file.split(separator: "\n").compactMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
        let failed = logins.filter { $0["event"] as? String == "login-failed" }
        #expect(failed.count == 5 && failed.allSatisfy { $0["address"] as? String == "127.0.0.1" }, "\(logins)")
        #expect(logins.contains { $0["event"] as? String == "login" && $0["user"] as? String == "vic" })
        #expect(!file.contains("wrong-password") && !file.contains("vic-secret"))
    }

    @Test("the API's JSON is the CLI's --json for the same repository")
    func sameAsCLI() throws {
        let lab = try ConsoleLab()
        try lab.check(["backup", lab.machine])
        let alice = try lab.login("alice")
        func cli(_ arguments: [String]) throws -> Any? {
            try JSONSerialization.jsonObject(with: Data(lab.check(arguments + ["--json"]).utf8))
        }
        #expect(sameJSON(try alice.get("/api/v1/machines/\(lab.machine)/points").json, try cli(["points", lab.machine])))
        #expect(sameJSON(try alice.get("/api/v1/machines/\(lab.machine)/history").json, try cli(["history", lab.machine])))
        #expect(sameJSON(try alice.get("/api/v1/machines/\(lab.machine)/drills").json, try cli(["drills", lab.machine])))
        let machine = try #require(alice.get("/api/v1/machines/\(lab.machine)").json as? [String: Any])
        let configured = try #require(try cli(["machines"]) as? [[String: Any]]).first
        #expect(sameJSON(machine["machine"], configured))
        // Status moves with the clock (a point's age): compare all but the age.
        func steady(_ value: Any?) -> [[String: Any]] {
            (value as? [[String: Any]] ?? []).map { $0.filter { $0.key != "lastPointAge" && $0.key != "rpoRatio" } }
        }
        let api = steady(try alice.get("/api/v1/machines").json), cliStatus = steady(try cli(["status"]))
        #expect(api.count == 1 && sameJSON(api, cliStatus), "\(api) vs \(cliStatus)")
        #expect(sameJSON(steady([machine["status"] as Any]), cliStatus))
        #expect(sameJSON(try alice.get("/api/v1/users").json, try cli(["users"])))
    }

    @Test("bad input: unknown machine or point, a state that does not allow it, bad JSON, no confirmation; nothing changes")
    func badInput() throws {
        let lab = try ConsoleLab()
        let olga = try lab.login("olga")
        let unknown = try olga.send("POST", "/api/v1/machines/nope/backups")
        #expect(unknown.status == 404 && unknown.error.contains("no machine named nope"), "\(unknown.text)")
        #expect(try olga.get("/api/v1/machines/nope").status == 404)
        let commit = try olga.send("POST", "/api/v1/machines/\(lab.machine)/commit")
        #expect(commit.status == 409 && commit.error.contains("is in Standby") && commit.error.contains("allowed now: test-failover, failover"),
                "\(commit.text)")
        let stop = try olga.send("DELETE", "/api/v1/machines/\(lab.machine)/drills")
        #expect(stop.status == 409 && stop.error.contains("stop-test is not allowed"))
        let malformed = try olga.send("POST", "/api/v1/machines/\(lab.machine)/drills", json: ["vcpus": "many"])
        #expect(malformed.status == 400 && malformed.error.contains("vcpus"), "\(malformed.text)")
        let point = try olga.send("POST", "/api/v1/machines/\(lab.machine)/drills", json: ["point": "19990101-000000"])
        #expect(point.status == 404 && point.error.contains("no recovery point 19990101-000000"))
        let unconfirmed = try olga.send("POST", "/api/v1/machines/\(lab.machine)/failover", json: ["confirm": "other"])
        #expect(unconfirmed.status == 400 && unconfirmed.error.contains("type the machine's name"), "\(unconfirmed.text)")
        let action = try olga.send("POST", "/api/v1/machines/\(lab.machine)/explode")
        #expect(action.status == 404 && action.error.contains("no action explode"))
        // The same errors as pages: the sentence, no stack trace.
        let page = try olga.send("POST", "/machines/\(lab.machine)/actions/commit", form: ["csrf": olga.csrf ?? ""])
        #expect(page.status == 409 && page.text.contains("commit is not allowed") && page.text.contains("<html"))
        #expect(try olga.get("/machines/nope").status == 404)
        let nowhere = try olga.get("/api/v1/nowhere")
        #expect(nowhere.status == 404 && nowhere.error.contains("docs/API.md"))
        #expect(try olga.get("/nowhere/at/all").text.contains("no page /nowhere/at/all"))
        #expect(try olga.get("/api/v1/jobs").json as? [Any] != nil && (try olga.get("/api/v1/jobs").json as? [Any])?.isEmpty == true,
                "no job was started")
        let status = try #require(olga.get("/api/v1/machines").json as? [[String: Any]]).first
        #expect(status?["state"] as? String == "Standby")
    }

    @Test("the replication service serves the same console with --console")
    func fromReplicationService() throws {
        let lab = try ConsoleLab()
        lab.stop()
        try lab.start(command: ["replicate", "--console", "127.0.0.1:0"])
        let alice = try lab.login("alice")
        let machines = try #require(alice.get("/api/v1/machines").json as? [[String: Any]])
        #expect(machines.map { $0["machine"] as? String } == [lab.machine])
        let started = try alice.send("POST", "/api/v1/machines/\(lab.machine)/backups")
        #expect(started.status == 202)
        let job = try alice.waitForJob(try #require((started.json as? [String: Any])?["id"] as? String))
        #expect(job["state"] as? String == "succeeded", "\(job)")
        lab.stop()
        #expect(lab.process?.terminationStatus == 0, "SIGTERM ends the service and its console cleanly")
    }

    @Test("off loopback the console speaks TLS with a self-signed certificate whose fingerprint it prints")
    func tls() throws {
        let lab = try ConsoleLab(listen: "0.0.0.0:0")
        #expect(lab.url.hasPrefix("https://"))
        let printed = try #require(lab.output.firstMatch(of: /fingerprint: ([0-9A-F:]{95})/)?.1).description
        let certificate = lab.scratch.file("hot/.console/tls/cert.pem")
        let openssl = try sh(["openssl", "x509", "-in", certificate, "-noout", "-fingerprint", "-sha256"])
        #expect(openssl.contains(printed), "\(openssl) vs \(printed)")
        let port = try #require(lab.url.firstMatch(of: /:(\d+)\/$/)?.1).description
        let client = HTTPClient(base: "https://127.0.0.1:\(port)", jar: lab.scratch.file("tls-jar"))
        let plain = try? sh(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "http://127.0.0.1:\(port)/api/v1/machines"])
        #expect(plain != "401", "plain HTTP is not served")
        let login = try client.send("POST", "/api/v1/login", json: ["user": "vic", "password": "vic-secret"], insecure: true)
        #expect(login.status == 200)
        #expect(login.headers.contains("Secure"), "under TLS the cookie is Secure: \(login.headers)")
        #expect(login.headers.contains("__Host-lifeboat_session="), "under TLS the cookie has the __Host- prefix: \(login.headers)")
        // HSTS under TLS when reached by name; not for an address or localhost (it would hold every port there to TLS).
        #expect(!login.headers.lowercased().contains("strict-transport-security"))
        let hostname = try sh(["hostname"]).trimmingCharacters(in: .whitespacesAndNewlines)
        let byName = try client.send("GET", "/login", insecure: true, headers: ["Host: \(hostname):\(port)"])
        #expect(byName.status == 200 && byName.headers.lowercased().contains("strict-transport-security: max-age="), "\(byName.headers)")
        #expect(try client.send("GET", "/api/v1/session", insecure: true).status == 200, "the __Host- cookie is sent back")
        // TLS 1.0 and 1.1 are refused; 1.2 is taken.
        let old = try? sh(["curl", "-s", "-k", "--tlsv1.0", "--tls-max", "1.1", "-o", "/dev/null", "-w", "%{http_code}",
                           "https://127.0.0.1:\(port)/login"])
        #expect(old == nil || old == "000", "TLS 1.1 refused: \(old ?? "error")")
        let twelve = try sh(["curl", "-s", "-k", "--tlsv1.2", "--tls-max", "1.2", "-o", "/dev/null", "-w", "%{http_code}",
                             "https://127.0.0.1:\(port)/login"])
        #expect(twelve == "200")
        // A restart keeps the certificate (the fingerprint people checked stays true).
        lab.stop()
        try lab.start(listen: "0.0.0.0:0")
        #expect(lab.output.contains("using the self-signed certificate") && lab.output.contains(printed),
                "the same certificate and fingerprint again: \(lab.output)")
    }
}

extension RecoveryVMTests {
@Suite("Web console in a browser")
struct ConsoleBrowserTests {
    @Test("headless Chromium logs in, sees the machine's RPO state, starts a drill that passes with its screenshot, stops it")
    func drillFromBrowser() throws {
        let drill = try DrillLab(["console"])
        let machine = drill.machines[0]
        let disk = drill.scratch.file("console-disk.raw")
        try DemoDisk.make(disk, marker: "console marker")
        try drill.check(["protect", machine, "--disk", disk, "--ip", "192.168.77.30/24", "--mac", "52:54:00:77:00:30",
                         "--memory", "256", "--rpo", "1d"])
        try drill.check(["backup", machine])
        let lab = try ConsoleLab(environment: drill.environment, machine: machine)
        defer { lab.stop() }
        let artifacts = packageRoot + "/.build/test-artifacts"
        try FileManager.default.createDirectory(atPath: artifacts, withIntermediateDirectories: true)
        do {
            let said = try sh(["/usr/bin/python3", packageRoot + "/Tests/browser/console_drill.py", lab.url, "olga", "olga-secret",
                               machine, artifacts])
            #expect(said.contains("drill passed with its screenshot, stopped"))
        } catch {
            Issue.record("the browser run failed (see .build/test-artifacts/console-failure.png): \(error)")
        }
        let shot = (try? FileManager.default.attributesOfItem(atPath: artifacts + "/console-dashboard.png")[.size] as? Int) ?? 0
        #expect(shot > 10_000, "dashboard screenshot kept as a test artifact")
        #expect(!drill.domainExists("lifeboat-test-" + machine), "stop-test from the page removed the VM")
        let history = try drill.check(["history", machine, "--json"])
        #expect(history.contains("\"user\" : \"olga\""), "the drill is in history with the user's name")
    }
}
}
