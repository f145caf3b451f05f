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
}
