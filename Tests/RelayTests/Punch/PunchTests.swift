import Foundation
import Logging
import MeshCore
import MeshIdentity
import MeshTestSupport
import MeshWire
import NIOCore
import NIOEmbedded
import NIOPosix
import Synchronization
import Testing

@testable import Relay

/// coturn's STUN/TURN server (package coturn), started by the tests on loopback.
let coturnServer = which("turnserver")

@Suite("PunchCodecTests", .rationed)
struct PunchCodecTests {
    let offer = RelaySessionMessage.punchOffer(
        PunchCandidates(
            id: 0x0102_0304_0506_0708,
            mapping: .portPreserving,
            candidates: [
                PunchCandidate(kind: .reflexive, ip: IPAddress("198.18.0.21")!, port: 7900),
                PunchCandidate(kind: .host, ip: IPAddress("198.19.1.2")!, port: 7900),
            ]
        )
    )

    @Test("punch messages byte for byte: offer, answer (IPv6), start, result; and back")
    func golden() throws {
        #expect(
            toHex(try self.offer.encode())
                == "20001a" + "0102030405060708" + "02" + "02" + "0204c6120015" + "1edc" + "0104c6130102" + "1edc"
        )
        let answer = RelaySessionMessage.punchAnswer(
            PunchCandidates(
                id: 9,
                mapping: .random,
                candidates: [PunchCandidate(kind: .reflexive, ip: IPAddress("2001:db8::1")!, port: 443)]
            )
        )
        #expect(
            toHex(try answer.encode())
                == "21001e" + "0000000000000009" + "05" + "01" + "0206" + "20010db8000000000000000000000001" + "01bb"
        )
        let start = RelaySessionMessage.punchStart(
            PunchStart(
                id: 9,
                mode: .simultaneousOpen,
                delayMillis: 60,
                rttMicros: 70_000,
                staggerMillis: 120,
                answererFirst: true
            )
        )
        #expect(toHex(try start.encode()) == "220012" + "0000000000000009" + "01" + "003c" + "00011170" + "0078" + "01")
        let result = RelaySessionMessage.punchResult(id: 9, ok: false, message: "peer mapping random")
        #expect(
            toHex(try result.encode())
                == "23001e" + "0000000000000009" + "00" + "0013"
                + toHex(Array("peer mapping random".utf8))
        )
        for m in [self.offer, answer, start, result] {
            let bytes = try m.encode()
            let back = try #require(try RelaySessionMessage.decode(bytes))
            #expect(back.message == m)
            #expect(back.length == bytes.count)
            // Every prefix is incomplete, never an error.
            for n in 0..<bytes.count { #expect(try RelaySessionMessage.decode(Array(bytes[..<n])) == nil) }
        }
    }

    @Test("malformed punch messages: mapping, kind, family, count, flag, mode; each with its offset")
    func malformed() throws {
        let good = try self.offer.encode()
        func fails(_ bytes: [UInt8], _ code: RelaySessionWireError.Code, at offset: Int) {
            #expect(throws: RelaySessionWireError(code, at: offset, "")) { try RelaySessionMessage.decode(bytes) }
        }
        var b = good
        b[11] = 9  // mapping
        fails(b, .badValue, at: 11)
        b = good
        b[12] = 17  // count over 16
        fails(b, .badValue, at: 12)
        b = good
        b[13] = 3  // candidate kind
        fails(b, .badValue, at: 13)
        b = good
        b[14] = 5  // family
        fails(b, .badValue, at: 14)
        b = good
        b[12] = 3  // one candidate more than there is
        fails(b, .truncated, at: good.count)
        let start = try RelaySessionMessage.punchStart(
            PunchStart(id: 1, mode: .offererDials, delayMillis: 1, rttMicros: 1, staggerMillis: 0, answererFirst: false)
        ).encode()
        var s = start
        s[11] = 0  // mode
        fails(s, .badValue, at: 11)
        s = start
        s[20] = 2  // flag
        fails(s, .badValue, at: 20)
        var r = try RelaySessionMessage.punchResult(id: 1, ok: true, message: "").encode()
        r[11] = 7
        fails(r, .badValue, at: 11)
        // Seventeen candidates cannot be encoded.
        let many = PunchCandidates(
            id: 1,
            mapping: .none,
            candidates: Array(repeating: PunchCandidate(kind: .host, ip: IPAddress("198.18.0.1")!, port: 1), count: 17)
        )
        #expect(throws: RelaySessionWireError(.unencodable, at: 0, "")) {
            try RelaySessionMessage.punchOffer(many).encode()
        }
    }
}

