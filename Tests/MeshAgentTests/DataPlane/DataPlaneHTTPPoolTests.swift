import MeshCore
import NIOCore
import NIOPosix
import Synchronization
import Testing

import struct MeshTestSupport.AwaitedTeardown
import func MeshTestSupport.onTeardown

@testable import MeshAgent

/// The epoll engine's upstream pool (`HTTPLoopPool`): its bounds hold per backend and event loop, so these
/// tests run the data plane on a group of one event loop (one splice loop, one pool).
@Suite("Data plane: the epoll engine's upstream pool", .timeLimit(.minutes(2)), .awaitedTeardown, .rationed)
struct DataPlaneHTTPPoolTests {
    private func withOneLoop(_ http: HTTPConfiguration, _ body: (DataPlane) async throws -> Void) async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let configuration = TestEngine.$current.withValue(.epoll) { testConfiguration(http: http) }
        let dataPlane = DataPlane(configuration: configuration, eventLoopGroup: group, logger: testLogger)
        do {
            try await body(dataPlane)
        } catch {
            await dataPlane.shutdown(drain: false)
            try await group.shutdownGracefully()
            throw error
        }
        await dataPlane.shutdown(drain: false)
        #expect(dataPlane.openChannels == 0, "channels left open after shutdown")
        try await group.shutdownGracefully()
    }

    @Test("a backend's connections are bounded: over the bound 503, and a slot comes back when its connection ends")
    func connectionBound() async throws {
        let stats = HTTPBackendStats()
        let server = try await TestServers.http("p", stats: stats)
        onTeardown { await server.close() }
        try await self.withOneLoop(HTTPConfiguration(maxConnectionsPerBackend: 1)) { dp in
            let vip = TestAddresses.vip()
            try await dp.apply(httpRoute("bounded", vip, [server.backend()]))
            let address = TestClient.vipAddress(vip, 8080)
            // The one connection allowed carries a request the backend holds.
            let held = Task { try await TestHTTPConnection.get(address, "/hold") }
            #expect(await eventually { stats.requests.load(ordering: .relaxed) == 1 })
            let refused = try #require(try await TestHTTPConnection.get(address, "/"))
            #expect(refused.status == 503 && refused.body.contains("upstream connection limit"), "\(refused.body)")
            stats.released.store(true, ordering: .relaxed)
            #expect(try await held.value?.status == 200)
            // Back in the pool: the next request takes it (no new connection).
            #expect(try await TestHTTPConnection.get(address, "/")?.status == 200)
            #expect(stats.connections.load(ordering: .relaxed) == 1)
            // A connection the backend drops gives its slot back: the next request opens another.
            _ = try? await TestHTTPConnection.get(address, "/reset")
            #expect(await eventually { dp.openChannels == 0 })
            let after = try #require(try await TestHTTPConnection.get(address, "/"))
            #expect(after.status == 200 && after.body == "p")
            #expect(stats.connections.load(ordering: .relaxed) == 2)
        }
    }

    @Test("an idle pooled connection closes after upstreamIdleTimeout; the next request opens a new one")
    func idleTimeout() async throws {
        let stats = HTTPBackendStats()
        let servers = try await [TestServers.http("a", stats: stats), TestServers.http("b")]
        onTeardown { for s in servers { await s.close() } }
        try await self.withOneLoop(HTTPConfiguration(upstreamIdleTimeout: .milliseconds(200))) { dp in
            let vip = TestAddresses.vip()
            try await dp.apply(httpRoute("idle", vip, [servers[0].backend()]))
            let address = TestClient.vipAddress(vip, 8080)
            #expect(try await TestHTTPConnection.get(address, "/")?.body == "a")
            #expect(stats.connections.load(ordering: .relaxed) == 1)
            // The client is gone; the pooled upstream connection goes after the idle time.
            #expect(await eventually { dp.openChannels == 0 })
            #expect(try await TestHTTPConnection.get(address, "/")?.body == "a")
            #expect(stats.connections.load(ordering: .relaxed) == 2)
            // A second backend on the same loop has its own entry: requests alternate between the two (how many
            // connections that takes depends on the 200 ms idle timeout against the machine's pace: not counted).
            try await dp.apply(httpRoute("idle", vip, [servers[0].backend(), servers[1].backend()]))
            let bodies = try await TestHTTPConnection.with(address) { conn in
                var bodies: [String] = []
                for _ in 0..<4 { bodies.append(try #require(try await conn.request(.GET, "/")).body) }
                return bodies
            }
            #expect(bodies.sorted() == ["a", "a", "b", "b"])
        }
    }
}
