import Foundation
import MeshCore
import MeshTestSupport
import MetricsTestKit
import NIOCore
import NIOPosix
import Synchronization
import Testing

@testable import DNS

let digPath = which("dig")
let kdigPath = which("kdig")

/// The zone the upstream test instance serves (its own domain, so the mesh instance forwards to it).
func upstreamInput() -> ZoneInput {
    ZoneInput(
        domain: "remote.test",
        ttl: 60,
        negativeTTL: 15,
        services: [
            DNSService(name: "api", namespace: "prod", clusterIPs: [ip("192.0.2.80")]),
            DNSService(name: "cached", namespace: "prod", clusterIPs: [ip("192.0.2.81")]),
            DNSService(name: "www", namespace: "org", clusterIPs: [ip("192.0.2.99")]),
        ]
    )
}

func meshInput() -> ZoneInput {
    var input = fixtureInput()
    let many = (0..<120).map { DNSEndpoint(ip: .v4(0x0A05_0000 | UInt32($0)), hostname: "pod-\($0)") }
    input.services.append(DNSService(name: "many", namespace: "shop", endpoints: many))
    input.services.append(DNSService(name: "ext2", namespace: "shop", externalName: "www.org.svc.remote.test"))
    return input
}

/// Runs dig (UDP unless `tcp`) against the server and returns its output.
func dig(_ port: Int, _ args: [String], tcp: Bool = false) async throws -> String {
    var a = ["-p", String(port), "@127.0.0.1", "+time=5", "+tries=1"]
    if tcp { a.append("+tcp") }
    return try await runCommand(digPath!, a + args)
}

/// The answer section lines of dig output (`+noall +answer`), whitespace-normalised.
func digAnswers(_ port: Int, _ args: [String], tcp: Bool = false) async throws -> [String] {
    try await dig(port, ["+noall", "+answer"] + args, tcp: tcp).split(separator: "\n").map {
        $0.split(whereSeparator: { $0 == " " || $0 == "\t" }).joined(separator: " ")
    }
}

func status(_ output: String) -> String? {
    guard let r = output.range(of: "status: ") else { return nil }
    return String(output[r.upperBound...].prefix { $0 != "," && $0 != ";" && $0 != "\n" })
}

