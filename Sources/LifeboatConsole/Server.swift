import Crypto
import Foundation
import Hummingbird
import HummingbirdAuth
import HummingbirdCore
import HummingbirdTLS
import HTTPTypes
import LifeboatBase
import LifeboatRecovery
import LifeboatRepository
import Logging
import NIOCore
import NIOSSL
import ServiceLifecycle

/// What a session holds: who logged in, the token every form and API change must carry, the
/// user's password epoch when they logged in (the salt of their password hash: a new password or
/// a removed and re-added user ends the session) and which login of the user it is (a later
/// login or a logout ends it: `SessionBook`).
struct ConsoleSession: Codable, Sendable {
    var user: String
    var csrf: String
    var epoch: String
    var login: String
}

/// A request's context: its session, the user it belongs to (checked against the user file on
/// every request, so a removed user's sessions end at once), and the client's address.
struct ConsoleContext: SessionRequestContext, RequestContext {
    typealias Session = ConsoleSession
    var coreContext: CoreRequestContextStorage
    let sessions: SessionContext<ConsoleSession>
    let address: String
    var user: ConsoleUser?
    var csrf: String = ""

    init(source: ApplicationRequestContextSource) {
        coreContext = .init(source: source)
        sessions = .init()
        address = source.channel.remoteAddress?.ipAddress ?? "unknown"
    }

    /// The user, whose role is at least `role`; else 403 naming what they are.
    func require(_ role: ConsoleRole, to what: String) throws -> ConsoleUser {
        guard let user else { throw ConsoleError(.unauthorized, "log in first: POST /api/v1/login") }
        guard user.role >= role else {
            throw ConsoleError(.forbidden, "\(user.name) is a \(user.role.rawValue): only \(role == .admin ? "admins" : "operators and admins") may \(what)")
        }
        return user
    }

    func frame(_ title: String) -> Frame {
        Frame(title: title, user: user?.name ?? "", role: user?.role.rawValue ?? "", csrf: csrf,
              isAdmin: user?.role == .admin, canAct: (user?.role ?? .viewer) >= .operator)
    }
}

/// An answer other than 200, with a sentence for the person.
struct ConsoleError: Error {
    let status: HTTPResponse.Status
    let message: String
    init(_ status: HTTPResponse.Status, _ message: String) {
        self.status = status
        self.message = message
    }

    /// Lifeboat's errors as HTTP: unknown things 404, wrong state or busy 409, bad input 400.
    init(_ error: any Error) {
        if let error = error as? ConsoleError { self = error; return }
        guard let error = error as? LifeboatError else {
            self.init(.internalServerError, "\(error)")
            return
        }
        let status: HTTPResponse.Status
        switch error.code {
        case .notFound: status = .notFound
        case .invalidState, .busy, .alreadyExists: status = .conflict
        case .invalidArgument: status = .badRequest
        case .authentication: status = .unauthorized
        case .unsupported: status = .serviceUnavailable
        case .damaged, .io, .noSpace: status = .internalServerError
        }
        self.init(status, error.message)
    }
}

/// Where and how the console listens.
public struct ConsoleListen: Sendable {
    /// Fixed at init: `isLoopback` is decided from it.
    public let host: String
    public var port: Int
    /// PEM files; nil: plain HTTP on a loopback address, else a self-signed certificate.
    public var certificate: String?
    public var key: String?
    /// More names the console answers to (Host header), beside its address, localhost and the host name.
    public var serverNames: [String]
    /// Every address `host` resolves to is a loopback address (decided once, from the resolved
    /// addresses: a name that merely starts with "127." is not loopback).
    public let isLoopback: Bool

    public init(host: String = "127.0.0.1", port: Int = 8470, certificate: String? = nil, key: String? = nil, serverNames: [String] = []) {
        self.host = host
        self.port = port
        self.certificate = certificate
        self.key = key
        self.serverNames = serverNames
        self.isLoopback = Self.resolvesToLoopback(host)
    }

