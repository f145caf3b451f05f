import MeshCore
import MeshTestSupport
import MetricsTestKit
import NIOCore
import NIOPosix
import Testing

@testable import DNS

@Suite("Forwarder pieces: cache, resolv.conf, upstream addresses", .rationed)
struct ForwarderTests {
    let key = DNSCacheKey(DNSQuestion(name: name("www.Example.com"), type: .a))
    let t0 = NIODeadline.uptimeNanoseconds(1_000_000_000_000)

    func answer(ttl: UInt32, rcode: DNSRCode = .noError) -> DNSMessage {
        var m = DNSMessage(
            header: DNSHeader(id: 1, isResponse: true),
            questions: [DNSQuestion(name: name("www.example.com"), type: .a)],
            answers: [DNSRecord(name: name("www.example.com"), ttl: ttl, data: .a(ip("192.0.2.1")))]
        )
        m.rcode = rcode
        return m
    }

    func negative(rcode: DNSRCode, soaTTL: UInt32, minimum: UInt32) -> DNSMessage {
        let soa = DNSSOA(
            mname: name("ns.example.com"),
            rname: name("h.example.com"),
            serial: 1,
            refresh: 1,
            retry: 1,
            expire: 1,
            minimum: minimum
        )
        var m = DNSMessage(
            header: DNSHeader(id: 1, isResponse: true),
            questions: [DNSQuestion(name: name("www.example.com"), type: .a)],
            authorities: [DNSRecord(name: name("example.com"), ttl: soaTTL, data: .soa(soa))]
        )
        m.rcode = rcode
        return m
    }

    @Test("the cache counts TTLs down and expires entries")
    func ttl() {
        let c = DNSCache(capacity: 10)
        #expect(c.insert(key, answer(ttl: 10), now: t0))
        // Case-insensitive key.
        let other = DNSCacheKey(DNSQuestion(name: name("WWW.example.COM"), type: .a))
        #expect(c.lookup(other, now: t0 + .seconds(4))?.answers.first?.ttl == 6)
        #expect(c.lookup(key, now: t0 + .seconds(10)) == nil)
        #expect(c.count == 0)
        // TTL 0 is not cached; the configured maximum caps long TTLs.
        #expect(!c.insert(key, answer(ttl: 0), now: t0))
        let capped = DNSCache(capacity: 10, maxTTL: 60)
        capped.insert(key, answer(ttl: 86400), now: t0)
        #expect(capped.lookup(key, now: t0 + .seconds(61)) == nil)
    }

    @Test("negative answers are cached for min(SOA TTL, SOA minimum); SERVFAIL and SOA-less ones are not")
    func negativeCaching() {
        let c = DNSCache(capacity: 10)
        #expect(c.insert(key, negative(rcode: .nxDomain, soaTTL: 300, minimum: 5), now: t0))
        #expect(c.lookup(key, now: t0 + .seconds(4))?.rcode == .nxDomain)
        #expect(c.lookup(key, now: t0 + .seconds(5)) == nil)
        #expect(c.insert(key, negative(rcode: .noError, soaTTL: 3, minimum: 60), now: t0))
        #expect(c.lookup(key, now: t0 + .seconds(3)) == nil)
        var noSOA = answer(ttl: 30)
        noSOA.answers = []
        noSOA.rcode = .nxDomain
        #expect(!c.insert(key, noSOA, now: t0))
        #expect(!c.insert(key, answer(ttl: 30, rcode: .servFail), now: t0))
        var tc = answer(ttl: 30)
        tc.header.truncated = true
        #expect(!c.insert(key, tc, now: t0))
    }