@Suite("NATClassificationTests", .rationed)
struct NATClassificationTests {
    let own = [IPAddress("198.19.1.2")!]

    func a(_ ip: String, _ port: UInt16) -> STUNAddress { STUNAddress(ip: IPAddress(ip)!, port: port) }

    @Test("mapping kinds from what two STUN endpoints saw of the link port")
    func classify() {
        let c = { (b: [STUNAddress]) in NATDiscovery.classify(localPort: 7900, localAddresses: self.own, bindings: b) }
        #expect(c([]) == .unknown)
        #expect(c([self.a("198.19.1.2", 7900), self.a("198.19.1.2", 7900)]) == .none)
        #expect(c([self.a("198.18.0.21", 7900), self.a("198.18.0.21", 7900)]) == .portPreserving)
        #expect(c([self.a("198.18.0.21", 7900)]) == .portPreserving)
        #expect(c([self.a("198.18.0.21", 40000), self.a("198.18.0.21", 40000)]) == .endpointIndependent)
        #expect(c([self.a("198.18.0.21", 40000)]) == .unknown)
        #expect(c([self.a("198.18.0.21", 40000), self.a("198.18.0.21", 40002)]) == .endpointDependent)
        #expect(c([self.a("198.18.0.21", 40000), self.a("198.18.0.21", 61234)]) == .random)
    }

    @Test("what theory allows for each pair of mappings")
    func plans() {
        let p = { (m: NATMapping, q: NATMapping) in
            PunchPlan.plan(mine: m, peer: q, mineReachable: true, peerReachable: true)
        }
        #expect(p(.portPreserving, .portPreserving) == .simultaneousOpen)
        #expect(p(.endpointIndependent, .portPreserving) == .simultaneousOpen)
        #expect(p(.portPreserving, .none) == .offererDials)
        #expect(p(.none, .portPreserving) == .answererDials)
        #expect(p(.portPreserving, .random) == .impossible("peer mapping random"))
        #expect(p(.random, .portPreserving) == .impossible("own mapping random"))
        #expect(p(.random, .random) == .impossible("peer mapping random"))
        #expect(p(.portPreserving, .endpointDependent) == .impossible("peer mapping endpointDependent"))
        #expect(p(.portPreserving, .unknown) == .impossible("peer mapping unknown"))
        #expect(
            PunchPlan.plan(mine: .portPreserving, peer: .portPreserving, mineReachable: true, peerReachable: false)
                == .impossible("peer has no reflexive address")
        )
    }
}

@Suite("STUNClientTests", .serialized, .timeLimit(.minutes(2)), .rationed)
struct STUNClientTests {
    /// A timeout far above the default 2 s: on a loaded machine our in-process server (or coturn) may answer
    /// late, and these tests are about what the answer says, not how fast it comes (`noAnswer` sets its own).
    let client: STUNClient = {
        var client = STUNClient(group: MultiThreadedEventLoopGroup.singleton)
        client.timeout = .seconds(10)
        return client
    }()

