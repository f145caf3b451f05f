import Logging
import MeshCore
import MeshTestSupport
import MetricsTestKit
import NIOCore
import NIOPosix
import Synchronization
import Testing

@testable import DNS

/// What a ``TestUpstream`` does with each query.
enum UpstreamBehaviour: Sendable {
    /// The right answer (A 192.0.2.42, the question echoed byte for byte).
    case answer
    /// Nothing: the query is only recorded.
    case silent
    /// Forgeries first (from another port; wrong ID; another name; the name in another case;
    /// another type; another class), then the right answer.
    case forgeFirst
}

/// A UDP resolver on loopback that records where each query came from and what it asked.
final class TestUpstream: ChannelInboundHandler, Sendable {
    typealias InboundIn = AddressedEnvelope<ByteBuffer>
    typealias OutboundOut = AddressedEnvelope<ByteBuffer>

    struct Query: Sendable {
        var source: SocketAddress
        var question: DNSQuestion
    }

    let behaviour: UpstreamBehaviour
    let ttl: UInt32
    let spoofer: any Channel
    let seen = Mutex<[Query]>([])

    private init(behaviour: UpstreamBehaviour, ttl: UInt32, spoofer: any Channel) {
        self.behaviour = behaviour
        self.ttl = ttl
        self.spoofer = spoofer
    }

    /// Starts one on 127.0.0.1 (a free port); returns it and its socket.
    static func start(_ behaviour: UpstreamBehaviour, ttl: UInt32 = 30) async throws -> (TestUpstream, any Channel) {
        let group = MultiThreadedEventLoopGroup.singleton
        let spoofer = try await DatagramBootstrap(group: group).bind(host: "127.0.0.1", port: 0).get()
        let upstream = TestUpstream(behaviour: behaviour, ttl: ttl, spoofer: spoofer)
        let channel = try await DatagramBootstrap(group: group)
            .channelInitializer { ch in
                ch.eventLoop.makeCompletedFuture { try ch.pipeline.syncOperations.addHandler(upstream) }
            }
            .bind(host: "127.0.0.1", port: 0).get()
        return (upstream, channel)
    }

    var queries: [Query] { self.seen.withLock { $0 } }

    func close(_ channel: any Channel) async {
        try? await channel.close()
        try? await self.spoofer.close()
    }

    static func reply(id: UInt16, question: DNSQuestion, ttl: UInt32, address: String) -> ByteBuffer {
        let m = DNSMessage(
            header: DNSHeader(id: id, isResponse: true, recursionAvailable: true),
            questions: [question],
            answers: [DNSRecord(name: question.name, ttl: ttl, data: .a(IPAddress(address)!))]
        )
        return ByteBuffer(bytes: try! m.encode())
    }

    /// `name` with the case of every letter flipped.
    static func flippedCase(_ name: DNSName) -> DNSName {
        try! DNSName(wire: name.wire.map { ($0 | 0x20) &- 0x61 < 26 ? $0 ^ 0x20 : $0 })
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let env = Self.unwrapInboundIn(data)
        guard let q = try? DNSMessage.decode(env.data.readableBytesView), let question = q.questions.first else {
            return
        }
        self.seen.withLock { $0.append(Query(source: env.remoteAddress, question: question)) }
        let to = env.remoteAddress
        let id = q.header.id
        func send(_ data: ByteBuffer) {
            context.write(Self.wrapOutboundOut(AddressedEnvelope(remoteAddress: to, data: data)), promise: nil)
        }
        switch self.behaviour {
        case .silent:
            return
        case .answer:
            break
        case .forgeFirst:
            // The right ID and question, from another port (an off-path forger that guessed both).
            self.spoofer.writeAndFlush(
                AddressedEnvelope(
                    remoteAddress: to,
                    data: Self.reply(id: id, question: question, ttl: 86400, address: "6.6.6.1")
                ),
                promise: nil
            )
            // From the right address and port, but: a wrong ID; another name; the same name in
            // another case (0x20); another type; another class.
            send(Self.reply(id: id &+ 1, question: question, ttl: 86400, address: "6.6.6.2"))
            let other = DNSQuestion(name: try! DNSName("other.example"), type: question.type)
            send(Self.reply(id: id, question: other, ttl: 86400, address: "6.6.6.3"))
            let recased = DNSQuestion(name: Self.flippedCase(question.name), type: question.type)
            send(Self.reply(id: id, question: recased, ttl: 86400, address: "6.6.6.4"))
            let aaaa = DNSQuestion(name: question.name, type: .aaaa)
            send(Self.reply(id: id, question: aaaa, ttl: 86400, address: "6.6.6.5"))
            let chaos = DNSQuestion(name: question.name, type: question.type, qclass: 3)
            send(Self.reply(id: id, question: chaos, ttl: 86400, address: "6.6.6.6"))
        }
        // In order on the same socket pair: the forgeries arrive first.
        send(Self.reply(id: id, question: question, ttl: self.ttl, address: "192.0.2.42"))
        context.flush()
    }
}

