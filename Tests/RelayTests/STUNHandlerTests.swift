import Logging
import MeshTestSupport
import MetricsTestKit
import NIOCore
import NIOEmbedded
import NIOTestUtils
import Testing

@testable import Relay

/// The STUN server's channel handlers on an `EmbeddedChannel` (STUNServerTests runs them over real sockets):
/// each answer is byte for byte the pure responder's, for the message's own sender, flushed once per read burst.
@Suite("STUN handlers on an EmbeddedChannel", .rationed)
struct STUNHandlerTests {
    let metrics = TestMetrics()
    let policy = STUNResponderPolicy(software: nil)

    func counter(_ label: String, _ dims: [(String, String)]) throws -> Int64 {
        try self.metrics.expectCounter(label, dims).totalValue
    }

    func expected(_ request: [UInt8], from source: STUNAddress, local: STUNAddress?) -> [UInt8] {
        request.withUnsafeBytes {
            STUNResponder.respond(to: $0, from: source, local: local, policy: self.policy).bytes
        }
    }

    @Test("UDP: each request answered to its sender with its own reflexive address; garbage dropped, counted")
    func udpBurst() throws {
        let channel = EmbeddedChannel(
            handler: STUNUDPHandler(
                policy: self.policy,
                metrics: STUNMetrics(factory: self.metrics),
                logger: Logger(label: "test.stun")
            )
        )
        let request = message("")
        let garbage: [UInt8] = [0xde, 0xad, 0xbe, 0xef]
        let senders = [("198.18.0.7", 40000), ("198.18.0.8", 40001), ("198.18.0.9", 40002)]
        for ((ip, port), bytes) in zip(senders, [request, garbage, request]) {
            let from = try SocketAddress(ipAddress: ip, port: port)
            channel.pipeline.fireChannelRead(AddressedEnvelope(remoteAddress: from, data: ByteBuffer(bytes: bytes)))
        }
        #expect(try channel.readOutbound(as: AddressedEnvelope<ByteBuffer>.self) == nil)
        channel.pipeline.fireChannelReadComplete()
        var answers: [AddressedEnvelope<ByteBuffer>] = []
        while let out = try channel.readOutbound(as: AddressedEnvelope<ByteBuffer>.self) { answers.append(out) }
        #expect(answers.map { $0.remoteAddress.port } == [40000, 40002])
        #expect(
            Array(answers[0].data.readableBytesView)
                == self.expected(request, from: addr("198.18.0.7", 40000), local: nil)
        )
        #expect(
            Array(answers[1].data.readableBytesView)
                == self.expected(request, from: addr("198.18.0.9", 40002), local: nil)
        )
        let decoded = try STUNMessage.decode(Array(answers[1].data.readableBytesView))
        #expect(decoded.type == .bindingSuccess && decoded.transactionID == testID)
        #expect(try self.counter("stun_messages_total", [("transport", "udp")]) == 3)
        #expect(try self.counter("stun_binding_responses_total", [("version", "rfc5389")]) == 2)
        #expect(try channel.finish().isClean)
    }

    func tcpChannel(remote: SocketAddress, local: SocketAddress) throws -> EmbeddedChannel {
        let channel = EmbeddedChannel()
        channel.remoteAddress = remote
        channel.localAddress = local
        try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(STUNFrameDecoder(maxMessageSize: 548)))
        try channel.pipeline.syncOperations.addHandler(
            STUNTCPHandler(policy: self.policy, metrics: STUNMetrics(factory: self.metrics))
        )
        return channel
    }

    @Test("TCP: two requests fed one byte at a time are answered in order, with the connection's addresses")
    func tcpByteByByte() throws {
        let remote = try SocketAddress(ipAddress: "198.18.0.7", port: 40000)
        let local = try SocketAddress(ipAddress: "198.18.0.10", port: 3478)
        let channel = try self.tcpChannel(remote: remote, local: local)
        let request = message("")
        for byte in request + request { try channel.writeInbound(ByteBuffer(bytes: [byte])) }
        var out = ByteBuffer()
        while var part = try channel.readOutbound(as: ByteBuffer.self) { out.writeBuffer(&part) }
        let one = self.expected(request, from: addr("198.18.0.7", 40000), local: addr("198.18.0.10", 3478))
        #expect(Array(out.readableBytesView) == one + one)
        #expect(try self.counter("stun_messages_total", [("transport", "tcp")]) == 2)
        #expect(try channel.finish().isClean)
    }

    @Test("TCP: a stream that is not STUN gets the answers before it, then the connection closes")
    func tcpGarbageCloses() throws {
        let channel = try self.tcpChannel(
            remote: try SocketAddress(ipAddress: "198.18.0.7", port: 40000),
            local: try SocketAddress(ipAddress: "198.18.0.10", port: 3478)
        )
        let request = message("")
        try channel.writeInbound(ByteBuffer(bytes: request + Array("GET / HTTP/1.1\r\n\r\n".utf8)))
        let answer = try channel.readOutbound(as: ByteBuffer.self)
        #expect(answer.map { Array($0.readableBytesView) }.map { try? STUNMessage.decode($0).type } == .bindingSuccess)
        #expect(!channel.isActive)
        #expect(try self.counter("stun_tcp_streams_closed_malformed_total", []) == 1)
    }

    @Test("the TCP frame decoder splits a stream into STUN messages however it arrives")
    func frameDecoderVerifier() throws {
        let a = message("")
        let b = message("", type: "0101")
        try ByteToMessageDecoderVerifier.verifyDecoder(
            inputOutputPairs: [(ByteBuffer(bytes: a + b), [ByteBuffer(bytes: a), ByteBuffer(bytes: b)])],
            decoderFactory: { STUNFrameDecoder(maxMessageSize: 548) }
        )
    }
}