    @Test("our STUN server: UDP and TCP bindings from a chosen local port report that very port")
    func ourServer() async throws {
        let stun = try await RunningSTUN.start(hosts: ["127.0.0.1"])
        let listener = try #require(stun.listeners.first)
        let port = freePort()
        let local = try SocketAddress(ipAddress: "127.0.0.1", port: port)
        let udp = try await self.client.bindingUDP(server: listener.udp, local: local)
        #expect(udp.mapped == STUNAddress(ip: IPAddress("127.0.0.1")!, port: UInt16(port)))
        #expect(udp.transport == .udp)
        let tcp = try await self.client.bindingTCP(server: try #require(listener.tcp), local: local)
        #expect(tcp.mapped == STUNAddress(ip: IPAddress("127.0.0.1")!, port: UInt16(port)))
        // Again from the same port at once: no TIME_WAIT in the way (SO_LINGER 0).
        let again = try await self.client.bindingTCP(server: try #require(listener.tcp), local: local)
        #expect(again.mapped.port == UInt16(port))
        // From a port a link listener holds (SO_REUSEPORT on both).
        let held = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .serverChannelOption(SimultaneousOpen.reusePort, value: 1)
            .bind(host: "0.0.0.0", port: 0).get()
        let heldPort = try #require(held.localAddress?.port)
        let shared = try await self.client.bindingTCP(
            server: try #require(listener.tcp),
            local: try SocketAddress(ipAddress: "0.0.0.0", port: heldPort)
        )
        #expect(shared.mapped == STUNAddress(ip: IPAddress("127.0.0.1")!, port: UInt16(heldPort)))
        try await held.close()

        // Discovery over two endpoints of this host: no NAT.
        let second = try await RunningSTUN.start(hosts: ["127.0.0.1"])
        let servers = [listener.tcp!, second.listeners[0].tcp!]
        let report = await NATDiscovery.discover(
            client: self.client,
            servers: servers,
            localPort: port,
            localAddresses: [IPAddress("127.0.0.1")!]
        )
        #expect(report.mapping == .none)
        #expect(report.reflexive == STUNAddress(ip: IPAddress("127.0.0.1")!, port: UInt16(port)))
        // The UDP requests went to the TCP ports (no UDP there, or another): errors are reported, not thrown.
        #expect(report.bindings.filter { $0.transport == .tcp }.count == 2)
        #expect(report.nodeCandidates.mapping == "none")
        await second.stop()
        await stun.stop()
    }

    @Test("no answer: a clear timeout, not a hang")
    func noAnswer() async throws {
        var client = self.client
        client.timeout = .milliseconds(300)
        let silent = try await DatagramBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .bind(host: "127.0.0.1", port: 0).get()
        let server = try #require(silent.localAddress)
        await #expect(throws: STUNClientError.timedOut(server: "\(server)", .udp)) {
            try await client.bindingUDP(server: server)
        }
        try await silent.close()
    }

    @Test(
        "coturn's turnserver on loopback: UDP and TCP bindings from a chosen port",
        .enabled(if: coturnServer != nil, "coturn's turnserver is not installed (apt-get install coturn)")
    )
    func coturn() async throws {
        let port = freePort()
        let dir = TempDir()
        let server = try Subprocess(
            coturnServer!,
            [
                "-n", "--log-file=stdout", "--simple-log", "--no-cli", "--no-tls", "--no-dtls", "-L", "127.0.0.1",
                "-p", "\(port)", "--allow-loopback-peers", "-z", "--pidfile", dir.path + "/turn.pid",
                "--userdb", dir.path + "/turn.db", "--no-auth",
            ]
        )
        defer { server.signal(SIGTERM) }
        let target = try SocketAddress(ipAddress: "127.0.0.1", port: port)
        let local = try SocketAddress(ipAddress: "127.0.0.1", port: freePort())
        var udp: STUNBinding?
        #expect(
            await eventually(timeout: .seconds(60)) {
                udp = try? await self.client.bindingUDP(server: target, local: local)
                return udp != nil
            },
            "turnserver did not answer: \(server.stdout.suffix(2000))"
        )
        #expect(udp?.mapped == STUNAddress(ip: IPAddress("127.0.0.1")!, port: UInt16(local.port!)))
        let tcp = try await self.client.bindingTCP(server: target, local: local)
        #expect(tcp.mapped == STUNAddress(ip: IPAddress("127.0.0.1")!, port: UInt16(local.port!)))
    }
}

/// Collects what a stream receives (read from the test).
final class StreamCollector: ChannelInboundHandler, Sendable {
    typealias InboundIn = ByteBuffer
    let bytes = Mutex<[UInt8]>([])
    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let b = self.unwrapInboundIn(data)
        self.bytes.withLock { $0 += b.readableBytesView }
    }
}

