import MeshCore
import MeshTestSupport
import NIOCore
import NIOPosix
import Synchronization
import Testing

@testable import MeshAgent

#if canImport(Glibc)
import Glibc
#endif

/// The proxy probed as a request-smuggling tester probes it, over real sockets: a raw backend that logs every
/// byte it receives and answers with canned (hostile) bytes, a data plane on ONE event loop (so that every
/// client shares one upstream pool), and for each case: what the backend received, what the attacking client
/// received, and what a second client received right after: always its own response, never a byte meant for
/// someone else. `SMUGGLING_TRANSCRIPT=1` prints the transcript (the source of the DataPlane README's table).
@Suite("Data plane: HTTP request smuggling and response desync, over sockets", .timeLimit(.minutes(2)), .rationed)
struct DataPlaneHTTPSmugglingTests {
    static let victimResponse = "HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nvictim"
    static let victimRequest = "GET /victim HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    static let victimReceived = "HTTP/1.1 200 OK\r\nContent-Length: 6\r\nconnection: close\r\n\r\nvictim"
    static let forged = "HTTP/1.1 302 Found\r\nLocation: http://evil.example/\r\nContent-Length: 0\r\n\r\n"

    struct Case: Sendable {
        var name: String
        var request: String
        /// What the attacking client must receive: exactly (`==`), or (`~`) starting with.
        var client: String
        var exact = true
        /// What the backend must have received from this request: exactly, nil for nothing at all.
        var backend: String?
    }

    static let xff = "x-forwarded-for: 127.0.0.1\r\n"

    static let responses: [String: String] = [
        "/victim": victimResponse,
        "/plain": "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        "/204-trailing":
            "HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 302 Found\r\nLocation: http://evil.example/\r\nX-Pad: ",
        "/long-body": "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + forged,
        "/304-body": "HTTP/1.1 304 Not Modified\r\n\r\n" + forged,
        "/101": "HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: evil\r\n\r\n" + forged,
        "/malformed": "HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n",
        "/hints": "HTTP/1.1 103 Early Hints\r\nConnection: X-Secret\r\nX-Secret: s\r\nLink: </a>\r\n\r\n"
            + "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        "/cl-list": "HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok",
    ]

