import MeshCore
import MeshTestSupport
import MetricsTestKit
import NIOCore
import NIOEmbedded
import Testing

@testable import MeshAgent

/// The HTTP proxy's client-side handlers (decoder and `HTTPProxyHandler`) on an `EmbeddedChannel`, for what
/// they answer themselves, without a backend: the real-socket suites (DataPlaneHTTPTests, HTTPSmugglingTests)
/// cover exchanges with backends.
@Suite("HTTP proxy handler on an EmbeddedChannel", .rationed)
struct HTTPProxyHandlerTests {
    let metrics = TestMetrics()

    /// A client connection to a route with no backends.
    /// Synchronous on purpose: an EmbeddedChannel belongs to the thread that made it, and an `await` in an async
    /// test may resume on another thread of the pool.
    func channel() throws -> (EmbeddedChannel, RouteHandle) {
        let configuration = testConfiguration()
        let counters = DataPlaneCounters()
        let channel = EmbeddedChannel()
        let environment = ProxyEnvironment(
            configuration: configuration,
            counters: counters,
            logger: testLogger,
            pools: HTTPUpstreamPools(
                group: channel.embeddedEventLoop,
                configuration: configuration,
                counters: counters
            ),
            splice: SpliceEngine(configuration: configuration, counters: counters, logger: testLogger),
            upstreams: Upstreams(peers: nil),
            traces: TraceLog()
        )
        let route = Route(
            service: service("empty"),
            vip: try #require(IPAddress("127.0.0.1")),
            port: 8080,
            proto: .http,
            policy: .roundRobin,
            backends: []
        )
        let handle = RouteHandle(
            route: route,
            settings: RouteSettings(localSite: nil, outlier: configuration.outlier, metricsFactory: self.metrics)
        )
        try HTTPProxy.initialize(channel: channel, handle: handle, environment: environment)
        channel.connect(to: try SocketAddress(ipAddress: "127.0.0.1", port: 40000), promise: nil)
        #expect(channel.isActive)
        return (channel, handle)
    }

    /// Everything written to the client so far, as text.
    func written(_ channel: EmbeddedChannel) throws -> String {
        var out = ByteBuffer()
        while var part = try channel.readOutbound(as: ByteBuffer.self) { out.writeBuffer(&part) }
        return String(buffer: out)
    }

    /// The status line of each response in `text` (bodies here are short texts without "HTTP/1.1 ").
    func statusLines(_ text: String) -> [String] {
        text.components(separatedBy: "HTTP/1.1 ").dropFirst().map {
            "HTTP/1.1 " + ($0.components(separatedBy: "\r\n").first ?? "")
        }
    }

    @Test("no backend: 503 with the reason, the connection kept; pipelined requests answered in order")
    func noBackend() throws {
        let (channel, handle) = try self.channel()
        try channel.writeInbound(ByteBuffer(string: "GET /a HTTP/1.1\r\nHost: empty\r\n\r\n"))
        let first = try self.written(channel)
        #expect(self.statusLines(first) == ["HTTP/1.1 503 Service Unavailable"])
        #expect(first.contains("no healthy upstream"))
        #expect(channel.isActive)
        // Two more in one read: both answered, in order, each in full.
        try channel.writeInbound(
            ByteBuffer(string: "GET /b HTTP/1.1\r\nHost: empty\r\n\r\nGET /c HTTP/1.1\r\nHost: empty\r\n\r\n")
        )
        let next = try self.written(channel)
        #expect(self.statusLines(next) == Array(repeating: "HTTP/1.1 503 Service Unavailable", count: 2), "\(next)")
        #expect(channel.isActive)
        #expect(handle.stats.requests.load(ordering: .relaxed) == 3)
        #expect(
            try self.metrics.expectCounter(
                "mesh_proxy_errors_total",
                [
                    ("service", "test/empty"), ("listener", handle.key.description), ("proto", "http"),
                    ("kind", "no_backend"),
                ]
            ).totalValue == 3
        )
        _ = try? channel.finish()
    }

    @Test("a request line that is not HTTP: 400, and the connection closes")
    func garbage() throws {
        let (channel, _) = try self.channel()
        _ = try? channel.writeInbound(ByteBuffer(string: "NOT HTTP AT ALL\r\n\r\n"))
        let out = try self.written(channel)
        #expect(self.statusLines(out).first?.hasPrefix("HTTP/1.1 400") == true)
        #expect(!channel.isActive)
    }

    @Test("a head over the size limit: 431, and the connection closes")
    func headTooLarge() throws {
        let (channel, _) = try self.channel()
        let big = String(repeating: "a", count: 128 * 1024)
        _ = try? channel.writeInbound(ByteBuffer(string: "GET / HTTP/1.1\r\nHost: empty\r\nx-big: \(big)\r\n\r\n"))
        #expect(self.statusLines(try self.written(channel)).first?.hasPrefix("HTTP/1.1 431") == true)
        #expect(!channel.isActive)
    }

    @Test("CONNECT: 501, the proxy does not tunnel arbitrary targets")
    func connectRefused() throws {
        let (channel, _) = try self.channel()
        _ = try? channel.writeInbound(
            ByteBuffer(string: "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com\r\n\r\n")
        )
        #expect(self.statusLines(try self.written(channel)).first?.hasPrefix("HTTP/1.1 501") == true)
    }
}
