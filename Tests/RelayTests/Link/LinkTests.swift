import MeshIdentity
import MeshTestSupport
import MeshWire
import NIOCore
import NIOPosix
import Synchronization
import Testing
import X509

@testable import Relay

#if canImport(Glibc)
import Glibc
#endif

/// Where the test's nodes listen for links (the agent will take it from the Node objects).
final class AddressBook: Sendable {
    private let book = Mutex<[String: [SocketAddress]]>([:])
    func set(_ node: String, _ addresses: [SocketAddress]) { self.book.withLock { $0[node] = addresses } }
    func addresses(_ node: String) -> [SocketAddress] { self.book.withLock { $0[node] ?? [] } }
}

/// A node of the test: its manager and its link listener on 127.0.0.1, port 0.
struct LinkNode {
    let manager: LinkManager
    let listener: LinkListener
    let address: SocketAddress

    static func make(
        _ name: String,
        ca: CertificateAuthority,
        identity: MeshPrincipal? = nil,
        book: AddressBook,
        configuration: LinkConfiguration = LinkConfiguration(),
        issued: IssuedCredential? = nil,
        revoked: RevokedSerials? = nil,
        check: @escaping LinkTargetCheck = { _, _ in nil }
    ) async throws -> LinkNode {
        let issued =
            try issued ?? ca.issueCredential(identity: identity ?? .node(name), serverAuth: true, clientAuth: true)
        let tls = try MeshLinkTLS(
            keyPEM: issued.keyPEM,
            certificatePEM: issued.certificatePEM,
            caPEM: try ca.certificatePEM(),
            revoked: revoked
        )
        let manager = LinkManager(
            tls: tls,
            group: MultiThreadedEventLoopGroup.singleton,
            configuration: configuration,
            resolve: { book.addresses($0) },
            check: check
        )
        let listener = LinkListener(manager: manager, address: try SocketAddress(ipAddress: "127.0.0.1", port: 0))
        let address = try await listener.bind()
        book.set(name, [address])
        return LinkNode(manager: manager, listener: listener, address: address)
    }

    func stop() async {
        try? await self.listener.close()
        await self.manager.shutdown()
    }
}

/// Nodes a and b of one test CA, in one address book, and an echo backend: what most link tests start from.
struct TwoLinkNodes {
    let ca: CertificateAuthority
    let book: AddressBook
    let backend: any Channel
    let a: LinkNode
    let b: LinkNode
    var port: Int { self.backend.localAddress!.port! }

    /// `configuration`: a's (b has the defaults).
    static func make(a configuration: LinkConfiguration = LinkConfiguration()) async throws -> TwoLinkNodes {
        let ca = try CertificateAuthority.create()
        let book = AddressBook()
        let backend = try await startEchoBackend()
        let a = try await LinkNode.make("a", ca: ca, book: book, configuration: configuration)
        let b = try await LinkNode.make("b", ca: ca, book: book)
        return TwoLinkNodes(ca: ca, book: book, backend: backend, a: a, b: b)
    }
}

/// Nodes a (idle timeout 300 ms), b and c (60 s) and an echo backend, for the idle-timeout tests; all
/// stopped after `body`, which gets a, b, the backend's port, then a function that makes a link from a to c,
/// opens a stream on it, closes the stream and returns the link (left without streams, it idles out).
func withIdleTimeoutNodes(
    _ body: (LinkNode, LinkNode, Int, () async throws -> Link) async throws -> Void
) async throws {
    let ca = try CertificateAuthority.create()
    let book = AddressBook()
    let backend = try await startEchoBackend()
    let port = backend.localAddress!.port!
    var configuration = LinkConfiguration()
    configuration.idleTimeout = .milliseconds(300)
    let a = try await LinkNode.make("a", ca: ca, book: book, configuration: configuration)
    let b = try await LinkNode.make("b", ca: ca, book: book)  // b's own timeout: 60 s
    let c = try await LinkNode.make("c", ca: ca, book: book)
    let idleLinkToC = {
        let other = try await a.manager.stream(to: "c", open: webTarget(port: port))
        let otherLink = try #require(a.manager.currentLink(to: "c"))
        try await other.close()
        return otherLink
    }
    try await body(a, b, port, idleLinkToC)
    await a.stop()
    await b.stop()
    await c.stop()
    try await backend.close()
}