    static let cases: [Case] = [
        Case(
            name: "leftover after a 204 (a forged 302 for the next client)",
            request: "GET /204-trailing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            client: "HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n",
            backend: "GET /204-trailing HTTP/1.1\r\nHost: x\r\n\(xff)\r\n"
        ),
        Case(
            name: "body longer than its Content-Length",
            request: "GET /long-body HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            client: "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nconnection: close\r\n\r\nok",
            backend: "GET /long-body HTTP/1.1\r\nHost: x\r\n\(xff)\r\n"
        ),
        Case(
            name: "304 with a body",
            request: "GET /304-body HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            client: "HTTP/1.1 304 Not Modified\r\nconnection: close\r\n\r\n",
            backend: "GET /304-body HTTP/1.1\r\nHost: x\r\n\(xff)\r\n"
        ),
        Case(
            name: "unsolicited 101",
            request: "GET /101 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            client: "HTTP/1.1 502 Bad Gateway\r\n",
            exact: false,
            backend: "GET /101 HTTP/1.1\r\nHost: x\r\n\(xff)\r\n"
        ),
        Case(
            name: "malformed response",
            request: "GET /malformed HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            client: "HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 51\r\n"
                + "connection: close\r\n\r\n502 invalid upstream response: invalid status line\n",
            backend: "GET /malformed HTTP/1.1\r\nHost: x\r\n\(xff)\r\n"
        ),
        Case(
            name: "Content-Length: ,34",
            request: "POST /plain HTTP/1.1\r\nHost: x\r\nContent-Length: ,34\r\n\r\n"
                + "GET /204-trailing HTTP/1.1\r\nHost: x\r\n\r\n",
            client: "HTTP/1.1 400 Bad Request\r\n",
            exact: false,
            backend: nil
        ),
        Case(
            name: "Content-Length: 5, 5",
            request: "POST /plain HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\nhello",
            client: "HTTP/1.1 400 Bad Request\r\n",
            exact: false,
            backend: nil
        ),
        Case(
            name: "Content-Length: 0005",
            request: "POST /plain HTTP/1.1\r\nHost: x\r\nContent-Length: 0005\r\n\r\nhello",
            client: "HTTP/1.1 400 Bad Request\r\n",
            exact: false,
            backend: nil
        ),
        Case(
            name: "two identical Content-Length lines",
            request: "POST /plain HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
            client: "HTTP/1.1 400 Bad Request\r\n",
            exact: false,
            backend: nil
        ),
        Case(
            name: "Transfer-Encoding: gzip, chunked",
            request: "POST /plain HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            client: "HTTP/1.1 501 Not Implemented\r\n",
            exact: false,
            backend: nil
        ),
        Case(
            name: "Connection: Host, X-Request-Id, Authorization, Cookie",
            request:
                "GET /plain HTTP/1.1\r\nHost: x\r\nConnection: close, Host, X-Request-Id, Authorization, Cookie\r\n"
                + "X-Request-Id: r\r\nAuthorization: a\r\nCookie: c=1\r\n\r\n",
            client: "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nconnection: close\r\n\r\nok",
            backend:
                "GET /plain HTTP/1.1\r\nHost: x\r\nX-Request-Id: r\r\nAuthorization: a\r\nCookie: c=1\r\n\(xff)\r\n"
        ),
        Case(
            name: "missing Host",
            request: "GET /plain HTTP/1.1\r\n\r\n",
            client: "HTTP/1.1 400 Bad Request\r\n",
            exact: false,
            backend: nil
        ),
        Case(
            name: "two Host lines",
            request: "GET /plain HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
            client: "HTTP/1.1 400 Bad Request\r\n",
            exact: false,
            backend: nil
        ),
        Case(
            name: "Host: a, b",
            request: "GET /plain HTTP/1.1\r\nHost: a, b\r\n\r\n",
            client: "HTTP/1.1 400 Bad Request\r\n",
            exact: false,
            backend: nil
        ),
        Case(
            name: "absolute-form target with another Host",
            request: "GET http://svc.example:81/plain HTTP/1.1\r\nHost: other\r\nConnection: close\r\n\r\n",
            client: "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nconnection: close\r\n\r\nok",
            backend: "GET /plain HTTP/1.1\r\nhost: svc.example:81\r\n\(xff)\r\n"
        ),
        Case(
            name: "absolute-form target with userinfo",
            request: "GET http://user:pw@svc/plain HTTP/1.1\r\nHost: svc\r\n\r\n",
            client: "HTTP/1.1 400 Bad Request\r\n",
            exact: false,
            backend: nil
        ),
        Case(
            name: "HTTP/1.0 + Transfer-Encoding: chunked (then closed)",
            request: "POST /plain HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
                + "2\r\nhi\r\n0\r\n\r\n",
            client: "HTTP/1.0 200 OK\r\nContent-Length: 2\r\nconnection: close\r\n\r\nok",
            backend: "POST /plain HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\(xff)\r\n2\r\nhi\r\n0\r\n\r\n"
        ),
        Case(
            name: "Upgrade: h2c (refused: a plain request, then closed)",
            request: "GET /plain HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                + "HTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\nPRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            client: "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nconnection: close\r\n\r\nok",
            backend: "GET /plain HTTP/1.1\r\nHost: x\r\n\(xff)\r\n"
        ),
        Case(
            name: "forged X-Forwarded-For, Forwarded, X-Real-IP",
            request: "GET /plain HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\n"
                + "X-Real-IP: 6.6.6.6\r\nConnection: close\r\n\r\n",
            client: "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nconnection: close\r\n\r\nok",
            backend: "GET /plain HTTP/1.1\r\nHost: x\r\n\(xff)\r\n"
        ),
        Case(
            name: "1xx with a Connection-named field",
            request: "GET /hints HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            client: "HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                + "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nconnection: close\r\n\r\nok",
            backend: "GET /hints HTTP/1.1\r\nHost: x\r\n\(xff)\r\n"
        ),
        Case(
            name: "response Content-Length: 2, 2 (made canonical)",
            request: "GET /cl-list HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            client: "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
            backend: "GET /cl-list HTTP/1.1\r\nHost: x\r\n\(xff)\r\n"
        ),
    ]

