import NIOCore

/// Cuts a byte stream into yamux frames, for a `ByteToMessageHandler` in front of the mux session.
///
/// A malformed header throws its `MeshWireError` (the session answers with Go Away, protocol error);
/// bytes left inside a frame when the stream ends (or the decoder is removed) throw `truncated`.
public struct YamuxFrameDecoder: ByteToMessageDecoder, Sendable {
    public typealias InboundOut = YamuxFrame

    /// The longest Data payload accepted.
    public let maxPayload: Int

    public init(maxPayload: Int) {
        self.maxPayload = maxPayload
    }

    public mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        guard let frame = try YamuxFrame.decode(from: &buffer, maxPayload: self.maxPayload) else {
            return .needMoreData
        }
        context.fireChannelRead(Self.wrapInboundOut(frame))
        return .continue
    }

    public mutating func decodeLast(
        context: ChannelHandlerContext,
        buffer: inout ByteBuffer,
        seenEOF: Bool
    ) throws -> DecodingState {
        while try self.decode(context: context, buffer: &buffer) == .continue {}
        // Called when the channel goes inactive (EOF or not) and when the decoder is removed: the frame
        // would never complete either way.
        if buffer.readableBytes > 0 {
            throw MeshWireError.truncated("a yamux frame (\(buffer.readableBytes) bytes left)")
        }
        return .needMoreData
    }
}