/// A TCP echo server on 127.0.0.1 (the endpoint a stream reaches).
func startEchoBackend() async throws -> any Channel {
    try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
        .childChannelOption(ChannelOptions.allowRemoteHalfClosure, value: true)
        .childChannelInitializer { channel in
            channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(EchoHandler()) }
        }
        .bind(host: "127.0.0.1", port: 0).get()
}

func webTarget(port: Int) -> StreamTarget {
    StreamTarget(
        namespace: "shop",
        service: "web",
        servicePort: 80,
        endpoint: .v4(0x7F00_0001),
        endpointPort: UInt16(port),
        transport: .tcp
    )
}

/// Sends `payload` and FIN through a stream to `node`, returns what came back before the peer's FIN.
func echoThrough(
    _ manager: LinkManager,
    to node: String,
    target: StreamTarget,
    payload: ByteBuffer
) async throws
    -> ByteBuffer
{
    let done = MultiThreadedEventLoopGroup.singleton.next().makePromise(of: ByteBuffer.self)
    do {
        _ = try await manager.stream(to: node, open: target) { stream in
            stream.eventLoop.makeCompletedFuture {
                try stream.syncOptions!.setOption(ChannelOptions.allowRemoteHalfClosure, value: true)
                try stream.pipeline.syncOperations.addHandler(SendAndCollect(payload: payload, done: done))
            }
        }
    } catch {
        done.fail(error)  // a test that fails here fails, rather than crash the run on a leaked promise
        throw error
    }
    return try await done.futureResult.get()
}

@Suite("LinkTests", .serialized, .rationed)
struct LinkTests {
    @Test("a TCP echo through a stream over a link reaches the local backend; /peers counts it")
    func echoThroughLink() async throws {
        let ca = try CertificateAuthority.create()
        let book = AddressBook()
        let backend = try await startEchoBackend()
        let port = backend.localAddress!.port!
        let a = try await LinkNode.make("a", ca: ca, book: book)
        let b = try await LinkNode.make("b", ca: ca, book: book) { target, from in
            target.endpointPort == UInt16(port) && from == "a" ? nil : StreamRefusal(.notLocalEndpoint, "not here")
        }
        var rng = SplitMix(seed: 13)
        let payload = ByteBuffer(bytes: (0..<300_000).map { _ in UInt8.random(in: 0...255, using: &rng) })
        let back = try await echoThrough(a.manager, to: "b", target: webTarget(port: port), payload: payload)
        #expect(back == payload)
        // A second stream reuses the link.
        let small = ByteBuffer(string: "hello, b")
        #expect(try await echoThrough(a.manager, to: "b", target: webTarget(port: port), payload: small) == small)
        #expect(a.manager.allLinks.count == 1)
        #expect(b.manager.currentLink(to: "a")?.dialer == "a")
        #expect(await eventually { await a.manager.stats().first?.rttMicros != nil })
        let row = try #require(await a.manager.stats().first)
        #expect(row.node == "b")
        #expect(row.path == "direct")
        #expect(row.bytesSent >= UInt64(payload.readableBytes + small.readableBytes))
        #expect(row.bytesReceived >= UInt64(payload.readableBytes + small.readableBytes))
        await a.stop()
        await b.stop()
        try await backend.close()
    }

