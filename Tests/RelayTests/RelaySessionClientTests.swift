import Crypto
import Logging
import MeshCore
import MeshIdentity
import MeshTestSupport
import MeshWire
import NIOCore
import NIOEmbedded
import NIOPosix
import NIOSSL
import Synchronization
import Testing

@testable import Relay

#if canImport(Glibc)
import Glibc
#endif

/// The relays a test's agents see (the control plane's list in the agent).
final class RelayBook: Sendable {
    private let relays = Mutex<[Relay]>([])
    func set(_ relays: [Relay]) { self.relays.withLock { $0 = relays } }
    func get() -> [Relay] { self.relays.withLock { $0 } }
}

/// A relay of the test on 127.0.0.1 with its own event loop (shutting it down kills every
/// connection, as a killed process would).
struct TestRelay {
    let server: RelaySessionServer
    let group: MultiThreadedEventLoopGroup
    let port: Int
    let name: String
    /// Its certificate's serial (hex).
    let serial: String

    static func start(
        _ name: String,
        _ pki: RelaySessionServerTests.PKI,
        identity: MeshPrincipal? = nil,
        locate: (@Sendable (String) async -> RelayLocation?)? = nil
    ) async throws -> TestRelay {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        var logger = Logger(label: "relay-\(name)")
        logger.logLevel = .critical
        var configuration = RelaySessionConfiguration(
            listen: ListenAddress(host: "127.0.0.1", port: 0),
            relayName: name
        )
        configuration.locate = locate
        // No test here is about the first message's bound: a loaded machine (the whole suite under two busy
        // loops) took over the 10 s default to send one.
        configuration.firstMessageTimeout = .seconds(60)
        let credentials = try pki.credentials(identity ?? .relay(name))
        let server = try RelaySessionServer(
            configuration: configuration,
            credentials: credentials,
            group: group,
            logger: logger
        )
        let address = try await server.start()
        return TestRelay(
            server: server,
            group: group,
            port: address.port!,
            name: name,
            serial: MeshTLS.serialHex(credentials.certificate.serialNumber)
        )
    }

    var object: Relay {
        Relay(
            metadata: ObjectMeta(name: self.name),
            spec: RelaySpec(addresses: ["127.0.0.1:\(self.port)"]),
            status: RelayStatus(phase: .ready)
        )
    }

    /// Its sockets close at once, the spliced circuits' too (they left NIO for the splice threads).
    func kill() async throws {
        self.server.splicer.stop()
        try await self.group.shutdownGracefully()
    }
}

/// A stand-in relay that welcomes, answers pings until `silence()`, then says nothing more (as a
/// relay behind a dead path does: no FIN, no RST).
struct MuteRelay {
    let channel: any Channel
    let muted: Muted
    let name: String

    final class Muted: Sendable {
        let value = Mutex(false)
    }

    final class Handler: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        typealias OutboundOut = ByteBuffer
        let name: String
        let muted: Muted
        var buffer: [UInt8] = []
        init(name: String, muted: Muted) {
            self.name = name
            self.muted = muted
        }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            var bytes = self.unwrapInboundIn(data)
            self.buffer += bytes.readBytes(length: bytes.readableBytes) ?? []
            while let (message, length) = try? RelaySessionMessage.decode(self.buffer) {
                self.buffer.removeFirst(length)
                if self.muted.value.withLock({ $0 }) { continue }
                let answer: RelaySessionMessage
                switch message {
                case .hello: answer = .welcome(relay: self.name, keepaliveSeconds: 15)
                case .ping(let v): answer = .pong(v)
                default: continue
                }
                context.writeAndFlush(self.wrapOutboundOut(ByteBuffer(bytes: try! answer.encode())), promise: nil)
            }
        }
    }

    static func start(_ name: String, _ pki: RelaySessionServerTests.PKI) async throws -> MuteRelay {
        let tls = try MeshTLS.serverContext(try pki.credentials(.relay(name)), requireClientCertificate: true)
        let muted = Muted()
        let channel = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .childChannelInitializer { child in
                child.eventLoop.makeCompletedFuture {
                    try child.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: tls))
                    try child.pipeline.syncOperations.addHandler(Handler(name: name, muted: muted))
                }
            }
            .bind(host: "127.0.0.1", port: 0).get()
        return MuteRelay(channel: channel, muted: muted, name: name)
    }

    func silence() { self.muted.value.withLock { $0 = true } }

    var object: Relay {
        Relay(
            metadata: ObjectMeta(name: self.name),
            spec: RelaySpec(addresses: ["127.0.0.1:\(self.channel.localAddress!.port!)"]),
            status: RelayStatus(phase: .ready)
        )
    }
}

