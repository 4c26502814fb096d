import ArgumentParser
import Foundation
import LifeboatBase
import LifeboatRecovery
import LifeboatRepository
import LifeboatService
import Logging
import ServiceLifecycle

extension Lifeboat {
    struct Replicate: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "The replication service: keeps every machine's RPO with a point every --every, retention after each, gc on a schedule.",
            discussion: """
            Points of running libvirt domains come from libvirt's backup API with changed-block tracking; machines \
            protected with --disk are read from their files. A failed point is retried with exponential back-off and \
            jitter and shows in 'lifeboat status' and history. SIGTERM ends running points cleanly. One service per \
            repository. --once runs what is due and exits (for a systemd timer or cron); its exit status is 1 when a point failed.
            """)
        @OptionGroup var repository: RepositoryOptions
        @OptionGroup var recovery: RecoveryOptions
        @Flag(help: "Run what is due now, then exit.") var once = false
        @Option(help: "At most this many points at once.") var jobs = 1
        @Option(help: "Serve Prometheus metrics on ADDR:PORT (GET /metrics), e.g. 127.0.0.1:9470 (default: $LIFEBOAT_METRICS, else none).")
        var metrics: String?
        @Option(help: "Run gc this often (default 1d).") var gcEvery = "1d"
        @Option(help: "zstd level of the compact after each gc (0: none).") var compactLevel = CompactOptions.defaultLevel
        @Option(help: "Also serve the web console and API on ADDR:PORT, as 'lifeboat console --listen' (default: $LIFEBOAT_CONSOLE, else none).")
        var console: String?
        @OptionGroup var tls: ConsoleTLSOptions
        @Option(help: "After each point, copy the machine's new points to this off-site repository (s3://BUCKET/PREFIX, as 'lifeboat sync --to').")
        var syncTo: String?

        func validate() throws {
            if let syncTo, !syncTo.hasPrefix("s3://") { throw ValidationError("--sync-to must be an s3://BUCKET/PREFIX address") }
            if jobs < 1 { throw ValidationError("--jobs must be at least 1") }
            if let metrics = metricsAddress, Self.address(metrics) == nil {
                throw ValidationError("--metrics \(metrics) is not ADDR:PORT like 127.0.0.1:9470")
            }
            if let console = consoleAddress { _ = try tls.listen(console, option: "--console") }
            if compactLevel != 0 && !CompactOptions.levels.contains(compactLevel) { throw ValidationError("--compact-level \(compactLevel) is not a zstd level from 1 to 22 (or 0 for none)") }
            if (try? DurationText.parse(gcEvery)) == nil { throw ValidationError("--gc-every \(gcEvery) is not a duration like 12h or 1d") }
        }

        var metricsAddress: String? {
            metrics ?? ProcessInfo.processInfo.environment["LIFEBOAT_METRICS"].flatMap { $0.isEmpty ? nil : $0 }
        }

        var consoleAddress: String? {
            console ?? ProcessInfo.processInfo.environment["LIFEBOAT_CONSOLE"].flatMap { $0.isEmpty ? nil : $0 }
        }

        static func address(_ text: String) -> (host: String, port: Int)? { ListenAddress.parse(text) }

        func run() async throws {
            let recovery = try self.recovery.recovery(repository)
            let lock = try recovery.lockReplicationService()
            defer { withExtendedLifetime(lock) {} }
            LoggingSystem.bootstrap(StreamLogHandler.standardError)
            var logger = Logger(label: "lifeboat.replicate")
            logger.logLevel = .info
            let replication = ReplicationOptions.replication(recovery.repository, hot: self.recovery.hot, connect: self.recovery.connect)
            let metricsRegistry = ReplicationMetrics()
            let service = ReplicationService(
                recovery: recovery, replication: replication,
                options: ReplicationServiceOptions(once: once, jobs: jobs, gcEvery: try DurationText.parse(gcEvery),
                                                   compactLevel: compactLevel == 0 ? nil : compactLevel,
                                                   syncTo: try syncTo.map { try repository.s3.repository($0) }),
                metrics: metricsRegistry, logger: logger)
            // The service ends by itself after --once (or a shutdown signal): then the group ends too.
            var services: [ServiceGroupConfiguration.ServiceConfiguration] = [
                .init(service: service, successTerminationBehavior: .gracefullyShutdownGroup),
            ]
            if let metrics = metricsAddress, let (host, port) = Self.address(metrics) {
                services.append(.init(service: metricsRegistry.server(host: host, port: port, logger: logger)))
            }
            if let console = consoleAddress {
                services.append(.init(service: try await ConsoleServer.make(recovery, self.recovery,
                                                                            listen: try tls.listen(console, option: "--console"), logger: logger)))
            }
            var configuration = ServiceGroupConfiguration(services: services, gracefulShutdownSignals: [.sigterm, .sigint], logger: logger)
            configuration.logger.logLevel = .warning
            try await ServiceGroup(configuration: configuration).run()
            if once {
                let failed = service.outcomes.filter { $0.point == nil }
                for outcome in service.outcomes {
                    if let point = outcome.point {
                        print("\(outcome.machine): point \(point.id), \(point.readMode ?? "full"), \(point.consistency), \(Format.bytes(point.bytesRead)) read")
                    } else {
                        print("\(outcome.machine): FAILED: \(outcome.error ?? "?")")
                    }
                }
                if !failed.isEmpty { throw ExitCode(1) }
            }
        }
    }
}
