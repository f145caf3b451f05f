import MeshIdentity
import MeshRecords
import MeshTestSupport
import NIOCore
import NIOPosix
import NIOSSL
import Synchronization
import Testing

@testable import Relay

/// Links with the mesh record layer (MeshRecords) over real sockets on 127.0.0.1.
@Suite(.rationed) struct LinkRecordLayerTests {
    /// Nodes a and b (with `configuration`) of one CA, and an echo backend; all stopped after `body`.
    func withNodes(
        _ configuration: LinkConfiguration = LinkConfiguration(),
        _ body: (_ a: LinkNode, _ b: LinkNode, _ port: Int, _ book: AddressBook, _ ca: CertificateAuthority)
            async throws -> Void
    ) async throws {
        let ca = try CertificateAuthority.create()
        let book = AddressBook()
        let backend = try await startEchoBackend()
        let a = try await LinkNode.make("a", ca: ca, book: book, configuration: configuration)
        let b = try await LinkNode.make("b", ca: ca, book: book, configuration: configuration)
        try await body(a, b, backend.localAddress!.port!, book, ca)
        await a.stop()
        await b.stop()
        try await backend.close()
    }

    /// The handler that seals `link`'s records, if any, and whether NIOSSL is still in its pipeline.
    func layers(of link: Link) async throws -> (sealed: (sent: UInt64, received: UInt64)?, nioSSL: Bool) {
        try await link.transport.eventLoop.submit {
            let ops = link.transport.pipeline.syncOperations
            let sealed = try? ops.handler(type: SealedRecordHandler.self)
            let tls =
                (try? ops.handler(type: NIOSSLClientHandler.self)) != nil
                || (try? ops.handler(type: NIOSSLServerHandler.self)) != nil
            return (sealed.map { ($0.recordsSent, $0.recordsReceived) }, tls)
        }.get()
    }

    @Test func linksSealTheirOwnRecordsAndAPeerWithoutTheLayerKeepsTLS() async throws {
        try await self.withNodes { a, b, port, book, ca in try await self.sealedAndNot(a, b, port, book, ca) }
    }

    func sealedAndNot(
        _ a: LinkNode,
        _ b: LinkNode,
        _ port: Int,
        _ book: AddressBook,
        _ ca: CertificateAuthority
    )
        async throws
    {
        var tlsOnly = LinkConfiguration()
        tlsOnly.sealedRecords = false
        let c = try await LinkNode.make("c", ca: ca, book: book, configuration: tlsOnly)
        let payload = ByteBuffer(bytes: (0..<200_000).map { UInt8(truncatingIfNeeded: $0 &* 13) })

        // a and b both offer it: NIOSSL leaves after the handshake, at both ends.
        #expect(try await echoThrough(a.manager, to: "b", target: webTarget(port: port), payload: payload) == payload)
        let ab = try #require(a.manager.currentLink(to: "b"))
        let ba = try #require(b.manager.currentLink(to: "a"))
        #expect(ab.records == "mesh" && ba.records == "mesh")
        #expect(await a.manager.stats().first.map { [$0.records, $0.dataPath] } == ["mesh", "nio"])
        let (sealed, tls) = try await self.layers(of: ab)
        #expect(!tls)
        let counts = try #require(sealed)
        #expect(counts.sent >= 13 && counts.received >= 13)  // 200 kB each way: at least 13 full records

        // c does not offer it: TLS records both ways, whichever end dials.
        #expect(try await echoThrough(c.manager, to: "b", target: webTarget(port: port), payload: payload) == payload)
        #expect(try await echoThrough(a.manager, to: "c", target: webTarget(port: port), payload: payload) == payload)
        for link in [c.manager.currentLink(to: "b"), b.manager.currentLink(to: "c"), a.manager.currentLink(to: "c")] {
            let link = try #require(link)
            #expect(link.records == "tls")
            let (sealed, tls) = try await self.layers(of: link)
            #expect(sealed == nil && tls)
        }
        #expect(a.manager.tls.secrets.count == 0 && b.manager.tls.secrets.count == 0)
        await c.stop()
    }

    @Test func bothEndsMoveToTheNextKeyInStep() async throws {
        var configuration = LinkConfiguration()
        configuration.recordsPerKey = 4
        try await self.withNodes(configuration) { a, b, port, _, _ in try await self.keyUpdates(a, port) }
    }

