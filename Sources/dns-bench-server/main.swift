// A standalone responder for benchmarks and manual checks: serves `svc<i>.<namespace>.svc.cluster.local`
// (A, VIP 10.96.x.y, one named port) for i in 0..<names, and forwards other names (or not).
import ArgumentParser
import DNS
import Logging
import MeshCore
import NIOPosix
import ServiceLifecycle

@main
struct DNSBenchServer: AsyncParsableCommand {
    @Option(help: "Listen address.") var host = "127.0.0.1"
    @Option(help: "Listen port (UDP and TCP).") var port = 5353
    @Option(help: "Number of services to generate.") var names = 1000
    @Option(help: "Namespace of the generated services.") var namespace = "bench"
    @Option(help: "Event loop threads.") var threads = 1
    @Option(help: "Upstream resolvers (host:port); none: names outside the zone are refused.")
    var upstream: [String] = []

    func run() async throws {
        var logger = Logger(label: "dns-bench-server")
        logger.logLevel = .info
        var services: [DNSService] = []
        services.reserveCapacity(self.names)
        for i in 0..<self.names {
            services.append(
                DNSService(
                    name: "svc\(i)",
                    namespace: self.namespace,
                    clusterIPs: [.v4(0x0A60_0000 | UInt32(i & 0xFFFF))],
                    ports: [DNSServicePort(name: "http", port: 80)]
                )
            )
        }
        let zones = DNSZoneStore()
        try zones.update(ZoneInput(services: services))
        let group = MultiThreadedEventLoopGroup(numberOfThreads: max(1, self.threads))
        let config = DNSServerConfiguration(
            host: self.host,
            port: self.port,
            forwarding: self.upstream.isEmpty ? nil : DNSForwardingConfiguration(upstreams: self.upstream)
        )
        let server = DNSServer(configuration: config, zones: zones, eventLoopGroup: group, logger: logger)
        let serviceGroup = ServiceGroup(
            services: [server],
            gracefulShutdownSignals: [.sigterm, .sigint],
            logger: logger
        )
        try await serviceGroup.run()
        try await group.shutdownGracefully()
    }
}
