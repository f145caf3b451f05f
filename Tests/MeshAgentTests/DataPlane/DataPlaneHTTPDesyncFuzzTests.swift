import MeshTestSupport
import NIOCore
import Testing

@testable import MeshAgent

/// Random pairs of requests and random backend responses (clean or hostile: bytes behind the end, a body on a
/// 204/304, an unsolicited 101, a malformed head, a body until close...) over one pooled upstream connection
/// (one event loop, one backend), from a seeded generator with a bounded number of rounds. Each response carries
/// its request's marker `M<i>M`; the hostile bytes behind it carry `X<i>X`. Every client must get its own
/// response(s) or an error, never a marker of another request and never a hostile byte.
@Suite("Data plane: HTTP desync fuzz over one pooled connection (seeded)", .timeLimit(.minutes(2)), .rationed)
struct DataPlaneHTTPDesyncFuzzTests {
    enum Kind: CaseIterable {
        case length, chunked, interimThenLength, nonCanonicalLength, untilClose
        case noContentWithBytes, longerThanLength, notModifiedWithBody, unsolicited101, malformed, chunkedWithBytes

        /// The client must get its response (not an error).
        var isClean: Bool {
            switch self {
            case .length, .chunked, .interimThenLength, .nonCanonicalLength, .untilClose: return true
            default: return false
            }
        }
    }

    static func response(_ kind: Kind, _ i: Int) -> String {
        let own = "M\(i)M"
        let hostile = "HTTP/1.1 200 OK\r\nContent-Length: \("X\(i)X".utf8.count)\r\n\r\nX\(i)X"
        let length = "HTTP/1.1 200 OK\r\nContent-Length: \(own.utf8.count)\r\n\r\n\(own)"
        let chunked =
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\(String(own.utf8.count, radix: 16))\r\n\(own)\r\n0\r\n\r\n"
        switch kind {
        case .length: return length
        case .chunked: return chunked
        case .interimThenLength: return "HTTP/1.1 100 Continue\r\n\r\n" + length
        case .nonCanonicalLength: return "HTTP/1.1 200 OK\r\nContent-Length: 0\(own.utf8.count)\r\n\r\n\(own)"
        case .untilClose: return "HTTP/1.1 200 OK\r\nX-Id: \(own)\r\n\r\n\(own)"
        case .noContentWithBytes: return "HTTP/1.1 204 No Content\r\nX-Id: \(own)\r\n\r\n" + hostile
        case .longerThanLength: return length + hostile
        case .notModifiedWithBody: return "HTTP/1.1 304 Not Modified\r\nX-Id: \(own)\r\n\r\n" + hostile
        case .unsolicited101:
            return "HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n" + hostile
        case .malformed: return "HTTP/1.1 2x0 OK\r\nX-Id: \(own)\r\n\r\n" + hostile
        case .chunkedWithBytes: return chunked + hostile
        }
    }

    @Test("200 random pairs: each client gets exactly its own response or an error", arguments: HTTPEngine.allCases)
    func randomPairs(engine: HTTPEngine) async throws {
        try await TestEngine.$current.withValue(engine) {
            var rng = SplitMix(seed: 0xdec0de)
            let rounds = 100
            var kinds: [Kind] = []
            var responses: [String: String] = [:]
            for i in 0..<(2 * rounds) {
                let kind = Kind.allCases.randomElement(using: &rng)!
                kinds.append(kind)
                responses["/f/\(i)"] = Self.response(kind, i)
            }
            var pipelinedRounds = 0
            try await withSingleLoopProxy(responses) { address, _ in
                for round in 0..<rounds {
                    let ids = [2 * round, 2 * round + 1]
                    func request(_ i: Int, last: Bool) -> String {
                        let path = kinds[i] == .untilClose ? "/close/f/\(i)" : "/f/\(i)"
                        let close = last ? "Connection: close\r\n" : ""
                        return Bool.random(using: &rng)
                            ? "GET \(path) HTTP/1.1\r\nHost: x\r\n\(close)\r\n"
                            : "POST \(path) HTTP/1.1\r\nHost: x\r\n\(close)Content-Length: 3\r\n\r\nabc"
                    }
                    var received: [(ids: [Int], text: String)] = []
                    if Bool.random(using: &rng) {
                        // Both on one client connection, pipelined.
                        pipelinedRounds += 1
                        let text = try await RawClient.send(
                            address,
                            Array((request(ids[0], last: false) + request(ids[1], last: true)).utf8)
                        )
                        received.append((ids, text))
                    } else {
                        for i in ids {
                            received.append(
                                ([i], try await RawClient.send(address, Array(request(i, last: true).utf8)))
                            )
                        }
                    }
                    for (own, text) in received {
                        var searchFrom = text.startIndex
                        for i in 0..<(2 * rounds) {
                            #expect(
                                !text.contains("X\(i)X"),
                                "round \(round): \(own) got hostile X\(i)X: \(text.debugDescription)"
                            )
                            if !own.contains(i) {
                                #expect(
                                    !text.contains("M\(i)M"),
                                    "round \(round): \(own) got M\(i)M: \(text.debugDescription)"
                                )
                            }
                        }
                        for i in own {
                            // A clean response reaches its client, in order, unless one before it on the same connection
                            // ended that connection (an error, or a body until close).
                            let earlier = own.prefix { $0 != i }
                            let mayBeCut = earlier.contains { !kinds[$0].isClean || kinds[$0] == .untilClose }
                            guard kinds[i].isClean, !mayBeCut else { continue }
                            let found = text[searchFrom...].range(of: "M\(i)M")
                            #expect(
                                found != nil,
                                "round \(round): \(i) (\(kinds[i])) missing: \(text.debugDescription)"
                            )
                            if let found { searchFrom = found.upperBound }
                        }
                    }
                }
            }
            #expect(pipelinedRounds > 10 && pipelinedRounds < 90)
        }
    }
}
