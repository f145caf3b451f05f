import NIOCore

/// Reads the client random of a TLS handshake off the wire, below NIOSSL: from the first bytes the channel
/// reads (the acceptor: the peer's ClientHello) or writes (the dialer: its own). It names the handshake's
/// line in the key-log (`TLSExporterSecrets`), which NIOSSL keys by client random and does not tell its
/// handler. Bytes pass through unchanged; it holds at most the first 43.
public final class ClientRandomReader: ChannelDuplexHandler, RemovableChannelHandler {
    public typealias InboundIn = ByteBuffer
    public typealias InboundOut = ByteBuffer
    public typealias OutboundIn = ByteBuffer
    public typealias OutboundOut = ByteBuffer

    public enum Side: Sendable {
        /// The ClientHello is read (this end accepted).
        case reading
        /// The ClientHello is written (this end dialed).
        case writing
    }

    /// Record header (5), handshake type and length (4), legacy_version (2), then the 32-byte random.
    static let randomRange = 11..<43

    private let side: Side
    private var first: [UInt8] = []
    /// The random, once 43 bytes have passed and they began as a ClientHello record; nil before, or when
    /// they did not.
    public private(set) var random: [UInt8]?
    public private(set) var done = false

    public init(_ side: Side) {
        self.side = side
    }

    /// The client random of a ClientHello that begins `bytes`: nil when it is not one (or is too short).
    public static func random(ofClientHello bytes: [UInt8]) -> [UInt8]? {
        guard bytes.count >= Self.randomRange.upperBound,
            bytes[0] == 22,  // handshake record
            bytes[5] == 1  // ClientHello
        else { return nil }
        return Array(bytes[Self.randomRange])
    }

    private func see(_ bytes: ByteBuffer) {
        guard !self.done else { return }
        let wanted = Self.randomRange.upperBound - self.first.count
        self.first += bytes.readableBytesView.prefix(wanted)
        if self.first.count >= Self.randomRange.upperBound {
            self.done = true
            self.random = Self.random(ofClientHello: self.first)
            self.first = []
        }
    }

    public func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if self.side == .reading { self.see(self.unwrapInboundIn(data)) }
        context.fireChannelRead(data)
    }

    public func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        if self.side == .writing { self.see(self.unwrapOutboundIn(data)) }
        context.write(data, promise: promise)
    }
}