@Suite(
    "End to end with real clients",
    .serialized,
    .enabled(if: digPath != nil, "dig is not installed (apt-get install dnsutils)"),
    .awaitedTeardown,
    .rationed,
)
struct EndToEndTests {
    @Test("dig over UDP and TCP: A, AAAA, SRV, PTR, NXDOMAIN with SOA, NODATA, 0x20")
    func digRecords() async throws {
        let s = try await RunningServer.start(zone: meshInput())
        onTeardown { await s.stop() }
        for tcp in [false, true] {
            #expect(
                try await digAnswers(s.port, ["web.shop.svc.cluster.local", "A"], tcp: tcp) == [
                    "web.shop.svc.cluster.local. 30 IN A 10.96.0.10"
                ]
            )
            #expect(
                try await digAnswers(s.port, ["web.shop.svc.cluster.local", "AAAA"], tcp: tcp) == [
                    "web.shop.svc.cluster.local. 30 IN AAAA fd00:96::10"
                ]
            )
            #expect(
                try await digAnswers(s.port, ["_http._tcp.web.shop.svc.cluster.local", "SRV"], tcp: tcp)
                    == ["_http._tcp.web.shop.svc.cluster.local. 30 IN SRV 0 100 80 web.shop.svc.cluster.local."]
            )
            #expect(
                try await digAnswers(s.port, ["-x", "10.96.0.10"], tcp: tcp) == [
                    "10.0.96.10.in-addr.arpa. 30 IN PTR web.shop.svc.cluster.local."
                ]
            )
            #expect(
                try await digAnswers(s.port, ["-x", "fd00:96::10"], tcp: tcp).first?.hasSuffix(
                    "IN PTR web.shop.svc.cluster.local."
                ) == true
            )
            let nx = try await dig(s.port, ["nope.shop.svc.cluster.local", "A"], tcp: tcp)
            #expect(status(nx) == "NXDOMAIN")
            #expect(nx.contains("ns.dns.cluster.local. hostmaster.cluster.local."))
            let nodata = try await dig(s.port, ["internal.ops.svc.cluster.local", "AAAA"], tcp: tcp)
            #expect(status(nodata) == "NOERROR")
            #expect(nodata.contains("ANSWER: 0") && nodata.contains("AUTHORITY: 1"))
            // 0x20: the question comes back in the client's case.
            let mixed = try await dig(s.port, ["WeB.ShOp.SvC.cLuStEr.LoCaL", "A"], tcp: tcp)
            #expect(mixed.contains(";WeB.ShOp.SvC.cLuStEr.LoCaL."))
            #expect(mixed.contains("10.96.0.10"))
        }
        await s.stop()
    }

    @Test("a truncated UDP answer is retried over TCP by dig and arrives whole")
    func truncatedRetry() async throws {
        let s = try await RunningServer.start(zone: meshInput())
        onTeardown { await s.stop() }
        let out = try await dig(s.port, ["many.shop.svc.cluster.local", "A"])
        #expect(out.contains("Truncated, retrying in TCP mode"))
        #expect(out.contains("ANSWER: 120"))
        let ignoreTC = try await dig(s.port, ["+ignore", "many.shop.svc.cluster.local", "A"])
        #expect(ignoreTC.contains(" tc") && ignoreTC.contains("ANSWER: 0"))
        await s.stop()
    }

    @Test("forwarding: answered by the upstream, cached after the upstream stops, SERVFAIL when it is dead")
    func forwarding() async throws {
        let upstream = try await RunningServer.start(zone: upstreamInput())
        let fwd = DNSForwardingConfiguration(
            upstreams: ["127.0.0.1:\(upstream.port)"],
            timeout: .seconds(3),  // a loaded machine's live upstream must never look dead
            attempts: 1
        )
        let s = try await RunningServer.start(zone: meshInput(), forwarding: fwd)
        onTeardown { await s.stop() }
        #expect(
            try await digAnswers(s.port, ["api.prod.svc.remote.test", "A"]) == [
                "api.prod.svc.remote.test. 60 IN A 192.0.2.80"
            ]
        )
        #expect(
            try await digAnswers(s.port, ["api.prod.svc.remote.test", "A"], tcp: true).first?.hasSuffix(
                "IN A 192.0.2.80"
            )
                == true
        )
        // 0x20 through the forwarder.
        #expect(try await dig(s.port, ["ApI.pRoD.svc.remote.test", "A"]).contains(";ApI.pRoD.svc.remote.test."))
        // NXDOMAIN from upstream passes through with its SOA.
        let nx = try await dig(s.port, ["nope.prod.svc.remote.test", "A"])
        #expect(status(nx) == "NXDOMAIN" && nx.contains("hostmaster.remote.test."))
        // ExternalName pointing outside the zone: CNAME plus the upstream's answer.
        let ext = try await digAnswers(s.port, ["ext2.shop.svc.cluster.local", "A"])
        #expect(
            ext == [
                "ext2.shop.svc.cluster.local. 30 IN CNAME www.org.svc.remote.test.",
                "www.org.svc.remote.test. 60 IN A 192.0.2.99",
            ]
        )
        // Cache: resolve once, stop the upstream, resolve again.
        #expect(
            try await digAnswers(s.port, ["cached.prod.svc.remote.test", "A"]).first?.hasSuffix("IN A 192.0.2.81")
                == true
        )
        await upstream.stop()
        let again = try await digAnswers(s.port, ["cached.prod.svc.remote.test", "A"])
        #expect(again.count == 1 && again.first?.hasSuffix("IN A 192.0.2.81") == true)
        // The negative answer is cached too.
        #expect(status(try await dig(s.port, ["nope.prod.svc.remote.test", "A"])) == "NXDOMAIN")
        // Not cached and the upstream is gone: SERVFAIL.
        // (dig waits longer than the forwarder's upstream timeout.)
        #expect(status(try await dig(s.port, ["+time=10", "api.prod.svc.remote.test", "AAAA"])) == "SERVFAIL")
        await s.stop()
    }

    @Test("never forwards to itself: an upstream equal to our own address is skipped")
    func noSelfLoop() async throws {
        // Reserve a port, free it, and make the server listen there (UDP and TCP) with itself as its
        // only upstream. Another socket may grab the TCP side of a freed port meanwhile: try again.
        let zones = DNSZoneStore()
        try zones.update(meshInput())
        var started: (port: Int, task: Task<Void, any Error>)?
        for _ in 0..<5 where started == nil {
            let probe = try await DatagramBootstrap(group: MultiThreadedEventLoopGroup.singleton).bind(
                host: "127.0.0.1",
                port: 0
            ).get()
            let port = probe.localAddress!.port!
            try await probe.close()
            let server = DNSServer(
                configuration: DNSServerConfiguration(
                    port: port,
                    forwarding: DNSForwardingConfiguration(
                        upstreams: ["127.0.0.1:\(port)"],
                        timeout: .milliseconds(200),
                        attempts: 1
                    )
                ),
                zones: zones
            )
            let task = Task { try await server.run() }
            if (try? await server.listeningAddresses()) != nil {
                started = (port, task)
            } else {
                task.cancel()
                _ = try? await task.value
            }
        }
        let (port, task) = try #require(started)
        defer { task.cancel() }
        let out = try await dig(port, ["example.invalid", "A"])
        #expect(status(out) == "SERVFAIL", "\(out)")
        // Still serving the zone.
        #expect(try await digAnswers(port, ["web.shop.svc.cluster.local", "A"]).count == 1)
        task.cancel()
        _ = try? await task.value
    }

    @Test(
        "kdig over UDP and TCP",
        .enabled(if: kdigPath != nil, "kdig is not installed (apt-get install knot-dnsutils)")
    )
    func kdig() async throws {
        let s = try await RunningServer.start(zone: meshInput())
        onTeardown { await s.stop() }
        for extra in [[String](), ["+tcp"]] {
            let out = try await runCommand(
                kdigPath!,
                ["-p", String(s.port), "@127.0.0.1", "+time=2", "+retry=0"] + extra + [
                    "_pg._tcp.db.shop.svc.cluster.local", "SRV",
                ]
            )
            #expect(out.contains("status: NOERROR"))
            #expect(out.contains("db-0.db.shop.svc.cluster.local."))
            let nx = try await runCommand(
                kdigPath!,
                ["-p", String(s.port), "@127.0.0.1", "+time=2", "+retry=0"] + extra + ["x.shop.svc.cluster.local", "A"]
            )
            #expect(nx.contains("status: NXDOMAIN"))
        }
        // kdig's default EDNS with a big headless answer: kdig retries over TCP on TC.
        let big = try await runCommand(
            kdigPath!,
            ["-p", String(s.port), "@127.0.0.1", "+time=2", "+retry=0", "many.shop.svc.cluster.local", "A"]
        )
        #expect(big.contains("ANSWER: 120"))
        await s.stop()
    }

    @Test("garbage over UDP and TCP: FORMERR or dropped, and the server keeps answering")
    func garbage() async throws {
        let metrics = TestMetrics()
        let s = try await RunningServer.start(zone: meshInput(), metricsFactory: metrics)
        onTeardown { await s.stop() }
        let group = MultiThreadedEventLoopGroup.singleton
        let collector = Collector()
        let client = try await DatagramBootstrap(group: group)
            .channelInitializer { ch in
                ch.eventLoop.makeCompletedFuture { try ch.pipeline.syncOperations.addHandler(collector) }
            }
            .bind(host: "127.0.0.1", port: 0).get()
        var rng = SplitMix(seed: 7)
        var sent = 0
        for i in 0..<500 {
            let n = Int(rng.next() % 80)
            var bytes = (0..<n).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            if n >= 3 { bytes[2] &= 0x7F }  // mostly queries, not responses
            if i % 5 == 0 { bytes = Array(Captured.digQuery.prefix(Int(rng.next() % UInt64(Captured.digQuery.count)))) }
            try await client.writeAndFlush(AddressedEnvelope(remoteAddress: s.udp, data: ByteBuffer(bytes: bytes)))
            sent += 1
        }
        // A well-formed header with a broken question gets FORMERR back. (Sent again until it does, for up to
        // a minute: the burst above may overflow the socket buffer, UDP may drop any one datagram, and the
        // collector's event loop is shared with every suite running beside this one; 5 s was once too few on
        // a loaded CI machine.)
        let probe = ByteBuffer(bytes: hex("beef 0100 0001 0000 0000 0000 3f 61"))
        for _ in 0..<240 where !collector.sawFormErr(id: 0xBEEF) {
            try await client.writeAndFlush(AddressedEnvelope(remoteAddress: s.udp, data: probe))
            try await Task.sleep(for: .milliseconds(250))
        }
        #expect(collector.sawFormErr(id: 0xBEEF))
        try await client.close()

        // TCP: garbage frames, then a length prefix promising more than is sent, then close.
        for payload in [
            hex("0005 0102030405 0003 aabbcc"), hex("ffff 0102"), hex("000c 1234 0100 0005 0000 0000 0000"),
        ] {
            let ch = try await ClientBootstrap(group: group).connect(to: s.tcp).get()
            try await ch.writeAndFlush(ByteBuffer(bytes: payload))
            try await Task.sleep(for: .milliseconds(20))
            try await ch.close()
        }
        for tcp in [false, true] {
            #expect(
                try await digAnswers(s.port, ["web.shop.svc.cluster.local", "A"], tcp: tcp) == [
                    "web.shop.svc.cluster.local. 30 IN A 10.96.0.10"
                ]
            )
        }
        #expect(sent == 500)
        // Garbage was counted: the FORMERR one and the TCP frames at least.
        let malformed = try metrics.expectCounter("dns_malformed_queries_total").totalValue
        #expect(malformed >= 3)
        // Every datagram that reached the socket is counted; the kernel may drop some of the burst on a loaded
        // machine (UDP), so only the answered probe and dig query are certain.
        #expect(try metrics.expectCounter("dns_queries_total", [("transport", "udp")]).totalValue >= 2)
        await s.stop()
    }

    @Test("TCP: pipelined queries on one connection are all answered; idle connections are closed")
    func tcpPipelining() async throws {
        let s = try await RunningServer.start(zone: meshInput(), tcpIdleTimeout: .milliseconds(300))
        onTeardown { await s.stop() }
        let collector = TCPCollector()
        let ch = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .channelInitializer { ch in
                ch.eventLoop.makeCompletedFuture {
                    try ch.pipeline.syncOperations.addHandler(ByteToMessageHandler(DNSTCPFrameDecoder()))
                    try ch.pipeline.syncOperations.addHandler(collector)
                }
            }
            .connect(to: s.tcp).get()
        var all = ByteBuffer()
        for i in 0..<20 {
            let q = DNSMessage(
                header: DNSHeader(id: UInt16(i)),
                questions: [DNSQuestion(name: name("web.shop.svc.cluster.local"), type: .a)]
            )
            let bytes = try q.encode()
            all.writeInteger(UInt16(bytes.count))
            all.writeBytes(bytes)
        }
        try await ch.writeAndFlush(all)
        #expect(await eventually(timeout: .seconds(30)) { collector.ids.count >= 20 })
        #expect(Set(collector.ids) == Set(0..<20))
        // Idle timeout closes the connection.
        try await ch.closeFuture.get()
        #expect(!ch.isActive)
        await s.stop()
    }

    @Test("TCP connections beyond the limit are closed at once")
    func tcpLimit() async throws {
        let s = try await RunningServer.start(zone: meshInput(), maxTCPConnections: 2)
        onTeardown { await s.stop() }
        let group = MultiThreadedEventLoopGroup.singleton
        let (a, seenA) = try await Self.tcpClient(s.tcp)
        let (b, seenB) = try await Self.tcpClient(s.tcp)
        // Both admitted before the third connects: each has had its answer.
        try await a.writeAndFlush(try Self.tcpQuery(id: 1))
        try await b.writeAndFlush(try Self.tcpQuery(id: 2))
        #expect(await eventually(timeout: .seconds(30)) { seenA.ids == [1] && seenB.ids == [2] })
        let c = try await ClientBootstrap(group: group).connect(to: s.tcp).get()
        try await c.closeFuture.get()  // closed by the server
        #expect(a.isActive && b.isActive)
        try await a.close()
        try await b.close()
        await s.stop()
    }
}