@Suite("PunchUpgradeTests", .serialized, .timeLimit(.minutes(2)), .rationed)
struct PunchUpgradeTests {
    /// Two nodes with no advertised link address, on one relay, each with NAT discovery against two STUN
    /// servers on loopback (mapping `none`) and a punch coordinator.
    @Test(
        "relay first, then upgrade: a stream open on the circuit carries on; new streams go direct; the circuit closes after"
    )
    func relayedThenDirect() async throws {
        let pki = try RelaySessionServerTests.PKI()
        let relay = try await TestRelay.start("r1", pki)
        let relays = RelayBook()
        relays.set([relay.object])
        let book = AddressBook()
        let backend = try await startEchoBackend()
        let target = webTarget(port: backend.localAddress!.port!)
        let stunA = try await RunningSTUN.start(hosts: ["127.0.0.1"])
        let stunB = try await RunningSTUN.start(hosts: ["127.0.0.1"])
        let servers = [stunA.listeners[0].tcp!, stunB.listeners[0].tcp!]
        let a = try await RelayedNode.make("a", ca: pki.ca, book: book, relays: relays)
        let b = try await RelayedNode.make("b", ca: pki.ca, book: book, relays: relays)
        book.set("a", [])
        book.set("b", [])  // neither advertises a link address: the first link is relayed
        var coordinators: [PunchCoordinator] = []
        for node in [a, b] {
            let discovery = NATDiscoveryService(
                client: STUNClient(group: MultiThreadedEventLoopGroup.singleton),
                localPort: node.node.address.port!,
                servers: { servers },
                localAddresses: { [IPAddress("127.0.0.1")!] }
            )
            #expect(await discovery.discover().mapping == .none)
            var configuration = PunchConfiguration()
            configuration.linkPort = node.node.address.port!
            let c = PunchCoordinator(links: node.manager, discovery: discovery, configuration: configuration)
            c.install()
            coordinators.append(c)
        }
        #expect(await eventually { a.client.home == "r1" && b.client.home == "r1" })

        // The first stream: over the relay, at once.
        let collector = StreamCollector()
        let first = try await a.manager.stream(to: "b", open: target) { stream in
            stream.eventLoop.makeCompletedFuture { try stream.pipeline.syncOperations.addHandler(collector) }
        }
        try await first.writeAndFlush(ByteBuffer(string: "before")).get()
        #expect(await eventually { collector.bytes.withLock { $0 } == Array("before".utf8) })
        let relayed = try #require(a.manager.allLinks.first { $0.path.relay != nil })

        // The upgrade: b has no NAT, so a dials b's reflexive address; both adopt the direct link.
        #expect(await eventually { a.manager.currentLink(to: "b")?.path == .direct })
        #expect(await eventually { b.manager.currentLink(to: "a")?.path == .direct })
        // The coordinator hears of the upgrade just after the link table has it: wait for its count.
        #expect(await eventually { coordinators[0].stats(for: "b")?.upgrades == 1 })
        let stats = try #require(coordinators[0].stats(for: "b"))
        #expect(stats.upgrades == 1)
        #expect(stats.localMapping == "none" && stats.peerMapping == "none")
        #expect(stats.upgradeMillis != nil)
        // The stream on the circuit carries on, undisturbed.
        #expect(relayed.isActive)
        try await first.writeAndFlush(ByteBuffer(string: " after")).get()
        #expect(await eventually { collector.bytes.withLock { $0 } == Array("before after".utf8) })
        // New streams go direct.
        let direct = try #require(a.manager.currentLink(to: "b"))
        let payload = ByteBuffer(repeating: 7, count: 100_000)
        let back = try await echoThrough(a.manager, to: "b", target: target, payload: payload)
        #expect(back == payload)
        let row = try #require(await a.manager.stats().first)
        #expect(row.path == "direct")
        #expect(row.bytesSent >= 100_000)
        #expect(direct.isActive)
        // The circuit closes once its last stream is done.
        try await first.close()
        #expect(await eventually { !relayed.isActive })

        await a.stop()
        await b.stop()
        await stunA.stop()
        await stunB.stop()
        try await relay.kill()
        try await backend.close()
    }
}