    /// True when `host` resolves, and only to 127.0.0.0/8 or ::1.
    static func resolvesToLoopback(_ host: String) -> Bool {
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var list: UnsafeMutablePointer<addrinfo>?
        guard getaddrinfo(host, nil, &hints, &list) == 0, let first = list else { return false }
        defer { freeaddrinfo(list) }
        var entry: UnsafeMutablePointer<addrinfo>? = first
        var any = false
        while let current = entry {
            guard let address = current.pointee.ai_addr else { return false }
            switch Int32(address.pointee.sa_family) {
            case AF_INET:
                let ip = address.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { UInt32(bigEndian: $0.pointee.sin_addr.s_addr) }
                guard ip >> 24 == 127 else { return false }
            case AF_INET6:
                let loopback = address.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { pointer -> Bool in
                    withUnsafeBytes(of: pointer.pointee.sin6_addr) { bytes in bytes.prefix(15).allSatisfy { $0 == 0 } && bytes[15] == 1 }
                }
                guard loopback else { return false }
            default:
                return false
            }
            any = true
            entry = current.pointee.ai_next
        }
        return any
    }

    /// TLS is used with a given certificate, and always off loopback.
    public var usesTLS: Bool { certificate != nil || !isLoopback }
}

extension Console {
    static let csrfHeader = HTTPField.Name("X-CSRF-Token")!

    /// The session cookie's name: with the __Host- prefix under TLS (the browser then takes it
    /// only over TLS, for this host, path /: a sibling host name cannot set or shadow it).
    static func sessionCookie(secure: Bool) -> String { secure ? "__Host-lifeboat_session" : "lifeboat_session" }
    /// The login form's cookie (see `loginPage`).
    static func loginCookie(secure: Bool) -> String { secure ? "__Host-lifeboat_login" : "lifeboat_login" }

    /// The console's router: middleware and every route. `routes` lists them (tests enumerate
    /// the changing ones from it).
    func router(_ listen: ConsoleListen, persist: MemoryPersistDriver<ContinuousClock>) -> Router<ConsoleContext> {
        let router = Router(context: ConsoleContext.self)
        router.add(middleware: HeadersMiddleware(tls: listen.usesTLS))
        router.add(middleware: ErrorMiddleware(pages: pages))
        router.add(middleware: RequestShapeMiddleware(names: ConsoleNames(listen: listen, extra: listen.serverNames)))
        let cookie = SessionCookieParameters(name: Self.sessionCookie(secure: listen.usesTLS), path: "/", secure: listen.usesTLS,
                                             sameSite: .strict)
        router.add(middleware: SessionMiddleware(storage: persist, configuration: .init(sessionCookieParameters: cookie,
                                                                                       defaultSessionExpiration: .seconds(8 * 3600))))
        router.add(middleware: AuthMiddleware(users: users, book: book))
        addAPIRoutes(router, secure: listen.usesTLS)
        addPageRoutes(router, secure: listen.usesTLS)
        return router
    }

    /// Every route as "METHOD /path" (parameters as :name).
    public func routes(_ listen: ConsoleListen = ConsoleListen()) -> [String] {
        router(listen, persist: MemoryPersistDriver()).routes.map { route in
            let path = "/\(route.path)".replacingOccurrences(of: "//", with: "/")
                .replacing(/\{([^}]+)\}/) { ":" + $0.1 }
            return "\(route.method) \(path)"
        }
    }

    /// The console's Hummingbird application: pages, /api/v1, sessions; TLS when `listen` asks
    /// for it (a self-signed certificate in HOT/.console/tls when none is given, whose
    /// fingerprint `onCertificate` receives).
    /// `onRunning` receives the URL once the server listens (with the port the system chose for port 0).
    public func application(_ listen: ConsoleListen, logger: Logger,
                            onCertificate: @Sendable (ConsoleCertificate) -> Void = { _ in },
                            onRunning: @escaping @Sendable (String) -> Void = { _ in }) throws -> some Service {
        let persist = MemoryPersistDriver()
        let router = self.router(listen, persist: persist)
        // The server's own limits: a connection without a complete request head for idleSeconds
        // (from its start, its TLS handshake included, or since its last answer) is closed; at
        // most `connections` at once, and `connectionsPerAddress` from one address off loopback.
        let perAddress = ConnectionsPerAddress()
        let http = HTTP1Channel.Configuration(additionalChannelHandlers: [perAddress.handler()],
                                              idleTimeout: .seconds(ConsoleLimits.idleSeconds))
        var server: HTTPServerBuilder = .http1(configuration: http)
        if listen.usesTLS {
            let files: ConsoleCertificate
            if let certificate = listen.certificate, let key = listen.key {
                files = try ConsoleCertificate.given(certificate: certificate, key: key)
            } else {
                files = try ConsoleCertificate.selfSigned(in: reader.settings.hotDirectory + "/.console/tls", host: listen.host)
            }
            onCertificate(files)
            let chain = try NIOSSLCertificate.fromPEMFile(files.certificate).map { NIOSSLCertificateSource.certificate($0) }
            var tls = TLSConfiguration.makeServerConfiguration(certificateChain: chain,
                                                               privateKey: .privateKey(try NIOSSLPrivateKey(file: files.key, format: .pem)))
            tls.minimumTLSVersion = .tlsv12
            server = try .tls(.http1(configuration: http), tlsConfiguration: tls)
        }
        return Application(router: router, server: server,
                           configuration: .init(address: .hostname(listen.host, port: listen.port), serverName: "lifeboat",
                                                availableConnectionsDelegate: MaximumAvailableConnections(ConsoleLimits.connections)),
                           services: [persist],
                           onServerRunning: { channel in
                               let host = listen.host.contains(":") ? "[\(listen.host)]" : listen.host
                               onRunning("\(listen.usesTLS ? "https" : "http")://\(host):\(channel.localAddress?.port ?? listen.port)/")
                           },
                           logger: logger)
    }
}