    @Test(
        "every case: the backend gets what it should, the client its answer, the next client its own response",
        arguments: HTTPEngine.allCases
    )
    func smuggling(engine: HTTPEngine) async throws {
        try await TestEngine.$current.withValue(engine) {
            var transcript = ""
            try await withSingleLoopProxy(Self.responses) { address, backend in
                for c in Self.cases {
                    let before = backend.received.utf8.count
                    let got = try await RawClient.send(address, Array(c.request.utf8))
                    let sent = String(backend.received.utf8.dropFirst(before))!
                    let next = try await RawClient.send(address, Array(Self.victimRequest.utf8))
                    let afterVictim = String(backend.received.utf8.dropFirst(before))!
                    #expect(
                        c.exact ? got == c.client : got.hasPrefix(c.client),
                        "\(c.name): client got \(got.debugDescription)"
                    )
                    #expect(sent == (c.backend ?? ""), "\(c.name): backend got \(sent.debugDescription)")
                    #expect(next == Self.victimReceived, "\(c.name): next client got \(next.debugDescription)")
                    #expect(afterVictim.hasSuffix("GET /victim HTTP/1.1\r\nHost: x\r\n\(Self.xff)\r\n"), "\(c.name)")
                    transcript += "## \(c.name)\nclient sent: \(c.request.debugDescription)\n"
                    transcript += "backend got: \(sent.debugDescription)\nclient got:  \(got.debugDescription)\n"
                    transcript += "next client: \(next.debugDescription)\n\n"
                }
            }
            if getenv("SMUGGLING_TRANSCRIPT") != nil { print(transcript) }
        }
    }

    @Test(
        "a response body that stalls is cut off after responseBodyTimeout; the next client is not affected",
        arguments: HTTPEngine.allCases
    )
    func stalledResponseBody(engine: HTTPEngine) async throws {
        try await TestEngine.$current.withValue(engine) {
            var responses = Self.responses
            responses["/stall"] = "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345"
            var http = HTTPConfiguration(addRequestID: false)
            http.responseBodyTimeout = .milliseconds(300)
            try await withSingleLoopProxy(responses, http: http) { address, _ in
                let got = try await RawClient.send(
                    address,
                    Array("GET /stall HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".utf8),
                    timeout: 20
                )
                #expect(got == "HTTP/1.1 200 OK\r\nContent-Length: 10\r\nconnection: close\r\n\r\n12345")
                #expect(try await RawClient.send(address, Array(Self.victimRequest.utf8)) == Self.victimReceived)
            }
        }
    }

    @Test(
        "a clean response keeps its upstream connection; a response with bytes behind it loses it",
        arguments: HTTPEngine.allCases
    )
    func poolingOnlyAtBoundary(engine: HTTPEngine) async throws {
        try await TestEngine.$current.withValue(engine) {
            try await withSingleLoopProxy(Self.responses) { address, backend in
                for _ in 0..<3 { _ = try await RawClient.send(address, Array(Self.victimRequest.utf8)) }
                #expect(backend.connections == 1)
                _ = try await RawClient.send(
                    address,
                    Array("GET /long-body HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".utf8)
                )
                #expect(try await RawClient.send(address, Array(Self.victimRequest.utf8)) == Self.victimReceived)
                #expect(backend.connections == 2)
                // Pipelined behind a response with bytes left over: the second request waits for a clean connection.
                let pipelined = try await RawClient.send(
                    address,
                    Array(("GET /204-trailing HTTP/1.1\r\nHost: x\r\n\r\n" + Self.victimRequest).utf8)
                )
                #expect(pipelined == "HTTP/1.1 204 No Content\r\n\r\n" + Self.victimReceived)
                #expect(backend.connections == 3)
            }
        }
    }
}

/// A data plane on one event loop (every client shares its one upstream pool) in front of a scripted raw
/// backend answering `responses`.
func withSingleLoopProxy(
    _ responses: [String: String],
    http: HTTPConfiguration = HTTPConfiguration(addRequestID: false),
    _ body: (SocketAddress, ScriptedHTTPBackend) async throws -> Void
) async throws {
    let backend = ScriptedHTTPBackend(responses: responses)
    let server = try await TestServers.tcp(name: "raw") { ScriptedHTTPHandler(backend) }
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    let dataPlane = DataPlane(configuration: testConfiguration(http: http), eventLoopGroup: group, logger: testLogger)
    do {
        let vip = TestAddresses.vip()
        try await dataPlane.apply(httpRoute("single-loop", vip, [server.backend()]))
        try await body(TestClient.vipAddress(vip, 8080), backend)
    } catch {
        await dataPlane.shutdown(drain: false)
        await server.close()
        try await group.shutdownGracefully()
        throw error
    }
    await dataPlane.shutdown(drain: false)
    await server.close()
    try await group.shutdownGracefully()
}
