import MeshCore
import MeshTestSupport
import MetricsTestKit
import NIOCore
import NIOPosix
import Synchronization
import Testing

@testable import DNS

/// Every datagram a client socket receives, in order.
final class DatagramInbox: ChannelInboundHandler, Sendable {
    typealias InboundIn = AddressedEnvelope<ByteBuffer>
    private let received = Mutex<[[UInt8]]>([])

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let envelope = Self.unwrapInboundIn(data)
        self.received.withLock { $0.append(Array(envelope.data.readableBytesView)) }
    }

    var all: [[UInt8]] { self.received.withLock { $0 } }

    /// The reply ids received.
    var ids: [UInt16] { self.all.filter { $0.count >= 2 }.map { UInt16($0[0]) << 8 | UInt16($0[1]) } }
}

/// The responder's own UDP loop (recvmmsg / sendmmsg on a thread of its own) over real loopback sockets.
@Suite("DNS UDP loop over real sockets", .serialized, .awaitedTeardown, .rationed)
struct UDPLoopTests {
    let policy = AnswerPolicy(forwarding: false)

    func client(_ inbox: DatagramInbox) async throws -> any Channel {
        try await DatagramBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .channelInitializer { ch in
                ch.eventLoop.makeCompletedFuture { try ch.pipeline.syncOperations.addHandler(inbox) }
            }
            .bind(host: "127.0.0.1", port: 0).get()
    }

    func query(_ qname: String, _ type: DNSType, id: UInt16) throws -> [UInt8] {
        try DNSMessage(
            header: DNSHeader(id: id, recursionDesired: true),
            questions: [DNSQuestion(name: try DNSName(qname), type: type)]
        ).encode()
    }

    func send(_ bytes: [UInt8], from channel: any Channel, to address: SocketAddress) async throws {
        try await channel.writeAndFlush(AddressedEnvelope(remoteAddress: address, data: ByteBuffer(bytes: bytes)))
    }

    @Test("clients each get the pure path's bytes; garbage is FORMERR or dropped; every datagram is counted")
    func answersEachSender() async throws {
        let metrics = TestMetrics()
        let s = try await RunningServer.start(zone: fixtureInput(), metricsFactory: metrics)
        onTeardown { await s.stop() }
        let web = try self.query("web.shop.svc.cluster.local", .a, id: 1)
        let outside = try self.query("www.example.com", .a, id: 2)
        let formErr = Array(try self.query("web.shop.svc.cluster.local", .a, id: 3).prefix(20))
        let nx = try self.query("nope.shop.svc.cluster.local", .a, id: 4)
        let tooShort: [UInt8] = [0, 1, 2, 3, 4]
        let inboxes = (0..<5).map { _ in DatagramInbox() }
        var clients: [any Channel] = []
        for inbox in inboxes { clients.append(try await self.client(inbox)) }
        for (i, bytes) in [web, outside, formErr, nx, tooShort].enumerated() {
            try await self.send(bytes, from: clients[i], to: s.udp)
        }
        // The datagram too short for a header gets nothing; the same client's next query is answered, and
        // datagrams from one client are read in order, so nothing can still be on its way for the first.
        let after = try self.query("web.shop.svc.cluster.local", .a, id: 9)
        try await self.send(after, from: clients[4], to: s.udp)
        #expect(await eventually { inboxes.allSatisfy { $0.all.count == 1 } })
        let zone = s.server.zones.zone  // the server's own zone (its SOA serial is the store's)
        for (i, bytes) in [web, outside, formErr, nx, after].enumerated() {
            #expect(inboxes[i].all == [try askRaw(zone, bytes, policy: self.policy).raw])
        }
        let answers = try inboxes.map { try DNSMessage.decode($0.all[0]) }
        #expect(answers[0].answers.first?.data == .a(ip("10.96.0.10")))
        #expect(answers[1].header.rcodeLow == UInt8(DNSRCode.refused.rawValue))
        #expect(answers[2].header.rcodeLow == UInt8(DNSRCode.formErr.rawValue))
        #expect(answers[3].header.rcodeLow == UInt8(DNSRCode.nxDomain.rawValue))
        #expect(answers[4].header.id == 9)
        #expect(try metrics.expectCounter("dns_queries_total", [("transport", "udp")]).totalValue == 6)
        #expect(try metrics.expectCounter("dns_zone_answers_total").totalValue == 3)
        #expect(try metrics.expectCounter("dns_nxdomain_total").totalValue == 1)
        #expect(try metrics.expectCounter("dns_malformed_queries_total").totalValue == 2)
        for c in clients { try await c.close() }
        await s.stop()
    }