    @Test("the cache is bounded and evicts the least recently used entry")
    func lru() {
        let c = DNSCache(capacity: 3)
        let keys = (0..<4).map { DNSCacheKey(DNSQuestion(name: name("n\($0).example"), type: .a)) }
        for k in keys.prefix(3) { c.insert(k, answer(ttl: 60), now: t0) }
        _ = c.lookup(keys[0], now: t0)  // n0 is now the most recent; n1 the least
        c.insert(keys[3], answer(ttl: 60), now: t0)
        #expect(c.count == 3)
        #expect(c.lookup(keys[1], now: t0) == nil)
        #expect(
            c.lookup(keys[0], now: t0) != nil && c.lookup(keys[2], now: t0) != nil && c.lookup(keys[3], now: t0) != nil
        )
        // Many inserts stay within the bound.
        for i in 0..<1000 {
            c.insert(DNSCacheKey(DNSQuestion(name: name("x\(i).example"), type: .a)), answer(ttl: 60), now: t0)
        }
        #expect(c.count == 3)
    }

    @Test("resolv.conf: nameserver lines and options")
    func resolvConf() {
        let r = ResolvConf(
            parsing: """
                # comment
                search shop.svc.cluster.local svc.cluster.local
                nameserver 10.255.255.53
                nameserver 2001:db8::53 ; trailing comment
                nameserver fe80::1%eth0
                nameserver not-an-ip
                options ndots:5 timeout:3 attempts:4
                """
        )
        #expect(r.nameservers == ["10.255.255.53", "2001:db8::53"])
        #expect(r.timeoutSeconds == 3 && r.attempts == 4)
        #expect(ResolvConf.load(path: "/nonexistent/resolv.conf").nameservers.isEmpty)
    }

    @Test("upstream addresses: host, host:port, [v6]:port")
    func upstreams() {
        #expect(parseUpstream("192.0.2.1")?.port == 53)
        #expect(parseUpstream("127.0.0.1:5300")?.port == 5300)
        #expect(parseUpstream("[::1]:5300")?.port == 5300)
        #expect(parseUpstream("2001:db8::1")?.port == 53)
        #expect(parseUpstream("example.com") == nil)
        #expect(parseUpstream("1.2.3.4:99999") == nil)
        let cfg = DNSForwardingConfiguration(upstreams: ["127.0.0.1:53", "bogus"])
        #expect(cfg.resolveUpstreams().count == 1)
    }

    @Test("our own address is recognised, also behind a wildcard listener")
    func sameEndpoint() throws {
        let a = try SocketAddress(ipAddress: "127.0.0.1", port: 5353)
        #expect(isSameEndpoint(a, try SocketAddress(ipAddress: "127.0.0.1", port: 5353)))
        #expect(!isSameEndpoint(a, try SocketAddress(ipAddress: "127.0.0.1", port: 53)))
        #expect(isSameEndpoint(a, try SocketAddress(ipAddress: "0.0.0.0", port: 5353)))
        #expect(
            !isSameEndpoint(
                try SocketAddress(ipAddress: "192.0.2.1", port: 5353),
                try SocketAddress(ipAddress: "127.0.0.1", port: 5353)
            )
        )
    }

    @Test("forwarded answers: client id, question case, RD/CD, size limit and SERVFAIL")
    func composeForwarded() throws {
        let req = ForwardRequest(
            id: 0x7777,
            flags: 0x0110,
            question: DNSQuestion(name: name("WwW.example.COM"), type: .a),
            clientEDNS: nil
        )
        let up = answer(ttl: 30)
        let m = try DNSMessage.decode(
            Answerer.composeForwarded(req, result: up, overTCP: false, policy: AnswerPolicy())
        )
        #expect(
            m.header.id == 0x7777 && m.header.recursionDesired && m.header.checkingDisabled
                && m.header.recursionAvailable
        )
        #expect(m.questions.first?.name.wire == name("WwW.example.COM").wire)
        #expect(m.answers.map(\.data) == up.answers.map(\.data) && m.edns == nil)
        let fail = try DNSMessage.decode(
            Answerer.composeForwarded(req, result: nil, overTCP: false, policy: AnswerPolicy())
        )
        #expect(fail.rcode == .servFail)
        var big = up
        big.answers = (0..<100).map { DNSRecord(name: name("www.example.com"), ttl: 30, data: .a(.v4(UInt32($0)))) }
        let t = try DNSMessage.decode(
            Answerer.composeForwarded(req, result: big, overTCP: false, policy: AnswerPolicy())
        )
        #expect(t.header.truncated && t.answers.isEmpty)
        let whole = try DNSMessage.decode(
            Answerer.composeForwarded(req, result: big, overTCP: true, policy: AnswerPolicy())
        )
        #expect(whole.answers.count == 100)
    }

    @Test("the forwarder ignores spoofed responses: wrong source, wrong id, wrong question")
    func antiSpoofing() async throws {
        // A fake upstream that answers every query three times: from another socket, with a wrong
        // id, with a wrong question, and finally correctly (with a distinct address).
        let group = MultiThreadedEventLoopGroup.singleton
        let spoofer = try await DatagramBootstrap(group: group).bind(host: "127.0.0.1", port: 0).get()
        let fake = FakeUpstream(spoofer: spoofer)
        let upstream = try await DatagramBootstrap(group: group)
            .channelInitializer { ch in
                ch.eventLoop.makeCompletedFuture { try ch.pipeline.syncOperations.addHandler(fake) }
            }
            .bind(host: "127.0.0.1", port: 0).get()
        let metrics = TestMetricsFactoryBox()
        // The right answer ends the wait at once; the timeout only bounds a failure (2 s was too short
        // under 2x `yes` once: the answer came later and the result was nil).
        let fw = DNSForwarder(
            configuration: DNSForwardingConfiguration(timeout: .seconds(30), attempts: 1),
            upstreams: [upstream.localAddress!],
            eventLoop: group.next(),
            logger: .init(label: "test"),
            metrics: DNSMetrics(factory: metrics.factory)
        )
        try await fw.start()
        let result = try await fw.resolve(DNSQuestion(name: name("spoof.example"), type: .a)).get()
        #expect(result?.answers.first?.data == .a(ip("192.0.2.42")))
        // The one from another port never reaches us: the upstream socket is connected.
        #expect(try metrics.factory.expectCounter("dns_upstream_mismatched_responses_total").totalValue == 2)
        await fw.shutdown()
        try await upstream.close()
        try await spoofer.close()
    }
}