    func keyUpdates(_ a: LinkNode, _ port: Int) async throws {
        var rng = SplitMix(seed: 29)
        for size in [1, 70_000, 300_000] {
            let payload = ByteBuffer(bytes: (0..<size).map { _ in UInt8.random(in: 0...255, using: &rng) })
            #expect(
                try await echoThrough(a.manager, to: "b", target: webTarget(port: port), payload: payload) == payload
            )
        }
        let (sealed, _) = try await self.layers(of: try #require(a.manager.currentLink(to: "b")))
        #expect((sealed?.sent ?? 0) > 4 * 5)  // the key moved on five times and more
    }

    @Test func whatCrossesTheWireIsSealedRecordsNeverThePlaintext() async throws {
        try await self.withNodes { a, b, port, book, _ in try await self.wire(a, b, port, book) }
    }

    func wire(_ a: LinkNode, _ b: LinkNode, _ port: Int, _ book: AddressBook) async throws {
        // a reaches b through a recording TCP forwarder on 127.0.0.1.
        let tap = try await WireTap.start(to: b.address)
        book.set("b", [tap.address])
        let marker = ByteBuffer(string: String(repeating: "MARKER-7d1c0a-", count: 200))
        #expect(try await echoThrough(a.manager, to: "b", target: webTarget(port: port), payload: marker) == marker)
        #expect(try #require(a.manager.currentLink(to: "b")).records == "mesh")
        let (toB, toA) = tap.captured
        #expect(toB.count > marker.readableBytes && toA.count > marker.readableBytes)
        for bytes in [toB, toA] {
            #expect(!bytes.contains(subsequence: Array("MARKER".utf8)))
            // The handshake's records, then application data only: every record header is TLS 1.3's.
            var at = 0
            while at + 5 <= bytes.count {
                // (A ClientHello's record says 0x0301, as RFC 8446 5.1 allows.)
                #expect([20, 21, 22, 23].contains(bytes[at]) && bytes[at + 1] == 3 && [1, 3].contains(bytes[at + 2]))
                at += 5 + Int(bytes[at + 3]) << 8 + Int(bytes[at + 4])
            }
            #expect(at == bytes.count)
        }
        try await tap.close()
    }
}

extension Array where Element == UInt8 {
    func contains(subsequence: [UInt8]) -> Bool {
        guard subsequence.count <= self.count else { return false }
        return (0...(self.count - subsequence.count)).contains { i in
            self[i..<(i + subsequence.count)].elementsEqual(subsequence)
        }
    }
}

/// A TCP forwarder on 127.0.0.1 that keeps a copy of what passes each way.
final class WireTap: Sendable {
    let server: any Channel
    private let bytes = Mutex<(toTarget: [UInt8], toClient: [UInt8])>(([], []))

    var address: SocketAddress { self.server.localAddress! }
    /// What went to the target and back to the client so far.
    var captured: (toTarget: [UInt8], toClient: [UInt8]) { self.bytes.withLock { $0 } }

    private init(server: any Channel) { self.server = server }

    static func start(to target: SocketAddress) async throws -> WireTap {
        let box = Mutex<WireTap?>(nil)
        let server = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .childChannelInitializer { client in
                ClientBootstrap(group: client.eventLoop)
                    .connect(to: target)
                    .flatMapThrowing { upstream in
                        let tap = box.withLock { $0 }!
                        try client.pipeline.syncOperations.addHandler(Recorder { b in tap.record(b, toTarget: true) })
                        try upstream.pipeline.syncOperations.addHandler(
                            Recorder { b in tap.record(b, toTarget: false) }
                        )
                        try StreamSpliceHandler.splice(client, upstream)
                    }
            }
            .bind(host: "127.0.0.1", port: 0).get()
        let tap = WireTap(server: server)
        box.withLock { $0 = tap }
        return tap
    }

    func record(_ buffer: ByteBuffer, toTarget: Bool) {
        self.bytes.withLock {
            if toTarget { $0.toTarget += buffer.readableBytesView } else { $0.toClient += buffer.readableBytesView }
        }
    }

    func close() async throws { try await self.server.close() }

    final class Recorder: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        typealias InboundOut = ByteBuffer
        let seen: (ByteBuffer) -> Void
        init(_ seen: @escaping (ByteBuffer) -> Void) { self.seen = seen }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            self.seen(self.unwrapInboundIn(data))
            context.fireChannelRead(data)
        }
    }
}
