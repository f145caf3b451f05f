import MeshCore
import MeshTestSupport
import NIOCore
import NIOHTTP1
import NIOPosix
import Synchronization
import Testing

import struct MeshTestSupport.AwaitedTeardown
import func MeshTestSupport.onTeardown

@testable import MeshAgent

/// A table with one HTTP route of service `name` on `vip:port` to `backends`.
func httpRoute(
    _ name: String,
    _ vip: IPAddress,
    port: Int = 8080,
    policy: BalancerPolicy = .roundRobin,
    _ backends: [Backend]
) -> RouteTable {
    RouteTable(routes: [
        Route(service: service(name), vip: vip, port: port, proto: .http, policy: policy, backends: backends)
    ])
}

@Suite("Data plane: HTTP/1.1 proxy over real sockets", .timeLimit(.minutes(2)), .awaitedTeardown, .rationed)
struct DataPlaneHTTPTests {
    @Test("GET through a VIP: body, X-Forwarded-For added, X-Request-Id added or kept", arguments: HTTPEngine.allCases)
    func basic(engine: HTTPEngine) async throws {
        try await TestEngine.$current.withValue(engine) {
            let backend = try await TestServers.http("web-1")
            onTeardown { await backend.close() }
            try await withDataPlane { dp in
                let vip = TestAddresses.vip()
                try await dp.apply(httpRoute("web", vip, [backend.backend()]))
                let address = TestClient.vipAddress(vip, 8080)
                let first = try #require(try await TestHTTPConnection.get(address, "/"))
                #expect(first.status == 200 && first.body == "web-1")
                #expect(first.header("x-seen-xff") == "127.0.0.1")
                let id = try #require(first.header("x-seen-request-id"))
                #expect(id.count == 32 && id.allSatisfy(\.isHexDigit))
                let second = try #require(
                    try await TestHTTPConnection.get(
                        address,
                        "/",
                        headers: [("x-request-id", "abc-123"), ("x-forwarded-for", "198.18.0.9")]
                    )
                )
                #expect(second.header("x-seen-request-id") == "abc-123")
                // No trusted hops (the default): the client's X-Forwarded-For is replaced, not appended to.
                #expect(second.header("x-seen-xff") == "127.0.0.1")
                let route = try #require(dp.snapshot().routes.first)
                #expect(route.proto == "http" && route.requests == 2)
            }
        }
    }

    @Test(
        "trusted hops: the last N addresses of X-Forwarded-For are kept, the client's appended",
        arguments: HTTPEngine.allCases
    )
    func trustedHops(engine: HTTPEngine) async throws {
        try await TestEngine.$current.withValue(engine) {
            let backend = try await TestServers.http("web-1")
            onTeardown { await backend.close() }
            try await withDataPlane(testConfiguration(http: HTTPConfiguration(trustedForwardingHops: 1))) { dp in
                let vip = TestAddresses.vip()
                try await dp.apply(httpRoute("web", vip, [backend.backend()]))
                let response = try #require(
                    try await TestHTTPConnection.get(
                        TestClient.vipAddress(vip, 8080),
                        "/",
                        headers: [("x-forwarded-for", "6.6.6.6, 198.18.0.9")]
                    )
                )
                #expect(response.header("x-seen-xff") == "198.18.0.9, 127.0.0.1")
            }
        }
    }

    @Test(
        "keep-alive both sides: requests on one client connection are balanced one by one over pooled upstreams",
        arguments: HTTPEngine.allCases
    )
    func keepAliveAndPerRequestBalancing(engine: HTTPEngine) async throws {
        try await TestEngine.$current.withValue(engine) {
            let stats = [HTTPBackendStats(), HTTPBackendStats(), HTTPBackendStats()]
            let servers = try await [
                TestServers.http("a", stats: stats[0]), TestServers.http("b", stats: stats[1]),
                TestServers.http("c", stats: stats[2]),
            ]
            onTeardown { for s in servers { await s.close() } }
            try await withDataPlane { dp in
                let vip = TestAddresses.vip()
                try await dp.apply(httpRoute("rr", vip, servers.map { $0.backend() }))
                let counts = try await TestHTTPConnection.with(TestClient.vipAddress(vip, 8080)) { conn in
                    var counts: [String: Int] = [:]
                    for _ in 0..<30 {
                        let response = try #require(try await conn.request(.GET, "/"))
                        counts[response.body, default: 0] += 1
                    }
                    return counts
                }
                // Exact round robin over 30 requests on one client connection.
                #expect(counts == ["a": 10, "b": 10, "c": 10])
                #expect(dp.openClientChannels <= 1)
                // Upstream connections were reused: one per backend.
                for s in stats { #expect(s.connections.load(ordering: .relaxed) == 1) }
                #expect(dp.openChannels - dp.openClientChannels <= 3)
            }
        }
    }

    @Test(
        "consistent hash on a header sticks per key and moves only the removed backend's keys",
        arguments: HTTPEngine.allCases
    )
    func consistentHashHeader(engine: HTTPEngine) async throws {
        try await TestEngine.$current.withValue(engine) {
            let servers = try await [
                TestServers.http("h0"), TestServers.http("h1"), TestServers.http("h2"), TestServers.http("h3"),
            ]
            onTeardown { for s in servers { await s.close() } }
            try await withDataPlane { dp in
                let vip = TestAddresses.vip()
                let policy = BalancerPolicy.consistentHash(.header("x-user"))
                try await dp.apply(httpRoute("ch", vip, policy: policy, servers.map { $0.backend() }))
                let keys = (0..<80).map { "user-\($0)" }
                func assignment() async throws -> [String: String] {
                    try await TestHTTPConnection.with(TestClient.vipAddress(vip, 8080)) { conn in
                        var result: [String: String] = [:]
                        for key in keys {
                            let response = try #require(try await conn.request(.GET, "/", headers: [("x-user", key)]))
                            result[key] = response.body
                        }
                        return result
                    }
                }
                // What the route's own balancer says each key gets, by server name: the proxy must follow it
                // exactly. (How few keys Maglev moves when a backend goes is a property of the table, checked
                // over 20,000 keys in BalancerTests; the backends' ports differ from run to run, so a share
                // measured over 80 keys here would be a sample, not a check.)
                let names = Dictionary(uniqueKeysWithValues: servers.map { ("\($0.ip):\($0.port)", $0.name) })
                func predicted() throws -> [String: String] {
                    var result: [String: String] = [:]
                    for key in keys {
                        let picks = try dp.wouldPick(namespace: "test", service: "ch", key: key)
                        result[key] = try #require(picks.first?.backend.flatMap { names[$0] })
                    }
                    return result
                }
                let before = try await assignment()
                #expect(before == (try predicted()))
                #expect(try await assignment() == before)  // sticks
                #expect(Set(before.values).count == 4)
                try await dp.apply(httpRoute("ch", vip, policy: policy, servers.dropLast().map { $0.backend() }))
                let after = try await assignment()
                #expect(after == (try predicted()))
                let moved = keys.filter { before[$0] != after[$0] }
                let mustMove = keys.filter { before[$0] == "h3" }
                #expect(!mustMove.isEmpty && Set(mustMove).isSubset(of: Set(moved)))
                #expect(!after.values.contains("h3"))

                // Cookie keys work the same way.
                let cookiePolicy = BalancerPolicy.consistentHash(.cookie("session"))
                try await dp.apply(httpRoute("ch", vip, policy: cookiePolicy, servers.map { $0.backend() }))
                let picks = try await TestHTTPConnection.with(TestClient.vipAddress(vip, 8080)) { conn in
                    var seen: Set<String> = []
                    for _ in 0..<5 {
                        let r = try #require(
                            try await conn.request(.GET, "/", headers: [("cookie", "a=1; session=s-42; b=2")])
                        )
                        seen.insert(r.body)
                    }
                    return seen
                }
                #expect(picks.count == 1)
            }
        }
    }

    @Test("least request keeps traffic away from a slow backend", arguments: HTTPEngine.allCases)
    func leastRequestAvoidsSlow(engine: HTTPEngine) async throws {
        try await TestEngine.$current.withValue(engine) {
            let slowStats = HTTPBackendStats()
            let fast1 = try await TestServers.http("fast-1")
            let fast2 = try await TestServers.http("fast-2")
            // Much slower than the others even when the whole suite loads the machine (at 400 ms, a run of
            // every suite in one process under two busy loops gave it 18 of 90: the fast ones were slow too).
            let slow = try await TestServers.http("slow", delay: .seconds(1), stats: slowStats)
            onTeardown {
                await fast1.close()
                await fast2.close()
                await slow.close()
            }
            try await withDataPlane { dp in
                let vip = TestAddresses.vip()
                try await dp.apply(
                    httpRoute("lr", vip, policy: .leastRequest, [fast1.backend(), fast2.backend(), slow.backend()])
                )
                let address = TestClient.vipAddress(vip, 8080)
                let total = try await withThrowingTaskGroup(of: Int.self) { group in
                    for _ in 0..<6 {
                        group.addTask {
                            try await TestHTTPConnection.with(address) { conn in
                                var n = 0
                                for _ in 0..<15 {
                                    if try await conn.request(.GET, "/")?.status == 200 { n += 1 }
                                }
                                return n
                            }
                        }
                    }
                    return try await group.reduce(0, +)
                }
                #expect(total == 90)
                let slowShare = Double(slowStats.requests.load(ordering: .relaxed)) / Double(total)
                // Round robin gives it exactly 1/3 whatever the load; least request keeps it lower. How much lower
                // depends on how slow the fast ones are: quiet, a few of 90; a whole-suite run beside two busy
                // loops gave it 18 of 90 (0.2) twice, with the slow one at 400 ms and at 1 s. The bound tells the
                // policies apart, not the machine's speed.
                #expect(slowShare < 0.28, "slow backend share \(slowShare)")
            }
        }
    }

    @Test(
        "503 with no backend, 502 when every backend refuses, 504 on upstream timeout — fast and plain",
        arguments: HTTPEngine.allCases
    )
    func errorStatuses(engine: HTTPEngine) async throws {
        try await TestEngine.$current.withValue(engine) {
            let refusedA = try await TestServers.refusedBackend()
            let refusedB = try await TestServers.refusedBackend()
            let slow = try await TestServers.http("slow")
            onTeardown { await slow.close() }
            var http = HTTPConfiguration()
            http.upstreamResponseTimeout = .milliseconds(200)
            // A connect timeout of a minute: "fast" means refusals are not waited out as a timeout would be,
            // told apart by that configured minute rather than by a few seconds a loaded machine can use up.
            try await withDataPlane(testConfiguration(connectTimeout: .seconds(60), http: http)) { dp in
                let none = TestAddresses.vip()
                let refused = TestAddresses.vip()
                let timeout = TestAddresses.vip()
                try await dp.apply(
                    RouteTable(routes: [
                        Route(service: service("none"), vip: none, port: 8080, proto: .http, backends: []),
                        Route(
                            service: service("refused"),
                            vip: refused,
                            port: 8080,
                            proto: .http,
                            backends: [refusedA, refusedB]
                        ),
                        Route(
                            service: service("timeout"),
                            vip: timeout,
                            port: 8080,
                            proto: .http,
                            backends: [slow.backend()]
                        ),
                    ])
                )
                let start = ContinuousClock.now
                let r503 = try #require(try await TestHTTPConnection.get(TestClient.vipAddress(none, 8080), "/"))
                #expect(r503.status == 503 && r503.body.contains("no healthy upstream"))
                #expect(r503.header("content-type")?.hasPrefix("text/plain") == true)
                let r502 = try #require(try await TestHTTPConnection.get(TestClient.vipAddress(refused, 8080), "/"))
                #expect(r502.status == 502 && r502.body.contains("connect"))
                #expect(ContinuousClock.now - start < .seconds(30))
                let r504 = try #require(
                    try await TestHTTPConnection.get(TestClient.vipAddress(timeout, 8080), "/slow/2000")
                )
                #expect(r504.status == 504 && r504.body.contains("timeout"))
                // Keep-alive survives an error answer to a complete request.
                let again = try await TestHTTPConnection.with(TestClient.vipAddress(none, 8080)) { conn in
                    [try await conn.request(.GET, "/")?.status, try await conn.request(.GET, "/")?.status]
                }
                #expect(again == [503, 503])
            }
        }
    }

    @Test(
        "idempotent requests are retried on another backend after a reset; a POST with a body is not",
        arguments: HTTPEngine.allCases
    )
    func retries(engine: HTTPEngine) async throws {
        try await TestEngine.$current.withValue(engine) {
            let resetStats = HTTPBackendStats()
            let resetter = try await TestServers.http("reset", resetEverything: true, stats: resetStats)
            let good = try await TestServers.http("good")
            onTeardown {
                await resetter.close()
                await good.close()
            }
            var outlier = OutlierConfiguration()
            outlier.enabled = false
            try await withDataPlane(testConfiguration(outlier: outlier)) { dp in
                let vip = TestAddresses.vip()
                try await dp.apply(httpRoute("retry", vip, [resetter.backend(), good.backend()]))
                let address = TestClient.vipAddress(vip, 8080)
                for _ in 0..<4 {
                    let response = try #require(try await TestHTTPConnection.get(address, "/"))
                    #expect(response.status == 200 && response.body == "good")
                }
                #expect(dp.snapshot().routes[0].retries >= 2)
                // Round robin sends the next request to the resetter: a POST with a body gets 502.
                var statuses: [Int] = []
                for _ in 0..<2 {
                    let r = try await withTimeout(30) {
                        try await TestHTTPConnection.with(address) {
                            try await $0.request(.POST, "/", body: "payload")?.status
                        }
                    }
                    statuses.append(r ?? 0)
                }
                #expect(statuses.sorted() == [200, 502])
            }
        }
    }

    @Test("garbage gets 400 and a close; oversized headers get 431; no crash, no leak", arguments: HTTPEngine.allCases)
    func badInput(engine: HTTPEngine) async throws {
        try await TestEngine.$current.withValue(engine) {
            let backend = try await TestServers.http("web")
            onTeardown { await backend.close() }
            var http = HTTPConfiguration()
            http.maxHeaderListSize = 4096
            try await withDataPlane(testConfiguration(http: http)) { dp in
                let vip = TestAddresses.vip()
                try await dp.apply(httpRoute("bad", vip, [backend.backend()]))
                let address = TestClient.vipAddress(vip, 8080)
                let garbage = try await RawClient.send(address, Array("\u{01}\u{02}NOT HTTP AT ALL\r\n\r\n".utf8))
                #expect(garbage.hasPrefix("HTTP/1.1 400"))
                #expect(garbage.lowercased().contains("connection: close"))
                let binary = try await RawClient.send(address, (0..<512).map { UInt8(truncatingIfNeeded: $0 &* 37) })
                #expect(binary.hasPrefix("HTTP/1.1 400"))
                let big = "GET / HTTP/1.1\r\nHost: x\r\nX-Big: \(String(repeating: "a", count: 8192))\r\n\r\n"
                let tooLarge = try await RawClient.send(address, Array(big.utf8))
                #expect(tooLarge.hasPrefix("HTTP/1.1 431"))
                // Still serving.
                #expect(try await TestHTTPConnection.get(address, "/")?.status == 200)
                #expect(await eventually { dp.openClientChannels == 0 })
            }
        }
    }

    @Test(
        "pipelined requests are answered in order, one at a time; garbage behind them gets 400 after them",
        arguments: HTTPEngine.allCases
    )
    func pipelining(engine: HTTPEngine) async throws {
        try await TestEngine.$current.withValue(engine) {
            let backend = try await TestServers.http("web")
            onTeardown { await backend.close() }
            try await withDataPlane { dp in
                let vip = TestAddresses.vip()
                try await dp.apply(httpRoute("pipe", vip, [backend.backend()]))
                let address = TestClient.vipAddress(vip, 8080)
                let two = "GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                let answered = try await RawClient.send(address, Array(two.utf8))
                #expect(answered.components(separatedBy: "HTTP/1.1 200").count == 3)
                #expect(answered.lowercased().contains("connection: close"))
                let withGarbage =
                    "GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n\u{01}\u{02}NOT HTTP\r\n\r\n"
                let text = try await RawClient.send(address, Array(withGarbage.utf8))
                // Status lines in order (a body is not followed by a line break: split on the version).
                let statuses = text.components(separatedBy: "HTTP/1.1 ").dropFirst().map { String($0.prefix(3)) }
                #expect(statuses == ["200", "200", "400"])
                #expect(await eventually { dp.openClientChannels == 0 })
            }
        }
    }

    @Test(
        "a removed route finishes the request in flight with connection: close, then closes",
        arguments: HTTPEngine.allCases
    )
    func drainAnswersInFlightRequest(engine: HTTPEngine) async throws {
        try await TestEngine.$current.withValue(engine) {
            // The route must be removed while the backend still holds the response: 2 s leaves room for a loaded
            // CI machine between the request arriving and the removal (400 ms was not always enough).
            let backend = try await TestServers.http("slow", delay: .seconds(2))
            onTeardown { await backend.close() }
            try await withDataPlane(testConfiguration(drainTimeout: .seconds(5))) { dp in
                let vip = TestAddresses.vip()
                try await dp.apply(httpRoute("drain", vip, [backend.backend()]))
                let address = TestClient.vipAddress(vip, 8080)
                async let response = TestHTTPConnection.get(address, "/")
                #expect(await eventually { dp.openClientChannels == 1 && dp.openChannels == 2 })
                try await dp.apply(RouteTable(routes: []))
                let r = try #require(try await response)
                #expect(r.status == 200 && r.header("connection") == "close")
                #expect(await eventually { dp.openClientChannels == 0 })
            }
        }
    }

    @Test(
        "a client that connects and never sends is closed by the request head timeout",
        arguments: HTTPEngine.allCases
    )
    func silentClient(engine: HTTPEngine) async throws {
        try await TestEngine.$current.withValue(engine) {
            let backend = try await TestServers.http("web")
            onTeardown { await backend.close() }
            var http = HTTPConfiguration()
            http.requestHeadTimeout = .milliseconds(200)
            try await withDataPlane(testConfiguration(http: http)) { dp in
                let vip = TestAddresses.vip()
                try await dp.apply(httpRoute("silent", vip, [backend.backend()]))
                let start = ContinuousClock.now
                let text = try await RawClient.send(TestClient.vipAddress(vip, 8080), [])
                #expect(text.isEmpty)
                #expect(ContinuousClock.now - start >= .milliseconds(190))
                #expect(await eventually { dp.openClientChannels == 0 })
            }
        }
    }

    @Test(
        "a request body that stalls is cut off; an early answer to an unfinished upload ends both sides",
        arguments: HTTPEngine.allCases
    )
    func stalledAndEarly(engine: HTTPEngine) async throws {
        try await TestEngine.$current.withValue(engine) {
            let backend = try await TestServers.http("web")
            onTeardown { await backend.close() }
            var http = HTTPConfiguration()
            http.clientIdleTimeout = .milliseconds(300)
            try await withDataPlane(testConfiguration(http: http)) { dp in
                let vip = TestAddresses.vip()
                try await dp.apply(httpRoute("stall", vip, [backend.backend()]))
                let address = TestClient.vipAddress(vip, 8080)
                // Promises 1000 bytes, sends 10, then nothing: closed after the idle time, without a response.
                let start = ContinuousClock.now
                let stalled = try await RawClient.send(
                    address,
                    Array("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123456789".utf8),
                    timeout: 5
                )
                #expect(stalled.isEmpty)
                #expect(ContinuousClock.now - start >= .milliseconds(290))
                #expect(await eventually { dp.openClientChannels == 0 })
            }
            // The backend answers 413 before reading the body; the client still uploading gets it, then a
            // close. On a data plane with the default idle timeout: with 300 ms, a loaded machine could take
            // longer than that to connect and relay the 413, and the idle timeout would close the client first.
            try await withDataPlane { dp in
                let vip = TestAddresses.vip()
                try await dp.apply(httpRoute("early", vip, [backend.backend()]))
                let early = try await RawClient.send(
                    TestClient.vipAddress(vip, 8080),
                    Array("POST /early HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n0123456789".utf8),
                    timeout: 30
                )
                #expect(early.hasPrefix("HTTP/1.1 413"))
                #expect(await eventually { dp.openClientChannels == 0 })
            }
        }
    }

    @Test("bodies stream both ways: 4 MiB up and echoed back, 32 MiB down", arguments: HTTPEngine.allCases)
    func streaming(engine: HTTPEngine) async throws {
        try await TestEngine.$current.withValue(engine) {
            let backend = try await TestServers.http("stream")
            onTeardown { await backend.close() }
            try await withDataPlane { dp in
                let vip = TestAddresses.vip()
                try await dp.apply(httpRoute("stream", vip, [backend.backend()]))
                let address = TestClient.vipAddress(vip, 8080)
                let up = String(repeating: "u", count: 4 * 1024 * 1024)
                // Bounds that only turn a hang into a failure: a debug build under a loaded run of every suite
                // in one process took over 20 s for the echo.
                let echoed = try await withTimeout(50) {
                    try await TestHTTPConnection.with(address) { try await $0.request(.POST, "/echo", body: up) }
                }
                #expect(echoed?.status == 200 && echoed?.body.utf8.count == up.utf8.count)
                let down = try await withTimeout(50) {
                    try await TestHTTPConnection.with(address) {
                        try await $0.request(.GET, "/big/\(32 * 1024 * 1024)", countBodyOnly: true)
                    }
                }
                #expect(down?.status == 200 && down?.bodyBytes == 32 * 1024 * 1024)
            }
        }
    }

    @Test("Upgrade (WebSocket) is passed through: 101, then bytes both ways", arguments: HTTPEngine.allCases)
    func upgrade(engine: HTTPEngine) async throws {
        try await TestEngine.$current.withValue(engine) {
            let backend = try await TestServers.http("ws")
            onTeardown { await backend.close() }
            try await withDataPlane { dp in
                let vip = TestAddresses.vip()
                try await dp.apply(httpRoute("ws", vip, [backend.backend()]))
                let address = TestClient.vipAddress(vip, 8080)
                let echoed = try await withTimeout(30) {
                    let channel = try await ClientBootstrap(group: testGroup).connect(to: address) { channel in
                        channel.eventLoop.makeCompletedFuture {
                            try NIOAsyncChannel<ByteBuffer, ByteBuffer>(wrappingChannelSynchronously: channel)
                        }
                    }
                    return try await channel.executeThenClose { inbound, outbound in
                        let request =
                            "GET /chat HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
                        try await outbound.write(ByteBuffer(string: request))
                        var text = ""
                        var iterator = inbound.makeAsyncIterator()
                        while !text.contains("\r\n\r\n"), let chunk = try await iterator.next() {
                            text += String(buffer: chunk)
                        }
                        #expect(text.hasPrefix("HTTP/1.1 101"))
                        try await outbound.write(ByteBuffer(string: "frame-1|"))
                        try await outbound.write(ByteBuffer(string: "frame-2|"))
                        var echoed = ""
                        while echoed.count < 16, let chunk = try await iterator.next() {
                            echoed += String(buffer: chunk)
                        }
                        return echoed
                    }
                }
                #expect(echoed == "frame-1|frame-2|")
                #expect(await eventually { dp.openClientChannels == 0 })
            }
        }
    }

    @Test("IPv6: an HTTP route on ::1 to an IPv6 backend", arguments: HTTPEngine.allCases)
    func ipv6(engine: HTTPEngine) async throws {
        try await TestEngine.$current.withValue(engine) {
            let backend = try await TestServers.http("v6", host: "::1")
            onTeardown { await backend.close() }
            try await withDataPlane { dp in
                let port = try await TestAddresses.applyOnFreeIPv6Port(dp) {
                    httpRoute("v6", IPAddress("::1")!, port: $0, [backend.backend()])
                }
                let response = try #require(
                    try await TestHTTPConnection.get(try SocketAddress(ipAddress: "::1", port: port), "/")
                )
                #expect(response.body == "v6" && response.header("x-seen-xff") == "::1")
            }
        }
    }

    @Test(
        "slow request bodies hold no upstream connection: small ones are read whole before a backend is picked",
        arguments: HTTPEngine.allCases
    )
    func slowBodiesBuffered(engine: HTTPEngine) async throws {
        try await TestEngine.$current.withValue(engine) {
            let stats = HTTPBackendStats()
            let backend = try await TestServers.http("web-1", stats: stats)
            onTeardown { await backend.close() }
            try await withDataPlane { dp in
                let vip = TestAddresses.vip()
                try await dp.apply(httpRoute("web", vip, [backend.backend()]))
                let address = TestClient.vipAddress(vip, 8080)
                // Ten clients send a head and half of a 10-byte body, then stall.
                var slow: [any Channel] = []
                for _ in 0..<10 {
                    let channel = try await ClientBootstrap(group: testGroup).connect(to: address).get()
                    try await channel.writeAndFlush(
                        ByteBuffer(string: "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12345")
                    ).get()
                    slow.append(channel)
                }
                // A request sent after them is answered: the proxy has taken their bytes by now...
                let fast = try #require(try await TestHTTPConnection.get(address, "/"))
                #expect(fast.status == 200)
                // ...and opened one upstream connection, for it alone.
                #expect(stats.connections.load(ordering: .relaxed) == 1)
                // A stalled body that completes goes up whole.
                try await slow[0].writeAndFlush(ByteBuffer(string: "67890")).get()
                #expect(await eventually { stats.requests.load(ordering: .relaxed) == 2 })
                for channel in slow { try? await channel.close() }
            }
        }
    }
}
