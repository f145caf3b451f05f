/// The messages agents and relays exchange on 7800/tcp, inside the outer TLS 1.3 (README "Relay
/// sessions"). Pure values and a pure codec, no I/O.
///
/// Frame: `type` (1 byte), `length` (2 bytes, big-endian, at most `maxPayload`), `payload`. Names
/// are a length byte and DNS-1123 subdomain bytes; circuit ids are 8 bytes big-endian; text is a
/// 2-byte length and UTF-8. A connection starts with one message and then either stays a control
/// session (`hello` ... `ping`/`pong`, `open`) or becomes one half of a circuit (`connect` or
/// `accept`, answered by `ready` or `refused`), after which the bytes are no longer framed: the
/// relay splices them to the other half as they are. A relay asks another relay for a circuit to a
/// node homed there with `forward`.
public enum RelaySessionMessage: Sendable, Hashable {
    /// Agent → relay, first on its control session: the protocol version and its node name (which
    /// must be the certificate's `mesh://node/NAME`).
    case hello(version: UInt8, node: String)
    /// Relay → agent: the session is up; the relay's name and how often it wants a ping.
    case welcome(relay: String, keepaliveSeconds: UInt16)
    /// Either way: a liveness probe and its answer, with an opaque value echoed.
    case ping(UInt64)
    case pong(UInt64)
    /// Agent → relay, first on a new connection: a circuit to `node`.
    case connect(node: String)
    /// Relay → agent on its control session: node `from` asks for circuit `circuit` to you; open a
    /// new connection and `accept` it.
    case open(circuit: UInt64, from: String)
    /// Agent → relay, first on a new connection: the other half of `circuit`.
    case accept(circuit: UInt64)
    /// Relay → relay, first on a new connection (the caller's certificate is `mesh://relay/...`): a
    /// circuit from node `from`, which has a session at the calling relay, to node `to`, homed on
    /// this one. Answered as `connect` is (`ready` or `refused`); then the two relays splice.
    case forward(from: String, to: String)
    /// Relay → both halves: the circuit is spliced; raw bytes follow.
    case ready(circuit: UInt64)
    /// Relay → agent: no (a circuit, a hello, a malformed message), and why; the relay closes.
    case refused(RelayRefusal, message: String)

    /// The protocol version this codec speaks.
    public static let version: UInt8 = 1
    /// The largest payload a frame may carry.
    public static let maxPayload = 1024
    /// Type, length.
    public static let headerSize = 3

    public enum Kind: UInt8, Sendable, CaseIterable {
        case hello = 0x01
        case welcome = 0x02
        case ping = 0x03
        case pong = 0x04
        case connect = 0x10
        case open = 0x11
        case accept = 0x12
        case ready = 0x13
        case forward = 0x14
        case refused = 0x1F
    }

    public var kind: Kind {
        switch self {
        case .hello: return .hello
        case .welcome: return .welcome
        case .ping: return .ping
        case .pong: return .pong
        case .connect: return .connect
        case .open: return .open
        case .accept: return .accept
        case .ready: return .ready
        case .forward: return .forward
        case .refused: return .refused
        }
    }
}

/// Why the relay said no. The code travels (1 byte); unknown codes decode as `.other`.
public enum RelayRefusal: Sendable, Hashable {
    /// No node of that name has a session here (never seen, or its session ended).
    case nodeOffline
    /// The target is not a node name the relay will serve (bad name, or the caller itself).
    case unknownNode
    /// A per-node limit (circuits, pending accepts) is reached.
    case limit
    /// The peer's message was malformed or not allowed at this point.
    case badMessage
    /// The other half did not arrive in time.
    case timeout
    /// The certificate's identity does not allow this (a hello for another name, a relay as a node).
    case forbidden
    /// The relay is shutting down.
    case draining
    case other(UInt8)

    public var code: UInt8 {
        switch self {
        case .nodeOffline: return 1
        case .unknownNode: return 2
        case .limit: return 3
        case .badMessage: return 4
        case .timeout: return 5
        case .forbidden: return 6
        case .draining: return 7
        case .other(let c): return c
        }
    }

    public init(code: UInt8) {
        switch code {
        case 1: self = .nodeOffline
        case 2: self = .unknownNode
        case 3: self = .limit
        case 4: self = .badMessage
        case 5: self = .timeout
        case 6: self = .forbidden
        case 7: self = .draining
        default: self = .other(code)
        }
    }
}

/// Why bytes are not a relay session message (or a message cannot be encoded): a code and the byte
/// offset, never a trap. Equal when code and offset are; `detail` is for people.
public struct RelaySessionWireError: Error, Hashable, Sendable, CustomStringConvertible {
    public enum Code: String, Hashable, Sendable, CaseIterable {
        /// A type byte that names no message.
        case unknownType
        /// A length above `maxPayload`.
        case tooLong
        /// The payload ends before a field does.
        case truncated
        /// Bytes left in the payload after the last field.
        case trailingBytes
        /// A name that is empty, too long or not a DNS-1123 subdomain.
        case badName
        /// Text that is not UTF-8.
        case badText
        /// A message that cannot be encoded (a field too long for its length prefix).
        case unencodable
    }

    public let code: Code
    public let offset: Int
    public let detail: String

    public init(_ code: Code, at offset: Int, _ detail: String) {
        self.code = code
        self.offset = offset
        self.detail = detail
    }

    public static func == (a: Self, b: Self) -> Bool { a.code == b.code && a.offset == b.offset }

    public func hash(into hasher: inout Hasher) {
        hasher.combine(self.code)
        hasher.combine(self.offset)
    }

    public var description: String {
        "relay session message: \(self.detail) (\(self.code.rawValue) at byte \(self.offset))"
    }
}