    @Test("300 queries in bursts of 60, many read batches, gets every answer once, in the sender's order")
    func burstAcrossBatches() async throws {
        let s = try await RunningServer.start(zone: fixtureInput())
        onTeardown { await s.stop() }
        let inbox = DatagramInbox()
        let client = try await self.client(inbox)
        let names = ["web.shop.svc.cluster.local", "db-0.db.shop.svc.cluster.local", "x.shop.svc.cluster.local"]
        // Written back to back, flushed once (NIO sends them with sendmmsg): the server reads them 16 at a time.
        // In chunks of 60 (a socket's default receive buffer holds ~200 small datagrams; UDP drops the rest).
        for chunk in 0..<5 {
            for id in (chunk * 60)..<((chunk + 1) * 60) {
                let bytes = try self.query(names[id % names.count], .a, id: UInt16(id))
                client.write(AddressedEnvelope(remoteAddress: s.udp, data: ByteBuffer(bytes: bytes)), promise: nil)
            }
            client.flush()
            #expect(await eventually { inbox.all.count >= (chunk + 1) * 60 })
        }
        #expect(inbox.ids == (0..<300).map { UInt16($0) })
        let zone = s.server.zones.zone
        for (id, reply) in inbox.all.enumerated() {
            let expected = try askRaw(
                zone,
                try self.query(names[id % names.count], .a, id: UInt16(id)),
                policy: self.policy
            )
            #expect(reply == expected.raw)
        }
        try await client.close()
        await s.stop()
    }

    @Test("stopping wakes the loop out of recvmmsg: run() returns and the port is free again")
    func stopReleasesThePort() async throws {
        let s = try await RunningServer.start(zone: fixtureInput())
        let port = s.port
        // Served, so the loop thread is blocked in recvmmsg again afterwards.
        let inbox = DatagramInbox()
        let client = try await self.client(inbox)
        try await self.send(try self.query("web.shop.svc.cluster.local", .a, id: 5), from: client, to: s.udp)
        #expect(await eventually { inbox.all.count == 1 })
        try await client.close()
        await s.stop()
        // The socket is closed once run() has returned: the same port binds again.
        let again = try await DatagramBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .bind(host: "127.0.0.1", port: port).get()
        #expect(again.localAddress?.port == port)
        try await again.close()
    }

    @Test("the zone index finds every owner name and nothing else")
    func zoneIndex() throws {
        let names: [[UInt8]] = (0..<2000).map { i in
            let label = Array("svc\(i)".utf8)
            return [UInt8(label.count)] + label + [4] + Array("test".utf8) + [0]
        }
        // A fixed seed and a random one: the index must not depend on the seed.
        for seed: UInt64 in [0, 0xDEAD_BEEF, .random(in: .min ... .max)] {
            let index = ZoneNameIndex(names, seed: seed)
            #expect(index.count == names.count)
            for (i, name) in names.enumerated() {
                #expect(index.find(name) == i)
                #expect(index.name(i) == name)
            }
            #expect(index.find([0]) == nil)
            #expect(index.find(Array(names[7].dropLast())) == nil)
            #expect(index.find([4] + Array("svc7".utf8) + [4] + Array("test".utf8) + [0]) == 7)
            #expect(index.find([4] + Array("SVC7".utf8) + [4] + Array("test".utf8) + [0]) == nil)
        }
        #expect(ZoneNameIndex([]).find([0]) == nil)
    }
}
