import MeshTestSupport
import NIOCore
import NIOEmbedded
import NIOHTTP1
import Testing

@_spi(Fuzzing) @testable import MeshAgent

/// The exchange state machine and the request policy, without a channel: heads parsed from bytes, events fed
/// in, the actions and the bytes that would go out checked.
@Suite("HTTP exchange: request policy and state machine, no sockets")
struct HTTPExchangeTests {
    private let allocator = ByteBufferAllocator()

    private func request(_ text: String) throws -> HTTPHead {
        var parser = HTTPParser(kind: .request)
        var buffer = ByteBuffer(string: text)
        guard case .head(let head)? = try parser.next(&buffer) else { throw TestTimeout(what: "no head in \(text)") }
        return head
    }

    private func response(_ text: String, to method: HTTPMethod = .GET) throws -> HTTPHead {
        var parser = HTTPParser(kind: .response)
        parser.expectResponse(to: method)
        var buffer = ByteBuffer(string: text)
        guard case .head(let head)? = try parser.next(&buffer) else { throw TestTimeout(what: "no head in \(text)") }
        return head
    }

    /// The policy's decision on `text`: the upstream head (without request id) or the refusal.
    private func admit(
        _ text: String,
        settings: HTTPRequestPolicy.Settings = .init(),
        route: Set<String>? = nil
    ) throws -> (upstream: String?, plan: HTTPRequestPolicy.Plan?, refusal: String?) {
        let head = try self.request(text)
        switch HTTPRequestPolicy.admit(
            head,
            settings: settings,
            clientAddress: "198.18.0.7",
            fallbackHost: "10.96.0.1:80",
            upgradeProtocols: { route }
        ) {
        case .forward(let plan):
            return (String(buffer: HTTPWire.requestHead(head, edits: plan.edits, allocator: self.allocator)), plan, nil)
        case .reject(let status, let reason):
            return (nil, nil, "\(status.code) \(reason)")
        }
    }

    private func exchange(_ text: String, settings: HTTPRequestPolicy.Settings = .init()) throws -> HTTPExchange {
        let head = try self.request(text)
        guard
            case .forward(let plan) = HTTPRequestPolicy.admit(
                head,
                settings: settings,
                clientAddress: nil,
                fallbackHost: "h"
            )
        else { throw TestTimeout(what: "refused: \(text)") }
        return HTTPExchange(id: 1, head: head, upstreamHead: ByteBuffer(string: "up"), plan: plan, hash: 0)
    }

    private func connection() -> UpstreamConnection {
        UpstreamConnection(
            channel: EmbeddedChannel(),
            handler: UpstreamHTTPHandler(decoder: HTTPDecodingHandler()),
            backend: BackendID(ip: .v4(0x7f00_0001), port: 1)
        )
    }

    // MARK: Host and target (RFC 9112 3.2, 3.2.2)

    @Test("Host: missing, duplicated, list-valued, empty or malformed is 400 for HTTP/1.1")
    func hostRules() throws {
        let refused = [
            ("GET / HTTP/1.1\r\n\r\n", "400 missing host header"),
            ("GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n", "400 more than one host header"),
            ("GET / HTTP/1.1\r\nHost: a, b\r\n\r\n", "400 invalid host header"),
            ("GET / HTTP/1.1\r\nHost: \r\n\r\n", "400 empty host header"),
            ("GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", "400 invalid host header"),
            ("GET / HTTP/1.1\r\nHost: u@a\r\n\r\n", "400 invalid host header"),
            ("GET http://user:pw@svc/ HTTP/1.1\r\nHost: svc\r\n\r\n", "400 userinfo in the request target"),
            ("GET http:///p HTTP/1.1\r\nHost: svc\r\n\r\n", "400 invalid authority in the request target"),
            ("GET p HTTP/1.1\r\nHost: svc\r\n\r\n", "400 invalid request target"),
        ]
        for (text, refusal) in refused {
            #expect(try self.admit(text).refusal == refusal, "\(text)")
        }
        #expect(try self.admit("GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n").refusal == nil)
        #expect(try self.admit("OPTIONS * HTTP/1.1\r\nHost: svc\r\n\r\n").refusal == nil)
    }