/// A forwarder (on its own, not behind a server) to `upstream`.
func makeForwarder(
    to upstream: SocketAddress,
    logs: LogRecorder = LogRecorder(),
    _ configure: (inout DNSForwardingConfiguration) -> Void = { _ in }
) async throws -> (DNSForwarder, TestMetrics) {
    // No test here waits for an upstream timeout: a long one keeps silent queries in flight (they end
    // at shutdown) however slow a loaded machine is.
    var config = DNSForwardingConfiguration(timeout: .seconds(120), attempts: 1)
    configure(&config)
    let metrics = TestMetrics()
    let fw = DNSForwarder(
        configuration: config,
        upstreams: [upstream],
        eventLoop: MultiThreadedEventLoopGroup.singleton.next(),
        logger: logs.logger(),
        metrics: DNSMetrics(factory: metrics)
    )
    try await fw.start()
    return (fw, metrics)
}

@Suite("Forwarder against forged answers: source ports, exact matching, 0x20, TTL cap", .rationed)
struct ForwarderSecurityTests {
    @Test("20 upstream queries leave from at least 15 distinct source ports, bound to 127.0.0.1")
    func randomSourcePorts() async throws {
        let (upstream, channel) = try await TestUpstream.start(.answer)
        let (fw, _) = try await makeForwarder(to: channel.localAddress!)
        for i in 0..<20 {
            let r = try await fw.resolve(DNSQuestion(name: try DNSName("q\(i).ports.example"), type: .a)).get()
            #expect(r?.answers.first?.data == .a(ip("192.0.2.42")))
        }
        let ports = Set(upstream.queries.compactMap(\.source.port))
        #expect(upstream.queries.count == 20)
        #expect(ports.count >= 15, "source ports: \(ports.sorted())")
        await fw.shutdown()
        await upstream.close(channel)
    }

    @Test("an upstream query's socket is bound to the address facing the upstream, not 0.0.0.0")
    func boundToTheUpstreamFacingAddress() async throws {
        let (upstream, channel) = try await TestUpstream.start(.silent)
        let (fw, _) = try await makeForwarder(to: channel.localAddress!)
        let answer = fw.resolve(DNSQuestion(name: try DNSName("bound.example"), type: .a))
        #expect(await eventually { !upstream.queries.isEmpty })
        let open = try await fw.openSocketAddresses().get()
        #expect(open.count == 1)
        #expect(open.allSatisfy { $0.ipAddress == "127.0.0.1" && ($0.port ?? 0) != 0 }, "\(open)")
        #expect(upstream.queries.first?.source.port == open.first?.port)
        await fw.shutdown()
        #expect(try await answer.get() == nil)
        await upstream.close(channel)
    }

