import Logging
import MeshHTTP
import MeshTestSupport
import NIOCore
import Testing

import class ServiceLifecycle.ServiceGroup

/// `HTTPKeepAliveClient` against a real server: one connection for many requests, and a new one,
/// transparently, after the server closed the idle one.
@Suite(.rationed) struct KeepAliveClientTests {
    /// A server answering each request with the client's port (which tells connections apart).
    func start(idle: TimeAmount) async throws -> (ServiceGroup, Task<Void, any Error>, Int, HTTPServer) {
        var config = HTTPServerConfiguration()
        config.idleTimeout = idle
        var logger = Logger(label: "test")
        logger.logLevel = .warning
        let server = HTTPServer(
            configuration: config,
            responder: ClosureResponder { request in .text(.ok, "\(request.remoteAddress?.port ?? 0)") },
            logger: logger
        )
        let group = ServiceGroup(configuration: .init(services: [.init(service: server)], logger: logger))
        let task = Task { try await group.run() }
        return (group, task, try await server.localAddress().port!, server)
    }

    @Test func requestsShareOneConnectionAndSurviveTheServerClosingIt() async throws {
        // An idle timeout well above the stalls a loaded 2-core CI machine shows between two requests; the
        // server closes an idle connection between one and two timeouts after its last request.
        let (group, task, port, server) = try await self.start(idle: .seconds(1))
        let client = HTTPKeepAliveClient(HTTPClient(endpoint: HTTPEndpoint(host: "127.0.0.1", port: port)))
        var ports: Set<String> = []
        // A machine too busy to send the next request within the idle timeout lets the server close the
        // connection in between: each such gap may cost one more connection, and nothing else may.
        var slowGaps = 0
        var last = ContinuousClock.now
        for _ in 0..<20 {
            let r = try await client.send(.POST, "/beat")
            // From the previous answer to this one: the longest the connection can have been idle.
            if ContinuousClock.now - last >= .milliseconds(900) { slowGaps += 1 }
            last = ContinuousClock.now
            #expect(r.status == .ok)
            ports.insert(String(buffer: r.body))
        }
        #expect(ports.count <= 1 + slowGaps, "\(ports.count) connections with \(slowGaps) gaps over the idle timeout")
        // The server closes the idle connection; the next request opens another, without an error.
        #expect(await eventually(timeout: .seconds(30)) { server.connectionCount == 0 })
        let after = try await client.send(.GET, "/beat")
        #expect(after.status == .ok && !ports.contains(String(buffer: after.body)))
        client.close()
        await group.triggerGracefulShutdown()
        try await task.value
        // Nobody listens: a clear error, not a hang.
        await #expect(throws: HTTPClientError.self) { _ = try await client.send(.GET, "/beat") }
    }

    /// What an agent does with its one connection: a watch (a pushed body) read while requests come; each request
    /// ends the body for a moment and is answered on the same connection, and the next watch follows on it.
    @Test func requestsGoBehindAStreamOnTheSameConnection() async throws {
        let pushes = PushFeeds()
        let (server, group, task, port) = try await startServer(pushes: pushes)
        let client = HTTPKeepAliveClient(HTTPClient(endpoint: HTTPEndpoint(host: "127.0.0.1", port: port)))
        let firstPort = String(buffer: try await client.send(.GET, "/port").body)
        for round in 0..<3 {
            // The stream's reader, in a task of its own: it reads lines until the body ends.
            let reader = Task {
                try await client.stream(.GET, "/push") { head, body -> [String] in
                    #expect(head.status == .ok)
                    var lines: [String] = []
                    while let line = try await body.nextLine() { lines.append(String(buffer: line)) }
                    return lines
                }
            }
            #expect(
                await eventually { pushes.count == round + 1 && pushes.last?.state.withLock { $0.started } == true }
            )
            let feed = pushes.last!
            feed.send("event \(round)\n")
            // A request while the stream is read: the server ends the stream, then answers on the same connection.
            let answer = try await client.send(.GET, "/port")
            #expect(String(buffer: answer.body) == firstPort)
            #expect(try await reader.value == ["event \(round)"])
            #expect(feed.state.withLock { $0.stops } == 1)
        }
        #expect(server.connectionCount == 1)
        client.close()
        await group.triggerGracefulShutdown()
        try await task.value
    }

    /// A stream's reader that stops before the end (a consumer's failure, a cancelled watcher) while a request
    /// waits behind it: the connection cannot be read on, so the request fails, once and in words, and the next
    /// one goes over a new connection.
    @Test func aStreamLeftUnreadFailsTheRequestBehindItOnceAndTheNextGoesOnANewConnection() async throws {
        let pushes = PushFeeds()
        let (server, group, task, port) = try await startServer(pushes: pushes)
        let client = HTTPKeepAliveClient(HTTPClient(endpoint: HTTPEndpoint(host: "127.0.0.1", port: port)))
        let firstPort = String(buffer: try await client.send(.GET, "/port").body)
        let reader = Task {
            try await client.stream(.GET, "/push") { _, body -> String? in
                let line = try await body.nextLine().map { String(buffer: $0) }
                // Leaves once the server has been asked for more (the request behind it is written), unread.
                _ = await eventually { pushes.last?.state.withLock { $0.stops } == 1 }
                return line
            }
        }
        #expect(await eventually { pushes.last?.state.withLock { $0.started } == true })
        pushes.last?.send("event\n")
        await #expect(throws: HTTPClientError.self) { _ = try await client.send(.GET, "/port") }
        #expect(try await reader.value == "event")
        let after = try await client.send(.GET, "/port")
        #expect(after.status == .ok && String(buffer: after.body) != firstPort)
        client.close()
        #expect(await eventually { server.connectionCount == 0 })
        await group.triggerGracefulShutdown()
        try await task.value
    }

    /// A server that closes a stream's connection (`Connection: close`): a request sent meanwhile goes over a
    /// new connection at once, and the stream goes on to its end.
    @Test func aStreamOnAConnectionTheServerClosesLeavesRequestsToAnother() async throws {
        let pushes = PushFeeds()
        let (server, group, task, port) = try await startServer(pushes: pushes)
        let client = HTTPKeepAliveClient(HTTPClient(endpoint: HTTPEndpoint(host: "127.0.0.1", port: port)))
        let reader = Task {
            try await client.stream(.GET, "/push", headers: ["Connection": "close"]) { _, body -> [String] in
                var lines: [String] = []
                while let line = try await body.nextLine() { lines.append(String(buffer: line)) }
                return lines
            }
        }
        #expect(await eventually { pushes.last?.state.withLock { $0.started } == true })
        let answer = try await client.send(.GET, "/port")
        #expect(answer.status == .ok)
        #expect(server.connectionCount == 2)
        let feed = pushes.last!
        #expect(feed.state.withLock { $0.stops } == 0)
        feed.send("still here\n")
        feed.end()
        #expect(try await reader.value == ["still here"])
        client.close()
        await group.triggerGracefulShutdown()
        try await task.value
    }
}