    @Test("a node that cannot be reached: each caller gets the error, the log says so once per 10 s")
    func unreachableNodeIsLoggedOnce() async throws {
        let ca = try CertificateAuthority.create()
        let closed = try SocketAddress(ipAddress: "127.0.0.1", port: freePort())  // nothing listens there
        let logs = LogRecorder()
        let manager = LinkManager(
            tls: try MeshLinkTLS(node: "a", issuedBy: ca),
            group: MultiThreadedEventLoopGroup.singleton,
            logger: logs.logger("link", level: .info),
            resolve: { _ in [closed] },
            check: { _, _ in nil }
        )
        for _ in 0..<3 {
            await #expect(throws: LinkError.self) { try await manager.stream(to: "gone", open: webTarget(port: 1)) }
        }
        let warnings = logs.messages(.warning, containing: "cannot reach the node over a link")
        #expect(warnings.count == 1, "\(logs.all.map(\.message))")
        await manager.shutdown()
    }

    @Test("a peer whose bytes come 300 ms late (a busy machine) still links: the TLS hand-off waits for it")
    func slowPeerStillLinks() async throws {
        let nodes = try await TwoLinkNodes.make()
        let (book, backend, port, a, b) = (nodes.book, nodes.backend, nodes.port, nodes.a, nodes.b)
        // a reaches b through a forwarder that holds every chunk from a for 300 ms: b's close_notify after
        // the handshake (the record layer's hand-off) comes 300 ms after a's own, beyond the 200 ms a client
        // of the control plane waits for one.
        let slow = try await DelayingForwarder.start(to: b.address, delay: .milliseconds(300))
        book.set("b", [slow.address])
        let payload = ByteBuffer(string: "late but whole")
        #expect(try await echoThrough(a.manager, to: "b", target: webTarget(port: port), payload: payload) == payload)
        #expect(a.manager.currentLink(to: "b")?.records == "mesh")
        await a.stop()
        await b.stop()
        try await slow.close()
        try await backend.close()
    }

