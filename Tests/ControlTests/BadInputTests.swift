import Control
import Foundation
import MeshClient
import MeshCore
import MeshHTTP
import MeshTestSupport
import NIOCore
import Testing

/// Every bad request gets a 4xx Status saying what is wrong; the store is unchanged and the server
/// keeps serving.
@Suite(.rationed) struct BadInputTests {
    static let servicePath = "/apis/mesh.edge/v1/namespaces/shop/services/web"

    /// Sends raw bytes and returns the HTTP status code and the Status message of the answer.
    func exchange(
        _ cp: RunningControl,
        _ request: String,
        halfClose: Bool = false
    ) async throws -> (code: Int, message: String) {
        let port = cp.port
        let tls = try cp.adminTLS()
        let reply = try await blocking {
            let socket = try TLSRawSocket(port: port, timeout: 30, tls: tls)
            socket.send(request)
            if halfClose { socket.shutdownWrite() }
            return socket.readFirstResponse()
        }
        let code = Int(reply.split(separator: " ").dropFirst().first ?? "") ?? 0
        let body = reply.components(separatedBy: "\r\n\r\n").dropFirst().joined(separator: "\r\n\r\n")
        let status = try? JSONDecoder().decode(Status.self, from: Data(body.utf8))
        return (code, status?.message ?? "<no Status body: \(reply.prefix(200))>")
    }

    func put(
        _ body: String,
        path: String = BadInputTests.servicePath,
        contentType: String = "application/json"
    ) -> String {
        "PUT \(path) HTTP/1.1\r\nHost: t\r\nContent-Type: \(contentType)\r\nContent-Length: \(body.utf8.count)\r\n\r\n\(body)"
    }

    func expectUnchangedAndServing(_ cp: RunningControl, rv: Int64) async throws {
        #expect(try await cp.rv() == rv)
        #expect(try await cp.client.list(MeshService.self).items.map(\.metadata.name) == ["keep"])
    }

    static let valid =
        #"{"apiVersion":"mesh.edge/v1","kind":"Service","metadata":{"name":"web"},"spec":{"ports":[{"port":80}]}}"#