/// A node of the test with its link manager and its relay client running.
struct RelayedNode {
    let node: LinkNode
    let client: RelaySessionClient
    let task: Task<Void, any Error>

    static func make(
        _ name: String,
        ca: CertificateAuthority,
        book: AddressBook,
        relays: RelayBook,
        configuration: LinkConfiguration = LinkConfiguration(),
        client settings: RelaySessionClientConfiguration? = nil,
        revoked: RevokedSerials? = nil
    ) async throws -> RelayedNode {
        let node = try await LinkNode.make(name, ca: ca, book: book, configuration: configuration, revoked: revoked)
        var logger = Logger(label: "relay-client-\(name)")
        logger.logLevel = .critical
        var settings = settings ?? RelaySessionClientConfiguration()
        settings.maxBackoff = .seconds(1)
        let client = RelaySessionClient(
            node: name,
            links: node.manager,
            relays: { relays.get() },
            configuration: settings,
            logger: logger
        )
        node.manager.setCircuitDialer { try await client.circuit(to: $0) }
        let task = Task { try await client.run() }
        return RelayedNode(node: node, client: client, task: task)
    }

    var manager: LinkManager { self.node.manager }

    func stop() async {
        self.task.cancel()
        _ = try? await self.task.value
        await self.node.stop()
    }
}

/// A loopback listener whose accept queue is full and never accepted: SYNs to it are dropped (as a
/// firewall drops them), so a dial hangs until its connect timeout.
final class Blackhole: Sendable {
    let fds: [Int32]
    let address: SocketAddress

    init() throws {
        let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, len) }
        }
        _ = withUnsafeMutablePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(listener, $0, &len) }
        }
        listen(listener, 0)
        var fds = [listener]
        // Fill the accept queue (backlog 0 holds one); non-blocking, so a dropped SYN does not block.
        for _ in 0..<2 {
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
            _ = withUnsafePointer(to: &addr) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, len) }
            }
            fds.append(fd)
        }
        self.fds = fds
        self.address = try SocketAddress(ipAddress: "127.0.0.1", port: Int(UInt16(bigEndian: addr.sin_port)))
    }

    func close() { for fd in self.fds { _ = Glibc.close(fd) } }
}

@Suite("RelaySessionClientTests", .serialized, .timeLimit(.minutes(3)), .rationed)
struct RelaySessionClientTests {
    func random(_ count: Int, seed: UInt64) -> ByteBuffer {
        var rng = SplitMix(seed: seed)
        return ByteBuffer(bytes: (0..<count).map { _ in UInt8.random(in: 0...255, using: &rng) })
    }

