import Logging
import MeshHTTP
import MeshTestSupport
import NIOCore
import NIOEmbedded
import NIOHTTP1
import NIOPosix
import Synchronization
import Testing

import class ServiceLifecycle.ServiceGroup

/// Counts streams that are running, to prove they stop when their client goes away.
final class StreamCounter: Sendable {
    let running = Atomic<Int>(0)
    let started = Atomic<Int>(0)
}

/// A pushed body the test feeds by hand: lines to send, its end, and how often the server stopped it.
final class PushFeed: HTTPEventSource {
    struct State {
        var lines: [String] = []
        var ended = false
        var started = false
        var stops = 0
        var wake: (@Sendable () -> Void)?
    }
    let state = Mutex(State())

    func start(eventLoop: any EventLoop, wake: @escaping @Sendable () -> Void) {
        self.state.withLock {
            $0.started = true
            $0.wake = wake
        }
        wake()
    }

    func take() -> HTTPPushed {
        self.state.withLock { s in
            if !s.lines.isEmpty { return .data(ByteBuffer(string: s.lines.removeFirst())) }
            return s.ended ? .end : .nothing
        }
    }

    func stop() {
        let wake = self.state.withLock { s in
            s.stops += 1
            s.ended = true
            return s.wake
        }
        wake?()
    }

    func send(_ line: String) {
        self.state.withLock { $0.lines.append(line) }
        self.state.withLock { $0.wake }?()
    }

    func end() {
        self.state.withLock { $0.ended = true }
        self.state.withLock { $0.wake }?()
    }
}

/// The pushed bodies of `/push` requests, in order.
final class PushFeeds: Sendable {
    let feeds = Mutex<[PushFeed]>([])
    var last: PushFeed? { self.feeds.withLock { $0.last } }
    var count: Int { self.feeds.withLock { $0.count } }
}

func startServer(
    configure: (inout HTTPServerConfiguration) -> Void = { _ in },
    counter: StreamCounter = StreamCounter(),
    pushes: PushFeeds = PushFeeds()
) async throws -> (HTTPServer, ServiceGroup, Task<Void, any Error>, Int) {
    var config = HTTPServerConfiguration()
    configure(&config)
    var logger = Logger(label: "test")
    logger.logLevel = .warning
    let responder = ClosureResponder { request in
        switch request.path {
        case "/echo":
            return HTTPResponse(status: .ok, body: .bytes(request.body))
        case "/port":  // tells connections apart
            return .text(.ok, "\(request.remoteAddress?.port ?? 0)")
        case "/whoami":
            let serial = request.peerCertificateSerial.map { $0.map { String($0, radix: 16) }.joined() } ?? "-"
            return .text(.ok, "\(request.peerIdentity ?? "-") \(serial)")
        case "/stream":
            return HTTPResponse(status: .ok) {
                .stream { writer in
                    counter.running.add(1, ordering: .relaxed)
                    counter.started.add(1, ordering: .relaxed)
                    defer { counter.running.subtract(1, ordering: .relaxed) }
                    var i = 0
                    while !writer.isClientClosed, i < 10_000 {
                        try await writer.write(ByteBuffer(string: "tick \(i)\n"))
                        i += 1
                        try await Task.sleep(for: .milliseconds(10))
                    }
                }
            }
        case "/push":
            let feed = PushFeed()
            pushes.feeds.withLock { $0.append(feed) }
            return HTTPResponse(status: .ok) { .push(feed) }
        default:
            return .text(.notFound, "no \(request.path)")
        }
    }
    let server = HTTPServer(configuration: config, responder: AtOnceResponder(inner: responder), logger: logger)
    let group = ServiceGroup(configuration: .init(services: [.init(service: server)], logger: logger))
    let task = Task { try await group.run() }
    let port = try await server.localAddress().port!
    return (server, group, task, port)
}

/// Answers `/at-once?n=N` on the event loop (`respondAtOnce`) with `at once N`; in a task, with 500.
struct AtOnceResponder: HTTPResponder {
    let inner: ClosureResponder

    func respond(to request: HTTPRequest) async -> HTTPResponse {
        if request.path == "/at-once" { return .text(.internalServerError, "answered in a task") }
        return await self.inner.respond(to: request)
    }

    func respondAtOnce(to request: HTTPRequest) -> HTTPResponse? {
        guard request.path == "/at-once" else { return nil }
        guard MultiThreadedEventLoopGroup.currentEventLoop != nil else {
            return .text(.internalServerError, "off the loop")
        }
        return .text(.ok, "at once \(request.query["n"] ?? "-")")
    }
}

