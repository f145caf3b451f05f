import NIOCore

/// Flags of a yamux frame (hashicorp/yamux spec.md, "Flag Field").
public struct YamuxFlags: OptionSet, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }

    /// Opens a stream (Data or Window Update); a ping request.
    public static let syn = YamuxFlags(rawValue: 0x1)
    /// Accepts a stream (Data or Window Update); a ping response.
    public static let ack = YamuxFlags(rawValue: 0x2)
    /// Half-closes a stream: the sender sends no more data.
    public static let fin = YamuxFlags(rawValue: 0x4)
    /// Resets a stream at once (or refuses it, in answer to SYN).
    public static let rst = YamuxFlags(rawValue: 0x8)
    /// Every flag the spec defines.
    public static let all: YamuxFlags = [.syn, .ack, .fin, .rst]

    public var description: String {
        let names = [(YamuxFlags.syn, "SYN"), (.ack, "ACK"), (.fin, "FIN"), (.rst, "RST")]
        let set = names.filter { self.contains($0.0) }.map(\.1)
        return set.isEmpty ? "-" : set.joined(separator: "|")
    }
}

/// The frame types (spec.md, "Type Field").
public enum YamuxFrameType: UInt8, Hashable, Sendable {
    case data = 0
    case windowUpdate = 1
    case ping = 2
    case goAway = 3
}

/// A Go Away frame's code (spec.md, "Session termination").
public enum YamuxGoAwayCode: UInt32, Hashable, Sendable {
    case normal = 0
    case protocolError = 1
    case internalError = 2
}

/// One yamux frame, as the session sees it. Each case holds only what the spec lets that type carry, so
/// an encoded frame is always valid: Ping and Go Away name stream 0, Data and Window Update do not.
///
/// Wire layout (12-byte header, big endian): version (8 bits, 0), type (8), flags (16), stream id (32),
/// length (32); a Data frame's payload follows its header. Length is the payload's size for Data, the
/// window delta for Window Update, an opaque value for Ping (echoed in the response) and the code for
/// Go Away.
public enum YamuxFrame: Hashable, Sendable {
    /// Bytes of a stream (possibly none, when only flags are sent).
    case data(stream: UInt32, flags: YamuxFlags, payload: ByteBuffer)
    /// Credit for `delta` more bytes of Data on a stream, with flags.
    case windowUpdate(stream: UInt32, flags: YamuxFlags, delta: UInt32)
    /// A ping request (`ack == false`, flag SYN) or response (`ack == true`, flag ACK) on stream 0.
    case ping(ack: Bool, opaque: UInt32)
    /// The sender takes no new streams; a code other than normal ends the session.
    case goAway(YamuxGoAwayCode)

    /// The size of a header.
    public static let headerSize = 12
    /// The only version spoken.
    public static let version: UInt8 = 0

    /// The stream the frame names (0 for the session).
    public var streamID: UInt32 {
        switch self {
        case .data(let s, _, _), .windowUpdate(let s, _, _): return s
        case .ping, .goAway: return 0
        }
    }

    /// The frame's flags.
    public var flags: YamuxFlags {
        switch self {
        case .data(_, let f, _), .windowUpdate(_, let f, _): return f
        case .ping(let ack, _): return ack ? .ack : .syn
        case .goAway: return []
        }
    }

    /// Appends the frame to `buffer`. Throws `unencodable` for a stream frame on stream 0, flags outside the
    /// four defined, or a payload over 2^32 - 1 bytes.
    public func encode(into buffer: inout ByteBuffer) throws(MeshWireError) {
        let type: YamuxFrameType
        let length: UInt32
        switch self {
        case .data(_, _, let payload):
            guard payload.readableBytes <= Int(UInt32.max) else { throw .unencodable("data payload over 4 GiB") }
            type = .data
            length = UInt32(payload.readableBytes)
        case .windowUpdate(_, _, let delta):
            type = .windowUpdate
            length = delta
        case .ping(_, let opaque):
            type = .ping
            length = opaque
        case .goAway(let code):
            type = .goAway
            length = code.rawValue
        }
        if type == .data || type == .windowUpdate {
            guard self.streamID != 0 else { throw .unencodable("a stream frame on stream 0") }
            guard YamuxFlags.all.isSuperset(of: self.flags) else { throw .unencodable("undefined flag bits") }
        }
        buffer.writeMultipleIntegers(Self.version, type.rawValue, self.flags.rawValue, self.streamID, length)
        if case .data(_, _, let payload) = self {
            buffer.writeImmutableBuffer(payload)
        }
    }