    @Test("two agents on one relay: a relayed link carries 4 MiB through a stream intact; /peers shows relayed, r1")
    func relayedLinkCarriesBytesIntact() async throws {
        let pki = try RelaySessionServerTests.PKI()
        let relay = try await TestRelay.start("r1", pki)
        let relays = RelayBook()
        relays.set([relay.object])
        let book = AddressBook()
        let backend = try await startEchoBackend()
        let port = backend.localAddress!.port!
        let a = try await RelayedNode.make("a", ca: pki.ca, book: book, relays: relays)
        let b = try await RelayedNode.make("b", ca: pki.ca, book: book, relays: relays)
        book.set("a", [])
        book.set("b", [])  // b advertises no link address: only the relay reaches it
        #expect(await eventually { a.client.home == "r1" && b.client.home == "r1" })
        #expect(a.client.status.rttMicros != nil)

        let payload = self.random(4 << 20, seed: 7)
        let back = try await echoThrough(a.manager, to: "b", target: webTarget(port: port), payload: payload)
        #expect(back.readableBytes == payload.readableBytes)
        #expect(SHA256.hash(data: Array(buffer: back)) == SHA256.hash(data: Array(buffer: payload)))
        let row = try #require(await a.manager.stats().first)
        #expect(row.node == "b")
        #expect(row.path == "relayed")
        #expect(row.relay == "r1")
        #expect(row.bytesSent >= UInt64(payload.readableBytes))  // and the stream's open header
        #expect(a.client.status.circuitsDialed == 1)
        #expect(await eventually { b.client.status.circuitsAccepted == 1 })
        #expect(await eventually { await b.manager.stats().first?.path == "relayed" })

        await a.stop()
        await b.stop()
        try await relay.kill()
        try await backend.close()
    }

    @Test("a peer whose link address drops SYNs is reached over the relay in well under the connect timeout")
    func blackholedDirectGetsRelayedFast() async throws {
        let pki = try RelaySessionServerTests.PKI()
        let relay = try await TestRelay.start("r1", pki)
        let relays = RelayBook()
        relays.set([relay.object])
        let book = AddressBook()
        let hole = try Blackhole()
        defer { hole.close() }
        let backend = try await startEchoBackend()
        let port = backend.localAddress!.port!
        // The direct dial to the blackhole would wait its whole connect timeout (10 minutes, beyond the
        // suite's time limit): the echo coming back at all shows the relayed dial did not wait for it
        // (no bound on the elapsed time, which load could break).
        var configuration = LinkConfiguration()
        configuration.connectTimeout = .seconds(600)
        let a = try await RelayedNode.make("a", ca: pki.ca, book: book, relays: relays, configuration: configuration)
        let b = try await RelayedNode.make("b", ca: pki.ca, book: book, relays: relays)
        book.set("b", [hole.address])
        #expect(await eventually { a.client.home == "r1" && b.client.home == "r1" })

        let x = ByteBuffer(string: "firewalled site")
        #expect(try await echoThrough(a.manager, to: "b", target: webTarget(port: port), payload: x) == x)
        #expect(a.manager.currentLink(to: "b")?.path == .relayed("r1"))

        // A dead address (connection refused): the relayed dial starts at once.
        let c = try await RelayedNode.make("c", ca: pki.ca, book: book, relays: relays)
        book.set("c", [try SocketAddress(ipAddress: "127.0.0.1", port: freePort())])
        #expect(await eventually { c.client.home == "r1" })
        #expect(try await echoThrough(a.manager, to: "c", target: webTarget(port: port), payload: x) == x)
        #expect(a.manager.currentLink(to: "c")?.path == .relayed("r1"))

        await a.stop()
        await b.stop()
        await c.stop()
        try await relay.kill()
        try await backend.close()
    }

    @Test("a direct link still wins when the peer can be dialed")
    func directWinsWhenReachable() async throws {
        let pki = try RelaySessionServerTests.PKI()
        let relay = try await TestRelay.start("r1", pki)
        let relays = RelayBook()
        relays.set([relay.object])
        let book = AddressBook()
        let backend = try await startEchoBackend()
        let port = backend.localAddress!.port!
        // The relay waits `relayDelay` for the direct dial before it starts a circuit: a minute here, so that a
        // loaded machine's slow handshake cannot start one (300 ms by default; the dial succeeds, so no wait).
        var configuration = LinkConfiguration()
        configuration.relayDelay = .seconds(60)
        let a = try await RelayedNode.make("a", ca: pki.ca, book: book, relays: relays, configuration: configuration)
        let b = try await RelayedNode.make("b", ca: pki.ca, book: book, relays: relays, configuration: configuration)
        #expect(await eventually { a.client.home == "r1" && b.client.home == "r1" })
        let x = ByteBuffer(string: "direct")
        #expect(try await echoThrough(a.manager, to: "b", target: webTarget(port: port), payload: x) == x)
        #expect(a.manager.currentLink(to: "b")?.path == .direct)
        #expect(a.client.status.circuitsDialed == 0)
        await a.stop()
        await b.stop()
        try await relay.kill()
        try await backend.close()
    }

