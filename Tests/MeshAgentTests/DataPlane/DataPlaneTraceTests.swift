import MeshCore
import MeshTestSupport
import NIOCore
import Testing

import struct MeshTestSupport.AwaitedTeardown
import func MeshTestSupport.onTeardown

@testable import MeshAgent

/// `x-mesh-trace` (what `meshctl trace` sends): the proxy records the policy's choice, every backend tried
/// and the response, for the request that asked, and for no other.
@Suite("Data plane: traced HTTP requests", .timeLimit(.minutes(1)), .awaitedTeardown, .rationed)
struct DataPlaneTraceTests {
    @Test(
        "a traced request: the choice and why, the endpoint actually used, first byte and status",
        arguments: HTTPEngine.allCases
    )
    func tracedRequest(engine: HTTPEngine) async throws {
        try await TestEngine.$current.withValue(engine) {
            let servers = try await [TestServers.http("h0"), TestServers.http("h1"), TestServers.http("h2")]
            onTeardown { for s in servers { await s.close() } }
            try await withDataPlane { dp in
                let vip = TestAddresses.vip()
                let policy = BalancerPolicy.consistentHash(.header("x-user"))
                try await dp.apply(httpRoute("traced", vip, policy: policy, servers.map { $0.backend(site: "a") }))
                let response = try #require(
                    try await TestHTTPConnection.get(
                        TestClient.vipAddress(vip, 8080),
                        "/?q=1",
                        headers: [("x-user", "alice"), ("x-mesh-trace", "t-1")]
                    )
                )
                #expect(response.head.status == .ok)
                // The exchange is recorded when it ends, which the client may see a moment before.
                var trace: RequestTrace?
                #expect(
                    await eventually {
                        trace = dp.trace("t-1")
                        return trace != nil
                    }
                )
                let t = try #require(trace)
                #expect(t.service == "traced" && t.port == 8080 && t.vip == vip.description)
                #expect(t.method == "GET" && t.target == "/?q=1")
                #expect(t.choice == "consistentHash: header x-user = \"alice\"")
                #expect(t.attempts.count == 1)
                // The endpoint the trace names is the one that answered (each backend answers with its name).
                let answered = try #require(servers.first { $0.name == response.body })
                #expect(t.attempts.first?.backend == "\(answered.ip):\(answered.port)")
                #expect(t.attempts.first?.node == answered.name && t.attempts.first?.site == "a")
                #expect(t.attempts.first?.path == "local" && t.attempts.first?.via == nil)
                #expect(t.attempts.first?.connection == "new" && t.attempts.first?.connectMicros != nil)
                #expect(t.status == 200 && t.error == nil)
                let first = try #require(t.firstByteMicros)
                let total = try #require(t.totalMicros)
                #expect(first > 0 && first <= total)
                // HTTP routes count bytes too: the route's, and the endpoint that answered (its head and body each
                // way); the others carried nothing.
                let route = { dp.snapshot().routes.first { $0.service == "traced" } }
                let used = { route()?.backends.first { $0.port == answered.port } }
                #expect(
                    await eventually {
                        (used()?.bytesSent ?? 0) > "GET /?q=1 HTTP/1.1\r\n".utf8.count
                            && (used()?.bytesReceived ?? 0) > "HTTP/1.1 200 OK\r\n".utf8.count
                                + answered.name.utf8.count
                    }
                )
                #expect((route()?.bytesIn ?? 0) >= (used()?.bytesSent ?? .max))
                #expect((route()?.bytesOut ?? 0) >= (used()?.bytesReceived ?? .max))
                #expect(route()?.backends.filter { $0.port != answered.port }.allSatisfy { $0.bytesSent == 0 } == true)

