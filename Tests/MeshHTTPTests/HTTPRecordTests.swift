import MeshHTTP
import MeshIdentity
import MeshRecords
import MeshTestSupport
import NIOCore
import NIOPosix
import NIOSSL
import Testing

/// HTTPS connections that move to the mesh record layer after their handshake (`HTTPRecordSwitch`), over real
/// sockets on 127.0.0.1: requests, bodies larger than a record, streams and the client's identity as with TLS
/// records; a peer that does not offer it keeps TLS records; bytes that are not records end that connection
/// only.
@Suite(.rationed) struct HTTPRecordTests {
    static func client(_ ca: CertificateAuthority, port: Int, records: Bool = true) throws -> HTTPClient {
        HTTPClient(
            endpoint: HTTPEndpoint(host: "127.0.0.1", port: port, tls: true),
            tls: HTTPClientTLS(context: try meshClientContext(ca, identity: .node("n1"), httpRecords: records))
        )
    }

    static func serial(of response: HTTPClientResponse) -> String {
        String(String(buffer: response.body).split(separator: " ").last ?? "")
    }

    @Test func requestsBodiesStreamsAndTheClientIdentityOverTheRecordLayer() async throws {
        let ca = try CertificateAuthority.create()
        let context = try meshServerContext(ca, identity: .control("cp"))
        let (server, group, task, port) = try await startServer(configure: { config in
            config.tls = HTTPServerTLS(context: context) { MeshTLS.identity(of: $0)?.uri }
        })
        let client = try Self.client(ca, port: port)
        // A new connection per request: each one switches. (NIOSSL took the client's close_notify for the end of
        // its input on a server that allows half-closure, and most of these failed.)
        for _ in 0..<20 {
            let whoami = try await client.send(.GET, "/whoami")
            #expect(whoami.status == .ok)
            let text = String(buffer: whoami.body)
            #expect(text.hasPrefix("mesh://node/n1 ") && Self.serial(of: whoami).count >= 2, "\(text)")
        }
        #expect(server.sealedConnections == 20)

        // A body of several records each way.
        let body = ByteBuffer(bytes: (0..<100_000).map { UInt8(truncatingIfNeeded: $0 &* 7) })
        let echo = try await client.send(.POST, "/echo", body: body)
        #expect(echo.status == .ok)
        #expect(echo.body == body)

        // A streamed answer, line by line, as watches are.
        let lines = try await client.stream(.GET, "/stream") { head, stream in
            #expect(head.status == .ok)
            var lines: [String] = []
            while lines.count < 3, let line = try await stream.nextLine() { lines.append(String(buffer: line)) }
            return lines
        }
        #expect(lines == ["tick 0", "tick 1", "tick 2"])
        #expect(server.sealedConnections == 22)
        await group.triggerGracefulShutdown()
        try await task.value
    }

    @Test func aPeerThatDoesNotOfferItKeepsTLSRecords() async throws {
        let ca = try CertificateAuthority.create()
        // A client without it, against a server with it.
        let context = try meshServerContext(ca, identity: .control("cp"))
        let (server, group, task, port) = try await startServer(configure: { config in
            config.tls = HTTPServerTLS(context: context) { MeshTLS.identity(of: $0)?.uri }
        })
        let plain = try await Self.client(ca, port: port, records: false).send(.GET, "/whoami")
        let sealed = try await Self.client(ca, port: port).send(.GET, "/whoami")
        #expect(String(buffer: plain.body).hasPrefix("mesh://node/n1 "), "\(String(buffer: plain.body))")
        #expect(Self.serial(of: plain).count >= 2 && Self.serial(of: sealed).count >= 2)
        #expect(server.sealedConnections == 1)
        await group.triggerGracefulShutdown()
        try await task.value

        // A server without it, against a client with it.
        let tlsOnly = try meshServerContext(ca, identity: .control("cp"), httpRecords: false)
        let (server2, group2, task2, port2) = try await startServer(configure: { config in
            config.tls = HTTPServerTLS(context: tlsOnly) { MeshTLS.identity(of: $0)?.uri }
        })
        let answer = try await Self.client(ca, port: port2).send(.GET, "/whoami")
        #expect(String(buffer: answer.body).hasPrefix("mesh://node/n1 "), "\(String(buffer: answer.body))")
        #expect(server2.sealedConnections == 0)
        await group2.triggerGracefulShutdown()
        try await task2.value
    }