    @Test("A homed on r1, B on r2: r1 forwards the circuit to r2 (relay to relay), 1 MiB intact both ways")
    func forwardedCircuit() async throws {
        let pki = try RelaySessionServerTests.PKI()
        // Where nodes are homed, as the control plane would tell the relays (Node status.relay).
        let homes = Mutex<[String: RelayLocation]>([:])
        let locate: @Sendable (String) async -> RelayLocation? = { node in homes.withLock { $0[node] } }
        let r1 = try await TestRelay.start("r1", pki, locate: locate)
        let r2 = try await TestRelay.start("r2", pki, locate: locate)
        let onR1 = RelayBook()
        onR1.set([r1.object])
        let onR2 = RelayBook()
        onR2.set([r2.object])
        let book = AddressBook()
        let backend = try await startEchoBackend()
        let port = backend.localAddress!.port!
        let a = try await RelayedNode.make("a", ca: pki.ca, book: book, relays: onR1)
        let b = try await RelayedNode.make("b", ca: pki.ca, book: book, relays: onR2)
        book.set("a", [])
        book.set("b", [])
        #expect(await eventually { a.client.home == "r1" && b.client.home == "r2" })
        let r1Address = try SocketAddress(ipAddress: "127.0.0.1", port: r1.port)
        let r2Address = try SocketAddress(ipAddress: "127.0.0.1", port: r2.port)
        homes.withLock {
            $0["a"] = RelayLocation(relay: "r1", addresses: [r1Address])
            $0["b"] = RelayLocation(relay: "r2", addresses: [r2Address])
        }

        let payload = self.random(1 << 20, seed: 11)
        let back = try await echoThrough(a.manager, to: "b", target: webTarget(port: port), payload: payload)
        #expect(SHA256.hash(data: Array(buffer: back)) == SHA256.hash(data: Array(buffer: payload)))
        #expect(a.manager.currentLink(to: "b")?.path == .relayed("r1"))
        #expect(await eventually { b.manager.currentLink(to: "a")?.path == .relayed("r2") })
        // Both relays splice it off NIO: r2 its two accepted halves, r1 the node's half and its own to r2.
        #expect(await eventually { r1.server.splicer.openCircuits == 1 && r2.server.splicer.openCircuits == 1 })

        // A node r2 does not know: r1 passes on r2's refusal.
        homes.withLock { $0["c"] = RelayLocation(relay: "r2", addresses: [r2Address]) }
        await #expect {
            _ = try await a.client.circuit(to: "c")
        } throws: { error in
            guard let e = error as? RelayClientError, case .refused(.nodeOffline, let text) = e.kind else {
                return false
            }
            return e.relay == "r1" && text.contains("via relay r2")
        }

