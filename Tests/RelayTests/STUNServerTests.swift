import MeshCore
import MeshTestSupport
import MetricsTestKit
import NIOCore
import NIOPosix
import Testing

@testable import Relay

/// A STUN server on loopback ports picked by the system, stopped by `stop()`.
struct RunningSTUN {
    let server: STUNServer
    let task: Task<Void, any Error>
    let metrics: TestMetrics
    let listeners: [STUNListener]

    static func start(hosts: [String] = ["127.0.0.1", "::1"]) async throws -> RunningSTUN {
        let metrics = TestMetrics()
        let server = STUNServer(
            configuration: STUNServerConfiguration(
                listen: hosts.map { ListenAddress(host: $0, port: 0) },
                policy: STUNResponderPolicy(software: "test")
            ),
            metricsFactory: metrics
        )
        let task = Task { try await server.run() }
        return RunningSTUN(server: server, task: task, metrics: metrics, listeners: try await server.listeners())
    }

    func stop() async {
        self.task.cancel()
        _ = try? await self.task.value
    }

    func counter(_ label: String, _ dims: [(String, String)] = []) throws -> Int64 {
        try self.metrics.expectCounter(label, dims).totalValue
    }
}

func bindingRequest(_ id: STUNTransactionID = .random(), fingerprint: Bool = true) -> [UInt8] {
    try! STUNMessage(type: .bindingRequest, transactionID: id, attributes: fingerprint ? [.fingerprint] : []).encode()
}

/// Sends datagrams from a fresh socket on `host` and collects `replies` answers.
func udpExchange(
    _ server: SocketAddress,
    from host: String,
    _ datagrams: [[UInt8]],
    replies: Int
) async throws -> (local: SocketAddress, replies: [[UInt8]]) {
    let channel = try await DatagramBootstrap(group: MultiThreadedEventLoopGroup.singleton)
        .bind(host: host, port: 0) { ch in
            ch.eventLoop.makeCompletedFuture {
                try NIOAsyncChannel<AddressedEnvelope<ByteBuffer>, AddressedEnvelope<ByteBuffer>>(
                    wrappingChannelSynchronously: ch
                )
            }
        }
    let local = channel.channel.localAddress!
    let got = try await channel.executeThenClose { inbound, outbound in
        for d in datagrams {
            try await outbound.write(AddressedEnvelope(remoteAddress: server, data: ByteBuffer(bytes: d)))
        }
        var out: [[UInt8]] = []
        for try await envelope in inbound {
            out.append(Array(buffer: envelope.data))
            if out.count == replies { break }
        }
        return out
    }
    return (local, got)
}

/// Writes `chunks` on one TCP connection (each flushed alone) and reads framed answers until
/// `replies` arrived or the server closed the connection.
func tcpExchange(
    _ server: SocketAddress,
    _ chunks: [[UInt8]],
    replies: Int
) async throws -> (local: SocketAddress, replies: [[UInt8]], closed: Bool) {
    let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
        .connect(to: server) { ch in
            ch.eventLoop.makeCompletedFuture {
                try NIOAsyncChannel<ByteBuffer, ByteBuffer>(wrappingChannelSynchronously: ch)
            }
        }
    let local = channel.channel.localAddress!
    return try await channel.executeThenClose { inbound, outbound in
        for c in chunks { try await outbound.write(ByteBuffer(bytes: c)) }
        var pending: [UInt8] = []
        var out: [[UInt8]] = []
        var iterator = inbound.makeAsyncIterator()
        while out.count < replies {
            guard let buffer = try await iterator.next() else { return (local, out, true) }
            pending += Array(buffer: buffer)
            while let n = pending.withUnsafeBytes({ try? STUNMessage.frameLength($0) }), pending.count >= n {
                out.append(Array(pending[..<n]))
                pending.removeFirst(n)
            }
        }
        return (local, out, false)
    }
}