/// Turns every error into a JSON error (under /api) or an error page, with the sentence and
/// no stack trace.
struct ErrorMiddleware: RouterMiddleware {
    typealias Context = ConsoleContext
    let pages: Pages

    func handle(_ request: Request, context: ConsoleContext, next: (Request, ConsoleContext) async throws -> Response) async throws -> Response {
        do {
            return try await next(request, context)
        } catch {
            let failure: ConsoleError
            if let http = error as? HTTPError {
                failure = ConsoleError(http.status, http.body ?? http.status.reasonPhrase)
            } else {
                failure = ConsoleError(error)
            }
            if failure.status == .internalServerError { context.logger.error("\(request.method) \(request.uri.path): \(failure.message)") }
            if request.uri.path.hasPrefix("/api/") { return Answer.error(failure) }
            if failure.status == .unauthorized { return Answer.redirect("/login") }
            let page = ErrorPage(title: failure.status.reasonPhrase, status: failure.status.code, message: failure.message,
                                 frame: context.user == nil ? nil : context.frame(failure.status.reasonPhrase))
            return Answer.html((try? pages.render("error", page)) ?? failure.message, status: failure.status)
        }
    }
}

/// Headers on every answer: no framing, no sniffing, no referrer, scripts and styles from here
/// only, no <base>; HSTS under TLS; and Server-Timing with the milliseconds the answer took at
/// the server (bench-console reads it).
struct HeadersMiddleware: RouterMiddleware {
    typealias Context = ConsoleContext
    let tls: Bool
    static let policy = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"

    func handle(_ request: Request, context: ConsoleContext, next: (Request, ConsoleContext) async throws -> Response) async throws -> Response {
        let started = ContinuousClock.now
        var response = try await next(request, context)
        let elapsed = ContinuousClock.now - started
        let milliseconds = Double(elapsed.components.seconds) * 1000 + Double(elapsed.components.attoseconds) / 1e15
        response.headers[HTTPField.Name("Server-Timing")!] = String(format: "app;dur=%.2f", milliseconds)
        if response.headers[.contentSecurityPolicy] == nil { response.headers[.contentSecurityPolicy] = Self.policy }
        // Not for localhost or an address: HSTS there would hold every port of it (an SSH tunnel's end) to TLS for a year.
        if tls, let (host, _) = ConsoleNames.split(request.head.authority ?? ""), host != "localhost", !ConsoleNames.isAddress(host) {
            response.headers[HTTPField.Name("Strict-Transport-Security")!] = "max-age=31536000"
        }
        response.headers[.xContentTypeOptions] = "nosniff"
        response.headers[HTTPField.Name("X-Frame-Options")!] = "DENY"
        // same-origin, not no-referrer: under no-referrer a browser sends "Origin: null" with the
        // console's own forms, and the Origin check must tell its pages from other sites'.
        response.headers[HTTPField.Name("Referrer-Policy")!] = "same-origin"
        response.headers[.cacheControl] = response.headers[.cacheControl] ?? "no-store"
        return response
    }
}