    @Test("forgeries (wrong port, ID, name, case, type or class) are dropped and never cached; the real answer is")
    func forgeriesAreNeverCached() async throws {
        let (upstream, channel) = try await TestUpstream.start(.forgeFirst)
        let logs = LogRecorder()
        let (fw, metrics) = try await makeForwarder(to: channel.localAddress!, logs: logs)
        let question = DNSQuestion(name: try DNSName("victim.bank.example"), type: .a)
        let first = try await fw.resolve(question).get()
        #expect(first?.answers.map(\.data) == [.a(ip("192.0.2.42"))])
        // The five forgeries from the upstream's own address were read and refused; the one from
        // another port never got past the kernel (the socket is connected to the upstream).
        #expect(try metrics.expectCounter("dns_upstream_mismatched_responses_total").totalValue == 5)
        // The cache holds the real answer: asked again, no new upstream query and the same answer.
        for _ in 0..<3 {
            let again = try await fw.resolve(question).get()
            #expect(again?.answers.map(\.data) == [.a(ip("192.0.2.42"))])
        }
        #expect(upstream.queries.count == 1)
        #expect(try metrics.expectCounter("dns_cache_hits_total").totalValue == 3)
        // The answer in another case is worth one warning: an upstream that drops the case breaks 0x20.
        #expect(logs.messages(.warning, containing: "dnsCaseRandomization: false").count == 1)
        await fw.shutdown()
        await upstream.close(channel)
    }

    @Test("0x20: the upstream sees mixed case; each client gets its own case back")
    func caseRandomisation() async throws {
        let (upstream, channel) = try await TestUpstream.start(.answer)
        let (fw, _) = try await makeForwarder(to: channel.localAddress!)
        let asked = ["abcdefghijklmnopqrstuvwxyz.one.example", "ABCDEFGHIJKLMNOPQRSTUVWXYZ.two.example"]
        for text in asked {
            let name = try DNSName(text)
            let r = try await fw.resolve(DNSQuestion(name: name, type: .a)).get()
            // The answer comes back owned by the name as asked, byte for byte.
            #expect(r?.answers.first?.name.wire == name.wire)
            #expect(r?.questions.first?.name.wire == name.wire)
        }
        let sent = upstream.queries.map(\.question.name)
        #expect(sent.count == 2)
        for (name, text) in zip(sent, asked) {
            let letters = name.wire.filter { ($0 | 0x20) &- 0x61 < 26 }
            // 26+ random letters: all of one case has odds of 2^-26.
            #expect(letters.contains { $0 < 0x61 } && letters.contains { $0 >= 0x61 }, "sent \(name)")
            #expect(name.equalsIgnoringCase(try DNSName(text)))
        }
        await fw.shutdown()
        await upstream.close(channel)
    }