                // The same key twice on one client connection (one event loop, one pool): the same endpoint, and
                // the second time on the pooled upstream connection the first one left.
                try await TestHTTPConnection.with(TestClient.vipAddress(vip, 8080)) { conn in
                    _ = try await conn.request(.GET, "/", headers: [("x-user", "alice"), ("x-mesh-trace", "t-2")])
                    _ = try await conn.request(.GET, "/", headers: [("x-user", "alice"), ("x-mesh-trace", "t-3")])
                }
                #expect(await eventually { dp.trace("t-3") != nil })
                #expect(dp.trace("t-2")?.attempts.map(\.backend) == t.attempts.map(\.backend))
                #expect(dp.trace("t-3")?.attempts.map(\.backend) == t.attempts.map(\.backend))
                #expect(dp.trace("t-3")?.attempts.first?.connection == "pooled")
                #expect(dp.trace("t-3")?.attempts.first?.connectMicros == nil)

                // A request without the field leaves nothing behind.
                _ = try await TestHTTPConnection.get(
                    TestClient.vipAddress(vip, 8080),
                    "/",
                    headers: [("x-user", "bob")]
                )
                #expect(dp.trace("bob") == nil)
            }
        }
    }

    @Test(
        "a refused endpoint then a good one: both attempts, the failure's reason, the final status",
        arguments: HTTPEngine.allCases
    )
    func retriedRequest(engine: HTTPEngine) async throws {
        try await TestEngine.$current.withValue(engine) {
            let good = try await TestServers.http("good")
            onTeardown { await good.close() }
            let refused = try await TestServers.refusedBackend()
            try await withDataPlane { dp in
                let vip = TestAddresses.vip()
                // Round robin starts with the first backend: the refused one.
                try await dp.apply(httpRoute("retry", vip, [refused, good.backend()]))
                let response = try #require(
                    try await TestHTTPConnection.get(
                        TestClient.vipAddress(vip, 8080),
                        "/",
                        headers: [("x-mesh-trace", "r")]
                    )
                )
                #expect(response.body == "good")
                #expect(await eventually { dp.trace("r") != nil })
                let t = try #require(dp.trace("r"))
                #expect(t.choice.hasPrefix("roundRobin"))
                #expect(t.attempts.count == 2)
                #expect(t.attempts.first?.backend == "\(refused.ip):\(refused.port)")
                #expect(t.attempts.first?.error?.hasPrefix("connect:") == true)
                #expect(t.attempts.last?.backend == "\(good.ip):\(good.port)" && t.attempts.last?.error == nil)
                #expect(t.status == 200)
            }
        }
    }

    @Test("no backend answers: the proxy's own status and reason", arguments: HTTPEngine.allCases)
    func failedRequest(engine: HTTPEngine) async throws {
        try await TestEngine.$current.withValue(engine) {
            let refused = try await TestServers.refusedBackend()
            try await withDataPlane { dp in
                let vip = TestAddresses.vip()
                try await dp.apply(httpRoute("dead", vip, [refused]))
                let response = try #require(
                    try await TestHTTPConnection.get(
                        TestClient.vipAddress(vip, 8080),
                        "/",
                        headers: [("x-mesh-trace", "d")]
                    )
                )
                #expect(response.head.status == .badGateway)
                #expect(await eventually { dp.trace("d") != nil })
                let t = try #require(dp.trace("d"))
                #expect(t.status == 502 && t.error == "upstream connect error")
                #expect(t.firstByteMicros == nil)
                #expect(!t.attempts.isEmpty && t.attempts.allSatisfy { $0.error != nil })
            }
        }
    }

    @Test("the log keeps the latest traces up to its capacity")
    func logCapacity() {
        let log = TraceLog(capacity: 2)
        func trace(_ id: String) -> RequestTrace {
            RequestTrace(
                id: id,
                namespace: "n",
                service: "s",
                vip: "10.0.0.1",
                port: 80,
                policy: "roundRobin",
                method: "GET",
                target: "/",
                received: "2026-12-04T10:00:00.000Z",
                choice: "",
                attempts: []
            )
        }
        log.record(trace("a"))
        log.record(trace("b"))
        log.record(trace("a"))  // replaced in place, not a second entry
        log.record(trace("c"))
        #expect(log.trace("a") == nil && log.trace("b") != nil && log.trace("c") != nil)
    }
}
