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
@Suite("Relay sessions over real sockets", .timeLimit(.minutes(2)), .rationed)
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
        private let end = Atomic<Bool>(false)
        /// The end of input (a FIN) arrived after the session's TLS had gone.
        var ended: Bool { self.end.load(ordering: .relaxed) }
        func markEnded() { self.end.store(true, ordering: .relaxed) }
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

        /// The next `n` bytes, or fewer when fewer came (a failed expectation, not a trap of the test process).
        func take(_ n: Int) -> [UInt8] {
            self.state.withLock { s in
                let end = min(s.bytes.count, s.consumed + n)
                defer { s.consumed = end }
                return Array(s.bytes[s.consumed..<end])
            }
        }
    }

    final class Collect: ChannelInboundHandler, Sendable {
        typealias InboundIn = ByteBuffer
        let received: Received
        /// Closes the connection at the end of input (else only its input is closed: it may still send).
        let closeAtEnd: Bool
        init(_ r: Received, closeAtEnd: Bool = true) {
            self.received = r
            self.closeAtEnd = closeAtEnd
        }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            var b = self.unwrapInboundIn(data)
            let bytes = b.readBytes(length: b.readableBytes) ?? []
            self.received.state.withLock { $0.bytes += bytes }
        }
        func channelInactive(context: ChannelHandlerContext) {
            self.received.state.withLock { $0.closed = true }
        }
        func errorCaught(context: ChannelHandlerContext, error: any Error) { context.close(promise: nil) }
        /// A circuit half allows half-closure: the relay's close_notify is no end, but once the TLS is
        /// gone a FIN is.
        func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
            if let e = event as? ChannelEvent, case .inputClosed = e,
                (try? context.pipeline.syncOperations.handler(type: NIOSSLHandler.self)) == nil
            {
                self.received.markEnded()
                if self.closeAtEnd { context.close(promise: nil) }
            }
        }
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

        /// Both halves of a circuit leave the session's TLS at once.
        static func unwrapBoth(_ a: Conn, _ b: Conn) async throws {
            async let aPlain: Void = a.unwrap()
            async let bPlain: Void = b.unwrap()
            try await aPlain
            try await bPlain
        }

        /// After `ready`: ends the session's TLS (close_notify both ways), as a circuit half does.
        func unwrap() async throws {
            let channel = self.channel
            try await channel.eventLoop.flatSubmit {
                let done = channel.eventLoop.makePromise(of: Void.self)
                do {
                    try channel.pipeline.syncOperations.handler(type: NIOSSLHandler.self).stopTLS(promise: done)
                } catch {
                    done.fail(error)
                }
                return done.futureResult
            }.get()
        }
    }

    /// Records the raw bytes a connection's socket reads (in front of its TLS).
    final class Tap: ChannelInboundHandler, Sendable {
        typealias InboundIn = ByteBuffer
        let bytes = Mutex<[UInt8]>([])
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            let b = self.unwrapInboundIn(data)
            self.bytes.withLock { $0 += Array(buffer: b) }
            context.fireChannelRead(data)
        }
    }

    /// Connects over TLS as `credentials` (expecting the relay `r1` of the mesh CA); with `tls`
    /// false, plain TCP.
    func connect(
        _ port: Int,
        as credentials: LoadedCredentials?,
        tls: Bool = true,
        tap: Tap? = nil,
        circuitHalf: Bool = false,
        closeAtEnd: Bool = true
    ) async throws -> Conn {
        let received = Received()
        let context: (NIOSSLContext, PeerVerifier)? = try credentials.map {
            let t = try MeshTLS.client($0, expect: .exactly(.relay("r1")))
            return (t.current.context, t.verifier)
        }
        let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            // A circuit half (as `RelayCircuitHandler`): the relay's close_notify right behind `ready`
            // must not close the connection.
            .channelOption(ChannelOptions.allowRemoteHalfClosure, value: circuitHalf)
            .channelInitializer { ch in
                ch.eventLoop.makeCompletedFuture {
                    if let tap { try ch.pipeline.syncOperations.addHandler(tap) }
                    if tls, let (ctx, verifier) = context {
                        try ch.pipeline.syncOperations.addHandler(
                            try NIOSSLClientHandler(
                                context: ctx,
                                serverHostname: nil,
                                customVerificationCallback: verifier.callback
                            )
                        )
                    }
                    try ch.pipeline.syncOperations.addHandler(Collect(received, closeAtEnd: closeAtEnd))
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
        let a2 = try await self.connect(port, as: aCredentials, circuitHalf: true)
        try await a2.send(.connect(node: "b"))
        guard case .open(let circuit, let from)? = await b.next() else {
            Issue.record("b was not told to open the circuit")
            return
        }
        #expect(from == "a")
        let b2 = try await self.connect(port, as: bCredentials, circuitHalf: true)
        try await b2.send(.accept(circuit: circuit))
        #expect(await a2.next() == .ready(circuit: circuit))
        #expect(await b2.next() == .ready(circuit: circuit))
        try await Conn.unwrapBoth(a2, b2)

        let size = 10 << 20
        // Eight random bytes a call (20 million calls of one byte took most of the time limit in a debug
        // build on a loaded machine).
        var rng = SplitMix(seed: UInt64.random(in: 0...UInt64.max))
        func random(_ count: Int) -> [UInt8] {
            var out = [UInt8](repeating: 0, count: count)
            out.withUnsafeMutableBytes { p in
                for i in stride(from: 0, to: count, by: 8) {
                    p.storeBytes(of: rng.next(), toByteOffset: i, as: UInt64.self)
                }
            }
            return out
        }
        let up = random(size)
        let down = random(size)
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
        // A requester that sends anything behind its connect (inside the session's TLS) is cut off.
        _ = try await self.session(port, pki, "b")
        let flood = try await self.connect(port, as: credentials)
        try await flood.send(.connect(node: "b"))
        try? await flood.send([UInt8](repeating: 0x17, count: 70_000))
        guard case .refused(.badMessage, let early)? = await flood.next() else {
            Issue.record("no refusal for bytes behind connect")
            return
        }
        #expect(early.contains("inside the relay session's TLS"), "\(early)")
        #expect(await flood.closedByRelay())
        // Still serving.
        _ = try await self.session(port, pki, "a")
        #expect(await eventually { server.sessions == 2 })
        await server.stop()
    }

    /// Opens a circuit a -> b (sessions `b` given) and returns both halves at `ready`.
    func circuit(
        _ port: Int,
        _ pki: PKI,
        b: Conn,
        tapA: Tap? = nil,
        tapB: Tap? = nil,
        closeAtEnd: Bool = true
    ) async throws -> (
        a: Conn, b: Conn, id: UInt64
    ) {
        let a2 = try await self.connect(
            port,
            as: try pki.credentials(.node("a")),
            tap: tapA,
            circuitHalf: true,
            closeAtEnd: closeAtEnd
        )
        try await a2.send(.connect(node: "b"))
        guard case .open(let id, "a")? = await b.next() else { throw CircuitTestError.notOpened }
        let b2 = try await self.connect(
            port,
            as: try pki.credentials(.node("b")),
            tap: tapB,
            circuitHalf: true,
            closeAtEnd: closeAtEnd
        )
        try await b2.send(.accept(circuit: id))
        guard await a2.next() == .ready(circuit: id), await b2.next() == .ready(circuit: id) else {
            throw CircuitTestError.notReady
        }
        return (a2, b2, id)
    }

    enum CircuitTestError: Error { case notOpened, notReady }

    @Test("a spliced circuit: an end of input passes on behind its bytes, the other way goes on, the last end closes")
    func halfCloseThroughTheSplice() async throws {
        let pki = try PKI()
        let (server, port) = try await self.start(pki)
        _ = try await self.session(port, pki, "a")
        let b = try await self.session(port, pki, "b")
        let (a2, b2, _) = try await self.circuit(port, pki, b: b, closeAtEnd: false)
        try await Conn.unwrapBoth(a2, b2)
        // Both halves are on the splice thread, not on NIO: the relay's NIO channels for them are gone.
        #expect(await eventually { server.splicer.openCircuits == 1 })
        #expect(server.hub.state.withLock { $0.circuits } == ["a": 1, "b": 1])

        // a says its last words and shuts its write side (a link's close_notify, then its FIN).
        try await a2.send(Array("last words".utf8))
        try await a2.channel.close(mode: .output)
        #expect(await eventually { b2.received.ended })
        #expect(b2.received.take(b2.received.unread) == Array("last words".utf8))
        // b still answers; a still reads.
        try await b2.send(Array("the reply".utf8))
        #expect(await eventually { a2.received.unread == 9 })
        #expect(a2.received.take(9) == Array("the reply".utf8))
        #expect(!a2.received.ended)
        // b's end too: the circuit is over, both sockets closed (a's connection, its output shut already, ends
        // with its input), its count released.
        try await b2.channel.close(mode: .output)
        #expect(await eventually { a2.received.closed })
        #expect(await eventually { server.splicer.openCircuits == 0 })
        #expect(await eventually { server.hub.state.withLock { $0.circuits.isEmpty } })
        await server.stop()
    }

    @Test("a spliced circuit with no byte either way for circuitIdleTimeout is closed, and its count released")
    func idleCircuitCloses() async throws {
        let pki = try PKI()
        let (server, port) = try await self.start(pki) { $0.circuitIdleTimeout = .seconds(1) }
        _ = try await self.session(port, pki, "a")
        let b = try await self.session(port, pki, "b")
        let (a2, b2, _) = try await self.circuit(port, pki, b: b)
        try await Conn.unwrapBoth(a2, b2)
        #expect(await a2.closedByRelay())
        #expect(await b2.closedByRelay())
        #expect(await eventually { server.splicer.openCircuits == 0 })
        #expect(await eventually { server.hub.state.withLock { $0.circuits.isEmpty } })
        await server.stop()
    }

    @Test("a half that goes before its partner left the session's TLS: the circuit ends, its count released")
    func aHalfGoesBeforeTheSplice() async throws {
        let pki = try PKI()
        let (server, port) = try await self.start(pki)
        _ = try await self.session(port, pki, "a")
        let b = try await self.session(port, pki, "b")
        let (a2, b2, _) = try await self.circuit(port, pki, b: b)
        try await a2.unwrap()
        // b never sends its close_notify: it goes.
        try await b2.channel.close()
        #expect(await a2.closedByRelay())
        #expect(await eventually { server.hub.state.withLock { $0.circuits.isEmpty } })
        #expect(server.splicer.openCircuits == 0)
        await server.stop()
    }

    @Test func afterReadyACircuitIsPlainTCPCarryingOnlyTheLinksOwnBytes() async throws {
        let pki = try PKI()
        let (server, port) = try await self.start(pki)
        _ = try await self.session(port, pki, "a")
        let b = try await self.session(port, pki, "b")
        let (tapA, tapB) = (Tap(), Tap())
        let (a2, b2, _) = try await self.circuit(port, pki, b: b, tapA: tapA, tapB: tapB)
        try await Conn.unwrapBoth(a2, b2)
        // What the link's TLS would send first (a ClientHello record), then its answer: each socket
        // reads exactly the bytes the other socket wrote, nothing around them (no session TLS
        // record, no framing): the relay passes the link's TLS on as it is and encrypts nothing.
        var rng = SystemRandomNumberGenerator()
        let hello: [UInt8] =
            [0x16, 0x03, 0x01, 0x02, 0x00] + (0..<512).map { _ in UInt8.random(in: 0...255, using: &rng) }
        let answer: [UInt8] =
            [0x16, 0x03, 0x03, 0x00, 0x7a] + (0..<122).map { _ in UInt8.random(in: 0...255, using: &rng) }
        let beforeB = tapB.bytes.withLock { $0.count }
        let beforeA = tapA.bytes.withLock { $0.count }
        try await a2.send(hello)
        #expect(await eventually { tapB.bytes.withLock { $0.count } >= beforeB + hello.count })
        try await b2.send(answer)
        #expect(await eventually { tapA.bytes.withLock { $0.count } >= beforeA + answer.count })
        #expect(tapB.bytes.withLock { Array($0[beforeB...]) } == hello)
        #expect(tapA.bytes.withLock { Array($0[beforeA...]) } == answer)
        #expect(b2.received.take(hello.count) == hello)
        #expect(a2.received.take(answer.count) == answer)
        // Before them, the session's TLS ended: each side's last record was the relay's close_notify
        // (an encrypted alert, type 0x17 in TLS 1.3), and nothing of the session follows it.
        #expect(b2.received.message() == nil)
        await server.stop()
    }

    @Test func aStrangerCannotTakeACircuit() async throws {
        let pki = try PKI()
        let other = try PKI()
        let (server, port) = try await self.start(pki)
        _ = try await self.session(port, pki, "a")
        let b = try await self.session(port, pki, "b")
        let a2 = try await self.connect(port, as: try pki.credentials(.node("a")), circuitHalf: true)
        try await a2.send(.connect(node: "b"))
        guard case .open(let id, "a")? = await b.next() else {
            Issue.record("b was not told to open")
            return
        }
        // Another node of the mesh, knowing the circuit's id, cannot accept it: it is b's.
        let c = try await self.connect(port, as: try pki.credentials(.node("c")))
        try await c.send(.accept(circuit: id))
        #expect(await c.next() == .refused(.badMessage, message: "no circuit \(id) waits for mesh://node/c"))
        #expect(await c.closedByRelay())
        // Nor can a client without a certificate of the mesh CA, nor one speaking no TLS.
        var foreign = try other.credentials(.node("b"))
        foreign.caPEM = try pki.ca.certificatePEM()
        let stranger = try await self.connect(port, as: foreign)
        try? await stranger.send(.accept(circuit: id))
        #expect(await stranger.closedByRelay())
        #expect(stranger.received.message() == nil)
        let plain = try await self.connect(port, as: nil, tls: false)
        try? await plain.send(try RelaySessionMessage.accept(circuit: id).encode())
        #expect(await plain.closedByRelay())
        #expect(plain.received.message() == nil)
        // The circuit still waits for b, and b gets it.
        let b2 = try await self.connect(port, as: try pki.credentials(.node("b")), circuitHalf: true)
        try await b2.send(.accept(circuit: id))
        #expect(await a2.next() == .ready(circuit: id))
        #expect(await b2.next() == .ready(circuit: id))
        await server.stop()
    }

    /// The relay's reason for bytes a circuit half sent inside the session's TLS.
    static func early(_ count: Int, _ circuit: UInt64) -> String {
        "\(count) bytes on circuit \(circuit) inside the relay session's TLS: after connect or accept a half "
            + "sends nothing until ready and its close_notify, then only the link's TLS in the clear"
    }

    @Test func garbageOnACircuitIsRefusedWithAReason() async throws {
        let pki = try PKI()
        let (server, port) = try await self.start(pki)
        _ = try await self.session(port, pki, "a")
        let b = try await self.session(port, pki, "b")
        // Bytes behind accept, in the same write.
        let a2 = try await self.connect(port, as: try pki.credentials(.node("a")))
        try await a2.send(.connect(node: "b"))
        guard case .open(let id, "a")? = await b.next() else {
            Issue.record("b was not told to open")
            return
        }
        let b2 = try await self.connect(port, as: try pki.credentials(.node("b")))
        try await b2.send(try RelaySessionMessage.accept(circuit: id).encode() + Array("GET /".utf8))
        var refusal: RelaySessionMessage?
        _ = await eventually {
            // b2 may see ready first (the pairing happens with accept), then the refusal.
            if let m = b2.received.message(), m != .ready(circuit: id) { refusal = m }
            return refusal != nil
        }
        guard case .refused(.badMessage, let text)? = refusal else {
            Issue.record("no refusal for bytes behind accept: \(String(describing: refusal))")
            return
        }
        #expect(text == Self.early(5, id))
        #expect(await b2.closedByRelay())
        #expect(await a2.closedByRelay())  // its partner went: the circuit is gone
        // Bytes after ready, still inside the session's TLS, instead of the close_notify (a half that
        // does not unwrap): the relay's shutdown of that TLS fails, and the circuit closes.
        let (a3, b3, _) = try await self.circuit(port, pki, b: b)
        try await a3.send(Array("hello b".utf8))
        // The relay closed both halves (the circuit's count is released); a's next write meets a reset.
        #expect(await eventually { server.hub.state.withLock { $0.circuits.isEmpty } })
        try? await a3.send(Array("again".utf8))
        #expect(await a3.closedByRelay())
        #expect(b3.received.unread == 0)  // nothing of it reached b
        #expect(await eventually { server.hub.state.withLock { $0.circuits.isEmpty } })
        await server.stop()
    }
}
