import Logging
import MetricsTestKit
import NIOCore
import NIOEmbedded
import NIOTestUtils
import Testing

@testable import DNS

/// The DNS server's channel handlers on an `EmbeddedChannel` (the real-socket tests are EndToEndTests): each
/// writes exactly what the pure answer path (`Answerer.answer`) produced for the query, to the query's own
/// sender, once per read burst.
@Suite("DNS handlers on an EmbeddedChannel")
struct DNSHandlerTests {
    let metrics = TestMetrics()
    let policy = AnswerPolicy(forwarding: false)

    func udpChannel() throws -> EmbeddedChannel {
        let handler = DNSUDPHandler(
            zones: DNSZoneStore(fixtureZone()),
            policy: self.policy,
            forwarder: nil,
            metrics: DNSMetrics(factory: self.metrics),
            logger: Logger(label: "test.dns")
        )
        return EmbeddedChannel(handler: handler)
    }

    func query(_ qname: String, _ type: DNSType, id: UInt16 = 0x4242) throws -> [UInt8] {
        try DNSMessage(
            header: DNSHeader(id: id, recursionDesired: true),
            questions: [DNSQuestion(name: try DNSName(qname), type: type)]
        ).encode()
    }

    func envelope(_ bytes: [UInt8], from port: Int) throws -> AddressedEnvelope<ByteBuffer> {
        AddressedEnvelope(
            remoteAddress: try SocketAddress(ipAddress: "127.0.0.1", port: port),
            data: ByteBuffer(bytes: bytes)
        )
    }

    func counter(_ label: String, _ dims: [(String, String)] = []) throws -> Int64 {
        try self.metrics.expectCounter(label, dims).totalValue
    }

    @Test("UDP: a burst of queries is answered to each sender, byte for byte the pure path's, at the burst's end")
    func udpBurst() throws {
        let channel = try self.udpChannel()
        let web = try self.query("web.shop.svc.cluster.local", .a, id: 1)
        let outside = try self.query("www.example.com", .a, id: 2)
        let formErr = Array(try self.query("web.shop.svc.cluster.local", .a, id: 3).prefix(20))
        let tooShort: [UInt8] = [0, 1, 2, 3, 4]
        for (bytes, port) in [(web, 5001), (outside, 5002), (formErr, 5003), (tooShort, 5004)] {
            channel.pipeline.fireChannelRead(try self.envelope(bytes, from: port))
        }
        // Written, not flushed, until the read burst ends.
        #expect(try channel.readOutbound(as: AddressedEnvelope<ByteBuffer>.self) == nil)
        channel.pipeline.fireChannelReadComplete()

        var replies: [(port: Int, bytes: [UInt8])] = []
        while let out = try channel.readOutbound(as: AddressedEnvelope<ByteBuffer>.self) {
            replies.append((out.remoteAddress.port ?? -1, Array(out.data.readableBytesView)))
        }
        let zone = fixtureZone()
        let expected = try [(web, 5001), (outside, 5002), (formErr, 5003)].map { bytes, port in
            (port, try askRaw(zone, bytes, policy: self.policy).raw)
        }
        #expect(replies.map(\.port) == expected.map(\.0))
        #expect(replies.map(\.bytes) == expected.map(\.1))
        // What they say: the zone's address, REFUSED (forwarding off), FORMERR; the 5-byte datagram is dropped.
        let answers = try replies.map { try DNSMessage.decode($0.bytes) }
        #expect(answers[0].answers.first?.data == .a(ip("10.96.0.10")))
        #expect(answers[1].header.rcodeLow == UInt8(DNSRCode.refused.rawValue))
        #expect(answers[2].header.rcodeLow == UInt8(DNSRCode.formErr.rawValue))
        #expect(try self.counter("dns_queries_total", [("transport", "udp")]) == 4)
        #expect(try self.counter("dns_zone_answers_total") == 1)
        #expect(try self.counter("dns_malformed_queries_total") >= 1)
        // The listener lives on: a valid query after the garbage is answered.
        channel.pipeline.fireChannelRead(try self.envelope(web, from: 5005))
        channel.pipeline.fireChannelReadComplete()
        #expect(try channel.readOutbound(as: AddressedEnvelope<ByteBuffer>.self)?.remoteAddress.port == 5005)
        #expect(try channel.finish().isClean)
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