struct TestMetricsFactoryBox {
    let factory = TestMetrics()
}

/// Answers each query with three forgeries first, then the real answer.
final class FakeUpstream: ChannelInboundHandler, Sendable {
    typealias InboundIn = AddressedEnvelope<ByteBuffer>
    typealias OutboundOut = AddressedEnvelope<ByteBuffer>
    let spoofer: any Channel

    init(spoofer: any Channel) { self.spoofer = spoofer }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let env = Self.unwrapInboundIn(data)
        guard let q = try? DNSMessage.decode(env.data.readableBytesView) else { return }
        func reply(id: UInt16, question: DNSQuestion, address: String) -> ByteBuffer {
            let m = DNSMessage(
                header: DNSHeader(id: id, isResponse: true, recursionAvailable: true),
                questions: [question],
                answers: [DNSRecord(name: question.name, ttl: 30, data: .a(IPAddress(address)!))]
            )
            return ByteBuffer(bytes: try! m.encode())
        }
        let question = q.questions[0]
        // 1. right id and question, but from another port.
        self.spoofer.writeAndFlush(
            AddressedEnvelope(
                remoteAddress: env.remoteAddress,
                data: reply(id: q.header.id, question: question, address: "6.6.6.1")
            ),
            promise: nil
        )
        // 2. wrong id.
        context.write(
            Self.wrapOutboundOut(
                AddressedEnvelope(
                    remoteAddress: env.remoteAddress,
                    data: reply(id: q.header.id &+ 1, question: question, address: "6.6.6.2")
                )
            ),
            promise: nil
        )
        // 3. wrong question.
        let other = DNSQuestion(name: try! DNSName("other.example"), type: .a)
        context.write(
            Self.wrapOutboundOut(
                AddressedEnvelope(
                    remoteAddress: env.remoteAddress,
                    data: reply(id: q.header.id, question: other, address: "6.6.6.3")
                )
            ),
            promise: nil
        )
        context.flush()
        // 4. the real one, a little later so the forgeries arrive first.
        let ch = context.channel
        let real = reply(id: q.header.id, question: question, address: "192.0.2.42")
        let remote = env.remoteAddress
        context.eventLoop.scheduleTask(in: .milliseconds(50)) {
            ch.writeAndFlush(AddressedEnvelope(remoteAddress: remote, data: real), promise: nil)
        }
    }
}