    @Test("absolute-form target: origin form upstream, Host from the target's authority")
    func absoluteForm() throws {
        #expect(
            try self.admit("GET http://svc.ns:8080/p?q=1 HTTP/1.1\r\nHost: other\r\nAccept: */*\r\n\r\n").upstream
                == "GET /p?q=1 HTTP/1.1\r\nhost: svc.ns:8080\r\nAccept: */*\r\nx-forwarded-for: 198.18.0.7\r\n\r\n"
        )
        #expect(
            try self.admit("GET HTTP://svc HTTP/1.1\r\n\r\n").upstream
                == "GET / HTTP/1.1\r\nhost: svc\r\nx-forwarded-for: 198.18.0.7\r\n\r\n"
        )
    }

    @Test("HTTP/1.0: forwarded with a Host (the address it was sent to); with Transfer-Encoding, then closed")
    func http10() throws {
        let plain = try self.admit("GET /x HTTP/1.0\r\n\r\n")
        #expect(plain.upstream == "GET /x HTTP/1.1\r\nhost: 10.96.0.1:80\r\nx-forwarded-for: 198.18.0.7\r\n\r\n")
        #expect(plain.plan?.keepAlive == false)
        let kept = try self.admit("GET /x HTTP/1.0\r\nHost: svc\r\nConnection: keep-alive\r\n\r\n")
        #expect(kept.upstream == "GET /x HTTP/1.1\r\nHost: svc\r\nx-forwarded-for: 198.18.0.7\r\n\r\n")
        #expect(kept.plan?.keepAlive == true)
        let chunked = try self.admit(
            "POST /x HTTP/1.0\r\nHost: svc\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        #expect(chunked.plan?.keepAlive == false)
    }

    // MARK: fields

    @Test("Connection can name hop-by-hop fields only: never Host, framing, identity or the proxy's own")
    func connectionTokens() throws {
        let upstream = try self.admit(
            "GET / HTTP/1.1\r\nHost: svc\r\nConnection: Host, Content-Length, X-Request-Id, Authorization, Cookie, "
                + "X-Forwarded-For, X-Private\r\nAuthorization: Bearer t\r\nCookie: a=1\r\nX-Request-Id: r1\r\n"
                + "X-Private: p\r\n\r\n"
        ).upstream
        #expect(
            upstream
                == "GET / HTTP/1.1\r\nHost: svc\r\nAuthorization: Bearer t\r\nCookie: a=1\r\nX-Request-Id: r1\r\n"
                + "x-forwarded-for: 198.18.0.7\r\n\r\n"
        )
    }

    @Test("X-Forwarded-For, Forwarded, X-Real-IP: replaced by default; with trusted hops, their part kept")
    func forwarding() throws {
        let text =
            "GET / HTTP/1.1\r\nHost: svc\r\nx-forwarded-for: 7.7.7.7\r\nForwarded: for=6.6.6.6\r\n"
            + "X-Real-IP: 6.6.6.6\r\nX-Forwarded-For: 6.6.6.6, 10.0.0.1\r\n\r\n"
        #expect(try self.admit(text).upstream == "GET / HTTP/1.1\r\nHost: svc\r\nx-forwarded-for: 198.18.0.7\r\n\r\n")
        var trusted = HTTPRequestPolicy.Settings()
        trusted.trustedHops = 1
        #expect(
            try self.admit(text, settings: trusted).upstream
                == "GET / HTTP/1.1\r\nHost: svc\r\nForwarded: for=6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\n"
                + "x-forwarded-for: 10.0.0.1, 198.18.0.7\r\n\r\n"
        )
        trusted.trustedHops = 5
        #expect(
            try self.admit(text, settings: trusted).upstream?.contains(
                "x-forwarded-for: 6.6.6.6, 10.0.0.1, 198.18.0.7\r\n"
            ) == true
        )
    }

    @Test("upgrades: WebSocket allowed, h2c refused (a plain request, then close) unless the route allows it")
    func upgrades() throws {
        let ws = try self.admit("GET / HTTP/1.1\r\nHost: s\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        #expect(ws.plan?.isUpgrade == true)
        #expect(ws.upstream?.contains("connection: upgrade\r\nupgrade: websocket\r\n") == true)
        let h2c =
            "GET / HTTP/1.1\r\nHost: s\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMA\r\n\r\n"
        let refused = try self.admit(h2c)
        #expect(refused.plan?.isUpgrade == false)
        #expect(refused.plan?.keepAlive == false)
        #expect(refused.upstream == "GET / HTTP/1.1\r\nHost: s\r\nx-forwarded-for: 198.18.0.7\r\n\r\n")
        #expect(try self.admit(h2c, route: ["h2c"]).plan?.isUpgrade == true)
        #expect(
            try self.admit("GET / HTTP/1.1\r\nHost: s\r\nConnection: upgrade\r\nUpgrade: websocket, h2c\r\n\r\n")
                .plan?.isUpgrade == false
        )
    }

    @Test("request framing: an ambiguous Content-Length or Transfer-Encoding is refused by the parser")
    func ambiguousFraming() throws {
        let cases: [(String, HTTPParseError)] = [
            ("Content-Length: ,34", .ambiguousContentLength),
            ("Content-Length: 5, 5", .ambiguousContentLength),
            ("Content-Length: 0005", .ambiguousContentLength),
            ("Content-Length: 5\r\nContent-Length: 5", .ambiguousContentLength),
            ("Content-Length: 5\r\nContent-Length: 6", .conflictingContentLength),
            ("Transfer-Encoding: gzip, chunked", .unsupportedTransferCoding),
            ("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked", .unsupportedTransferCoding),
            ("Transfer-Encoding: chunked, chunked", .unsupportedTransferCoding),
        ]
        for (fields, error) in cases {
            #expect(throws: error, "\(fields)") {
                _ = try self.request("POST / HTTP/1.1\r\nHost: s\r\n\(fields)\r\n\r\nhello")
            }
        }
        #expect(try self.request("POST / HTTP/1.1\r\nHost: s\r\nContent-Length: 0\r\n\r\n").body == .length(0))
        #expect(try self.request("POST / HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: Chunked\r\n\r\n").body == .chunked)
    }

    // MARK: the exchange

    @Test("a small body is buffered before a backend is picked; it goes up whole on attach")
    func bufferedBody() throws {
        var settings = HTTPRequestPolicy.Settings()
        settings.requestBufferSize = 8
        let exchange = try self.exchange("POST / HTTP/1.1\r\nHost: s\r\nContent-Length: 6\r\n\r\n", settings: settings)
        #expect(!exchange.dispatched)
        #expect(exchange.requestBody(ByteBuffer(string: "abc"), bufferLimit: 8) == .hold)
        #expect(exchange.requestBody(ByteBuffer(string: "def"), bufferLimit: 8) == .hold)
        #expect(exchange.requestEnd(trailers: nil, now: .now(), responseTimeout: .seconds(1)) == .dispatch)
        let sending = exchange.attach(self.connection(), now: .now(), responseTimeout: .seconds(1))
        #expect(sending.body.map { String(buffer: $0) } == ["abc", "def"])
        #expect(sending.end)
        #expect(exchange.requestEnded && exchange.bodyBytesSent)

        // Chunked: buffered until it outgrows the buffer, then dispatched and streamed.
        let chunked = try self.exchange(
            "POST / HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\n",
            settings: settings
        )
        #expect(chunked.requestBody(ByteBuffer(string: "12345"), bufferLimit: 8) == .hold)
        #expect(chunked.requestBody(ByteBuffer(string: "6789"), bufferLimit: 8) == .dispatch)
        #expect(chunked.requestBody(ByteBuffer(string: "more"), bufferLimit: 8) == .hold)
        _ = chunked.attach(self.connection(), now: .now(), responseTimeout: .seconds(1))
        #expect(chunked.requestBody(ByteBuffer(string: "x"), bufferLimit: 8) == .send)
        #expect(chunked.requestEnd(trailers: nil, now: .now(), responseTimeout: .seconds(1)) == .send)

        // Over the buffer by its Content-Length: dispatched at once.
        #expect(
            try self.exchange("POST / HTTP/1.1\r\nHost: s\r\nContent-Length: 9\r\n\r\n", settings: settings).dispatched
        )
    }

    /// An exchange whose GET went up whole on a connection.
    private func sentGET() throws -> HTTPExchange {
        let exchange = try self.exchange("GET / HTTP/1.1\r\nHost: s\r\n\r\n")
        #expect(exchange.requestEnd(trailers: nil, now: .now(), responseTimeout: .seconds(1)) == .hold)
        _ = exchange.attach(self.connection(), now: .now(), responseTimeout: .seconds(1))
        return exchange
    }

    @Test("the upstream connection is pooled only when its response ended exactly at the end of the bytes read")
    func boundary() throws {
        let clean = try self.sentGET()
        guard
            case .forward = clean.responseHead(
                try self.response("HTTP/1.1 204 No Content\r\n\r\n"),
                allocator: self.allocator
            )
        else { throw TestTimeout(what: "forward") }
        #expect(clean.responseEnd(atBoundary: true) == .finish(lastChunk: false))
        #expect(clean.isDone && clean.upstreamReturnsToPool)

        let leftover = try self.sentGET()
        _ = leftover.responseHead(try self.response("HTTP/1.1 204 No Content\r\n\r\n"), allocator: self.allocator)
        #expect(leftover.responseEnd(atBoundary: false) == .finish(lastChunk: false))
        #expect(leftover.isDone && !leftover.upstreamReturnsToPool)

        let closing = try self.sentGET()
        _ = closing.responseHead(
            try self.response("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"),
            allocator: self.allocator
        )
        _ = closing.responseEnd(atBoundary: true)
        #expect(!closing.upstreamReturnsToPool)

        let faulty = try self.sentGET()
        _ = faulty.responseHead(
            try self.response("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"),
            allocator: self.allocator
        )
        _ = faulty.responseEnd(atBoundary: true)
        #expect(!faulty.upstreamReturnsToPool)
    }

    @Test("an unsolicited 101 is refused (502), its connection not reused; a solicited one awaits the switch")
    func unsolicited101() throws {
        let exchange = try self.sentGET()
        let switching = try self.response(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: evil\r\nConnection: upgrade\r\n\r\n"
        )
        guard case .refuse(let reason) = exchange.responseHead(switching, allocator: self.allocator) else {
            Issue.record("101 forwarded")
            return
        }
        #expect(reason.contains("101"))
        #expect(!exchange.upstreamReturnsToPool)

        let upgrade = try self.exchange(
            "GET / HTTP/1.1\r\nHost: s\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
        )
        _ = upgrade.requestEnd(trailers: nil, now: .now(), responseTimeout: .seconds(1))
        _ = upgrade.attach(self.connection(), now: .now(), responseTimeout: .seconds(1))
        guard case .awaitUpgrade = upgrade.responseHead(switching, allocator: self.allocator) else {
            Issue.record("upgrade refused")
            return
        }
        #expect(upgrade.responseEnd(atBoundary: false) == .upgrade)
    }

    @Test("1xx loses its hop-by-hop and Connection-named fields; final heads get one canonical Content-Length")
    func responseEdits() throws {
        let exchange = try self.sentGET()
        let interim = try self.response(
            "HTTP/1.1 103 Early Hints\r\nConnection: X-Secret\r\nX-Secret: s\r\nLink: </a>\r\n\r\n"
        )
        guard case .interim(let bytes?) = exchange.responseHead(interim, allocator: self.allocator) else {
            Issue.record("1xx not passed")
            return
        }
        #expect(String(buffer: bytes) == "HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n")
        let final = try self.response("HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\ncontent-length: 02\r\n\r\nok")
        guard case .forward(let head) = exchange.responseHead(final, allocator: self.allocator) else {
            Issue.record("not forwarded")
            return
        }
        #expect(String(buffer: head) == "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    }

    @Test("an upstream that closes: a malformed response is 502 and never retried; a reset GET is retried")
    func upstreamClosed() throws {
        let malformed = try self.sentGET()
        #expect(
            malformed.upstreamClosed(error: HTTPParseError.invalidStatus)
                == .fail(.badGateway, "invalid upstream response: invalid status line")
        )
        let reset = try self.sentGET()
        #expect(reset.upstreamClosed(error: nil) == .retry(.badGateway, "upstream connection reset"))
        #expect(reset.mayRetry(connectAttempts: 3, maxRetries: 2))
        let post = try self.exchange("POST / HTTP/1.1\r\nHost: s\r\nContent-Length: 1\r\n\r\n")
        _ = post.requestBody(ByteBuffer(string: "x"), bufferLimit: 0)
        _ = post.attach(self.connection(), now: .now(), responseTimeout: .seconds(1))
        #expect(post.upstreamClosed(error: nil) == .fail(.badGateway, "upstream connection reset"))
        let started = try self.sentGET()
        _ = started.responseHead(
            try self.response("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n"),
            allocator: self.allocator
        )
        #expect(started.upstreamClosed(error: nil) == .closeClient)
    }

    @Test("timeouts: response head (504), stalled request body, stalled response body")
    func timeouts() throws {
        let t0 = NIODeadline.now()
        let exchange = try self.exchange("GET / HTTP/1.1\r\nHost: s\r\n\r\n")
        _ = exchange.requestEnd(trailers: nil, now: t0, responseTimeout: .seconds(1))
        _ = exchange.attach(self.connection(), now: t0, responseTimeout: .seconds(1))
        func check(_ at: TimeAmount) -> HTTPExchange.Timeout? {
            exchange.timeout(
                now: t0 + at,
                lastClientRead: t0,
                lastUpstreamRead: t0,
                requestBodyTimeout: .seconds(5),
                responseBodyTimeout: .seconds(3)
            )
        }
        #expect(check(.milliseconds(900)) == nil)
        #expect(check(.seconds(1)) == .response)
        _ = exchange.responseHead(
            try self.response("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n"),
            allocator: self.allocator
        )
        #expect(check(.seconds(2)) == nil)
        #expect(check(.seconds(3)) == .responseBody)

        let body = try self.exchange("POST / HTTP/1.1\r\nHost: s\r\nContent-Length: 100000\r\n\r\n")
        _ = body.attach(self.connection(), now: t0, responseTimeout: .seconds(1))
        #expect(
            body.timeout(
                now: t0 + .seconds(5),
                lastClientRead: t0,
                lastUpstreamRead: t0,
                requestBodyTimeout: .seconds(5),
                responseBodyTimeout: .seconds(3)
            ) == .requestBody
        )
    }

    @Test("hash keys from a header or a cookie, as bytes, equal to the hash of the value as a string")
    func hashKeys() throws {
        let head = try self.request(
            "GET / HTTP/1.1\r\nHost: s\r\nX-User: alice\r\nCookie: a=1; session = s3cr3t ;b=2\r\nCookie: c=3\r\n\r\n"
        )
        #expect(head.hashKey(.header("x-user")) == StableHash.hash("alice"))
        #expect(head.hashKey(.cookie("session")) == StableHash.hash("s3cr3t"))
        #expect(head.hashKey(.cookie("c")) == StableHash.hash("3"))
        #expect(head.hashKey(.cookie("Session")) == nil)
        #expect(head.hashKey(.header("x-none")) == nil)
    }

    @Test("the desync fuzz target on 3000 seeded streams of clean and hostile responses: no violation")
    func desyncFuzzTargetOnSeededStreams() {
        let fragments = [
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            "HTTP/1.1 204 No Content\r\n\r\n",
            "HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            "HTTP/1.1 100 Continue\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 302 Found\r\nLocation: http://evil.example/\r\nX-Pad: ",
            "okok",
            "HTTP/1.1 200 OK\r\n\r\nuntil close",
        ].map { Array($0.utf8) }
        var rng = SplitMix(seed: 0xfeed)
        var carriedThree = 0
        for _ in 0..<3000 {
            var input: [UInt8] = [UInt8.random(in: 0...255, using: &rng), UInt8.random(in: 0...255, using: &rng)]
            for _ in 0..<Int.random(in: 1...6, using: &rng) {
                input += fragments.randomElement(using: &rng)!
                // Mostly a segment per response (the backend answers once per request), sometimes two at once.
                if Int.random(in: 0..<4, using: &rng) > 0 { input.append(0xFF) }
            }
            let result = HTTPDesyncFuzzing.check(input)
            #expect(result.violation == nil, "\(String(decoding: input.dropFirst(2), as: UTF8.self).debugDescription)")
            if result.requests >= 3 { carriedThree += 1 }
        }
        // Clean streams did carry several requests over the one connection (the check was exercised).
        #expect(carriedThree > 100)
        // A stream whose first response has bytes behind it never carries a second request.
        let hostile = [UInt8(60), 0] + Array("HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 302 Found\r\n\r\n".utf8)
        #expect(HTTPDesyncFuzzing.check(hostile).requests == 1)
    }
}