/// Collects UDP responses (any event loop). Sendable: state behind a Mutex.
final class Collector: ChannelInboundHandler, Sendable {
    typealias InboundIn = AddressedEnvelope<ByteBuffer>
    private let formErrIDs = NIOLockedIDs()

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let env = Self.unwrapInboundIn(data)
        if let m = try? DNSMessage.decode(env.data.readableBytesView), m.rcode == .formErr {
            self.formErrIDs.append(m.header.id)
        }
    }

    func sawFormErr(id: UInt16) -> Bool { self.formErrIDs.contains(id) }
}

extension EndToEndTests {
    /// A TCP client that collects the ids of one-answer responses.
    static func tcpClient(_ address: SocketAddress) async throws -> (any Channel, TCPCollector) {
        let collector = TCPCollector()
        let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .channelInitializer { ch in
                ch.eventLoop.makeCompletedFuture {
                    try ch.pipeline.syncOperations.addHandler(ByteToMessageHandler(DNSTCPFrameDecoder()))
                    try ch.pipeline.syncOperations.addHandler(collector)
                }
            }
            .connect(to: address).get()
        return (channel, collector)
    }

    /// An A query for web.shop.svc.cluster.local, framed for TCP.
    static func tcpQuery(id: UInt16) throws -> ByteBuffer {
        let bytes = try DNSMessage(
            header: DNSHeader(id: id),
            questions: [DNSQuestion(name: name("web.shop.svc.cluster.local"), type: .a)]
        ).encode()
        var out = ByteBuffer()
        out.writeInteger(UInt16(bytes.count))
        out.writeBytes(bytes)
        return out
    }
}

final class TCPCollector: ChannelInboundHandler, Sendable {
    typealias InboundIn = ByteBuffer
    private let seen = NIOLockedIDs()

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let buf = Self.unwrapInboundIn(data)
        if let m = try? DNSMessage.decode(buf.readableBytesView), m.answers.count == 1 {
            self.seen.append(m.header.id)
        }
    }

    var ids: [UInt16] { self.seen.all }
}

/// A list of message IDs behind a Mutex.
final class NIOLockedIDs: Sendable {
    private let ids = Mutex<[UInt16]>([])
    func append(_ id: UInt16) { self.ids.withLock { $0.append(id) } }
    func contains(_ id: UInt16) -> Bool { self.ids.withLock { $0.contains(id) } }
    var all: [UInt16] { self.ids.withLock { $0 } }
}
