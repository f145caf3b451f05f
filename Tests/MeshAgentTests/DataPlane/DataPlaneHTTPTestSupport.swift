import MeshCore
import NIOCore
import NIOHTTP1
import NIOPosix
import Synchronization
import Testing

@testable import MeshAgent

/// Requests a test HTTP backend has seen.
final class HTTPBackendStats: Sendable {
    let requests = Atomic<Int>(0)
    let connections = Atomic<Int>(0)
    /// `/hold` answers once this is true.
    let released = Atomic<Bool>(false)
}

extension TestServers {
    /// A tiny HTTP/1.1 backend. Paths: `/` (200, body = name, echoes X-Forwarded-For / X-Request-Id in
    /// x-seen-* headers), `/slow/<ms>`, `/status/<code>`, `/big/<bytes>` (streamed), `/echo` (streams the
    /// request body back), `/reset` (closes without answering), `/early` (413 before reading the body), `/hold`
    /// (answers once `stats.released` is set); `Upgrade: websocket` switches to a byte echo.
    /// `delay` slows every answer down.
    static func http(
        _ name: String,
        host: String = "127.0.0.1",
        delay: TimeAmount = .zero,
        resetEverything: Bool = false,
        stats: HTTPBackendStats = HTTPBackendStats()
    ) async throws -> TestServer {
        let channel = try await ServerBootstrap(group: testGroup)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    stats.connections.add(1, ordering: .relaxed)
                    let sync = channel.pipeline.syncOperations
                    try sync.configureHTTPServerPipeline(
                        withServerUpgrade: (
                            upgraders: [EchoUpgrader()],
                            completionHandler: { context in
                                context.pipeline.syncOperations.removeHandler(name: "app", promise: nil)
                            }
                        )
                    )
                    try sync.addHandler(
                        TestHTTPHandler(name: name, delay: delay, resetEverything: resetEverything, stats: stats),
                        name: "app"
                    )
                }
            }
            .bind(host: host, port: 0)
            .get()
        return TestServer(channel: channel, name: name)
    }
}

final class EchoUpgrader: HTTPServerProtocolUpgrader, Sendable {
    let supportedProtocol = "websocket"
    let requiredUpgradeHeaders: [String] = []

    func buildUpgradeResponse(
        channel: any Channel,
        upgradeRequest: HTTPRequestHead,
        initialResponseHeaders: HTTPHeaders
    ) -> EventLoopFuture<HTTPHeaders> {
        channel.eventLoop.makeSucceededFuture(initialResponseHeaders)
    }

    func upgrade(context: ChannelHandlerContext, upgradeRequest: HTTPRequestHead) -> EventLoopFuture<Void> {
        context.eventLoop.makeCompletedFuture { try context.pipeline.syncOperations.addHandler(EchoHandler()) }
    }
}