@Suite("PunchHandlerTests", .rationed)
struct PunchHandlerTests {
    @Test(
        "PunchStreamHandler on an EmbeddedChannel: frames in pieces arrive whole and in order; garbage ends the stream"
    )
    func punchStreamFrames() async throws {
        let inbox = PunchInbox()
        let channel = EmbeddedChannel(handler: PunchStreamHandler(inbox: inbox))
        let start = RelaySessionMessage.punchStart(
            PunchStart(
                id: 5,
                mode: .simultaneousOpen,
                delayMillis: 60,
                rttMicros: 900,
                staggerMillis: 120,
                answererFirst: false
            )
        )
        let bytes = try PunchCodecTests().offer.encode() + (try start.encode())
        // One byte at a time, then the rest.
        for b in bytes.prefix(7) { try channel.writeInbound(ByteBuffer(bytes: [b])) }
        try channel.writeInbound(ByteBuffer(bytes: bytes.dropFirst(7)))
        #expect(await inbox.next(within: .seconds(1)) == PunchCodecTests().offer)
        #expect(await inbox.next(within: .seconds(1)) == start)
        // Nothing more: the wait times out with nil.
        #expect(await inbox.next(within: .milliseconds(50)) == nil)
        // A type no session knows: the inbox closes and so does the stream.
        try channel.writeInbound(ByteBuffer(bytes: [0x7E, 0, 0]))
        #expect(await inbox.next(within: .seconds(1)) == nil)
        #expect(!channel.isActive)
    }

    @Test("STUNAnswerHandler on an EmbeddedChannel: an answer in pieces, another transaction skipped, not-STUN fails")
    func stunAnswerFraming() throws {
        let loop = EmbeddedEventLoop()
        let id = STUNTransactionID.random()
        let answer = loop.makePromise(of: STUNMessage.self)
        let channel = EmbeddedChannel(
            handler: STUNAnswerHandler(transaction: id, server: "s", answer: answer),
            loop: loop
        )
        let mapped = STUNAddress(ip: IPAddress("198.18.0.21")!, port: 7900)
        let other = try STUNMessage(
            type: .bindingSuccess,
            transactionID: .random(),
            attributes: [.xorMappedAddress(mapped)]
        )
        .encode()
        let mine = try STUNMessage(type: .bindingSuccess, transactionID: id, attributes: [.xorMappedAddress(mapped)])
            .encode()
        let wire = other + mine
        try channel.writeInbound(ByteBuffer(bytes: wire.prefix(25)))
        try channel.writeInbound(ByteBuffer(bytes: wire.dropFirst(25)))
        let got = try answer.futureResult.wait()
        #expect(got.transactionID == id)
        let binding = try STUNClient.binding(
            got,
            server: try SocketAddress(ipAddress: "127.0.0.1", port: 1),
            transport: .tcp,
            local: nil,
            start: .now
        )
        #expect(binding.mapped == mapped)

        let failed = loop.makePromise(of: STUNMessage.self)
        let garbage = EmbeddedChannel(
            handler: STUNAnswerHandler(transaction: id, server: "s", answer: failed),
            loop: loop
        )
        try garbage.writeInbound(ByteBuffer(string: "HTTP/1.1 200 OK\r\n"))
        #expect(throws: STUNClientError.self) { try failed.futureResult.wait() }
        #expect(!garbage.isActive)
    }
}

@Suite("LinkPortSharingTests", .rationed)
struct LinkPortSharingTests {
    @Test("the link listener shares its port with punches and STUN (SO_REUSEPORT), but not with another listener")
    func aSecondListenerOnTheLinkPortFails() async throws {
        let ca = try CertificateAuthority.create()
        let book = AddressBook()
        let first = try await LinkNode.make("a", ca: ca, book: book)
        let port = try #require(first.address.port)
        let second = LinkListener(
            manager: first.manager,
            address: try SocketAddress(ipAddress: "127.0.0.1", port: port)
        )
        await #expect(throws: (any Error).self) { try await second.bind() }
        // A STUN request can still leave from it.
        let stun = try await RunningSTUN.start(hosts: ["127.0.0.1"])
        var client = STUNClient(group: MultiThreadedEventLoopGroup.singleton)
        client.timeout = .seconds(30)  // its 2 s went by on a busy machine, every suite running at once
        let binding = try await client.bindingTCP(
            server: try #require(stun.listeners.first?.tcp),
            local: try SocketAddress(ipAddress: "127.0.0.1", port: port)
        )
        #expect(binding.mapped.port == UInt16(port))
        await stun.stop()
        await first.stop()
    }
}
