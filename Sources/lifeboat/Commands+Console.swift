import ArgumentParser
import Foundation
import LifeboatBase
import LifeboatConsole
import LifeboatRecovery
import LifeboatRepository
import Logging
import ServiceLifecycle
#if canImport(Glibc)
import Glibc
#endif

/// Where a console listens, as `lifeboat console` and `lifeboat replicate --console` take it.
struct ConsoleTLSOptions: ParsableArguments {
    @Option(help: "TLS certificate (PEM) for the console (default: a self-signed one in HOT/.console/tls off loopback).")
    var tlsCert: String?
    @Option(help: "TLS private key (PEM) that goes with --tls-cert.") var tlsKey: String?
    @Option(name: .customLong("server-name"),
            help: "A host name the console answers to (Host header), beside its address, localhost and this host's name; repeatable.")
    var serverNames: [String] = []

    func validate() throws {
        if (tlsCert == nil) != (tlsKey == nil) { throw ValidationError("give --tls-cert and --tls-key together") }
    }

    func listen(_ address: String, option: String) throws -> ConsoleListen {
        guard let (host, port) = ListenAddress.parse(address) else {
            throw ValidationError("\(option) \(address) is not ADDR:PORT like 127.0.0.1:8470")
        }
        return ConsoleListen(host: host, port: port, certificate: tlsCert, key: tlsKey, serverNames: serverNames)
    }
}

enum ConsoleServer {
    /// The console of `recovery` as a service: jobs act with the CLI's helpers (finalisers that
    /// outlive the console); the URL and a self-signed certificate's fingerprint go to stdout.
    static func make(_ recovery: Recovery, _ options: RecoveryOptions, listen: ConsoleListen,
                     logger: Logger) async throws -> any Service {
        let replication = ReplicationOptions.replication(recovery.repository, hot: options.hot, connect: options.connect)
        let console = try await Console(recovery: recovery, replication: replication)
        if (try console.users.users()).isEmpty {
            say("no console users yet: add one with 'lifeboat user add NAME --role admin' (it works while the console runs)")
        }
        return try console.application(listen, logger: logger, onCertificate: { certificate in
            if certificate.selfSigned {
                say("TLS: \(certificate.created ? "created a" : "using the") self-signed certificate \(certificate.certificate)")
            }
            say("TLS certificate SHA-256 fingerprint: \(certificate.fingerprint)")
        }, onRunning: { url in say("lifeboat console at \(url)") })
    }

    /// A line on stdout at once (a pipe would keep it in a buffer).
    static func say(_ line: String) {
        FileHandle.standardOutput.write(Data((line + "\n").utf8))
    }
}

extension Lifeboat {
    struct ConsoleCommand: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "console",
            abstract: "The web console and JSON API (/api/v1): every machine's protection at a glance, drills and failovers from a browser.",
            discussion: """
            Logins come from 'lifeboat user add'. On 127.0.0.1 (the default) it speaks HTTP; on any other address TLS is \
            required: with --tls-cert/--tls-key, or a self-signed certificate made on first start in HOT/.console/tls, \
            whose fingerprint is printed. SIGTERM or Ctrl-C stops it; work it started (drills, finalisers) goes on.
            """)
        @OptionGroup var repository: RepositoryOptions
        @OptionGroup var recovery: RecoveryOptions
        @Option(help: "ADDR:PORT to listen on.") var listen = "127.0.0.1:8470"
        @OptionGroup var tls: ConsoleTLSOptions
        @Flag(help: "Print every route the console serves (METHOD /path) and exit.") var routes = false
        @OptionGroup var output: OutputOptions

        func validate() throws { _ = try tls.listen(listen, option: "--listen") }

        func run() async throws {
            let recovery = try self.recovery.recovery(repository)
            if routes {
                let console = try await Console(recovery: recovery, replication: ReplicationOptions.replication(
                    recovery.repository, hot: self.recovery.hot, connect: self.recovery.connect))
                let list = console.routes(try tls.listen(listen, option: "--listen"))
                if output.json { return try JSON.print(list) }
                return list.forEach { print($0) }
            }
            LoggingSystem.bootstrap(StreamLogHandler.standardError)
            var logger = Logger(label: "lifeboat.console")
            logger.logLevel = .notice   // logins, failed logins and refusals (user and address)
            let service = try await ConsoleServer.make(recovery, self.recovery,
                                                       listen: try tls.listen(listen, option: "--listen"), logger: logger)
            let group = ServiceGroup(configuration: .init(services: [.init(service: service)],
                                                          gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
            try await group.run()
        }
    }

    struct UserCommand: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "user", abstract: "Add or remove a console user.",
            subcommands: [Add.self, Remove.self])

        /// Where the console's users live: HOT/.console/users.json.
        struct Location: ParsableArguments {
            @Option(help: "Hot storage folder (default: $LIFEBOAT_HOT, else /var/lib/lifeboat/hot).") var hot: String?
            var store: UserStore { UserStore(hotDirectory: ReplicationOptions.hotDirectory(hot)) }
        }

        struct Add: ParsableCommand {
            static let configuration = CommandConfiguration(
                abstract: "Add a console user, or set an existing one's role and password.",
                discussion: "The password comes from $LIFEBOAT_CONSOLE_PASSWORD, else a prompt (never from $LIFEBOAT_PASSWORD, the repository's). It is kept as a salted scrypt hash in HOT/.console/users.json (mode 0600). Setting it again ends the user's sessions.")
            @OptionGroup var location: Location
            @Argument(help: "User name.") var name: String
            @Option(help: "viewer (sees everything, changes nothing), operator (also acts), admin (also manages users).")
            var role: String

            func run() throws {
                guard let role = ConsoleRole(rawValue: role) else {
                    throw LifeboatError(.invalidArgument, "--role \(role) is not a role: use viewer, operator or admin")
                }
                let password: String
                if let given = ProcessInfo.processInfo.environment["LIFEBOAT_CONSOLE_PASSWORD"] {
                    password = given
                } else {
                    guard isatty(0) != 0 else {
                        throw LifeboatError(.invalidArgument, "no password for console user \(name): set $LIFEBOAT_CONSOLE_PASSWORD or run this on a terminal ($LIFEBOAT_PASSWORD is the repository's and is not used)")
                    }
                    password = String(cString: getpass("Password for \(name): "))
                    guard String(cString: getpass("Repeat it: ")) == password else {
                        throw LifeboatError(.invalidArgument, "the passwords do not match: nothing was changed")
                    }
                }
                let user = try location.store.add(name, role: role, password: password)
                print("console user \(user.name) is \(user.role == .viewer ? "a" : "an") \(user.role.rawValue)")
            }
        }

        struct Remove: ParsableCommand {
            static let configuration = CommandConfiguration(abstract: "Remove a console user (their sessions end at once).")
            @OptionGroup var location: Location
            @Argument(help: "User name.") var name: String

            func run() throws {
                try location.store.remove(name)
                print("console user \(name) removed")
            }
        }
    }

    struct Users: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List the console's users and their roles.")
        @OptionGroup var location: UserCommand.Location
        @OptionGroup var output: OutputOptions

        func run() throws {
            let users = try location.store.users().map(\.listing)
            if output.json { return try JSON.print(users) }
            print(Format.table(["USER", "ROLE", "ADDED"], users.map { [$0.name, $0.role.rawValue, Format.time($0.created)] }))
        }
    }
}