    /// The frame as bytes.
    public func encoded(allocator: ByteBufferAllocator = ByteBufferAllocator()) throws(MeshWireError) -> ByteBuffer {
        var out = allocator.buffer(capacity: Self.headerSize + (self.payloadSize))
        try self.encode(into: &out)
        return out
    }

    var payloadSize: Int {
        if case .data(_, _, let p) = self { return p.readableBytes }
        return 0
    }

    /// Reads one frame from the front of `buffer`: nil (nothing consumed) when the bytes there do not yet
    /// hold a whole frame, the frame (consumed) when they do, and an error (nothing consumed) when the
    /// header is malformed. A header is checked as soon as its 12 bytes are there, before its payload.
    ///
    /// - Parameter maxPayload: the longest Data payload accepted (`frameTooLarge` above it). A session
    ///   passes its largest receive window: a longer frame would overrun any window anyway.
    public static func decode(from buffer: inout ByteBuffer, maxPayload: Int) throws(MeshWireError) -> YamuxFrame? {
        guard
            let (version, rawType, rawFlags, stream, length) = buffer.getMultipleIntegers(
                at: buffer.readerIndex,
                as: (UInt8, UInt8, UInt16, UInt32, UInt32).self
            )
        else { return nil }
        guard version == Self.version else { throw .unsupportedVersion(version) }
        guard let type = YamuxFrameType(rawValue: rawType) else { throw .unknownFrameType(rawType) }
        let flags = YamuxFlags(rawValue: rawFlags)
        guard YamuxFlags.all.isSuperset(of: flags) else { throw .unknownFlags(rawFlags) }
        let frame: YamuxFrame
        switch type {
        case .data, .windowUpdate:
            guard stream != 0 else { throw .streamFrameOnSession(rawType) }
            guard !flags.isSuperset(of: [.syn, .ack]) else { throw .conflictingFlags(stream: stream) }
            if type == .windowUpdate {
                frame = .windowUpdate(stream: stream, flags: flags, delta: length)
            } else {
                guard length <= maxPayload else { throw .frameTooLarge(length, limit: maxPayload) }
                guard buffer.readableBytes >= Self.headerSize + Int(length) else { return nil }
                let payload = buffer.getSlice(at: buffer.readerIndex + Self.headerSize, length: Int(length))!
                frame = .data(stream: stream, flags: flags, payload: payload)
            }
        case .ping:
            guard stream == 0 else { throw .sessionFrameOnStream(rawType, stream: stream) }
            guard flags == .syn || flags == .ack else { throw .badPingFlags(rawFlags) }
            frame = .ping(ack: flags == .ack, opaque: length)
        case .goAway:
            guard stream == 0 else { throw .sessionFrameOnStream(rawType, stream: stream) }
            guard flags.isEmpty else { throw .flagsNotAllowed(rawFlags) }
            guard let code = YamuxGoAwayCode(rawValue: length) else { throw .unknownGoAway(length) }
            frame = .goAway(code)
        }
        buffer.moveReaderIndex(forwardBy: Self.headerSize + frame.payloadSize)
        return frame
    }
}

extension YamuxFrame: CustomStringConvertible {
    public var description: String {
        switch self {
        case .data(let s, let f, let p): return "DATA stream \(s) [\(f)] \(p.readableBytes) bytes"
        case .windowUpdate(let s, let f, let d): return "WINDOW_UPDATE stream \(s) [\(f)] +\(d)"
        case .ping(let ack, let o): return "PING \(ack ? "ACK" : "SYN") \(o)"
        case .goAway(let c): return "GO_AWAY \(c)"
        }
    }
}