    @Test func badBodiesGetClearErrorsAndChangeNothing() async throws {
        let cp = try await RunningControl()
        try await cp.client.apply(service("keep"))
        let rv = try await cp.rv()
        let cases: [(String, String, Int, String)] = [
            ("malformed JSON", self.put(#"{"apiVersion": "mesh.edge/v1", "kind": "#), 400, "malformed JSON"),
            ("not an object", self.put("[1,2]"), 400, "must be a JSON object"),
            (
                "nested 10,000 deep (the limit meshctl shares)",
                self.put(
                    #"{"apiVersion":"mesh.edge/v1","kind":"Service","spec":"#
                        + String(repeating: #"{"a":"#, count: 10_000) + "1" + String(repeating: "}", count: 10_001)
                ), 400, "malformed JSON: lists and objects nest deeper than 100 levels"
            ),
            ("empty body", self.put(""), 400, "has no body"),
            (
                "unknown field",
                self.put(Self.valid.replacingOccurrences(of: #""spec":{"#, with: #""spec":{"portz":1,"#)), 400,
                "spec.portz: unknown field"
            ),
            (
                "wrong type", self.put(Self.valid.replacingOccurrences(of: #""port":80"#, with: #""port":"80""#)), 400,
                "spec.ports[0].port: expected a number"
            ),
            (
                "invalid value", self.put(Self.valid.replacingOccurrences(of: #""port":80"#, with: #""port":0"#)), 422,
                "spec.ports[0].port: must be 1-65535"
            ),
            (
                "invalid name",
                self.put(
                    Self.valid.replacingOccurrences(of: #""name":"web""#, with: #""name":"Web_1""#),
                    path: "/apis/mesh.edge/v1/namespaces/shop/services/Web_1"
                ), 422,
                "metadata.name: invalid character"
            ),
            (
                "name mismatch", self.put(Self.valid, path: "/apis/mesh.edge/v1/namespaces/shop/services/other"), 400,
                "does not match the name in the URL"
            ),
            (
                "kind mismatch", self.put(Self.valid, path: "/apis/mesh.edge/v1/namespaces/shop/endpoints/web"), 400,
                "does not belong under /endpoints"
            ),
            (
                "unknown kind", self.put(Self.valid, path: "/apis/mesh.edge/v1/namespaces/shop/gadgets/web"), 404,
                "no resource \"gadgets\""
            ),
            (
                "bad namespace", self.put(Self.valid, path: "/apis/mesh.edge/v1/namespaces/Shop!/services/web"), 400,
                "namespace \"Shop!\" is invalid"
            ),
            ("not JSON", self.put("kind: Service", contentType: "application/yaml"), 415, "send JSON"),
            (
                "bad method", "PATCH \(Self.servicePath) HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n", 405,
                "is not allowed here"
            ),
            (
                "bad selector", "GET /apis/mesh.edge/v1/services?labelSelector=a,,b HTTP/1.1\r\nHost: t\r\n\r\n", 400,
                "empty term"
            ),
            (
                "bad watch version",
                "GET /apis/mesh.edge/v1/services?watch=1&resourceVersion=-3 HTTP/1.1\r\nHost: t\r\n\r\n", 400,
                "not a decimal number"
            ),
        ]
        for (what, request, code, message) in cases {
            let (got, text) = try await self.exchange(cp, request)
            #expect(got == code, "\(what): \(text)")
            #expect(text.contains(message), "\(what): \(text)")
        }
        try await self.expectUnchangedAndServing(cp, rv: rv)
        try await cp.stop()
    }

    @Test func oversizedBodiesAreRefusedBeforeTheyAreRead() async throws {
        let cp = try await RunningControl { $0.maxBodyBytes = 4096 }
        try await cp.client.apply(service("keep"))
        let rv = try await cp.rv()
        // Declared too large: refused from the header alone.
        var (code, message) = try await self.exchange(
            cp,
            "PUT \(Self.servicePath) HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"
        )
        #expect(code == 413)
        #expect(message.contains("over the limit of 4096"))
        // Chunked and growing past the limit.
        let chunk = String(repeating: "x", count: 3000)
        let hex = String(chunk.utf8.count, radix: 16)
        (code, message) = try await self.exchange(
            cp,
            "PUT \(Self.servicePath) HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                + "\(hex)\r\n\(chunk)\r\n\(hex)\r\n\(chunk)\r\n0\r\n\r\n"
        )
        #expect(code == 413)
        try await self.expectUnchangedAndServing(cp, rv: rv)
        try await cp.stop()
    }

    @Test func truncatedAndStalledBodies() async throws {
        let cp = try await RunningControl { $0.requestTimeoutSeconds = 1 }
        try await cp.client.apply(service("keep"))
        let rv = try await cp.rv()
        let head =
            "PUT \(Self.servicePath) HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        // The client ends its side in the middle of a chunk.
        var (code, message) = try await self.exchange(cp, head + "40\r\n{\"apiVersion\":", halfClose: true)
        #expect(code == 400)
        #expect(message.contains("ended before its body was complete"))
        // The client stops sending in the middle of a chunk and waits.
        (code, message) = try await self.exchange(cp, head + "40\r\n{\"apiVersion\":")
        #expect(code == 408)
        #expect(message.contains("timed out after 1s"))
        // A chunk header that is not hex.
        (code, message) = try await self.exchange(cp, head + "zz\r\nabc\r\n0\r\n\r\n")
        #expect(code == 400)
        #expect(message.contains("malformed HTTP request"))
        // Content-Length promises more than arrives before the client half-closes.
        (code, message) = try await self.exchange(
            cp,
            "PUT \(Self.servicePath) HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{\"a\"",
            halfClose: true
        )
        #expect(code == 400)
        try await self.expectUnchangedAndServing(cp, rv: rv)
        try await cp.stop()
    }

    @Test func garbageAndHugeHeaders() async throws {
        let cp = try await RunningControl()
        try await cp.client.apply(service("keep"))
        let rv = try await cp.rv()
        var (code, message) = try await self.exchange(cp, "\u{01}\u{02}GARBAGE \u{7f}\r\n\r\n")
        #expect(code == 400)
        #expect(message.contains("malformed HTTP request"))
        (code, message) = try await self.exchange(
            cp,
            "GET / HTTP/1.1\r\nX-Big: \(String(repeating: "a", count: 100_000))\r\n\r\n"
        )
        #expect(code == 431)
        #expect(message.contains("too large"))
        // Random bytes, many times over: the server answers or closes, and lives.
        var generator = SystemRandomNumberGenerator()
        let port = cp.port
        let tls = try cp.adminTLS()
        for _ in 0..<50 {
            let junk = (0..<Int.random(in: 1...2000, using: &generator)).map { _ in
                UInt8.random(in: 0...255, using: &generator)
            }
            _ = try await blocking {
                let socket = try TLSRawSocket(port: port, timeout: 30, tls: tls)
                socket.send(junk)
                socket.shutdownWrite()
                return socket.readAll()
            }
        }
        try await self.expectUnchangedAndServing(cp, rv: rv)
        try await cp.stop()
    }

    @Test func idleAndSilentConnectionsAreClosed() async throws {
        // The request timeout is ten minutes: a close the sockets see within their 60 s can only be the
        // 1 s idle timeout (no bound on the elapsed time, which load could break).
        let cp = try await RunningControl {
            $0.idleTimeoutSeconds = 1
            $0.requestTimeoutSeconds = 600
        }
        let port = cp.port
        let tls = try cp.adminTLS()
        let closed = try await blocking {
            let silent = try TLSRawSocket(port: port, timeout: 60, tls: tls)
            // A slow-loris client that never finishes its head.
            let dribbler = try TLSRawSocket(port: port, timeout: 60, tls: tls)
            dribbler.send("GET /healthz HTTP/1.1\r\nX-A: ")
            return (silent.isClosedByPeer(), dribbler.isClosedByPeer())
        }
        #expect(closed == (true, true))
        #expect(await eventually { (try? await cp.client.http.send(.GET, "/healthz").status) == .ok })
        try await cp.stop()
    }
}
