import Foundation
import Hummingbird
import HummingbirdAuth
import HTTPTypes
import LifeboatBase
import LifeboatRecovery
import LifeboatRepository

/// GET /api/v1/session and the login answer.
struct SessionInfo: Codable, Sendable {
    var user: String
    var role: ConsoleRole
    /// Send it back as the X-CSRF-Token header with every POST and DELETE.
    var csrf: String
}

/// GET /api/v1/machines/NAME.
struct MachineInfo: Codable, Sendable {
    var machine: Machine
    var status: ServerStatus
}

struct NewUser: Codable, Sendable {
    var name: String
    var role: ConsoleRole
    var password: String
}

extension Console {
    // MARK: - Shared by the API and the pages

    /// Checks the password and opens a session, replacing the user's earlier one. The try is
    /// counted as a failure per address and per user name before the check and waits for its
    /// slot (`LoginThrottle`; a browser with the user's device cookie is not held by the name's
    /// count); the check runs on the bounded password queue (`PasswordChecks`). Every outcome is
    /// logged and kept in HOT/.console/logins.jsonl.
    /// - Returns: the session, and the device cookie's value to set.
    func login(user given: String, password: String, device: String?, context: ConsoleContext) async throws -> (SessionInfo, device: String) {
        let valid = UserStore.validName(given)
        let name = valid ? given : "(not a user name)"
        let address = context.address
        func note(_ event: String) {
            if event == "login-refused" && !logins.shouldRecordRefusal(from: address) { return }
            logins.record(LoginRecord(time: Date(), event: event, user: name, address: address))
            context.logger.notice("console \(event): user \(name) from \(address)")
        }
        // Only names of users have a count of their own (a flood of made-up names fills nothing).
        let known = valid && (try? users.user(given)) != nil
        let counted = known && !devices.vouches(device, for: given) ? given : nil
        let (wait, retryAfter) = throttle.admit(address: address, user: counted)
        guard let wait else {
            note("login-refused")
            // Answered after a pause (no CPU, a timer): a client that loops on refusals makes a
            // few requests a second, not thousands, and costs the pages of people logged in nothing.
            try await Task.sleep(for: .seconds(ConsoleLimits.refusalPause))
            throw ConsoleError(.tooManyRequests, "too many failed logins for \(name) or from your address: try again in \(Int(retryAfter.rounded(.up)) + 1) s")
        }
        if wait > 0 { try await Task.sleep(for: .milliseconds(Int(wait * 1000))) }
        let users = self.users
        guard let checked = try await passwordChecks.run({ try users.verify(valid ? given : "", password: password) }) else {
            throttle.failed(address: address, user: counted)
            note("login-refused")
            try await Task.sleep(for: .seconds(ConsoleLimits.refusalPause))
            throw ConsoleError(.tooManyRequests, "too many logins at once: try again in a few seconds")
        }
        guard let user = checked else {
            throttle.failed(address: address, user: counted)
            note("login-failed")
            throw ConsoleError(.unauthorized, "wrong user name or password: check them (after failures, answers for that name and from your address come slower)")
        }
        throttle.succeeded(address: address, user: user.name)
        note("login")
        let session = ConsoleSession(user: user.name, csrf: Answer.newToken(), epoch: user.password.salt, login: book.open(user.name))
        context.sessions.createSession(session)
        return (SessionInfo(user: user.name, role: user.role, csrf: session.csrf), devices.value(for: user.name))
    }

    /// The device cookie (`DeviceCookies`) on a login's answer.
    static func setDevice(_ value: String, on response: inout Response, secure: Bool) {
        response.setCookie(Cookie(name: DeviceCookies.name(secure: secure), value: value, maxAge: Int(DeviceCookies.lifetime), path: "/",
                                  secure: secure, httpOnly: true, sameSite: .strict))
    }

    /// Ends every session of the context's user.
    func logout(_ context: ConsoleContext) {
        if let user = context.user {
            book.close(user.name)
            logins.record(LoginRecord(time: Date(), event: "logout", user: user.name, address: context.address))
        }
        context.sessions.clearSession()
    }

    func machineInfo(_ name: String) async throws -> MachineInfo {
        let status = try await status(name)
        let machine = try await read { try $0.repository.machine(name) }
        return MachineInfo(machine: machine, status: status)
    }