@Suite("STUN server over real sockets", .timeLimit(.minutes(1)), .rationed) struct STUNServerTests {
    @Test("UDP over IPv4 and IPv6: the answer carries the client's own address and the server's")
    func udpBothFamilies() async throws {
        let s = try await RunningSTUN.start()
        for (listener, host) in zip(s.listeners, ["127.0.0.1", "::1"]) {
            let id = STUNTransactionID.random()
            let (local, replies) = try await udpExchange(listener.udp, from: host, [bindingRequest(id)], replies: 1)
            let m = try STUNMessage.decode(replies[0])
            #expect(m.type == .bindingSuccess && m.transactionID == id)
            #expect(m.first(STUNAttributeType.xorMappedAddress) == .xorMappedAddress(STUNAddress(local)!))
            #expect(m.first(STUNAttributeType.responseOrigin) == .responseOrigin(STUNAddress(listener.udp)!))
            #expect(m.attributes.suffix(2) == [.software("test"), .fingerprint])
        }
        // RFC 3489 clients get MAPPED-ADDRESS.
        let (local, replies) = try await udpExchange(s.listeners[0].udp, from: "127.0.0.1", [vovidaRequest], replies: 1)
        #expect(try STUNMessage.decode(replies[0]).attributes.first == .mappedAddress(STUNAddress(local)!))
        #expect(try s.counter("stun_binding_responses_total", [("version", "rfc5389")]) == 2)
        #expect(try s.counter("stun_binding_responses_total", [("version", "rfc3489")]) == 1)
        await s.stop()
    }

    @Test("UDP garbage is dropped and counted; the server keeps answering")
    func udpGarbage() async throws {
        let s = try await RunningSTUN.start(hosts: ["127.0.0.1"])
        var corrupted = bindingRequest()
        corrupted[10] ^= 1
        let garbage: [[UInt8]] = [
            Array(repeating: 0xFF, count: 100), Array("GET / HTTP/1.1\r\n\r\n".utf8),
            hex("1b9c0120000100000000000103577757074578416d706c6504544553540000010001"), [0, 1, 0],
            hex("80e0000100000002deadbeef"), corrupted,
            Array(repeating: 0, count: 1472),
        ]
        let indication = try STUNMessage(
            type: STUNMessageType(method: .binding, class: .indication),
            transactionID: .random()
        )
        .encode()
        let id = STUNTransactionID.random()
        // Datagrams from one socket are handled in order: when the answer to the last arrives, the
        // rest has been looked at.
        let (_, replies) = try await udpExchange(
            s.listeners[0].udp,
            from: "127.0.0.1",
            garbage + [indication, message("0003000400000006"), bindingRequest(id)],
            replies: 2
        )
        #expect(try STUNMessage.decode(replies[0]).type == .bindingError)
        #expect(try STUNMessage.decode(replies[1]).transactionID == id)
        #expect(try s.counter("stun_dropped_total", [("reason", "not_stun")]) == Int64(garbage.count))
        #expect(try s.counter("stun_dropped_total", [("reason", "not_request")]) == 1)
        #expect(try s.counter("stun_error_responses_total", [("code", "420")]) == 1)
        #expect(try s.counter("stun_messages_total", [("transport", "udp")]) == Int64(garbage.count + 3))
        await s.stop()
    }

    @Test("TCP over IPv4 and IPv6: back-to-back and split messages are all answered, in order")
    func tcpFraming() async throws {
        let s = try await RunningSTUN.start()
        for listener in s.listeners {
            let ids = (0..<4).map { _ in STUNTransactionID.random() }
            let two = bindingRequest(ids[0]) + bindingRequest(ids[1], fingerprint: false)
            let split = bindingRequest(ids[2])
            let classic = Array(vovidaRequest[0..<8]) + ids[3].bytes + Array(vovidaRequest[20...])
            let chunks = [two, Array(split[0..<3]), Array(split[3..<21]), Array(split[21...]) + classic]
            let (local, replies, closed) = try await tcpExchange(try #require(listener.tcp), chunks, replies: 4)
            #expect(!closed)
            let messages = try replies.map { try STUNMessage.decode($0) }
            #expect(messages.map(\.transactionID) == ids)
            for m in messages.prefix(3) {
                #expect(m.first(STUNAttributeType.xorMappedAddress) == .xorMappedAddress(STUNAddress(local)!))
            }
            #expect(messages[3].first(STUNAttributeType.mappedAddress) == .mappedAddress(STUNAddress(local)!))
            #expect(messages[0].hasFingerprint && !messages[1].hasFingerprint)
        }
        #expect(try s.counter("stun_messages_total", [("transport", "tcp")]) == 8)
        #expect(try s.counter("stun_tcp_connections_total") == 2)
        await s.stop()
    }

    @Test("a TCP stream that is not STUN, or a message over the limit, is closed; others are unaffected")
    func tcpGarbage() async throws {
        let s = try await RunningSTUN.start(hosts: ["127.0.0.1"])
        let tcp = try #require(s.listeners[0].tcp)
        // Answered first, then the stream turns to garbage: the connection closes.
        let id = STUNTransactionID.random()
        let r1 = try await tcpExchange(tcp, [bindingRequest(id) + Array("GET / HTTP/1.1\r\n\r\n".utf8)], replies: 2)
        #expect(r1.closed && r1.replies.count == 1)
        #expect(try STUNMessage.decode(r1.replies[0]).transactionID == id)
        let r2 = try await tcpExchange(tcp, [hex("0001fffc2112a442") + Array(repeating: 0, count: 100)], replies: 1)
        #expect(r2.closed && r2.replies.isEmpty)
        // A framed message that fails its FINGERPRINT is dropped, the stream stays open.
        var corrupted = bindingRequest()
        corrupted[10] ^= 1
        let id2 = STUNTransactionID.random()
        let r3 = try await tcpExchange(tcp, [corrupted, bindingRequest(id2)], replies: 1)
        #expect(!r3.closed)
        #expect(try STUNMessage.decode(r3.replies[0]).transactionID == id2)
        #expect(try s.counter("stun_tcp_streams_closed_malformed_total") == 2)
        #expect(try s.counter("stun_dropped_total", [("reason", "not_stun")]) == 1)
        await s.stop()
    }

    @Test("stopping closes the sockets: the TCP port refuses connections afterwards")
    func stop() async throws {
        let s = try await RunningSTUN.start(hosts: ["127.0.0.1"])
        let tcp = try #require(s.listeners[0].tcp)
        #expect(s.server.isListening)
        await s.stop()
        #expect(!s.server.isListening)
        await #expect(throws: (any Error).self) { try await tcpExchange(tcp, [bindingRequest()], replies: 1) }
    }

    @Test("a port in use fails start-up with the bind error")
    func portInUse() async throws {
        let s = try await RunningSTUN.start(hosts: ["127.0.0.1"])
        let port = try #require(s.listeners[0].udp.port)
        // UDP alone too: no SO_REUSEADDR on the datagram socket, so two servers never share a port.
        for tcp in [true, false] {
            let second = STUNServer(
                configuration: STUNServerConfiguration(listen: [ListenAddress(host: "127.0.0.1", port: port)], tcp: tcp)
            )
            await #expect(throws: (any Error).self) { try await second.run() }
            await #expect(throws: (any Error).self) { try await second.listeners() }
        }
        await s.stop()
    }
}
