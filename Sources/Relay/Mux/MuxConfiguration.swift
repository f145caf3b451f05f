import MeshWire
import NIOCore

/// How a mux session behaves, and its limits (see Mux/README.md).
public struct MuxConfiguration: Sendable {
    /// Which side of the link: the client opens odd stream ids, the server even ones.
    public enum Role: Sendable, Hashable {
        case client
        case server
    }

    public var role: Role
    /// The window granted to the peer for each stream, and so the most bytes a stream ever buffers unread
    /// (its pending-bytes limit). The spec's 256 KiB by default; a larger value is announced on SYN/ACK.
    public var receiveWindow: UInt32 = YamuxDefaults.initialWindow
    /// Streams open at once on the session, both directions together. A SYN beyond it is refused with RST
    /// (not a protocol error); `openStream` beyond it fails with ``MuxError/tooManyStreams(limit:)``.
    public var maxStreams = 1024
    /// The largest Data frame sent (bytes of payload).
    public var maxFrameSize = 16 * 1024
    /// A stream's write queue: unwritable above `high` bytes, writable again below `low`.
    public var writeBufferWaterMark = ChannelOptions.Types.WriteBufferWaterMark(low: 32 * 1024, high: 64 * 1024)

    public init(role: Role) {
        self.role = role
    }
}

/// Constants of hashicorp/yamux's spec.
public enum YamuxDefaults {
    /// Every stream starts with a 256 KiB window on both sides.
    public static let initialWindow: UInt32 = 256 * 1024
}

/// How a peer broke the protocol. Each cuts the session off (Go Away with protocol error, then close)
/// and is counted in ``MuxStats/protocolErrors``.
public enum MuxViolation: String, Hashable, Sendable, CaseIterable {
    /// A frame that does not decode (`MeshWireError`), including a Data frame longer than the window.
    case malformedFrame = "malformed_frame"
    /// More Data on a stream than the window granted.
    case windowOverrun = "window_overrun"
    /// A frame for a stream that was never opened.
    case unknownStream = "unknown_stream"
    /// A SYN with our parity, an id not above the peer's last one, or on an id that is open.
    case badStreamID = "bad_stream_id"
    /// Data after the peer's own FIN.
    case dataAfterFin = "data_after_fin"
    /// A Window Update that takes the send window past 2^32 - 1.
    case windowOverflow = "window_overflow"
}

/// Errors of a session and its streams.
public enum MuxError: Error, Hashable, Sendable, CustomStringConvertible {
    /// The peer reset the stream (RST), or refused it.
    case streamReset(UInt32)
    /// The session is closed (its channel went away, or it was cut off).
    case sessionClosed
    /// Go Away was sent or received: no new streams.
    case goneAway
    /// `openStream` with `maxStreams` open.
    case tooManyStreams(limit: Int)
    /// Every stream id of this side was used (2^31 of them).
    case streamIDsExhausted
    /// The peer broke the protocol and was cut off.
    case protocolViolation(MuxViolation)
    /// The peer ended the session with Go Away and an error code.
    case peerError(YamuxGoAwayCode)

    public var description: String {
        switch self {
        case .streamReset(let id): return "stream \(id) was reset by the peer"
        case .sessionClosed: return "the mux session is closed"
        case .goneAway: return "the mux session is going away: no new streams"
        case .tooManyStreams(let n): return "the mux session has its \(n) streams open"
        case .streamIDsExhausted: return "the mux session used all its stream ids"
        case .protocolViolation(let v): return "the peer broke the mux protocol (\(v.rawValue)) and was cut off"
        case .peerError(let c): return "the peer ended the mux session: \(c)"
        }
    }
}

/// A session's counters.
public struct MuxStats: Sendable, Hashable {
    public var streamsOpened = 0
    public var streamsAccepted = 0
    /// Peer SYNs refused: over `maxStreams`, after Go Away, or without an acceptor.
    public var streamsRefused = 0
    /// Streams reset by the peer.
    public var streamsResetByPeer = 0
    public var openStreams = 0
    public var dataBytesSent: UInt64 = 0
    public var dataBytesReceived: UInt64 = 0
    /// Cut-offs by reason (a session is cut off once, so at most one entry is 1).
    public var protocolErrors: [MuxViolation: Int] = [:]
    /// The last round trip measured by a ping.
    public var lastRTT: TimeAmount?
    public var goAwaySent: YamuxGoAwayCode?
    public var goAwayReceived: YamuxGoAwayCode?

    public init() {}
}