    @Test(
        "0x20 through the server: a client asking in any case gets exactly its case back, also from the cache",
        .enabled(if: digPath != nil, "dig is not installed (apt-get install dnsutils)")
    )
    func caseThroughTheServer() async throws {
        let (upstream, channel) = try await TestUpstream.start(.answer)
        let fwd = DNSForwardingConfiguration(
            upstreams: ["127.0.0.1:\(channel.localAddress!.port!)"],
            timeout: .seconds(2),
            attempts: 1
        )
        let s = try await RunningServer.start(zone: meshInput(), forwarding: fwd)
        for asked in ["www.mixedcase.example", "WwW.MiXeDcAsE.eXaMpLe", "WWW.MIXEDCASE.EXAMPLE"] {
            let out = try await dig(s.port, [asked, "A"])
            #expect(out.contains(";\(asked).\t"), "\(out)")
            let answers = try await digAnswers(s.port, [asked, "A"])
            #expect(answers.count == 1, "\(answers)")
            #expect(
                answers.first?.hasPrefix("\(asked). ") == true && answers.first?.hasSuffix(" IN A 192.0.2.42") == true
            )
        }
        // One upstream query for all of them (the cache key ignores case), in mixed case.
        #expect(upstream.queries.count == 1)
        let lower = try DNSName("www.mixedcase.example")
        #expect(
            upstream.queries.first.map { $0.question.name != lower && $0.question.name.equalsIgnoringCase(lower) }
                == true
        )
        await s.stop()
        await upstream.close(channel)
    }

    @Test("an upstream TTL of 86400 is cached, and handed out, for at most the maximum")
    func ttlCap() async throws {
        #expect(DNSForwardingConfiguration().maxCacheTTL == 300)
        let (upstream, channel) = try await TestUpstream.start(.answer, ttl: 86400)
        let clock = ManualClock()
        let (fw, _) = try await makeForwarder(to: channel.localAddress!) {
            $0.maxCacheTTL = 1
            $0.now = { clock.deadline }
        }
        let question = DNSQuestion(name: try DNSName("long.ttl.example"), type: .a)
        let first = try await fw.resolve(question).get()
        #expect(first?.answers.first?.ttl == 1)
        await clock.advance(by: .milliseconds(999))
        let cached = try await fw.resolve(question).get()
        #expect((cached?.answers.first?.ttl ?? 99) <= 1)
        #expect(upstream.queries.count == 1)
        // Past the maximum the entry is gone and the upstream is asked again.
        await clock.advance(by: .milliseconds(2))
        let again = try await fw.resolve(question).get()
        #expect(again?.answers.first?.ttl == 1)
        #expect(upstream.queries.count == 2)
        await fw.shutdown()
        await upstream.close(channel)
    }

    @Test("the cache caps stored and handed-out TTLs at its maximum")
    func cacheCapsTTLs() {
        let t0 = NIODeadline.uptimeNanoseconds(1_000_000_000_000)
        let q = DNSQuestion(name: name("long.example"), type: .a)
        let key = DNSCacheKey(q)
        let m = DNSMessage(
            header: DNSHeader(id: 1, isResponse: true),
            questions: [q],
            answers: [DNSRecord(name: q.name, ttl: 86400, data: .a(ip("192.0.2.1")))],
            additionals: [DNSRecord(name: q.name, ttl: 86400, data: .a(ip("192.0.2.2")))]
        )
        let c = DNSCache(capacity: 10)
        #expect(c.maxTTL == 300)
        #expect(c.insert(key, m, now: t0))
        let hit = c.lookup(key, now: t0)
        #expect(hit?.answers.first?.ttl == 300 && hit?.additionals.first?.ttl == 300)
        #expect(c.lookup(key, now: t0 + .seconds(299))?.answers.first?.ttl == 1)
        #expect(c.lookup(key, now: t0 + .seconds(300)) == nil)
    }

    @Test("a truncated answer is fetched again over TCP, in 0x20 case, and arrives whole")
    func truncatedFallsBackToTCP() async throws {
        // Our own server as the upstream: 120 endpoints do not fit in 1232 bytes of UDP.
        let upstream = try await RunningServer.start(zone: meshInput())
        let (fw, _) = try await makeForwarder(to: upstream.udp)
        let name = try DNSName("many.shop.svc.cluster.local")
        let r = try await fw.resolve(DNSQuestion(name: name, type: .a)).get()
        #expect(r?.answers.count == 120)
        #expect(r?.answers.allSatisfy { $0.name.wire == name.wire } == true)
        await fw.shutdown()
        await upstream.stop()
    }

    @Test("upstream queries in flight (a socket each) are bounded; beyond the bound: SERVFAIL at once")
    func inFlightQueriesAreBounded() async throws {
        let (upstream, channel) = try await TestUpstream.start(.silent)
        let (fw, metrics) = try await makeForwarder(to: channel.localAddress!) { $0.maxUpstreamQueries = 2 }
        let waiting = (0..<2).map { fw.resolve(DNSQuestion(name: try! DNSName("slow\($0).example"), type: .a)) }
        #expect(await eventually { upstream.queries.count == 2 })
        let refused = try await fw.resolve(DNSQuestion(name: try DNSName("third.example"), type: .a)).get()
        #expect(refused == nil)
        #expect(try metrics.expectCounter("dns_upstream_failures_total").totalValue == 1)
        #expect(upstream.queries.count == 2)
        await fw.shutdown()
        for w in waiting { #expect(try await w.get() == nil) }
        await upstream.close(channel)
    }

    @Test("randomised case keeps every non-letter byte and the name's meaning")
    func randomisedCaseShape() throws {
        let n = try DNSName("a-1.B_2.example.COM")
        for _ in 0..<20 {
            let r = randomisedCase(n)
            #expect(r.equalsIgnoringCase(n) && r.wire.count == n.wire.count)
            #expect(zip(r.wire, n.wire).allSatisfy { a, b in a == b || a ^ 0x20 == b })
        }
        #expect(randomisedCase(.root) == .root)
    }
}