/// Finds the session's user (a session whose user is gone, whose password changed since, or
/// that a later login or a logout replaced is no session); answers 401 (API) or sends to /login
/// (pages) without one; and checks CSRF on every change, whatever its path: any method but GET
/// and HEAD needs the session's token, under /api/ as the X-CSRF-Token header with a JSON
/// Content-Type (even with an empty body), elsewhere as the form field csrf. Paths reach it in
/// normal form (`RequestShapeMiddleware`), so the /api/ prefix is the router's too.
struct AuthMiddleware: RouterMiddleware {
    typealias Context = ConsoleContext
    let users: UserStore
    let book: SessionBook
    /// Served without a session; the two logins defend themselves (JSON only; the login form's cookie token).
    static let open: Set<String> = ["/login", "/api/v1/login", "/static/console.css", "/static/console.js"]

    func handle(_ request: Request, context: ConsoleContext, next: (Request, ConsoleContext) async throws -> Response) async throws -> Response {
        var context = context
        var request = request
        if let session = context.sessions.session {
            if let user = try users.user(session.user), user.password.salt == session.epoch, book.isCurrent(session) {
                context.user = user
                context.csrf = session.csrf
            } else {
                context.sessions.clearSession()
            }
        }
        // Every body is read here, bounded in size and time, before anything answers (a body
        // left unread is drained by the server after the answer, with no deadline).
        let body: ByteBuffer
        do {
            body = try await request.collectBodyLimited(context.user == nil ? ConsoleLimits.anonymousBody : ConsoleLimits.body)
        } catch let error as HTTPError where error.status == .contentTooLarge {
            throw ConsoleError(.contentTooLarge, "the request body is too large")
        }
        let path = request.uri.path
        if Self.open.contains(path) { return try await next(request, context) }
        guard context.user != nil else {
            if path.hasPrefix("/api/") { throw ConsoleError(.unauthorized, "not logged in: POST /api/v1/login with {\"user\": ..., \"password\": ...} first") }
            return Answer.redirect("/login")
        }
        if request.method != .get && request.method != .head {
            if path.hasPrefix("/api/") {
                guard let token = request.headers[Console.csrfHeader], Answer.same(token, context.csrf) else {
                    throw ConsoleError(.forbidden, "the X-CSRF-Token header is missing or does not match your session: take csrf from the login answer or GET /api/v1/session")
                }
                guard request.isJSON else {
                    throw ConsoleError(.unsupportedMediaType, "changes through the API need Content-Type: application/json, even with an empty body")
                }
            } else {
                guard request.headers[.contentType]?.lowercased().hasPrefix("application/x-www-form-urlencoded") == true else {
                    throw ConsoleError(.forbidden, "a change from a page must be the page's own form: reload the page and try again")
                }
                try Request.checkFormToken(Request.fields(of: body), context)
            }
        }
        return try await next(request, context)
    }
}

/// Building answers.
enum Answer {
    static func json<T: Encodable>(_ value: T, status: HTTPResponse.Status = .ok) throws -> Response {
        var data = try JSONEncoder.lifeboat.encode(value)
        data.append(0x0a)
        return Response(status: status, headers: [.contentType: "application/json; charset=utf-8"],
                        body: .init(byteBuffer: ByteBuffer(bytes: data)))
    }

    static func error(_ error: ConsoleError) -> Response {
        struct Body: Encodable { let error: String; let status: Int }
        return (try? json(Body(error: error.message, status: error.status.code), status: error.status))
            ?? Response(status: error.status)
    }

    static func html(_ text: String, status: HTTPResponse.Status = .ok) -> Response {
        Response(status: status, headers: [.contentType: "text/html; charset=utf-8"], body: .init(byteBuffer: ByteBuffer(string: text)))
    }

    static func redirect(_ path: String) -> Response {
        Response(status: .seeOther, headers: [.location: path])
    }

    /// `cache`: the console's own scripts and styles may be kept a while; machines' data (reports,
    /// screenshots) never outlives the session in a browser's cache (the default).
    static func bytes(_ bytes: [UInt8], type: String, cache: String = "no-store") -> Response {
        Response(status: .ok, headers: [.contentType: type, .cacheControl: cache],
                 body: .init(byteBuffer: ByteBuffer(bytes: bytes)))
    }