    func addUser(_ new: NewUser) async throws -> ConsoleUser.Listing {
        let users = self.users
        return try await withCheckedThrowingContinuation { continuation in
            DispatchQueue.global().async { continuation.resume(with: Result { try users.add(new.name, role: new.role, password: new.password).listing }) }
        }
    }

    func removeUser(_ name: String, by user: ConsoleUser) throws {
        guard name != user.name else { throw ConsoleError(.conflict, "\(name) cannot remove themselves: log in as another admin to do it") }
        try users.remove(name)
        book.close(name)
    }

    static func action(_ text: String) throws -> ConsoleAction {
        guard let action = ConsoleAction(rawValue: text) else {
            throw ConsoleError(.notFound, "no action \(text): use one of " + ConsoleAction.allCases.map(\.rawValue).joined(separator: ", "))
        }
        return action
    }

    // MARK: - /api/v1

    func addAPIRoutes(_ router: Router<ConsoleContext>, secure: Bool) {
        let api = router.group("api/v1")
        api.post("login") { request, context -> Response in
            struct Login: Decodable { var user: String; var password: String }
            let body = try await request.json(Login.self, context)
            let (info, device) = try await self.login(user: body.user, password: body.password,
                                                      device: request.cookies[DeviceCookies.name(secure: secure)]?.value, context: context)
            var response = try Answer.json(info)
            Self.setDevice(device, on: &response, secure: secure)
            return response
        }
        api.post("logout") { _, context -> Response in
            self.logout(context)
            return Response(status: .noContent)
        }
        api.get("session") { _, context -> Response in
            let user = try context.require(.viewer, to: "look")
            return try Answer.json(SessionInfo(user: user.name, role: user.role, csrf: context.csrf))
        }
        api.get("machines") { _, _ -> Response in try Answer.json(try await self.snapshot().statuses) }
        api.get("machines/:name") { _, context -> Response in
            try Answer.json(try await self.machineInfo(try context.parameters.require("name")))
        }
        api.get("machines/:name/points") { _, context -> Response in
            let name = try context.parameters.require("name")
            return try Answer.json(try await self.read { try $0.repository.points(name) })
        }
        api.get("machines/:name/drills") { _, context -> Response in
            let name = try context.parameters.require("name")
            return try Answer.json(try await self.read { try $0.drills(name) })
        }
        api.get("machines/:name/history") { _, context -> Response in
            let name = try context.parameters.require("name")
            return try Answer.json(try await self.read { try $0.history(name) })
        }
        // Resource-style: a point is a POST to backups, a drill a POST to drills, stopping it a DELETE.
        api.post("machines/:name/backups") { request, context in try await self.apiAction(.backup, request, context) }
        api.post("machines/:name/drills") { request, context in try await self.apiAction(.testFailover, request, context) }
        api.delete("machines/:name/drills") { request, context in try await self.apiAction(.stopTest, request, context) }
        // Every action by its CLI name: failover, change-point, commit, cancel-failover, failback…
        api.post("machines/:name/:action") { request, context in
            try await self.apiAction(try Self.action(try context.parameters.require("action")), request, context)
        }
        api.get("jobs") { _, _ -> Response in try Answer.json(self.jobs.all()) }
        api.get("jobs/:id") { _, context -> Response in
            let id = try context.parameters.require("id")
            guard let job = self.jobs.job(id) else { throw ConsoleError(.notFound, "no job \(id): see GET /api/v1/jobs") }
            return try Answer.json(job)
        }
        api.get("plans") { _, _ -> Response in try Answer.json(try await self.snapshot().plans) }
        api.get("plans/:name") { _, context -> Response in
            let name = try context.parameters.require("name")
            return try Answer.json(try await self.read { try $0.plan(name) })
        }
        api.get("reports") { request, _ -> Response in
            let plan = request.uri.queryParameters.get("plan")
            return try Answer.json(try await self.read { recovery in
                if let plan { _ = try recovery.plan(plan) }
                return recovery.reports(plan: plan)
            })
        }
        api.get("reports/:id") { _, context -> Response in
            let id = try context.parameters.require("id")
            return try Answer.json(try await self.read { try $0.report(id) })
        }
        api.get("users") { _, context -> Response in
            _ = try context.require(.admin, to: "see users")
            return try Answer.json(try self.users.users().map(\.listing))
        }
        api.get("logins") { _, context -> Response in
            _ = try context.require(.admin, to: "see logins")
            return try Answer.json(self.logins.records())
        }
        api.post("users") { request, context -> Response in
            _ = try context.require(.admin, to: "manage users")
            return try Answer.json(try await self.addUser(try await request.json(NewUser.self, context)), status: .created)
        }
        api.delete("users/:name") { _, context -> Response in
            let admin = try context.require(.admin, to: "manage users")
            try self.removeUser(try context.parameters.require("name"), by: admin)
            return Response(status: .noContent)
        }
        api.get("**") { request, _ -> Response in throw ConsoleError(.notFound, "no API call GET \(request.uri.path): see docs/API.md") }
    }