    @Test("a dialer expecting node b that reaches a server holding a's certificate is refused")
    func wrongIdentityRefused() async throws {
        let ca = try CertificateAuthority.create()
        let book = AddressBook()
        let impostor = try await LinkNode.make("a", ca: ca, book: book)
        let c = try await LinkNode.make("c", ca: ca, book: book)
        book.set("b", [impostor.address])  // b's address leads to a
        await #expect {
            _ = try await c.manager.link(to: "b")
        } throws: { error in
            guard case LinkError.handshakeFailed(let why) = error else { return false }
            return why.contains("mesh://node/a") && why.contains("mesh://node/b")
        }
        #expect(c.manager.allLinks.isEmpty)
        #expect(impostor.manager.allLinks.isEmpty)
        await impostor.stop()
        await c.stop()
    }

    @Test("a certificate of another CA is refused on either end")
    func otherCARefused() async throws {
        let ca = try CertificateAuthority.create()
        let other = try CertificateAuthority.create(commonName: "another CA")
        let book = AddressBook()
        let b = try await LinkNode.make("b", ca: ca, book: book)
        let strangerBook = AddressBook()
        strangerBook.set("b", [b.address])
        let stranger = try await LinkNode.make("s", ca: other, book: strangerBook)
        // The stranger dials b: b refuses its certificate (and the stranger refuses b's).
        await #expect(throws: LinkError.self) { _ = try await stranger.manager.link(to: "b") }
        #expect(await eventually { b.manager.handshakesRefused >= 1 })
        #expect(b.manager.allLinks.isEmpty)
        // b dials a node of another CA: refused by b's dialer check.
        book.set("x", [stranger.address])
        await #expect {
            _ = try await b.manager.link(to: "x")
        } throws: { error in
            guard case LinkError.handshakeFailed(let why) = error else { return false }
            return why.contains("not issued by the mesh CA")
        }
        #expect(b.manager.allLinks.isEmpty)
        await b.stop()
        await stranger.stop()
    }

    @Test("a client certificate that is not mesh://node/... is refused by the acceptor")
    func nonNodeClientRefused() async throws {
        let ca = try CertificateAuthority.create()
        let book = AddressBook()
        let b = try await LinkNode.make("b", ca: ca, book: book)
        let admin = try await LinkNode.make("ops", ca: ca, identity: .relay("ops"), book: book)
        await #expect {
            _ = try await admin.manager.link(to: "b")
        } throws: { error in
            guard case LinkError.handshakeFailed(let why) = error else { return false }
            return why.contains("refused this node's certificate")
        }
        #expect(await eventually { b.manager.handshakesRefused >= 1 })
        #expect(b.manager.allLinks.isEmpty)
        await b.stop()
        await admin.stop()
    }

    @Test("a stream to a target the receiver does not serve is refused with the reason, and counted")
    func unservedTargetRefused() async throws {
        let ca = try CertificateAuthority.create()
        let book = AddressBook()
        let backend = try await startEchoBackend()
        let port = backend.localAddress!.port!
        let a = try await LinkNode.make("a", ca: ca, book: book)
        let b = try await LinkNode.make("b", ca: ca, book: book) { target, _ in
            StreamRefusal(.notLocalEndpoint, "\(target.endpoint):\(target.endpointPort) is not an endpoint of node b")
        }
        await #expect {
            _ = try await echoThrough(
                a.manager,
                to: "b",
                target: webTarget(port: port),
                payload: ByteBuffer(string: "x")
            )
        } throws: { error in
            guard case LinkError.refused(let r) = error else { return false }
            return r.code == .notLocalEndpoint && r.reason == "127.0.0.1:\(port) is not an endpoint of node b"
        }
        #expect(a.manager.refusedReceived[StreamRefusal.Code.notLocalEndpoint.rawValue] == 1)
        #expect(b.manager.refusedSent[StreamRefusal.Code.notLocalEndpoint.rawValue] == 1)
        // The link stays, and the refused stream is gone on both sides.
        #expect(a.manager.currentLink(to: "b")?.isUsable == true)
        #expect(await eventually { a.manager.currentLink(to: "b")?.openStreams == 0 })
        await a.stop()
        await b.stop()
        try await backend.close()
    }

    @Test("both nodes dialing at once end with exactly one link, the one a (the smaller name) dialed")
    func simultaneousDial() async throws {
        let nodes = try await TwoLinkNodes.make()
        let (backend, port, a, b) = (nodes.backend, nodes.port, nodes.a, nodes.b)
        for round in 0..<5 {
            async let fromA = a.manager.link(to: "b")
            async let fromB = b.manager.link(to: "a")
            _ = try await (fromA, fromB)
            let settled = await eventually {
                a.manager.allLinks.count == 1 && b.manager.allLinks.count == 1
                    && a.manager.currentLink(to: "b")?.dialer == "a" && b.manager.currentLink(to: "a")?.dialer == "a"
            }
            #expect(settled, "round \(round): a has \(a.manager.allLinks), b has \(b.manager.allLinks)")
            // The survivor carries streams both ways.
            let x = ByteBuffer(string: "round \(round)")
            #expect(try await echoThrough(a.manager, to: "b", target: webTarget(port: port), payload: x) == x)
            #expect(try await echoThrough(b.manager, to: "a", target: webTarget(port: port), payload: x) == x)
            a.manager.peerLeft("b")
            b.manager.peerLeft("a")
            #expect(await eventually { a.manager.allLinks.isEmpty && b.manager.allLinks.isEmpty })
        }
        await a.stop()
        await b.stop()
        try await backend.close()
    }

    @Test("a link stays while a stream is open and closes after the idle timeout")
    func idleLinkCloses() async throws {
        try await withIdleTimeoutNodes { a, b, port, idleLinkToC in
            let stream = try await a.manager.stream(to: "b", open: webTarget(port: port))
            let link = try #require(a.manager.currentLink(to: "b"))
            #expect(link.openStreams == 1)
            // A link to c, made after b's and left without streams, closes for idle: b's link has been up
            // longer than the idle timeout by then, and its open stream kept it (a condition, not a sleep).
            let otherLink = try await idleLinkToC()
            #expect(await eventually { otherLink.closedForIdle })
            #expect(link.isUsable)
            try await stream.close()
            #expect(await eventually { a.manager.allLinks.isEmpty && b.manager.allLinks.isEmpty })
            #expect(!link.isActive)
        }
    }

    @Test("a new link is held for the stream it was dialed for: with no idle time at all, the stream still opens")
    func newLinkWaitsForItsStream() async throws {
        // The link's idle timer starts when it is up, and the caller's stream opens after the dial returns
        // (on a busy machine, after the idle timeout). An idle timeout of zero fires on the link's event
        // loop's next turn: without the dial's hold the link closes before the stream opens.
        var configuration = LinkConfiguration()
        configuration.idleTimeout = .zero
        let nodes = try await TwoLinkNodes.make(a: configuration)  // b, the acceptor, keeps its 60 s
        let (backend, port, a, b) = (nodes.backend, nodes.port, nodes.a, nodes.b)
        for round in 0..<3 {
            let payload = ByteBuffer(string: "round \(round)")
            let echoed = try await echoThrough(a.manager, to: "b", target: webTarget(port: port), payload: payload)
            #expect(echoed == payload)
            // Once its stream is done, nothing holds the link: it closes for idle at once.
            #expect(await eventually { a.manager.allLinks.isEmpty })
        }
        await a.stop()
        await b.stop()
        try await backend.close()
    }

    @Test("a held link (as the punch coordinator holds one between rounds) outlives the idle timeout")
    func heldLinkStays() async throws {
        try await withIdleTimeoutNodes { a, _, port, idleLinkToC in
            let stream = try await a.manager.stream(to: "b", open: webTarget(port: port))
            let link = try #require(a.manager.currentLink(to: "b"))
            let release = link.hold()
            try await stream.close()
            #expect(await eventually { link.openStreams == 1 })  // the hold alone
            // A link to c, made after b's stream closed and left without streams, closes for idle; b's,
            // held, does not (a condition, not a sleep).
            let otherLink = try await idleLinkToC()
            #expect(await eventually { otherLink.closedForIdle })
            #expect(link.isUsable)
            release()
            release()  // a second call does nothing
            #expect(await eventually { link.closedForIdle })
            #expect(link.openStreams == 0)
        }
    }

    @Test("an idle link is closed by its dialer; the acceptor's own timer runs twice as long")
    func dialerClosesIdleLink() async throws {
        var configuration = LinkConfiguration()
        configuration.idleTimeout = .seconds(1)
        #expect(configuration.idleTimeout(for: .dialer(expect: "b")) == .seconds(1))
        #expect(configuration.idleTimeout(for: .acceptor) == .seconds(2))
        let ca = try CertificateAuthority.create()
        let book = AddressBook()
        let backend = try await startEchoBackend()
        let a = try await LinkNode.make("a", ca: ca, book: book, configuration: configuration)
        let b = try await LinkNode.make("b", ca: ca, book: book, configuration: configuration)
        let stream = try await a.manager.stream(to: "b", open: webTarget(port: backend.localAddress!.port!))
        let dialed = try #require(a.manager.currentLink(to: "b"))
        #expect(await eventually { b.manager.currentLink(to: "a") != nil })
        let accepted = try #require(b.manager.currentLink(to: "a"))
        #expect(accepted.role == .acceptor)
        try await stream.close()
        // Both ends saw the stream close at about the same time with the same setting: the dialer's timer
        // (1 s) closes the link, the acceptor's (2 s) never fires.
        #expect(await eventually { !dialed.isActive && !accepted.isActive })
        #expect(dialed.closedForIdle)
        #expect(!accepted.closedForIdle)
        await a.stop()
        await b.stop()
        try await backend.close()
    }

    @Test("a revoked node certificate is refused by the acceptor")
    func revokedRefused() async throws {
        let ca = try CertificateAuthority.create()
        let book = AddressBook()
        let issuedA = try ca.issueCredential(identity: .node("a"), serverAuth: true, clientAuth: true)
        let serial = MeshTLS.serialHex(try Certificate(pemEncoded: issuedA.certificatePEM).serialNumber)
        let revoked = RevokedSerials()
        let b = try await LinkNode.make("b", ca: ca, book: book, revoked: revoked)
        let a = try await LinkNode.make("a", ca: ca, book: book, issued: issuedA)
        // Not revoked yet: the link comes up.
        _ = try await a.manager.link(to: "b")
        a.manager.peerLeft("b")
        #expect(await eventually { b.manager.allLinks.isEmpty })
        revoked.insert(serial)
        await #expect(throws: LinkError.self) { _ = try await a.manager.link(to: "b") }
        #expect(await eventually { b.manager.handshakesRefused == 1 })
        #expect(b.manager.allLinks.isEmpty)
        await a.stop()
        await b.stop()
    }

    @Test("after a renewal (replaceTLS) new links present the new certificate; the old one may then be revoked")
    func renewedCertificateServesNewLinks() async throws {
        let ca = try CertificateAuthority.create()
        let book = AddressBook()
        let old = try ca.issueCredential(identity: .node("a"), serverAuth: true, clientAuth: true)
        let revoked = RevokedSerials()
        let b = try await LinkNode.make("b", ca: ca, book: book, revoked: revoked)
        let a = try await LinkNode.make("a", ca: ca, book: book, issued: old)
        _ = try await a.manager.link(to: "b")
        a.manager.peerLeft("b")
        #expect(await eventually { b.manager.allLinks.isEmpty })
        let renewed = try ca.issueCredential(identity: .node("a"), serverAuth: true, clientAuth: true)
        a.manager.replaceTLS(
            try MeshLinkTLS(
                keyPEM: renewed.keyPEM,
                certificatePEM: renewed.certificatePEM,
                caPEM: try ca.certificatePEM()
            )
        )
        revoked.insert(MeshTLS.serialHex(try Certificate(pemEncoded: old.certificatePEM).serialNumber))
        _ = try await a.manager.link(to: "b")
        #expect(b.manager.handshakesRefused == 0)
        // b answers a's first ping from its link loop, which can come before b's own event loop has put the
        // link in its table: a condition, not a race.
        #expect(await eventually { b.manager.currentLink(to: "a") != nil })
        await a.stop()
        await b.stop()
    }

    @Test("a link over a handed-over transport (as a relay circuit is) carries streams and shows as relayed")
    func linkOverHandedOverChannel() async throws {
        let nodes = try await TwoLinkNodes.make()
        let (book, backend, port, a, b) = (nodes.book, nodes.backend, nodes.port, nodes.a, nodes.b)
        book.set("a", [])
        book.set("b", [])
        // Stand-in for a circuit: a connected socket pair whose ends are handed to the two managers.
        let accepted = MultiThreadedEventLoopGroup.singleton.next().makePromise(of: Link.self)
        let circuit = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .childChannelInitializer { channel in
                b.manager.establish(over: channel, role: .acceptor, path: .relayed("r1")).cascade(to: accepted)
                return channel.eventLoop.makeSucceededVoidFuture()
            }
            .bind(host: "127.0.0.1", port: 0).get()
        let end = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .connect(to: circuit.localAddress!).get()
        let link = try await a.manager.establish(over: end, role: .dialer(expect: "b"), path: .relayed("r1")).get()
        #expect(try await accepted.futureResult.get().peer == "a")
        #expect(a.manager.currentLink(to: "b") === link)
        let x = ByteBuffer(string: "over a circuit")
        #expect(try await echoThrough(a.manager, to: "b", target: webTarget(port: port), payload: x) == x)
        let row = try #require(await a.manager.stats().first)
        #expect(row.path == "relayed")
        #expect(row.relay == "r1")
        await a.stop()
        await b.stop()
        try await circuit.close()
        try await backend.close()
    }

    @Test("a connection that never completes the handshake is closed after the handshake timeout")
    func handshakeTimeout() async throws {
        let ca = try CertificateAuthority.create()
        var configuration = LinkConfiguration()
        configuration.handshakeTimeout = .milliseconds(200)
        let b = try await LinkNode.make("b", ca: ca, book: AddressBook(), configuration: configuration)
        let silent = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .connect(to: b.address).get()
        #expect(await eventually { !silent.isActive })
        #expect(await eventually { b.manager.handshakesRefused == 1 })
        await b.stop()
    }

    @Test("a connected client socket handed over is spliced to a stream: bytes and FIN both ways")
    func spliceHandedOverSocket() async throws {
        let nodes = try await TwoLinkNodes.make()
        let (backend, port, a, b) = (nodes.backend, nodes.port, nodes.a, nodes.b)
        var fds: [Int32] = [-1, -1]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds) == 0)
        let app = fds[1]
        try await a.manager.splice(socket: fds[0], to: "b", open: webTarget(port: port))
        var rng = SplitMix(seed: 7)
        let payload = (0..<200_000).map { _ in UInt8.random(in: 0...255, using: &rng) }
        // Write on one thread while another reads (the echo's windows are smaller than the payload).
        async let wrote: Void = blocking {
            payload.withUnsafeBytes { raw in
                var off = 0
                while off < raw.count {
                    let n = write(app, raw.baseAddress! + off, raw.count - off)
                    if n <= 0 { break }
                    off += n
                }
            }
            shutdown(app, Int32(SHUT_WR))
        }
        let back = try await blocking { () -> [UInt8] in
            var got: [UInt8] = []
            var chunk = [UInt8](repeating: 0, count: 65536)
            while true {
                let n = read(app, &chunk, chunk.count)
                if n <= 0 { break }
                got += chunk[0..<n]
            }
            return got
        }
        try await wrote
        close(app)
        #expect(back == payload)
        #expect(await eventually { a.manager.currentLink(to: "b")?.openStreams == 0 })
        await a.stop()
        await b.stop()
        try await backend.close()
    }

    @Test(
        "a UDP flow: datagrams framed in a stream reach a local UDP endpoint and its answers come back",
        arguments: [false, true]
    )
    func udpFlow(onLoop: Bool) async throws {
        let ca = try CertificateAuthority.create()
        let book = AddressBook()
        let backend = try await DatagramBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(UDPEcho()) }
            }
            .bind(host: "127.0.0.1", port: 0).get()
        let port = backend.localAddress!.port!
        var configuration = LinkConfiguration()
        if onLoop { configuration.loop = try LinkLoop.start(name: "test-udp-a") }
        let a = try await LinkNode.make("a", ca: ca, book: book, configuration: configuration)
        if onLoop { configuration.loop = try LinkLoop.start(name: "test-udp-b") }
        let b = try await LinkNode.make("b", ca: ca, book: book, configuration: configuration)
        #expect((try await a.manager.link(to: "b").loop != nil) == onLoop)
        var target = webTarget(port: port)
        target.transport = .udp
        let log = StreamLog()
        let stream = try await a.manager.stream(to: "b", open: target) { stream in
            stream.eventLoop.makeCompletedFuture {
                try stream.pipeline.syncOperations.addHandler(RecordingHandler(log))
            }
        }
        var framed = ByteBuffer()
        for d in ["one", "two", "", String(repeating: "x", count: 1200)] {
            try DatagramFraming.encode(ByteBuffer(string: d), into: &framed)
        }
        try await stream.writeAndFlush(framed)
        let sent = ["one", "two", "", String(repeating: "x", count: 1200)]
        var got: [String] = []
        let arrived = await eventually {
            var bytes = log.bytes
            got = []
            while let d = try? DatagramFraming.decode(from: &bytes) { got.append(String(buffer: d)) }
            return got.count == sent.count
        }
        #expect(arrived)
        #expect(got.sorted() == sent.sorted())  // UDP: the order may differ, not the datagrams
        try await stream.close()
        #expect(await eventually { b.manager.currentLink(to: "a")?.openStreams == 0 })
        await a.stop()
        await b.stop()
        try await backend.close()
    }
}

