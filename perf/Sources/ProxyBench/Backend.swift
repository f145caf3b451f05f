import ArgumentParser
import NIOCore
import NIOPosix

#if canImport(Glibc)
import Glibc
#endif

/// Test backends: `bulk` (after the first byte received, sends --size bytes and closes), `echo`, and `http`
/// (keep-alive, fixed body of --size bytes).
struct BackendCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "backend", abstract: "Run a benchmark backend.")

    enum Kind: String, ExpressibleByArgument {
        case bulk
        case echo
        case http
    }

    @Option(help: "host:port to listen on.") var listen: HostPort
    @Option(help: "bulk | echo | http") var kind: Kind
    @Option(help: "bulk: bytes per connection; http: body bytes.") var size = 4 * 1024 * 1024

    func run() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let kind = self.kind
        let size = self.size
        let channel = try await ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .serverChannelOption(.backlog, value: 1024)
            .childChannelOption(.allowRemoteHalfClosure, value: true)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let sync = channel.pipeline.syncOperations
                    switch kind {
                    case .bulk: try sync.addHandler(BulkHandler(size: size))
                    case .echo: try sync.addHandler(EchoBackendHandler())
                    case .http: try sync.addHandler(TinyHTTPHandler(bodySize: size))
                    }
                }
            }
            .bind(to: try self.listen.socketAddress())
            .get()
        print("ready \(self.listen) pid \(getpid())")
        try await channel.closeFuture.get()
    }
}

final class BulkHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    let size: Int
    private var remaining = 0
    private var started = false
    private var pumping = false
    private let chunk = ByteBuffer(repeating: UInt8(ascii: "b"), count: 256 * 1024)

    init(size: Int) { self.size = size }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !self.started else { return }
        self.started = true
        self.remaining = self.size
        self.pump(context: context)
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if self.remaining > 0 { self.pump(context: context) }
    }

    private func pump(context: ChannelHandlerContext) {
        // A flush can drain the socket and fire a writability change right here: no re-entry.
        guard !self.pumping, self.remaining > 0 else { return }
        self.pumping = true
        defer { self.pumping = false }
        while context.channel.isWritable && self.remaining > 0 {
            let n = min(self.remaining, self.chunk.readableBytes)
            self.remaining -= n
            context.write(self.wrapOutboundOut(self.chunk.getSlice(at: 0, length: n)!), promise: nil)
        }
        if self.remaining == 0 {
            context.writeAndFlush(self.wrapOutboundOut(ByteBuffer())).assumeIsolated().whenComplete { _ in
                context.close(promise: nil)
            }
        } else {
            context.flush()
            if context.channel.isWritable && self.remaining > 0 {
                context.eventLoop.assumeIsolated().execute { self.pump(context: context) }
            }
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) { context.close(promise: nil) }
}

final class EchoBackendHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    func channelRead(context: ChannelHandlerContext, data: NIOAny) { context.write(data, promise: nil) }
    func channelReadComplete(context: ChannelHandlerContext) { context.flush() }
    func errorCaught(context: ChannelHandlerContext, error: any Error) { context.close(promise: nil) }
}

/// Answers every `\r\n\r\n`-terminated request (no request bodies) with a fixed keep-alive response.
final class TinyHTTPHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    private let response: ByteBuffer
    private var buffer = ByteBuffer()

    init(bodySize: Int) {
        var r = ByteBuffer()
        r.writeString("HTTP/1.1 200 OK\r\ncontent-length: \(bodySize)\r\ncontent-type: text/plain\r\n\r\n")
        r.writeRepeatingByte(UInt8(ascii: "h"), count: bodySize)
        self.response = r
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var incoming = self.unwrapInboundIn(data)
        self.buffer.writeBuffer(&incoming)
        while let view = self.buffer.readableBytesView.firstRange(of: [13, 10, 13, 10]) {
            self.buffer.moveReaderIndex(to: view.upperBound)
            context.write(self.wrapOutboundOut(self.response), promise: nil)
        }
        self.buffer.discardReadBytes()
    }

    func channelReadComplete(context: ChannelHandlerContext) { context.flush() }
    func errorCaught(context: ChannelHandlerContext, error: any Error) { context.close(promise: nil) }
}
