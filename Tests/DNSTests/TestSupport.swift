import Foundation
import Logging
import MeshCore
import MeshTestSupport
import Metrics
import NIOCore
import NIOPosix
import Testing

@testable import DNS

func name(_ s: String) -> DNSName { try! DNSName(s) }

func ip(_ s: String) -> IPAddress { IPAddress(s)! }

/// Runs the pure answer path on an encoded query.
struct AskResult {
    var disposition: QueryDisposition
    var response: DNSMessage?
    var raw: [UInt8]
    var malformed: Bool

    var forwarded: ForwardRequest? {
        if case .forward(let r) = self.disposition { return r }
        return nil
    }
    var dropped: Bool {
        if case .drop = self.disposition { return true }
        return false
    }
}

func askRaw(
    _ zone: DNSZone,
    _ bytes: [UInt8],
    tcp: Bool = false,
    policy: AnswerPolicy = AnswerPolicy()
) throws -> AskResult {
    let scratch = AnswerScratch()
    let d = bytes.withUnsafeBytes { Answerer.answer($0, zone: zone, overTCP: tcp, policy: policy, scratch: scratch) }
    if case .reply = d {
        return AskResult(
            disposition: d,
            response: try DNSMessage.decode(scratch.response),
            raw: scratch.response,
            malformed: scratch.malformed
        )
    }
    return AskResult(disposition: d, response: nil, raw: [], malformed: scratch.malformed)
}

func ask(
    _ zone: DNSZone,
    _ qname: String,
    _ type: DNSType,
    edns: DNSEDNS? = nil,
    tcp: Bool = false,
    policy: AnswerPolicy = AnswerPolicy()
) throws -> AskResult {
    let q = DNSMessage(
        header: DNSHeader(id: 0x4242, recursionDesired: true),
        questions: [DNSQuestion(name: try DNSName(qname), type: type)],
        edns: edns
    )
    return try askRaw(zone, try q.encode(), tcp: tcp, policy: policy)
}

/// A fixture zone exercising every record shape.
func fixtureInput() -> ZoneInput {
    ZoneInput(services: [
        DNSService(
            name: "web",
            namespace: "shop",
            clusterIPs: [ip("10.96.0.10"), ip("fd00:96::10")],
            ports: [
                DNSServicePort(name: "http", port: 80),
                DNSServicePort(name: "dns", port: 53, protocol: .udp),
                DNSServicePort(name: "", port: 9999),
            ],
            exported: true
        ),
        DNSService(
            name: "db",
            namespace: "shop",
            ports: [DNSServicePort(name: "pg", port: 5432)],
            endpoints: [
                DNSEndpoint(ip: ip("10.1.0.1"), hostname: "db-0"),
                DNSEndpoint(ip: ip("10.1.0.2"), hostname: "db-1"),
                DNSEndpoint(ip: ip("10.1.0.3")),
                DNSEndpoint(ip: ip("10.1.0.4"), hostname: "db-3", ready: false),
                DNSEndpoint(ip: ip("fd00:1::5"), hostname: "db-4"),
            ]
        ),
        DNSService(name: "empty", namespace: "shop", endpoints: [DNSEndpoint(ip: ip("10.1.1.1"), ready: false)]),
        DNSService(name: "internal", namespace: "ops", clusterIPs: [ip("10.96.0.20")], exported: false),
        DNSService(name: "ext", namespace: "shop", externalName: "www.example.org"),
        DNSService(name: "alias", namespace: "shop", externalName: "web.shop.svc.cluster.local"),
    ])
}

func fixtureZone() -> DNSZone { try! DNSZone(fixtureInput()) }

/// A responder running in-process on a free loopback port; `stop()` ends it.
final class RunningServer: Sendable {
    let server: DNSServer
    let task: Task<Void, any Error>
    let udp: SocketAddress
    let tcp: SocketAddress

    var port: Int { self.udp.port! }

    init(_ server: DNSServer, task: Task<Void, any Error>, udp: SocketAddress, tcp: SocketAddress) {
        self.server = server
        self.task = task
        self.udp = udp
        self.tcp = tcp
    }

    static func start(
        zone: ZoneInput,
        forwarding: DNSForwardingConfiguration? = nil,
        maxTCPConnections: Int = 64,
        tcpIdleTimeout: TimeAmount = .seconds(5),
        metricsFactory: (any MetricsFactory)? = nil
    ) async throws -> RunningServer {
        let zones = DNSZoneStore()
        try zones.update(zone)
        var logger = Logger(label: "test.dns")
        logger.logLevel = .warning
        let server = DNSServer(
            configuration: DNSServerConfiguration(
                host: "127.0.0.1",
                port: 0,
                tcpIdleTimeout: tcpIdleTimeout,
                maxTCPConnections: maxTCPConnections,
                forwarding: forwarding
            ),
            zones: zones,
            logger: logger,
            metricsFactory: metricsFactory
        )
        let task = Task { try await server.run() }
        let addrs = try await server.listeningAddresses()
        return RunningServer(server, task: task, udp: addrs.udp, tcp: addrs.tcp)
    }

    func stop() async {
        self.task.cancel()
        _ = try? await self.task.value
    }
}

/// Runs a command with a deadline and returns its standard output and error. Asynchronous (MeshTestSupport's
/// `run`): a blocking read here held one of the cooperative pool's threads (two on this machine) for as long
/// as the command ran, and starved the other tests' tasks.
func runCommand(_ path: String, _ args: [String], timeout: Duration = .seconds(15)) async throws -> String {
    let result = try await run(path, args, timeout: timeout)
    return result.stdout + result.stderr
}

func which(_ tool: String) -> String? {
    for dir in ["/usr/bin", "/usr/sbin", "/usr/local/bin", "/bin", "/sbin"] {
        let path = dir + "/" + tool
        if FileManager.default.isExecutableFile(atPath: path) { return path }
    }
    return nil
}