final class TestHTTPHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    let name: String
    let delay: TimeAmount
    let resetEverything: Bool
    let stats: HTTPBackendStats
    private var head: HTTPRequestHead?
    private var received = 0
    private var echoing = false
    private var bigRemaining = 0
    private var pumping = false

    init(name: String, delay: TimeAmount, resetEverything: Bool, stats: HTTPBackendStats) {
        self.name = name
        self.delay = delay
        self.resetEverything = resetEverything
        self.stats = stats
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch self.unwrapInboundIn(data) {
        case .head(let head):
            self.head = head
            self.received = 0
            self.stats.requests.add(1, ordering: .relaxed)
            if self.resetEverything || head.uri == "/reset" {
                context.close(promise: nil)
                return
            }
            if head.uri == "/early" {
                var headers = HTTPHeaders()
                headers.add(name: "x-backend", value: self.name)
                self.send(.payloadTooLarge, headers, body: "too large", context: context)
                return
            }
            if head.uri == "/echo" {
                self.echoing = true
                var headers = HTTPHeaders()
                headers.add(name: "x-backend", value: self.name)
                context.writeAndFlush(
                    self.wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: .ok, headers: headers))),
                    promise: nil
                )
            }
        case .body(let buffer):
            self.received += buffer.readableBytes
            if self.echoing { context.write(self.wrapOutboundOut(.body(.byteBuffer(buffer))), promise: nil) }
        case .end:
            guard let head = self.head, !self.resetEverything, head.uri != "/early" else { return }
            if self.echoing {
                self.echoing = false
                context.writeAndFlush(self.wrapOutboundOut(.end(nil)), promise: nil)
                return
            }
            if self.delay > .zero {
                context.eventLoop.assumeIsolated().scheduleTask(in: self.delay) { self.respond(head, context: context) }
            } else {
                self.respond(head, context: context)
            }
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        context.flush()
    }

    private func respond(_ head: HTTPRequestHead, context: ChannelHandlerContext) {
        let parts = head.uri.split(separator: "/")
        var headers = HTTPHeaders()
        headers.add(name: "x-backend", value: self.name)
        headers.add(name: "x-seen-xff", value: head.headers.first(name: "x-forwarded-for") ?? "-")
        headers.add(name: "x-seen-request-id", value: head.headers.first(name: "x-request-id") ?? "-")
        headers.add(name: "x-seen-body", value: "\(self.received)")
        switch parts.first {
        case "slow":
            let ms = Int64(parts.dropFirst().first ?? "0") ?? 0
            context.eventLoop.assumeIsolated().scheduleTask(in: .milliseconds(ms)) {
                self.send(.ok, headers, body: self.name, context: context)
            }
        case "hold":
            self.answerWhenReleased(headers, context: context)
        case "status":
            let code = Int(parts.dropFirst().first ?? "200") ?? 200
            self.send(HTTPResponseStatus(statusCode: code), headers, body: "status \(code)", context: context)
        case "big":
            self.bigRemaining = Int(parts.dropFirst().first ?? "0") ?? 0
            headers.add(name: "content-length", value: "\(self.bigRemaining)")
            context.write(
                self.wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: .ok, headers: headers))),
                promise: nil
            )
            self.pumpBig(context: context)
        default:
            self.send(.ok, headers, body: self.name, context: context)
        }
    }

    private func answerWhenReleased(_ headers: HTTPHeaders, context: ChannelHandlerContext) {
        guard self.stats.released.load(ordering: .relaxed) else {
            context.eventLoop.assumeIsolated().scheduleTask(in: .milliseconds(5)) {
                self.answerWhenReleased(headers, context: context)
            }
            return
        }
        self.send(.ok, headers, body: self.name, context: context)
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if self.bigRemaining > 0 { self.pumpBig(context: context) }
    }

    private func pumpBig(context: ChannelHandlerContext) {
        // A flush can drain the socket and fire a writability change right here: no re-entry.
        guard !self.pumping else { return }
        self.pumping = true
        defer { self.pumping = false }
        let chunk = ByteBuffer(repeating: UInt8(ascii: "x"), count: 64 * 1024)
        while context.channel.isWritable && self.bigRemaining > 0 {
            let n = min(chunk.readableBytes, self.bigRemaining)
            self.bigRemaining -= n
            context.write(self.wrapOutboundOut(.body(.byteBuffer(chunk.getSlice(at: 0, length: n)!))), promise: nil)
        }
        if self.bigRemaining == 0 {
            context.writeAndFlush(self.wrapOutboundOut(.end(nil)), promise: nil)
        } else {
            context.flush()
            // The flush may have made room without a writability change reaching us (we were pumping).
            if context.channel.isWritable && self.bigRemaining > 0 {
                context.eventLoop.assumeIsolated().execute { self.pumpBig(context: context) }
            }
        }
    }

    private func send(
        _ status: HTTPResponseStatus,
        _ headers: HTTPHeaders,
        body: String,
        context: ChannelHandlerContext
    ) {
        var headers = headers
        headers.add(name: "content-length", value: "\(body.utf8.count)")
        context.write(
            self.wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: status, headers: headers))),
            promise: nil
        )
        context.write(self.wrapOutboundOut(.body(.byteBuffer(ByteBuffer(string: body)))), promise: nil)
        context.writeAndFlush(self.wrapOutboundOut(.end(nil)), promise: nil)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}

enum RawClient {
    /// Sends raw bytes and reads until the server closes (or `timeout`); returns the text received.
    static func send(_ address: SocketAddress, _ bytes: [UInt8], timeout: Double = 30) async throws -> String {
        try await withTimeout(timeout, "raw exchange") {
            let channel = try await ClientBootstrap(group: testGroup).connect(to: address) { channel in
                channel.eventLoop.makeCompletedFuture {
                    try NIOAsyncChannel<ByteBuffer, ByteBuffer>(wrappingChannelSynchronously: channel)
                }
            }
            return try await channel.executeThenClose { inbound, outbound in
                if !bytes.isEmpty { try await outbound.write(ByteBuffer(bytes: bytes)) }
                var text = ""
                do {
                    for try await chunk in inbound { text += String(buffer: chunk) }
                } catch let error as IOError where error.errnoCode == ECONNRESET {
                    // The proxy may reset after answering when unread input is left: what arrived counts.
                }
                return text
            }
        }
    }
}
