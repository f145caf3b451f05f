import MeshHTTP
import MeshIdentity
import MeshTestSupport
import NIOCore
import NIOPosix
import NIOSSL
import NIOTLS
import Testing

/// What `HTTPClient` says when a TLS server goes away in ways a person has to tell apart.
@Suite(.rationed) struct HTTPClientTLSTests {
    /// The socket end of a server pipeline: closing from here bypasses NIOSSL, so no close_notify is sent.
    final class SocketEnd: ChannelInboundHandler, @unchecked Sendable {
        typealias InboundIn = ByteBuffer
        var context: ChannelHandlerContext?
        func handlerAdded(context: ChannelHandlerContext) { self.context = context }
    }

    /// After NIOSSL: once the server's side of the handshake is done, closes the socket under NIOSSL, as a
    /// server does that gives up on a TLS 1.3 handshake after the client has sent its Finished.
    final class CloseUnderTLS: ChannelInboundHandler, @unchecked Sendable {
        typealias InboundIn = ByteBuffer
        let socket: SocketEnd
        init(_ socket: SocketEnd) { self.socket = socket }
        func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
            if case .handshakeCompleted = event as? TLSUserEvent { self.socket.context?.close(promise: nil) }
        }
    }

    @Test func aServerThatClosesWithoutCloseNotifyGetsAnErrorInWords() async throws {
        let ca = try CertificateAuthority.create()
        let serverContext = try meshServerContext(ca, identity: .node("server"))
        let server = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let socket = SocketEnd()
                    try channel.pipeline.syncOperations.addHandler(socket)
                    try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: serverContext))
                    try channel.pipeline.syncOperations.addHandler(CloseUnderTLS(socket))
                }
            }
            .bind(host: "127.0.0.1", port: 0)
            .get()
        let port = server.localAddress!.port!
        let client = HTTPClient(
            endpoint: HTTPEndpoint(host: "127.0.0.1", port: port, tls: true),
            tls: HTTPClientTLS(context: try meshClientContext(ca, identity: .node("client")))
        )
        do {
            _ = try await client.send(.GET, "/")
            Issue.record("the request succeeded against a server that closes every connection")
        } catch let error as HTTPClientError {
            let text = "\(error)"
            #expect(text.contains("request to https://127.0.0.1:\(port) failed"), "\(text)")
            #expect(text.contains("without closing TLS (close_notify) and without an answer"), "\(text)")
            #expect(!text.contains("uncleanShutdown"), "\(text)")
        }
        try await server.close()
    }
}
