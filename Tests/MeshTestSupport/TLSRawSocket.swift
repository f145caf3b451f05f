import Foundation
import NIOCore
import NIOPosix
import NIOSSL

/// `RawSocket` over TLS: a blocking client that sends exact bytes (garbage, half requests) inside a
/// TLS 1.3 connection and reads the reply, for testing the HTTPS control API byte by byte. Use it
/// from `blocking { }` (it waits on a condition, never on a Swift concurrency thread).
public final class TLSRawSocket: @unchecked Sendable {
    // All mutable state sits behind `condition`.
    final class Inbox: ChannelInboundHandler, @unchecked Sendable {
        typealias InboundIn = ByteBuffer
        let condition = NSCondition()
        var data: [UInt8] = []
        var closed = false

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            let buffer = self.unwrapInboundIn(data)
            self.condition.withLock {
                self.data += buffer.readableBytesView
                self.condition.broadcast()
            }
        }

        func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
            if case ChannelEvent.inputClosed = event { self.markClosed() }
            context.fireUserInboundEventTriggered(event)
        }

        func channelInactive(context: ChannelHandlerContext) {
            self.markClosed()
        }

        func errorCaught(context: ChannelHandlerContext, error: any Error) {
            self.markClosed()
            context.close(promise: nil)
        }

        func markClosed() {
            self.condition.withLock {
                self.closed = true
                self.condition.broadcast()
            }
        }
    }

    let channel: any Channel
    let inbox = Inbox()
    let timeout: TimeInterval

    public init(host: String = "127.0.0.1", port: Int, timeout: Int = 10, tls: NIOSSLContext) throws {
        self.timeout = TimeInterval(timeout)
        let inbox = self.inbox
        self.channel = try ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .channelOption(.allowRemoteHalfClosure, value: true)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(
                        NIOSSLClientHandler(context: tls, serverHostname: nil)
                    )
                    try channel.pipeline.syncOperations.addHandler(inbox)
                }
            }
            .connect(host: host, port: port)
            .wait()
    }

    deinit { self.channel.close(promise: nil) }

    public func send(_ text: String) { self.send(Array(text.utf8)) }

    public func send(_ bytes: [UInt8]) {
        try? self.channel.writeAndFlush(ByteBuffer(bytes: bytes)).wait()
    }

    /// Stops sending (TLS close_notify, then the TCP write side); reading still works.
    public func shutdownWrite() {
        try? self.channel.close(mode: .output).wait()
    }

    /// Waits until `ready` holds for the inbox or the timeout passes; returns what `take` makes of it.
    private func wait<T>(until ready: (Inbox) -> Bool, take: (Inbox) -> T) -> T {
        let deadline = Date(timeIntervalSinceNow: self.timeout)
        self.inbox.condition.lock()
        defer { self.inbox.condition.unlock() }
        while !ready(self.inbox), self.inbox.condition.wait(until: deadline) {}
        return take(self.inbox)
    }

    private static func takeAll(_ inbox: Inbox) -> String {
        defer { inbox.data.removeAll() }
        return String(decoding: inbox.data, as: UTF8.self)
    }

    /// Reads until the server closes or the timeout passes.
    public func readAll() -> String {
        self.wait(until: { $0.closed }, take: Self.takeAll)
    }

    /// Reads whatever has arrived (waits up to the timeout for something).
    public func readSome() -> String {
        self.wait(until: { !$0.data.isEmpty || $0.closed }, take: Self.takeAll)
    }

    /// Reads one HTTP/1.1 response: its head, then a Content-Length body (or until close).
    public func readFirstResponse() -> String {
        func complete(_ out: [UInt8]) -> Int? {
            let text = String(decoding: out, as: UTF8.self)
            guard let headEnd = text.range(of: "\r\n\r\n") else { return nil }
            let head = text[..<headEnd.lowerBound].lowercased()
            guard let cl = head.split(separator: "\r\n").first(where: { $0.hasPrefix("content-length:") }),
                let n = Int(cl.dropFirst("content-length:".count).trimmingCharacters(in: .whitespaces))
            else { return nil }
            let bodyStart = text.utf8.distance(
                from: text.utf8.startIndex,
                to: headEnd.upperBound.samePosition(in: text.utf8)!
            )
            return out.count >= bodyStart + n ? bodyStart + n : nil
        }
        return self.wait(
            until: { $0.closed || complete($0.data) != nil },
            take: { inbox in
                let end = complete(inbox.data) ?? inbox.data.count
                defer { inbox.data.removeFirst(end) }
                return String(decoding: inbox.data[..<end], as: UTF8.self)
            }
        )
    }

    /// True when the server has closed the connection within the timeout.
    public func isClosedByPeer() -> Bool {
        self.wait(until: { $0.closed }, take: { $0.closed })
    }
}