/// Echoes each datagram to its sender.
final class UDPEcho: ChannelInboundHandler {
    typealias InboundIn = AddressedEnvelope<ByteBuffer>
    typealias OutboundOut = AddressedEnvelope<ByteBuffer>
    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let e = self.unwrapInboundIn(data)
        context.writeAndFlush(
            self.wrapOutboundOut(AddressedEnvelope(remoteAddress: e.remoteAddress, data: e.data)),
            promise: nil
        )
    }
}

/// A server that speaks first: a greeting, then its FIN.
final class Greeter: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    func channelActive(context: ChannelHandlerContext) {
        context.writeAndFlush(self.wrapOutboundOut(ByteBuffer(string: "220 ready\r\n")), promise: nil)
        context.close(mode: .output, promise: nil)
        context.fireChannelActive()
    }
    func channelRead(context: ChannelHandlerContext, data: NIOAny) {}
    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event as? ChannelEvent == .inputClosed { context.close(promise: nil) }
    }
}

extension LinkTests {
    @Test("an endpoint that speaks first (a greeting on connect) loses nothing before the splice")
    func serverSpeaksFirst() async throws {
        let ca = try CertificateAuthority.create()
        let book = AddressBook()
        let backend = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .childChannelOption(ChannelOptions.allowRemoteHalfClosure, value: true)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(Greeter()) }
            }
            .bind(host: "127.0.0.1", port: 0).get()
        let a = try await LinkNode.make("a", ca: ca, book: book)
        let b = try await LinkNode.make("b", ca: ca, book: book)
        for _ in 0..<10 {
            let got = try await echoThrough(
                a.manager,
                to: "b",
                target: webTarget(port: backend.localAddress!.port!),
                payload: ByteBuffer(string: "QUIT\r\n")
            )
            #expect(String(buffer: got) == "220 ready\r\n")
        }
        await a.stop()
        await b.stop()
        try await backend.close()
    }
}

