import Logging
import MeshTestSupport
import MetricsTestKit
import NIOCore
import NIOEmbedded
import NIOTestUtils
import Testing

@testable import DNS

/// The DNS server's TCP channel handlers on an `EmbeddedChannel` (the real-socket tests are EndToEndTests
/// and UDPLoopTests): each writes exactly what the pure answer path (`Answerer.answer`) produced for the
/// query, once per read burst.
@Suite("DNS handlers on an EmbeddedChannel", .rationed)
struct DNSHandlerTests {
    let metrics = TestMetrics()
    let policy = AnswerPolicy(forwarding: false)

    func query(_ qname: String, _ type: DNSType, id: UInt16 = 0x4242) throws -> [UInt8] {
        try DNSMessage(
            header: DNSHeader(id: id, recursionDesired: true),
            questions: [DNSQuestion(name: try DNSName(qname), type: type)]
        ).encode()
    }

    func counter(_ label: String, _ dims: [(String, String)] = []) throws -> Int64 {
        try self.metrics.expectCounter(label, dims).totalValue
    }

    func tcpChannel() throws -> EmbeddedChannel {
        let channel = EmbeddedChannel()
        try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(DNSTCPFrameDecoder()))
        try channel.pipeline.syncOperations.addHandler(
            DNSTCPHandler(
                zones: DNSZoneStore(fixtureZone()),
                policy: self.policy,
                forwarder: nil,
                metrics: DNSMetrics(factory: self.metrics)
            )
        )
        return channel
    }

    @Test("TCP: pipelined queries fed one byte at a time are answered in order, each framed")
    func tcpPipelinedByteByByte() throws {
        let channel = try self.tcpChannel()
        let first = try self.query("web.shop.svc.cluster.local", .a, id: 7)
        let second = try self.query("db.shop.svc.cluster.local", .srv, id: 8)
        var stream = DNSTCPHandler.frame(first, allocator: channel.allocator)
        var secondFrame = DNSTCPHandler.frame(second, allocator: channel.allocator)
        stream.writeBuffer(&secondFrame)
        for byte in stream.readableBytesView {
            try channel.writeInbound(ByteBuffer(bytes: [byte]))
        }
        var out = ByteBuffer()
        while var part = try channel.readOutbound(as: ByteBuffer.self) { out.writeBuffer(&part) }
        let zone = fixtureZone()
        for query in [first, second] {
            let length = out.readInteger(as: UInt16.self)
            let bytes = length.flatMap { out.readBytes(length: Int($0)) }
            #expect(bytes == (try askRaw(zone, query, tcp: true, policy: self.policy).raw))
        }
        #expect(out.readableBytes == 0)
        #expect(try self.counter("dns_queries_total", [("transport", "tcp")]) == 2)
        #expect(try channel.finish().isClean)
    }

    @Test("TCP: an idle connection is closed")
    func tcpIdleCloses() throws {
        let channel = try self.tcpChannel()
        channel.pipeline.fireUserInboundEventTriggered(IdleStateHandler.IdleStateEvent.read)
        #expect(!channel.isActive)
    }

    @Test("the TCP frame decoder splits a stream into messages however it arrives")
    func frameDecoderVerifier() throws {
        let a: [UInt8] = [1, 2, 3]
        let b: [UInt8] = Array(repeating: 9, count: 300)
        let input = ByteBuffer(bytes: [0, 3] + a + [1, 44] + b)
        try ByteToMessageDecoderVerifier.verifyDecoder(
            inputOutputPairs: [(input, [ByteBuffer(bytes: a), ByteBuffer(bytes: b)])],
            decoderFactory: { DNSTCPFrameDecoder() }
        )
    }
}