        await a.stop()
        await b.stop()
        try await r1.kill()
        try await r2.kill()
        try await backend.close()
    }

    @Test(
        "the link's TLS rides the unwrapped circuit end to end: a circuit to another node than the one meant is refused by the dialer"
    )
    func impostorOnACircuitIsRefusedByTheLink() async throws {
        let pki = try RelaySessionServerTests.PKI()
        let relay = try await TestRelay.start("r1", pki)
        let relays = RelayBook()
        relays.set([relay.object])
        let book = AddressBook()
        let a = try await RelayedNode.make("a", ca: pki.ca, book: book, relays: relays)
        let c = try await RelayedNode.make("c", ca: pki.ca, book: book, relays: relays)
        book.set("a", [])
        book.set("c", [])
        #expect(await eventually { a.client.home == "r1" && c.client.home == "r1" })
        // As if the relay (or whoever took the circuit: the relay session's TLS is gone after ready)
        // had paired a's circuit for b with c: a's link expects exactly mesh://node/b.
        let (channel, _) = try await a.client.circuit(to: "c")
        await #expect(throws: LinkError.handshakeFailed("the server presented mesh://node/c, not mesh://node/b")) {
            _ = try await a.manager.establish(over: channel, role: .dialer(expect: "b"), path: .relayed("r1")).get()
        }
        #expect(a.manager.currentLink(to: "b") == nil)
        #expect(await c.manager.stats().isEmpty)
        await a.stop()
        await c.stop()
        try await relay.kill()
    }

    @Test("the home relay dies: streams on its circuit end, both agents re-home on the closed connection")
    func rehomeWhenTheRelayDies() async throws {
        let pki = try RelaySessionServerTests.PKI()
        let r1 = try await TestRelay.start("r1", pki)
        let r2 = try await TestRelay.start("r2", pki)
        let relays = RelayBook()
        relays.set([r1.object])
        let book = AddressBook()
        let backend = try await startEchoBackend()
        let port = backend.localAddress!.port!
        // Pings every 10 minutes at most: a re-home within the minute below can only come from the
        // closed connection, not from a ping timeout (no bound on the elapsed time).
        var settings = RelaySessionClientConfiguration()
        settings.maxPingInterval = .seconds(600)
        settings.pongTimeout = .seconds(600)
        let a = try await RelayedNode.make("a", ca: pki.ca, book: book, relays: relays, client: settings)
        let b = try await RelayedNode.make("b", ca: pki.ca, book: book, relays: relays, client: settings)
        book.set("a", [])
        book.set("b", [])
        #expect(await eventually { a.client.home == "r1" && b.client.home == "r1" })
        relays.set([r1.object, r2.object])
        let homes = Mutex<[String?]>([])
        a.client.onHomeChange { home in homes.withLock { $0.append(home) } }

        // A stream left open on the circuit through r1.
        let open = try await a.manager.stream(to: "b", open: webTarget(port: port))
        #expect(a.manager.currentLink(to: "b")?.path == .relayed("r1"))

        try await r1.kill()
        #expect(await eventually(timeout: .seconds(60)) { !open.isActive }, "the stream on the dead circuit hangs")
        #expect(await eventually(timeout: .seconds(60)) { a.client.home == "r2" && b.client.home == "r2" })
        #expect(a.client.status.sessions == 2)
        #expect(homes.withLock { $0 } == [nil, "r2"])

        let x = ByteBuffer(string: "after the re-home")
        #expect(try await echoThrough(a.manager, to: "b", target: webTarget(port: port), payload: x) == x)
        #expect(a.manager.currentLink(to: "b")?.path == .relayed("r2"))

        await a.stop()
        await b.stop()
        try await r2.kill()
        try await backend.close()
    }

    @Test("both nodes dialing each other over the relay at once end with one link, the one a dialed")
    func simultaneousRelayedDial() async throws {
        let pki = try RelaySessionServerTests.PKI()
        let relay = try await TestRelay.start("r1", pki)
        let relays = RelayBook()
        relays.set([relay.object])
        let book = AddressBook()
        let backend = try await startEchoBackend()
        let port = backend.localAddress!.port!
        let a = try await RelayedNode.make("a", ca: pki.ca, book: book, relays: relays)
        let b = try await RelayedNode.make("b", ca: pki.ca, book: book, relays: relays)
        book.set("a", [])
        book.set("b", [])
        #expect(await eventually { a.client.home == "r1" && b.client.home == "r1" })
        for round in 0..<3 {
            async let fromA = a.manager.link(to: "b")
            async let fromB = b.manager.link(to: "a")
            _ = try await (fromA, fromB)
            let settled = await eventually {
                a.manager.allLinks.count == 1 && b.manager.allLinks.count == 1
                    && a.manager.currentLink(to: "b")?.dialer == "a" && b.manager.currentLink(to: "a")?.dialer == "a"
            }
            #expect(settled, "round \(round): a has \(a.manager.allLinks), b has \(b.manager.allLinks)")
            let x = ByteBuffer(string: "round \(round)")
            #expect(try await echoThrough(a.manager, to: "b", target: webTarget(port: port), payload: x) == x)
            #expect(try await echoThrough(b.manager, to: "a", target: webTarget(port: port), payload: x) == x)
            #expect(a.manager.currentLink(to: "b")?.path == .relayed("r1"))
            a.manager.peerLeft("b")
            b.manager.peerLeft("a")
            #expect(await eventually { a.manager.allLinks.isEmpty && b.manager.allLinks.isEmpty })
        }
        await a.stop()
        await b.stop()
        try await relay.kill()
        try await backend.close()
    }

    @Test("a home relay that goes silent (no FIN) is left for another within the ping timeout")
    func silentRelayIsLeft() async throws {
        let pki = try RelaySessionServerTests.PKI()
        let mute = try await MuteRelay.start("r1", pki)
        let r2 = try await TestRelay.start("r2", pki)
        let relays = RelayBook()
        relays.set([mute.object])
        var settings = RelaySessionClientConfiguration()
        settings.maxPingInterval = .seconds(1)
        settings.pongTimeout = .seconds(1)
        let a = try await RelayedNode.make("a", ca: pki.ca, book: AddressBook(), relays: relays, client: settings)
        #expect(await eventually { a.client.home == "r1" })
        relays.set([mute.object, r2.object])
        mute.silence()
        // Only the ping timeout can end a silent session within the minute (TCP would take many): the
        // error says it was that, so no bound on the elapsed time is needed.
        #expect(await eventually(timeout: .seconds(60)) { a.client.home == "r2" })
        #expect(a.client.status.lastError?.contains("did not answer a ping") == true, "\(a.client.status)")
        await a.stop()
        try await mute.channel.close()
        try await r2.kill()
    }

    @Test("a relay of another CA, presenting another relay's name, or revoked, is refused by the client")
    func foreignRelayRefused() async throws {
        let pki = try RelaySessionServerTests.PKI()
        let other = try RelaySessionServerTests.PKI()
        let foreign = try await TestRelay.start("r1", other)
        let impostor = try await TestRelay.start("r2", pki, identity: .relay("r9"))
        let relays = RelayBook()
        relays.set([foreign.object])
        let a = try await RelayedNode.make("a", ca: pki.ca, book: AddressBook(), relays: relays)
        #expect(await eventually { a.client.status.lastError?.contains("not issued by the mesh CA") == true })
        #expect(a.client.home == nil)
        #expect(foreign.server.sessions == 0)
        relays.set([impostor.object])
        #expect(
            await eventually(timeout: .seconds(15)) {
                a.client.status.lastError?.contains("mesh://relay/r9") == true
            }
        )
        #expect(a.client.home == nil)
        await #expect(throws: RelayClientError.self) { _ = try await a.client.circuit(to: "b") }
        await a.stop()
        try await foreign.kill()
        try await impostor.kill()

        // A revoked relay certificate (meshctl revoke relay): refused once the list has its serial.
        let revokedRelay = try await TestRelay.start("r3", pki)
        relays.set([revokedRelay.object])
        let b = try await RelayedNode.make(
            "b",
            ca: pki.ca,
            book: AddressBook(),
            relays: relays,
            revoked: RevokedSerials([revokedRelay.serial])
        )
        #expect(await eventually { b.client.status.lastError?.contains("is revoked") == true })
        #expect(b.client.home == nil)
        await b.stop()
        try await revokedRelay.kill()
    }
}