/// A TCP forwarder on 127.0.0.1 to `target` that holds each chunk from the connecting side for `delay` before
/// passing it on (the other way goes at once): a slow network or a busy peer, in order.
final class DelayingForwarder: Sendable {
    let server: any Channel
    var address: SocketAddress { self.server.localAddress! }

    private init(server: any Channel) { self.server = server }

    static func start(to target: SocketAddress, delay: TimeAmount) async throws -> DelayingForwarder {
        let group = MultiThreadedEventLoopGroup.singleton
        let server = try await ServerBootstrap(group: group)
            .childChannelOption(ChannelOptions.autoRead, value: false)
            .childChannelInitializer { inbound in
                ClientBootstrap(group: inbound.eventLoop)
                    .channelInitializer { outbound in
                        outbound.pipeline.addHandler(Forward(to: inbound, delay: .zero))
                    }
                    .connect(to: target)
                    .flatMap { outbound in
                        inbound.pipeline.addHandler(Forward(to: outbound, delay: delay)).flatMap {
                            inbound.setOption(ChannelOptions.autoRead, value: true)
                        }
                    }
            }
            .bind(host: "127.0.0.1", port: 0).get()
        return DelayingForwarder(server: server)
    }

    func close() async throws { try await self.server.close() }

    /// Writes what its channel reads to `peer` after `delay`; closes `peer` when its channel closes.
    private final class Forward: ChannelInboundHandler, Sendable {
        typealias InboundIn = ByteBuffer
        let peer: any Channel
        let delay: TimeAmount

        init(to peer: any Channel, delay: TimeAmount) {
            self.peer = peer
            self.delay = delay
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            let bytes = self.unwrapInboundIn(data)
            let peer = self.peer
            if self.delay == .zero {
                peer.writeAndFlush(bytes, promise: nil)
            } else {
                context.eventLoop.scheduleTask(in: self.delay) { peer.writeAndFlush(bytes, promise: nil) }
            }
        }

        func channelInactive(context: ChannelHandlerContext) {
            let peer = self.peer
            context.eventLoop.scheduleTask(in: self.delay) { peer.close(promise: nil) }
        }
    }
}
