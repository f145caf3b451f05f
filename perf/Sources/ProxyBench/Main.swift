import ArgumentParser
import Logging
import MeshAgent
import MeshCore
import MeshHTTP
import NIOCore
import NIOPosix
import ServiceLifecycle

#if canImport(Glibc)
import Glibc
#endif

/// Benchmark tool for the data plane: our proxy, the backends it is measured against, and the clients.
@main
struct Bench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mesh-proxy-bench",
        abstract: "Proxy benchmarks: run our proxy, backends, a bulk-transfer client and an open-loop latency client.",
        subcommands: [
            ProxyCommand.self, LinkPairCommand.self, BackendCommand.self, BulkCommand.self, LatencyCommand.self,
            QuietCommand.self, DNSLoadCommand.self,
        ]
    )
}

/// The longest load (warm-up and measurement) a generator runs: every load loop is bounded.
let maxLoadSeconds = 600.0

/// Checks a generator's `--duration` and `--warmup` against `maxLoadSeconds`.
func validateLoadWindow(duration: Double, warmup: Double) throws {
    guard duration > 0, warmup >= 0, warmup + duration <= maxLoadSeconds else {
        throw ValidationError("duration must be > 0 and warmup + duration at most \(maxLoadSeconds) s")
    }
}

/// `host:port` with IPv6 in brackets.
struct HostPort: ExpressibleByArgument, CustomStringConvertible {
    var host: String
    var port: Int

    init?(argument: String) {
        guard let colon = argument.lastIndex(of: ":"), let port = Int(argument[argument.index(after: colon)...])
        else { return nil }
        var host = String(argument[..<colon])
        if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        self.host = host
        self.port = port
    }

    var description: String { self.host.contains(":") ? "[\(self.host)]:\(self.port)" : "\(self.host):\(self.port)" }

    func socketAddress() throws -> SocketAddress { try SocketAddress(ipAddress: self.host, port: self.port) }
}

/// Runs the data plane with one route until SIGTERM / SIGINT.
struct ProxyCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "proxy", abstract: "Run our proxy (one route).")

    @Option(help: "VIP:port to listen on.") var listen: HostPort
    @Option(help: "Backend host:port (repeatable).") var backend: [HostPort]
    @Flag(help: "L7 HTTP/1.1 instead of L4 TCP.") var http = false
    @Option(help: "Event-loop threads.") var threads = 1
    @Option(help: "HTTP engine: nio | epoll (default: the data plane's, or $MESH_HTTP_ENGINE).")
    var httpEngine: HTTPEngine?
    @Option(help: "prometheus (as mesh-agent: every route's counters and timer in a Prometheus registry) | none.")
    var metrics: MetricsBackend = .prometheus

    enum MetricsBackend: String, ExpressibleByArgument {
        case prometheus
        case none
    }

    func run() async throws {
        if self.metrics == .prometheus { MeshMetrics.bootstrap() }
        var logger = Logger(label: "bench.proxy")
        logger.logLevel = .warning
        let group = MultiThreadedEventLoopGroup(numberOfThreads: self.threads)
        var configuration = DataPlaneConfiguration(bindMode: .loopback)
        if let engine = self.httpEngine
            ?? getenv("MESH_HTTP_ENGINE").flatMap({ HTTPEngine(rawValue: String(cString: $0)) })
        {
            configuration.http.engine = engine
        }
        let dataPlane = DataPlane(
            configuration: configuration,
            eventLoopGroup: group,
            logger: logger
        )
        guard let vip = IPAddress(self.listen.host) else { throw ValidationError("bad VIP \(self.listen.host)") }
        let backends = try self.backend.map { b -> Backend in
            guard let ip = IPAddress(b.host) else { throw ValidationError("bad backend \(b)") }
            return Backend(ip: ip, port: b.port)
        }
        try await dataPlane.apply(
            RouteTable(routes: [
                Route(
                    service: ServiceKey(namespace: "bench", name: "bench"),
                    vip: vip,
                    port: self.listen.port,
                    proto: self.http ? .http : .tcp,
                    backends: backends
                )
            ])
        )
        print("ready \(self.listen) pid \(getpid())")
        let services = ServiceGroup(
            configuration: .init(services: [dataPlane], gracefulShutdownSignals: [.sigterm, .sigint], logger: logger)
        )
        try await services.run()
        try await group.shutdownGracefully()
    }
}

extension HTTPEngine: @retroactive ExpressibleByArgument {}