    /// Starts an action: 202 with the job (its progress at GET /api/v1/jobs/ID).
    func apiAction(_ action: ConsoleAction, _ request: Request, _ context: ConsoleContext) async throws -> Response {
        let user = try context.require(.operator, to: action.rawValue)
        let name = try context.parameters.require("name")
        let body = try await request.json(ActionRequest.self, context, empty: ActionRequest())
        let job = try await start(action, machine: name, body, user: user.name)
        var response = try Answer.json(job, status: .accepted)
        response.headers[.location] = "/api/v1/jobs/\(job.id)"
        return response
    }

    // MARK: - Pages

    /// The login form's own CSRF defence, before any session exists: a token in a SameSite=Strict
    /// cookie and in the form must match, so a form posted from another site cannot log a
    /// browser into somebody else's session.
    /// The token is kept while the cookie lives: a second GET /login (a browser following a
    /// redirect for its favicon) must not change it under an open form.
    func loginPage(_ request: Request, error: String?, user: String, secure: Bool, status: HTTPResponse.Status = .ok) throws -> Response {
        let kept = request.cookies[Self.loginCookie(secure: secure)]?.value
        let token = kept.flatMap { $0.count == 43 && $0.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "-" || $0 == "_") } ? $0 : nil }
            ?? Answer.newToken()
        var response = Answer.html(try pages.render("login", LoginPage(error: error, user: user, csrf: token)), status: status)
        response.setCookie(Cookie(name: Self.loginCookie(secure: secure), value: token, maxAge: 3600, path: secure ? "/" : "/login",
                                  secure: secure, httpOnly: true, sameSite: .strict))
        return response
    }

    func addPageRoutes(_ router: Router<ConsoleContext>, secure: Bool) {
        router.get("login") { request, context -> Response in
            if context.user != nil { return Answer.redirect("/") }
            return try self.loginPage(request, error: nil, user: "", secure: secure)
        }
        router.post("login") { request, context -> Response in
            let form = try await request.form(context, checkCSRF: false)
            guard let cookie = request.cookies[Self.loginCookie(secure: secure)]?.value, Answer.same(cookie, form["csrf"] ?? "") else {
                return try self.loginPage(request, error: "the login form expired or came from another site: log in again", user: form["user"] ?? "",
                                          secure: secure, status: .forbidden)
            }
            do {
                let (_, device) = try await self.login(user: form["user"] ?? "", password: form["password"] ?? "",
                                                       device: request.cookies[DeviceCookies.name(secure: secure)]?.value, context: context)
                var response = Answer.redirect("/")
                Self.setDevice(device, on: &response, secure: secure)
                return response
            } catch let error as ConsoleError where error.status == .unauthorized || error.status == .tooManyRequests {
                return try self.loginPage(request, error: error.message, user: form["user"] ?? "", secure: secure, status: error.status)
            }
        }
        router.post("logout") { request, context -> Response in
            _ = try await request.form(context)
            self.logout(context)
            return Answer.redirect("/login")
        }
        router.get("static/:file") { _, context -> Response in
            let file = try context.parameters.require("file")
            guard let bytes = self.pages.asset(file) else { throw ConsoleError(.notFound, "no file \(file)") }
            return Answer.bytes(bytes, type: file.hasSuffix(".css") ? "text/css; charset=utf-8" : "text/javascript; charset=utf-8",
                                cache: "private, max-age=300")
        }
        router.get("/") { _, context -> Response in
            let main = try self.dashboard(try await self.snapshot())
            return Answer.html(try self.pages.render("dashboard", Shell(frame: context.frame("Dashboard"), main: main)))
        }
        router.get("machines/:name") { _, context -> Response in
            let name = try context.parameters.require("name")
            let status = try await self.status(name)
            let jobs = self.jobs.all()
            let (machine, points, drills, history) = try await self.read { recovery in
                (try recovery.repository.machine(name), try recovery.repository.points(name), recovery.hot.drills(name), recovery.hot.history(name))
            }
            let page = MachinePage(status: status, machine: machine, points: points, drills: drills, history: history,
                                   jobs: jobs, frame: context.frame(name))
            return Answer.html(try self.pages.render("machine", page))
        }
        router.get("machines/:name/drills/:id/screenshot.png") { _, context -> Response in
            let name = try context.parameters.require("name"), id = try context.parameters.require("id")
            let bytes = try await self.read { recovery -> [UInt8]? in
                try recovery.drills(name).first { $0.id == id }?.screenshot.flatMap { FileSystem.contents($0) }
            }
            guard let bytes else { throw ConsoleError(.notFound, "drill \(id) of \(name) has no screenshot") }
            return Answer.bytes(bytes, type: "image/png")
        }
        router.post("machines/:name/actions/:action") { request, context -> Response in
            let form = try await request.form(context)
            let action = try Self.action(try context.parameters.require("action"))
            let user = try context.require(.operator, to: action.rawValue)
            let body = ActionRequest(point: form["point"].flatMap { $0.isEmpty ? nil : $0 }, confirm: form["confirm"],
                                     planned: form["planned"] == "on")
            let job = try await self.start(action, machine: try context.parameters.require("name"), body, user: user.name)
            return Answer.redirect("/jobs/\(job.id)")
        }
        router.get("jobs/:id") { _, context -> Response in
            let id = try context.parameters.require("id")
            guard let job = self.jobs.job(id) else { throw ConsoleError(.notFound, "no job \(id): it may be older than the console's start") }
            return Answer.html(try self.pages.render("job", JobPage(job, frame: context.frame("\(job.action) \(job.machine)"))))
        }
        router.get("plans") { _, context -> Response in
            let plans = try await self.snapshot().plans
            let reports = try await self.read { $0.reports() }
            return Answer.html(try self.pages.render("plans", PlansPage(plans: plans, reports: reports, frame: context.frame("Plans"))))
        }
        router.get("reports/:id") { _, context -> Response in
            let id = try context.parameters.require("id")
            let bytes = try await self.read { recovery -> [UInt8]? in
                let report = try recovery.report(id)
                return FileSystem.contents(recovery.reportDirectory(plan: report.plan, id: report.id) + "/report.html")
            }
            guard let bytes else { throw ConsoleError(.notFound, "report \(id) has no HTML page (yet)") }
            var response = Answer.bytes(bytes, type: "text/html; charset=utf-8")
            // The report is self-contained: its own styles, screenshots as data: URLs, no scripts.
            response.headers[.contentSecurityPolicy] = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'"
            return response
        }
        router.get("users") { _, context -> Response in
            let admin = try context.require(.admin, to: "manage users")
            let rows = try self.users.users().map {
                UsersPage.Row(name: $0.name, role: $0.role.rawValue, created: Units.time($0.created), isSelf: $0.name == admin.name)
            }
            return Answer.html(try self.pages.render("users", UsersPage(frame: context.frame("Users"), users: rows,
                                                                        roles: ConsoleRole.allCases.map(\.rawValue))))
        }
        router.post("users") { request, context -> Response in
            let form = try await request.form(context)
            _ = try context.require(.admin, to: "manage users")
            guard let role = ConsoleRole(rawValue: form["role"] ?? "") else {
                throw ConsoleError(.badRequest, "role must be viewer, operator or admin")
            }
            _ = try await self.addUser(NewUser(name: form["name"] ?? "", role: role, password: form["password"] ?? ""))
            return Answer.redirect("/users")
        }
        router.post("users/:name/remove") { request, context -> Response in
            _ = try await request.form(context)
            let admin = try context.require(.admin, to: "manage users")
            try self.removeUser(try context.parameters.require("name"), by: admin)
            return Answer.redirect("/users")
        }
        // Anything else: a 404 page that went through the same checks and headers.
        router.get("**") { request, _ -> Response in throw ConsoleError(.notFound, "no page \(request.uri.path): start from the dashboard") }
    }
}
