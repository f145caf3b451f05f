import Crypto
import Foundation
import Logging
import MeshCore
import MeshIdentity
import MeshTestSupport
import NIOCore
import NIOPosix
import NIOSSL
import Synchronization
import Testing

@testable import Relay

/// The relay session listener over real loopback sockets: TLS 1.3 with mesh certificates, node
/// sessions, circuits spliced byte for byte, refusals with reasons, garbage survived.
@Suite("Relay sessions over real sockets", .timeLimit(.minutes(2)))
struct RelaySessionServerTests {
    static let quiet: Logger = {
        var l = Logger(label: "relay-session-test")
        l.logLevel = .critical
        return l
    }()

    /// A mesh CA with credentials for the relay and for nodes, written to files and loaded.
    final class PKI: Sendable {
        let dir = TempDir()
        let ca: CertificateAuthority
        init() throws { self.ca = try CertificateAuthority.create() }

        func credentials(_ identity: MeshPrincipal) throws -> LoadedCredentials {
            let issued = try self.ca.issueCredential(identity: identity, serverAuth: true, clientAuth: true)
            let files = CredentialFiles(
                directory: self.dir.path,
                name: identity.uri.replacingOccurrences(of: "/", with: "_")
            )
            try files.write(
                keyPEM: issued.keyPEM,
                certificatePEM: issued.certificatePEM,
                caPEM: try self.ca.certificatePEM()
            )
            return try files.load()
        }
    }

    /// What a test connection has received, filled on its event loop.
    final class Received: Sendable {
        let state = Mutex<(bytes: [UInt8], consumed: Int, closed: Bool)>(([], 0, false))
        var closed: Bool { self.state.withLock { $0.closed } }
        var unread: Int { self.state.withLock { $0.bytes.count - $0.consumed } }

        /// The next session message, once whole.
        func message() -> RelaySessionMessage? {
            self.state.withLock { s in
                guard let (m, n) = try? RelaySessionMessage.decode(Array(s.bytes[s.consumed...])) else { return nil }
                s.consumed += n
                return m
            }
        }

        func take(_ n: Int) -> [UInt8] {
            self.state.withLock { s in
                defer { s.consumed += n }
                return Array(s.bytes[s.consumed..<s.consumed + n])
            }
        }
    }