extension HTTPResponse {
    init(status: HTTPResponseStatus, body: () -> Body) {
        self.init(status: status, headers: [:], body: body())
    }
}

@Suite(.rationed) struct HTTPServerTests {
    @Test("the listen backlog is 4096 (the kernel caps it at somaxconn): a replica's agents reconnect at once")
    func listenBacklog() async throws {
        let somaxconn = (try? String(contentsOfFile: "/proc/sys/net/core/somaxconn", encoding: .utf8))
            .flatMap { Int($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
        for (configured, expected) in [(nil, min(4096, somaxconn ?? 4096)), (100, 100)] {
            let (_, group, task, port) = try await startServer { if let configured { $0.backlog = configured } }
            // For a listening socket, ss's Send-Q column is its backlog.
            let ss = try await run("/usr/bin/env", ["ss", "-Hltn", "sport = :\(port)"])
            let fields = ss.stdout.split(whereSeparator: \.isWhitespace)
            #expect(ss.status == 0, "\(ss.stderr)")
            #expect(fields.count >= 3 && Int(fields[2]) == expected, "\(ss.stdout)")
            await group.triggerGracefulShutdown()
            try await task.value
        }
    }

    @Test func keepAliveAndPipelinedRequestsOnOneConnection() async throws {
        let (server, group, task, port) = try await startServer()
        let replies = try await blocking {
            let s = try RawSocket(port: port, timeout: 5)
            s.send(
                "POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\none"
                    + "POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\ntwo"
                    + "GET /missing HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
            )
            return s.readAll()
        }
        let statuses = replies.components(separatedBy: "HTTP/1.1 ").dropFirst().map { $0.prefix(3) }
        #expect(statuses == ["200", "200", "404"])
        #expect(replies.contains("\r\n\r\none") && replies.contains("\r\n\r\ntwo"))
        #expect(await eventually { server.connectionCount == 0 })
        await group.triggerGracefulShutdown()
        try await task.value
    }

    @Test("answers made at once on the event loop, pipelined 2,000 deep among answers made in tasks, in order")
    func answersMadeAtOnceKeepTheirOrder() async throws {
        let (server, group, task, port) = try await startServer()
        let replies = try await blocking {
            let s = try RawSocket(port: port, timeout: 120)
            var requests = ""
            for n in 0..<2000 {
                requests += "GET /at-once?n=\(n) HTTP/1.1\r\nHost: t\r\n\r\n"
                if n % 100 == 0 {
                    requests +=
                        "POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\ne\(String(n).padding(toLength: 4, withPad: "_", startingAt: 0))"
                }
            }
            s.send(requests + "GET /missing HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            return s.readAll()
        }
        // Each answer's body, in the order written.
        let bodies = replies.components(separatedBy: "HTTP/1.1 ").dropFirst().map { reply in
            String(reply.prefix(3)) + " "
                + (reply.components(separatedBy: "\r\n\r\n").last ?? "").trimmingCharacters(in: .newlines)
        }
        var expected: [String] = []
        for n in 0..<2000 {
            expected.append("200 at once \(n)")
            if n % 100 == 0 { expected.append("200 e" + String(n).padding(toLength: 4, withPad: "_", startingAt: 0)) }
        }
        expected.append("404 no /missing")
        #expect(bodies.count == expected.count)
        let difference = zip(bodies, expected).first { $0 != $1 }
        #expect(difference == nil, "first answer out of place: \(difference.map { "\($0) where \($1) was due" } ?? "")")
        #expect(await eventually { server.connectionCount == 0 })
        await group.triggerGracefulShutdown()
        try await task.value
    }

    @Test func streamsStopWhenTheirClientLeaves() async throws {
        let counter = StreamCounter()
        let (server, group, task, port) = try await startServer(counter: counter)
        let head = try await blocking {
            let s = try RawSocket(port: port, timeout: 5)
            s.send("GET /stream HTTP/1.1\r\nHost: t\r\n\r\n")
            return s.readSome()
        }  // the socket closes here
        #expect(head.contains("transfer-encoding: chunked"))
        // The head goes out before the producer runs: wait for it to have started, then for it to stop.
        #expect(await eventually { counter.started.load(ordering: .relaxed) == 1 })
        #expect(await eventually { counter.running.load(ordering: .relaxed) == 0 })
        #expect(await eventually { server.connectionCount == 0 })
        await group.triggerGracefulShutdown()
        try await task.value
    }

    @Test func pushedBodiesAreWrittenAsTheyComeAndHoldNoTaskWhileTheyWait() async throws {
        let pushes = PushFeeds()
        let (server, group, task, port) = try await startServer(pushes: pushes)
        let socket = SendableSocket(try RawSocket(port: port, timeout: 10))
        let head = try await blocking {
            socket.socket.send("GET /push HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            return socket.socket.readUntil("\r\n\r\n")
        }
        #expect(head.hasPrefix("HTTP/1.1 200") && head.lowercased().contains("transfer-encoding: chunked"), "\(head)")
        // Asked to close, the answer ends its connection, and says so.
        #expect(head.lowercased().contains("connection: close"), "\(head)")
        // Waiting for data, the pushed body holds no task (an idle watch costs its connection only).
        #expect(await eventually { server.requestsInFlight == 0 })
        #expect(pushes.last?.state.withLock { $0.started } == true)
        // A request the client sends meanwhile is dropped, and the stream goes on.
        socket.socket.send("POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nagain")
        for i in 0..<3 {
            pushes.last?.send("line \(i)\n")
            let got = try await blocking { socket.socket.readUntil("line \(i)\n") }
            #expect(got.contains("line \(i)\n"), "\(got)")
        }
        // Its end ends the answer, and the connection: nothing answers the dropped request.
        pushes.last?.end()
        let last = try await blocking { socket.socket.readAll() }
        #expect(last.hasSuffix("0\r\n\r\n"), "\(last)")
        #expect(!last.contains("again"), "\(last)")
        #expect(await eventually { server.connectionCount == 0 })
        await group.triggerGracefulShutdown()
        try await task.value
    }

    @Test func theNextRequestOnAKeptAliveConnectionEndsAPushedBodyAndIsAnsweredAfterIt() async throws {
        let pushes = PushFeeds()
        let (server, group, task, port) = try await startServer(pushes: pushes)
        let socket = SendableSocket(try RawSocket(port: port, timeout: 10))
        let head = try await blocking {
            socket.socket.send("GET /push HTTP/1.1\r\nHost: t\r\n\r\n")
            return socket.socket.readUntil("\r\n\r\n")
        }
        #expect(head.hasPrefix("HTTP/1.1 200") && head.lowercased().contains("transfer-encoding: chunked"), "\(head)")
        #expect(!head.lowercased().contains("connection: close"), "\(head)")
        #expect(await eventually { pushes.last?.state.withLock { $0.started } == true })
        let first = pushes.last!
        first.send("line 0\n")
        let line = try await blocking { socket.socket.readUntil("line 0\n") }
        #expect(line.contains("line 0\n"), "\(line)")
        #expect(await eventually { server.requestsInFlight == 0 })
        // The next request ends the pushed body (stopped once), then is answered on the same connection.
        let answer = try await blocking {
            socket.socket.send("POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nagain")
            return socket.socket.readUntil("again")
        }
        #expect(first.state.withLock { $0.stops } == 1)
        let end = answer.range(of: "0\r\n\r\n")
        let reply = answer.range(of: "HTTP/1.1 200")
        #expect(end != nil && reply != nil && end!.upperBound <= reply!.lowerBound, "\(answer)")
        #expect(answer.hasSuffix("again"), "\(answer)")
        // The decoder is back: another pushed body on the same connection, then its own end keeps the connection.
        let second = try await blocking {
            socket.socket.send("GET /push HTTP/1.1\r\nHost: t\r\n\r\n")
            return socket.socket.readUntil("\r\n\r\n")
        }
        #expect(second.hasPrefix("HTTP/1.1 200"), "\(second)")
        #expect(await eventually { pushes.count == 2 && pushes.last?.state.withLock { $0.started } == true })
        pushes.last?.send("line 1\n")
        pushes.last?.end()
        let rest = try await blocking { socket.socket.readUntil("0\r\n\r\n") }
        #expect(rest.contains("line 1\n") && rest.hasSuffix("0\r\n\r\n"), "\(rest)")
        #expect(pushes.last?.state.withLock { $0.stops } == 0)
        #expect(server.connectionCount == 1)
        // HEAD on the decoder that came back: the length without the body (the next answer starts clean).
        let headOnly = try await blocking {
            socket.socket.send("HEAD /port HTTP/1.1\r\nHost: t\r\n\r\n")
            return socket.socket.readUntil("\r\n\r\n")
        }
        #expect(headOnly.hasPrefix("HTTP/1.1 200") && headOnly.lowercased().contains("content-length:"), "\(headOnly)")
        let third = try await blocking {
            socket.socket.send("POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nConnection: close\r\n\r\nlast")
            return socket.socket.readAll()
        }
        #expect(third.hasPrefix("HTTP/1.1 200") && third.hasSuffix("last"), "\(third)")
        #expect(await eventually { server.connectionCount == 0 })
        await group.triggerGracefulShutdown()
        try await task.value
    }

    @Test("pushed bodies woken together from another thread (a change reaching every watch) are all written")
    func pushedBodiesWokenTogetherAreAllWritten() async throws {
        let pushes = PushFeeds()
        let (server, group, task, port) = try await startServer(pushes: pushes)
        let sockets = try (0..<40).map { _ in SendableSocket(try RawSocket(port: port, timeout: 10)) }
        for socket in sockets {
            _ = try await blocking {
                socket.socket.send("GET /push HTTP/1.1\r\nHost: t\r\n\r\n")
                return socket.socket.readUntil("\r\n\r\n")
            }
        }
        #expect(await eventually { pushes.count == 40 && server.requestsInFlight == 0 })
        let feeds = pushes.feeds.withLock { $0 }
        for round in 0..<3 {
            // Every feed woken in one burst, twice each, from a thread that is not the loops'.
            try await blocking {
                for (i, feed) in feeds.enumerated() {
                    feed.send("round \(round) feed \(i) a\n")
                    feed.send("round \(round) feed \(i) b\n")
                }
            }
            for (i, socket) in sockets.enumerated() {
                let got = try await blocking { socket.socket.readUntil("round \(round) feed \(i) b\n") }
                #expect(got.contains("round \(round) feed \(i) a\n"), "\(got)")
                #expect(got.contains("round \(round) feed \(i) b\n"), "\(got)")
            }
        }
        await group.triggerGracefulShutdown()
        try await task.value
    }

    @Test func aClientThatHalfClosesAfterItsRequestGetsTheAnswerThenTheConnectionCloses() async throws {
        let (server, group, task, port) = try await startServer()
        let socket = SendableSocket(try RawSocket(port: port, timeout: 30))
        socket.socket.send("POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n\r\nlast")
        socket.socket.shutdownWrite()
        let answer = try await blocking { socket.socket.readAll() }
        #expect(answer.hasPrefix("HTTP/1.1 200") && answer.hasSuffix("last"), "\(answer)")
        // Closed after the answer, not left to the idle timeout (120 s).
        #expect(await eventually { server.connectionCount == 0 })
        await group.triggerGracefulShutdown()
        try await task.value
    }

    @Test func pushedBodiesStopWhenTheirClientLeavesAndWhenTheServerShutsDown() async throws {
        let pushes = PushFeeds()
        let (server, group, task, port) = try await startServer(pushes: pushes)
        // The client leaves: its source is stopped, and the connection goes.
        _ = try await blocking {
            let s = try RawSocket(port: port, timeout: 10)
            s.send("GET /push HTTP/1.1\r\nHost: t\r\n\r\n")
            return s.readUntil("\r\n\r\n")
        }  // the socket closes here
        #expect(await eventually { pushes.last?.state.withLock { $0.stops } ?? 0 >= 1 })
        #expect(await eventually { server.connectionCount == 0 })
        // A shutdown stops the one under way: its answer ends with the last chunk, and the server stops.
        let socket = SendableSocket(try RawSocket(port: port, timeout: 10))
        _ = try await blocking {
            socket.socket.send("GET /push HTTP/1.1\r\nHost: t\r\n\r\n")
            return socket.socket.readUntil("\r\n\r\n")
        }
        #expect(await eventually { pushes.count == 2 && pushes.last?.state.withLock { $0.started } == true })
        await group.triggerGracefulShutdown()
        try await task.value
        let rest = try await blocking { socket.socket.readAll() }
        #expect(rest.hasSuffix("0\r\n\r\n"), "\(rest)")
        #expect(pushes.last?.state.withLock { $0.stops } ?? 0 >= 1)
        #expect(server.connectionCount == 0)
    }

    @Test func shutdownEndsStreamsAndClosesIdleConnections() async throws {
        let counter = StreamCounter()
        let (server, group, task, port) = try await startServer(
            configure: { $0.drainTimeout = .seconds(1) },
            counter: counter
        )
        let reader = Task {
            try await blocking {
                let s = try RawSocket(port: port, timeout: 10)
                s.send("GET /stream HTTP/1.1\r\nHost: t\r\n\r\n")
                return s.readAll()
            }
        }
        #expect(await eventually { counter.running.load(ordering: .relaxed) == 1 })
        // The stream writes 10,000 ticks (100 s) on its own: the drain ended it when the body stops
        // short of the last tick (counted, not timed, so load cannot break it).
        await group.triggerGracefulShutdown()
        try await task.value
        let body = try await reader.value
        #expect(!body.contains("tick 9999\n"), "the stream ran to its end: the drain did not stop it")
        #expect(body.hasSuffix("0\r\n\r\n"), "the stream ends with the last chunk: \(body.suffix(40))")
        #expect(counter.running.load(ordering: .relaxed) == 0)
        #expect(server.connectionCount == 0)
    }

    @Test func connectionLimit() async throws {
        let (server, group, task, port) = try await startServer(configure: { $0.maxConnections = 1 })
        // A connection that has sent a request keeps its slot.
        let first = try await blocking {
            let s = try RawSocket(port: port, timeout: 5)
            s.send("GET /echo HTTP/1.1\r\nHost: t\r\n\r\n")
            _ = s.readFirstResponse()
            return SendableSocket(s)
        }
        #expect(await eventually { server.connectionCount == 1 })
        let second = try await blocking {
            let s = try RawSocket(port: port, timeout: 5)
            s.send("GET /echo HTTP/1.1\r\nHost: t\r\n\r\n")
            return s.readAll()
        }
        #expect(second.hasPrefix("HTTP/1.1 503"))
        withExtendedLifetime(first) {}
        await group.triggerGracefulShutdown()
        try await task.value
    }

    @Test func aSilentConnectionGivesItsSlotToANewOne() async throws {
        let (server, group, task, port) = try await startServer(configure: { $0.maxConnections = 1 })
        // Connected, but not a byte sent: the first to go when the slots are full.
        let silent = SendableSocket(try RawSocket(port: port))
        #expect(await eventually { server.connectionCount == 1 })
        let answer = try await blocking {
            let s = try RawSocket(port: port, timeout: 5)
            s.send("GET /echo HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            return s.readAll()
        }
        #expect(answer.hasPrefix("HTTP/1.1 200"), "\(answer)")
        #expect(server.evictedConnections == 1)
        #expect(try await blocking { silent.socket.isClosedByPeer() })
        await group.triggerGracefulShutdown()
        try await task.value
    }

    @Test func bindFailureIsReported() async throws {
        let (_, group, task, port) = try await startServer()
        var config = HTTPServerConfiguration()
        config.port = port
        let second = HTTPServer(
            configuration: config,
            responder: ClosureResponder { _ in .text(.ok, "") },
            logger: Logger(label: "t")
        )
        let run = Task { try await second.run() }
        await #expect(throws: (any Error).self) { try await second.localAddress() }
        await #expect(throws: (any Error).self) { try await run.value }
        await group.triggerGracefulShutdown()
        try await task.value
    }
}

@Suite(.rationed) struct RequestParsingTests {
    @Test func pathsAndQueriesAreDecoded() {
        let r = HTTPRequest(method: .GET, uri: "/a%20b/c?watch=true&labelSelector=app%3Dweb%2Ctier&x=1+2&flag")
        #expect(r.path == "/a b/c")
        #expect(r.query == ["watch": "true", "labelSelector": "app=web,tier", "x": "1 2", "flag": ""])
        #expect(HTTPRequest.percentDecode("%zz", plusIsSpace: false) == nil)
        #expect(HTTPRequest.percentDecode("%ff", plusIsSpace: false) == nil)
        #expect(HTTPRequest.percentEncode("a b/c=d") == "a%20b%2Fc%3Dd")
    }

    @Test func endpoints() {
        #expect(HTTPEndpoint(url: "http://127.0.0.1:7700") == HTTPEndpoint(host: "127.0.0.1", port: 7700))
        #expect(HTTPEndpoint(url: "[::1]:7700/") == HTTPEndpoint(host: "::1", port: 7700))
        #expect(HTTPEndpoint(url: "http://127.0.0.1:0") == nil)
        #expect(HTTPEndpoint(url: "https://x/y") == nil)
        #expect(HTTPEndpoint(url: "https://[::1]:7700") == HTTPEndpoint(host: "::1", port: 7700, tls: true))
        #expect(HTTPEndpoint(url: "127.0.0.1:7700", defaultTLS: true)?.tls == true)
        #expect(HTTPEndpoint(url: "https://mesh.example")?.port == 443)
        #expect(HTTPEndpoint(host: "::1", port: 1, tls: true).description == "https://[::1]:1")
        #expect(HTTPEndpoint(host: "::1", port: 1).description == "http://[::1]:1")
    }
}

/// A socket handed to a blocking thread and back (only one thread uses it at a time).
final class SendableSocket: @unchecked Sendable {
    let socket: RawSocket
    init(_ socket: RawSocket) { self.socket = socket }
}
