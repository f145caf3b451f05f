import Logging
import MeshCore
import MeshTestSupport
import MetricsTestKit
import NIOCore
import ServiceLifecycle
import Testing

import struct MeshTestSupport.AwaitedTeardown
import func MeshTestSupport.onTeardown

@testable import MeshAgent

@Suite("Data plane: metrics, snapshot, service lifecycle", .timeLimit(.minutes(1)), .awaitedTeardown, .rationed)
struct DataPlaneMetricsTests {
    @Test("swift-metrics counters, meter and timer are labelled by service", arguments: HTTPEngine.allCases)
    func metrics(engine: HTTPEngine) async throws {
        try await TestEngine.$current.withValue(engine) {
            let metrics = TestMetrics()
            let tcpBackend = try await TestServers.echo()
            let httpBackend = try await TestServers.http("m")
            onTeardown {
                await tcpBackend.close()
                await httpBackend.close()
            }
            let dp = DataPlane(
                configuration: testConfiguration(),
                eventLoopGroup: testGroup,
                logger: testLogger,
                metricsFactory: metrics
            )
            let tcpVIP = TestAddresses.vip()
            let httpVIP = TestAddresses.vip()
            let emptyVIP = TestAddresses.vip()
            try await dp.apply(
                RouteTable(routes: [
                    Route(service: service("m-tcp"), vip: tcpVIP, port: 8080, backends: [tcpBackend.backend()]),
                    Route(
                        service: service("m-http"),
                        vip: httpVIP,
                        port: 8080,
                        proto: .http,
                        backends: [httpBackend.backend()]
                    ),
                    Route(service: service("m-none"), vip: emptyVIP, port: 8080, backends: []),
                ])
            )
            for _ in 0..<2 {
                _ = try await TestClient.exchange(TestClient.vipAddress(tcpVIP, 8080), send: "12345", halfClose: true)
            }
            try await TestHTTPConnection.with(TestClient.vipAddress(httpVIP, 8080)) { conn in
                for _ in 0..<3 { _ = try await conn.request(.GET, "/") }
            }
            _ = try await TestClient.exchange(TestClient.vipAddress(emptyVIP, 8080))
            #expect(await eventually { dp.openClientChannels == 0 })

            func dims(_ name: String, _ vip: IPAddress, _ proto: String) -> [(String, String)] {
                [("service", "test/\(name)"), ("listener", "\(vip):8080/tcp"), ("proto", proto)]
            }
            let tcp = dims("m-tcp", tcpVIP, "tcp")
            #expect(try metrics.expectCounter("mesh_proxy_connections_total", tcp).totalValue == 2)
            #expect(try metrics.expectCounter("mesh_proxy_bytes_in_total", tcp).totalValue == 10)
            #expect(try metrics.expectCounter("mesh_proxy_bytes_out_total", tcp).totalValue == 10)
            #expect(try metrics.expectMeter("mesh_proxy_active_connections", tcp).lastValue == 0)
            #expect(try metrics.expectTimer("mesh_proxy_upstream_latency_seconds", tcp).values.count == 2)
            let http = dims("m-http", httpVIP, "http")
            #expect(try metrics.expectCounter("mesh_proxy_requests_total", http).totalValue == 3)
            #expect(try metrics.expectTimer("mesh_proxy_upstream_latency_seconds", http).values.count == 3)
            let none = dims("m-none", emptyVIP, "tcp") + [("kind", "no_backend")]
            #expect(try metrics.expectCounter("mesh_proxy_errors_total", none).totalValue == 1)
            await dp.shutdown()
            #expect(dp.openChannels == 0)
        }
    }

    @Test("snapshot: per-route counters and per-backend health", arguments: HTTPEngine.allCases)
    func snapshot(engine: HTTPEngine) async throws {
        try await TestEngine.$current.withValue(engine) {
            let good = try await TestServers.greeter("good")
            onTeardown { await good.close() }
            let refused = try await TestServers.refusedBackend()
            // An ejection that outlasts the nine connections even on a machine loaded by other work.
            let config = testConfiguration(
                outlier: .init(
                    consecutiveFailures: 3,
                    baseEjectionTime: .seconds(30),
                    maxEjectionTime: .seconds(60),
                    maxEjectionPercent: 10
                )
            )
            try await withDataPlane(config) { dp in
                let vip = TestAddresses.vip()
                var notReady = good.backend()
                notReady.port = 1
                notReady.ready = false
                try await dp.apply(
                    RouteTable(routes: [
                        Route(
                            service: service("snap"),
                            vip: vip,
                            port: 8080,
                            policy: .roundRobin,
                            backends: [good.backend(weight: 2, site: "s1"), refused, notReady]
                        )
                    ])
                )
                // Smooth round robin 2:1 makes every third first pick the refusing backend: 3 failures in 9.
                for _ in 0..<9 { _ = try await TestClient.exchange(TestClient.vipAddress(vip, 8080)) }
                let route = try #require(dp.snapshot().routes.first)
                #expect(route.namespace == "test" && route.service == "snap" && route.policy == "roundRobin")
                #expect(route.vip == vip.description && route.port == 8080 && route.listening && route.error == nil)
                #expect(route.totalConnections == 9 && route.failures == 3)
                let byPort = Dictionary(uniqueKeysWithValues: route.backends.map { ($0.port, $0) })
                #expect(
                    byPort[good.port]?.healthy == true && byPort[good.port]?.weight == 2
                        && byPort[good.port]?.site == "s1"
                )
                #expect(byPort[good.port]?.total == 9)
                #expect(byPort[refused.port]?.ejected == true && byPort[refused.port]?.ejectedForSeconds != nil)
                #expect(byPort[1]?.ready == false && byPort[1]?.healthy == false && byPort[1]?.total == 0)
                #expect(await eventually { dp.snapshot().routes.first?.activeConnections == 0 })
            }
        }
    }

    @Test(
        "as a ServiceLifecycle service: serves until graceful shutdown, then closes everything",
        arguments: HTTPEngine.allCases
    )
    func serviceLifecycle(engine: HTTPEngine) async throws {
        try await TestEngine.$current.withValue(engine) {
            let backend = try await TestServers.echo()
            onTeardown { await backend.close() }
            let dp = DataPlane(configuration: testConfiguration(), eventLoopGroup: testGroup, logger: testLogger)
            let group = ServiceGroup(services: [dp], logger: testLogger)
            let running = Task { try await group.run() }
            let vip = TestAddresses.vip()
            try await dp.apply(
                RouteTable(routes: [Route(service: service("svc"), vip: vip, port: 8080, backends: [backend.backend()])]
                )
            )
            let reply = try await TestClient.exchange(TestClient.vipAddress(vip, 8080), send: "up", halfClose: true)
            #expect(String(buffer: reply) == "up")
            await group.triggerGracefulShutdown()
            try await withTimeout(30) { try await running.value }
            #expect(dp.openChannels == 0)
            #expect(dp.snapshot().mode == .stopped && dp.snapshot().routes.isEmpty)
            await #expect(throws: (any Error).self) {
                _ = try await TestClient.exchange(TestClient.vipAddress(vip, 8080), timeout: 2)
            }
            await #expect(throws: DataPlaneError.self) { try await dp.apply(RouteTable()) }
        }
    }
}