    final class Collect: ChannelInboundHandler, Sendable {
        typealias InboundIn = ByteBuffer
        let received: Received
        init(_ r: Received) { self.received = r }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            var b = self.unwrapInboundIn(data)
            let bytes = b.readBytes(length: b.readableBytes) ?? []
            self.received.state.withLock { $0.bytes += bytes }
        }
        func channelInactive(context: ChannelHandlerContext) {
            self.received.state.withLock { $0.closed = true }
        }
        func errorCaught(context: ChannelHandlerContext, error: any Error) { context.close(promise: nil) }
    }

    struct Conn {
        let channel: any Channel
        let received: Received

        func send(_ m: RelaySessionMessage) async throws { try await self.send(try m.encode()) }
        func send(_ bytes: [UInt8]) async throws { try await self.channel.writeAndFlush(ByteBuffer(bytes: bytes)) }

        func next(timeout: Duration = .seconds(10)) async -> RelaySessionMessage? {
            var got: RelaySessionMessage?
            _ = await eventually(timeout: timeout) {
                got = self.received.message()
                return got != nil
            }
            return got
        }

        /// Waits for the relay to close the connection.
        func closedByRelay() async -> Bool { await eventually(timeout: .seconds(10)) { self.received.closed } }
    }

    /// Connects over TLS as `credentials` (expecting the relay `r1` of the mesh CA); with `tls`
    /// false, plain TCP.
    func connect(_ port: Int, as credentials: LoadedCredentials?, tls: Bool = true) async throws -> Conn {
        let received = Received()
        let context: (NIOSSLContext, PeerVerifier)? = try credentials.map {
            let t = try MeshTLS.client($0, expect: .exactly(.relay("r1")))
            return (t.current.context, t.verifier)
        }
        let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .channelInitializer { ch in
                ch.eventLoop.makeCompletedFuture {
                    if tls, let (ctx, verifier) = context {
                        try ch.pipeline.syncOperations.addHandler(
                            try NIOSSLClientHandler(
                                context: ctx,
                                serverHostname: nil,
                                customVerificationCallback: verifier.callback
                            )
                        )
                    }
                    try ch.pipeline.syncOperations.addHandler(Collect(received))
                }
            }
            .connect(host: "127.0.0.1", port: port).get()
        return Conn(channel: channel, received: received)
    }

    func start(
        _ pki: PKI,
        configure: (inout RelaySessionConfiguration) -> Void = { _ in }
    ) async throws
        -> (RelaySessionServer, Int)
    {
        var config = RelaySessionConfiguration(listen: ListenAddress(host: "127.0.0.1", port: 0), relayName: "r1")
        // The relay closes a connection whose first message has not come within 10 s of its accept, TLS
        // handshake included; a loaded run (debug BoringSSL, many handshakes at once) took longer than that.
        config.firstMessageTimeout = .seconds(60)
        configure(&config)
        let server = try RelaySessionServer(
            configuration: config,
            credentials: try pki.credentials(.relay("r1")),
            logger: Self.quiet
        )
        let address = try await server.start()
        return (server, address.port!)
    }

    /// A node's control session, welcomed.
    func session(_ port: Int, _ pki: PKI, _ name: String) async throws -> Conn {
        let c = try await self.connect(port, as: try pki.credentials(.node(name)))
        try await c.send(.hello(version: 1, node: name))
        #expect(await c.next() == .welcome(relay: "r1", keepaliveSeconds: 15))
        return c
    }

    @Test func twoNodeSessionsAndACircuitCarrying10MiBBothWaysIntact() async throws {
        let pki = try PKI()
        let (server, port) = try await self.start(pki)
        let a = try await self.session(port, pki, "a")
        let b = try await self.session(port, pki, "b")
        #expect(await eventually { server.sessions == 2 })
        try await a.send(.ping(42))
        #expect(await a.next() == .pong(42))

        let aCredentials = try pki.credentials(.node("a"))
        let bCredentials = try pki.credentials(.node("b"))
        let a2 = try await self.connect(port, as: aCredentials)
        try await a2.send(.connect(node: "b"))
        guard case .open(let circuit, let from)? = await b.next() else {
            Issue.record("b was not told to open the circuit")
            return
        }
        #expect(from == "a")
        let b2 = try await self.connect(port, as: bCredentials)
        try await b2.send(.accept(circuit: circuit))
        #expect(await a2.next() == .ready(circuit: circuit))
        #expect(await b2.next() == .ready(circuit: circuit))

        let size = 10 << 20
        var rng = SystemRandomNumberGenerator()
        let up = (0..<size).map { _ in UInt8.random(in: 0...255, using: &rng) }
        let down = (0..<size).map { _ in UInt8.random(in: 0...255, using: &rng) }
        func write(_ conn: Conn, _ bytes: [UInt8]) async throws {
            var at = 0
            while at < bytes.count {
                let n = min(256 << 10, bytes.count - at)
                try await conn.send(Array(bytes[at..<at + n]))
                at += n
            }
        }
        async let sentUp: Void = write(a2, up)
        async let sentDown: Void = write(b2, down)
        try await sentUp
        try await sentDown
        #expect(await eventually(timeout: .seconds(60)) { b2.received.unread >= size && a2.received.unread >= size })
        #expect(b2.received.unread == size && a2.received.unread == size)
        #expect(SHA256.hash(data: b2.received.take(size)) == SHA256.hash(data: up))
        #expect(SHA256.hash(data: a2.received.take(size)) == SHA256.hash(data: down))

        // One end going closes the other, and the circuit's count is released.
        try await a2.channel.close()
        #expect(await b2.closedByRelay())
        #expect(await eventually { server.hub.state.withLock { $0.circuits.isEmpty } })
        await server.stop()
    }

    @Test func aClientOfAnotherCAOrNotANodeIsRefused() async throws {
        let pki = try PKI()
        let other = try PKI()
        let (server, port) = try await self.start(pki)
        // A node certificate of another CA (it trusts the relay's CA, so only the relay can refuse).
        var foreign = try other.credentials(.node("a"))
        foreign.caPEM = try pki.ca.certificatePEM()
        let stranger = try await self.connect(port, as: foreign)
        try? await stranger.send(.hello(version: 1, node: "a"))
        #expect(await stranger.closedByRelay())
        #expect(stranger.received.message() == nil)
        // A relay certificate of the right CA: it may only forward, a session needs a node.
        let relay = try await self.connect(port, as: try pki.credentials(.relay("r2")))
        try await relay.send(.hello(version: 1, node: "r2"))
        let refused = await relay.next()
        #expect(refused == .refused(.forbidden, message: "mesh://relay/r2 may only forward circuits (it sent hello)"))
        #expect(await relay.closedByRelay())
        // This relay's own identity is no client of it.
        let itself = try await self.connect(port, as: try pki.credentials(.relay("r1")))
        #expect(
            await itself.next()
                == .refused(.forbidden, message: "this relay serves nodes and other relays: presented mesh://relay/r1")
        )
        // A node may not forward.
        let node = try await self.connect(port, as: try pki.credentials(.node("a")))
        try await node.send(.forward(from: "a", to: "b"))
        #expect(await node.next() == .refused(.badMessage, message: "forward is not allowed here"))
        // A client that expects another relay name does not talk to this one.
        // And the listener still serves nodes.
        _ = try await self.session(port, pki, "a")
        #expect(await eventually { server.sessions == 1 })
        await server.stop()
    }

    @Test func circuitsToAnOfflineOrUnknownNodeAreRefusedWithAReason() async throws {
        let pki = try PKI()
        let (server, port) = try await self.start(pki) { $0.acceptTimeout = .milliseconds(300) }
        let a = try await self.session(port, pki, "a")
        let credentials = try pki.credentials(.node("a"))
        let toB = try await self.connect(port, as: credentials)
        try await toB.send(.connect(node: "b"))
        #expect(await toB.next() == .refused(.nodeOffline, message: "node b has no session at this relay"))
        #expect(await toB.closedByRelay())
        let toSelf = try await self.connect(port, as: credentials)
        try await toSelf.send(.connect(node: "a"))
        #expect(await toSelf.next() == .refused(.unknownNode, message: "a circuit from a to itself"))
        // b is there but never accepts: the requester hears so after the accept timeout.
        let b = try await self.session(port, pki, "b")
        let slow = try await self.connect(port, as: credentials)
        try await slow.send(.connect(node: "b"))
        guard case .open? = await b.next() else {
            Issue.record("b was not told to open")
            return
        }
        #expect(await slow.next() == .refused(.timeout, message: "node b did not accept the circuit in time"))
        // b's session ends: b is offline again.
        try await b.channel.close()
        #expect(await eventually { server.sessions == 1 })
        let again = try await self.connect(port, as: credentials)
        try await again.send(.connect(node: "b"))
        #expect(await again.next() == .refused(.nodeOffline, message: "node b has no session at this relay"))
        _ = a
        await server.stop()
    }

    @Test func perNodeCircuitLimit() async throws {
        let pki = try PKI()
        let (server, port) = try await self.start(pki) { $0.maxCircuitsPerNode = 1 }
        _ = try await self.session(port, pki, "a")
        let b = try await self.session(port, pki, "b")
        let credentials = try pki.credentials(.node("a"))
        let first = try await self.connect(port, as: credentials)
        try await first.send(.connect(node: "b"))
        guard case .open? = await b.next() else {
            Issue.record("b was not told to open")
            return
        }
        let second = try await self.connect(port, as: credentials)
        try await second.send(.connect(node: "b"))
        #expect(await second.next() == .refused(.limit, message: "node a is at its limit of 1 circuits here"))
        await server.stop()
    }

    @Test func malformedMessagesGetAClearErrorAndTheListenerSurvivesGarbage() async throws {
        let pki = try PKI()
        let (server, port) = try await self.start(pki)
        let credentials = try pki.credentials(.node("a"))
        // Not TLS at all.
        let raw = try await self.connect(port, as: nil, tls: false)
        try await raw.send(Array("GET / HTTP/1.1\r\nHost: relay\r\n\r\n".utf8))
        #expect(await raw.closedByRelay())
        // TLS, then HTTP.
        let http = try await self.connect(port, as: credentials)
        try await http.send(Array("GET / HTTP/1.1\r\n\r\n".utf8))
        guard case .refused(.badMessage, let text)? = await http.next() else {
            Issue.record("no refusal for HTTP")
            return
        }
        #expect(text.contains("type 0x47 is no relay session message"), "\(text)")
        #expect(await http.closedByRelay())
        // A hello under another name than the certificate's.
        let liar = try await self.connect(port, as: credentials)
        try await liar.send(.hello(version: 1, node: "b"))
        #expect(await liar.next() == .refused(.forbidden, message: "hello as b over the certificate of mesh://node/a"))
        // A ping before hello, an accept of no circuit, a truncated frame then garbage.
        let early = try await self.connect(port, as: credentials)
        try await early.send(.ping(1))
        #expect(await early.next() == .refused(.badMessage, message: "ping is not allowed here"))
        let stray = try await self.connect(port, as: credentials)
        try await stray.send(.accept(circuit: 99))
        #expect(await stray.next() == .refused(.badMessage, message: "no circuit 99 waits for mesh://node/a"))
        let truncated = try await self.connect(port, as: credentials)
        try await truncated.send([0x10, 0x00, 0x02, 0x05, 0x61])
        guard case .refused(.badMessage, let t)? = await truncated.next() else {
            Issue.record("no refusal for a truncated name")
            return
        }
        #expect(t.contains("truncated"), "\(t)")
        // A requester that floods before its circuit is ready is cut off.
        _ = try await self.session(port, pki, "b")
        let flood = try await self.connect(port, as: credentials)
        try await flood.send(.connect(node: "b"))
        try? await flood.send([UInt8](repeating: 0x17, count: 70_000))
        #expect(
            await flood.next()
                == .refused(.badMessage, message: "over 65536 bytes sent before the circuit was ready")
        )
        // Still serving.
        _ = try await self.session(port, pki, "a")
        #expect(await eventually { server.sessions == 2 })
        await server.stop()
    }
}