/// The circuit half's handler on an EmbeddedChannel: bytes that arrive with or after `ready` reach
/// the link's handlers whole and in order, whichever way the handler leaves the pipeline.
@Suite("RelayCircuitHandler", .rationed)
struct RelayCircuitHandlerTests {
    final class Collect: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        var bytes: [UInt8] = []
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            var b = self.unwrapInboundIn(data)
            self.bytes += b.readBytes(length: b.readableBytes) ?? []
        }
    }

    @Test(
        "acceptor: bytes read while leaving the session's TLS are handed to the link installed at ready, then the rest"
    )
    func acceptorKeepsBytesReadWhileUnwrapping() throws {
        let channel = EmbeddedChannel()
        let ready = channel.eventLoop.makePromise(of: UInt64.self)
        let collect = Collect()
        let installed = NIOLoopBound(collect, eventLoop: channel.eventLoop)
        let handler = RelayCircuitHandler(
            ready: ready,
            onReady: { ch in try! ch.pipeline.syncOperations.addHandler(installed.value) },
            tlsRefusal: { nil }
        )
        try channel.pipeline.syncOperations.addHandler(handler)
        // The frame arrives in two pieces; the link's first bytes come in the clear behind the
        // relay's close_notify, before the unwrap has completed (as NIOSSL hands them on).
        let frame = try RelaySessionMessage.ready(circuit: 9).encode()
        try channel.writeInbound(ByteBuffer(bytes: frame.prefix(4)))
        #expect(collect.bytes.isEmpty)
        try channel.writeInbound(ByteBuffer(bytes: Array(frame.dropFirst(4))))
        try channel.writeInbound(ByteBuffer(bytes: [1, 2, 3]))
        #expect(collect.bytes.isEmpty)
        channel.embeddedEventLoop.run()
        #expect(try ready.futureResult.wait() == 9)
        try channel.writeInbound(ByteBuffer(bytes: [4, 5]))
        #expect(collect.bytes == [1, 2, 3, 4, 5])
        #expect((try? channel.pipeline.syncOperations.handler(type: RelayCircuitHandler.self)) == nil)
        _ = try channel.finish()
    }

    @Test("dialer: bytes after ready are held until the link's first write, then handed on in order")
    func dialerHoldsBytesUntilTheLinkSpeaks() throws {
        let channel = EmbeddedChannel()
        let ready = channel.eventLoop.makePromise(of: UInt64.self)
        try channel.pipeline.syncOperations.addHandler(
            RelayCircuitHandler(ready: ready, onReady: nil, tlsRefusal: { nil })
        )
        try channel.writeInbound(ByteBuffer(bytes: try RelaySessionMessage.ready(circuit: 3).encode()))
        try channel.writeInbound(ByteBuffer(bytes: [7]))
        channel.embeddedEventLoop.run()
        #expect(try ready.futureResult.wait() == 3)
        try channel.writeInbound(ByteBuffer(bytes: [8]))
        #expect(try channel.readInbound(as: ByteBuffer.self) == nil)  // held, not lost at the tail
        let collect = Collect()
        try channel.pipeline.syncOperations.addHandler(collect)
        try channel.writeOutbound(ByteBuffer(bytes: [0x16]))  // the link's ClientHello
        channel.embeddedEventLoop.run()
        #expect(collect.bytes == [7, 8])
        #expect(try channel.readOutbound(as: ByteBuffer.self) == ByteBuffer(bytes: [0x16]))
        _ = try channel.finish()
    }

    @Test("bytes behind ready inside the session's TLS: a protocol error, the circuit is closed")
    func bytesBehindReadyAreRefused() throws {
        let channel = EmbeddedChannel()
        let ready = channel.eventLoop.makePromise(of: UInt64.self)
        try channel.pipeline.syncOperations.addHandler(
            RelayCircuitHandler(ready: ready, onReady: nil, tlsRefusal: { nil })
        )
        try channel.writeInbound(ByteBuffer(bytes: try RelaySessionMessage.ready(circuit: 3).encode() + [7]))
        #expect(throws: RelayClientError.protocolError("the relay sent bytes after ready inside its TLS")) {
            try ready.futureResult.wait()
        }
        #expect(!channel.isActive)
    }

    @Test("refused: the promise fails with the relay's code and text")
    func refusedFailsWithCodeAndText() throws {
        let channel = EmbeddedChannel()
        let ready = channel.eventLoop.makePromise(of: UInt64.self)
        try channel.pipeline.syncOperations.addHandler(
            RelayCircuitHandler(ready: ready, onReady: nil, tlsRefusal: { nil })
        )
        try channel.writeInbound(ByteBuffer(bytes: try RelaySessionMessage.refused(.limit, message: "full").encode()))
        #expect(throws: RelayClientError.refused(.limit, "full")) { try ready.futureResult.wait() }
        #expect(!channel.isActive)
    }
}