    /// Compares tokens in time that does not depend on where they differ.
    static func same(_ a: String, _ b: String) -> Bool {
        !a.isEmpty && equalInConstantTime(a.utf8, b.utf8)
    }

    static func newToken() -> String {
        Data(secureRandomBytes(32)).base64EncodedString()
            .replacingOccurrences(of: "+", with: "-").replacingOccurrences(of: "/", with: "_").replacingOccurrences(of: "=", with: "")
    }
}

extension Request {
    var isJSON: Bool { headers[.contentType]?.lowercased().hasPrefix("application/json") == true }

    /// The body, at most `limit` bytes, arriving within `ConsoleLimits.bodySeconds`; kept in
    /// the request, so a handler can read it again.
    mutating func collectBodyLimited(_ limit: Int) async throws -> ByteBuffer {
        let original = self
        let (request, buffer) = try await withThrowingTaskGroup(of: (Request, ByteBuffer).self) { group in
            group.addTask {
                var request = original
                let buffer = try await request.collectBody(upTo: limit)
                return (request, buffer)
            }
            group.addTask {
                try await Task.sleep(for: .seconds(ConsoleLimits.bodySeconds))
                throw ConsoleError(.requestTimeout, "the request body did not arrive within \(Int(ConsoleLimits.bodySeconds)) s")
            }
            defer { group.cancelAll() }
            return try await group.next()!
        }
        self = request
        return buffer
    }

    /// The body, as AuthMiddleware read it (bounded in size and time) before any handler ran.
    func text(_ context: ConsoleContext) async throws -> String {
        String(buffer: try await body.collect(upTo: ConsoleLimits.body))
    }

    /// A form's csrf field must be the session's token.
    static func checkFormToken(_ fields: [String: String], _ context: ConsoleContext) throws {
        guard Answer.same(fields["csrf"] ?? "", context.csrf) else {
            throw ConsoleError(.forbidden, "this form's CSRF token does not match your session (an old page, or a page from elsewhere): reload the page and try again")
        }
    }

    /// The fields of an application/x-www-form-urlencoded body.
    static func fields(of buffer: ByteBuffer) -> [String: String] {
        var fields: [String: String] = [:]
        for pair in String(buffer: buffer).split(separator: "&") {
            let parts = pair.split(separator: "=", maxSplits: 1).map {
                String($0).replacingOccurrences(of: "+", with: " ").removingPercentEncoding ?? ""
            }
            if let key = parts.first, !key.isEmpty { fields[key] = parts.count > 1 ? parts[1] : "" }
        }
        return fields
    }

    /// The form fields of a POST from a page, whose csrf field must match the session's
    /// (AuthMiddleware checked it already; checked again here, where the form is used).
    func form(_ context: ConsoleContext, checkCSRF: Bool = true) async throws -> [String: String] {
        let fields = Request.fields(of: try await body.collect(upTo: ConsoleLimits.body))
        if checkCSRF { try Request.checkFormToken(fields, context) }
        return fields
    }

    /// A JSON body as `T`; an empty body as `empty`. A body must say it is JSON (Content-Type:
    /// application/json), which a form on another site cannot send without asking first.
    func json<T: Decodable>(_ type: T.Type, _ context: ConsoleContext, empty: T? = nil) async throws -> T {
        guard isJSON else {
            throw ConsoleError(.unsupportedMediaType, "the request body must be JSON with Content-Type: application/json")
        }
        let text = try await text(context)
        if text.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty, let empty { return empty }
        do {
            return try JSONDecoder.lifeboat.decode(T.self, from: Data(text.utf8))
        } catch {
            throw ConsoleError(.badRequest, "the request body is not the JSON expected (\(Answer.describe(error))): see docs/API.md")
        }
    }
}

extension Answer {
    static func describe(_ error: any Error) -> String {
        switch error {
        case DecodingError.keyNotFound(let key, _): return "field \(key.stringValue) is missing"
        case DecodingError.typeMismatch(_, let context), DecodingError.valueNotFound(_, let context):
            return "field \(context.codingPath.map(\.stringValue).joined(separator: ".")) has the wrong type"
        case DecodingError.dataCorrupted: return "not valid JSON"
        default: return "\(error)"
        }
    }
}