    /// After the switch, the client writes bytes that are not records (below its record handler, straight to the
    /// socket): the server ends that connection without answering, and goes on serving others.
    @Test func bytesThatAreNotRecordsEndOnlyThatConnection() async throws {
        let ca = try CertificateAuthority.create()
        let context = try meshServerContext(ca, identity: .control("cp"))
        let (server, group, task, port) = try await startServer(configure: { config in
            config.tls = HTTPServerTLS(context: context) { MeshTLS.identity(of: $0)?.uri }
        })
        let clientContext = try meshClientContext(ca, identity: .node("n1"), httpRecords: true)
        let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try HTTPRecordSwitch.addHandlers(
                        try NIOSSLClientHandler(context: clientContext, serverHostname: nil),
                        role: .client,
                        to: channel.pipeline.syncOperations
                    )
                }
            }
            .connect(host: "127.0.0.1", port: port)
            .get()
        // Settled on the record layer: NIOSSL and the switch have left the client's pipeline.
        let settled = try await eventually(timeout: .seconds(30)) {
            let handlers = try await channel.eventLoop.submit {
                let ops = channel.pipeline.syncOperations
                return (
                    (try? ops.handler(type: SealedRecordHandler.self)) != nil,
                    (try? ops.handler(type: NIOSSLClientHandler.self)) != nil
                )
            }.get()
            return handlers.0 && !handlers.1
        }
        #expect(settled)
        try await channel.eventLoop.submit {
            let below = try channel.pipeline.syncOperations.context(handlerType: SealedRecordHandler.self)
            // A record header that claims 17 bytes, then 17 bytes no key seals.
            below.writeAndFlush(
                NIOAny(ByteBuffer(bytes: [23, 3, 3, 0, 17] + [UInt8](repeating: 0x41, count: 17))),
                promise: nil
            )
        }.get()
        #expect(await eventually(timeout: .seconds(30)) { !channel.isActive })
        #expect(server.sealedConnections == 1)
        // Another client is served as before.
        let whoami = try await Self.client(ca, port: port).send(.GET, "/whoami")
        #expect(String(buffer: whoami.body).hasPrefix("mesh://node/n1 "))
        await group.triggerGracefulShutdown()
        try await task.value
    }

    /// A server that refuses the client's certificate: TLS 1.3 ends the client's handshake first, so the client
    /// learns it while leaving TLS, and says so.
    @Test func aRefusedClientCertificateIsReportedInWords() async throws {
        let ca = try CertificateAuthority.create()
        let other = try CertificateAuthority.create()
        let context = try meshServerContext(ca, identity: .control("cp"))
        let (_, group, task, port) = try await startServer(configure: { config in
            config.tls = HTTPServerTLS(context: context) { MeshTLS.identity(of: $0)?.uri }
        })
        // Trusts the server's CA, presents a certificate of another.
        var config = TLSConfiguration.makeClientConfiguration()
        config.minimumTLSVersion = .tlsv13
        config.certificateVerification = .noHostnameVerification
        config.trustRoots = .certificates(try NIOSSLCertificate.fromPEMBytes(Array(try ca.certificatePEM().utf8)))
        let issued = try other.issueCredential(identity: .node("n1"), serverAuth: false, clientAuth: true)
        config.certificateChain = try NIOSSLCertificate.fromPEMBytes(Array(issued.certificatePEM.utf8)).map {
            .certificate($0)
        }
        config.privateKey = .privateKey(try NIOSSLPrivateKey(bytes: Array(issued.keyPEM.utf8), format: .pem))
        MeshTLS.offerHTTPRecords(&config)
        let client = HTTPClient(
            endpoint: HTTPEndpoint(host: "127.0.0.1", port: port, tls: true),
            tls: HTTPClientTLS(context: try NIOSSLContext(configuration: config))
        )
        do {
            _ = try await client.send(.GET, "/whoami")
            Issue.record("a certificate of another CA was accepted")
        } catch let error as HTTPClientError {
            let text = "\(error)"
            #expect(text.contains("request to https://127.0.0.1:\(port) failed"), "\(text)")
            #expect(text.contains("TLS failed after the handshake (") && text.contains("ALERT_UNKNOWN_CA"), "\(text)")
            #expect(text.contains("the server refused this client's certificate"), "\(text)")
        }
        await group.triggerGracefulShutdown()
        try await task.value
    }
}
