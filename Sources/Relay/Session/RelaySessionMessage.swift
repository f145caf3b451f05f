import MeshCore

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
    /// Hole punching, agent to agent on a relayed link's punch stream (never to a relay: it refuses them
    /// as `badMessage`). The link's dialer offers its NAT mapping and candidates...
    case punchOffer(PunchCandidates)
    /// ...the other end answers with its own (the offerer measures the round trip through the relay)...
    case punchAnswer(PunchCandidates)
    /// ...the offerer says how and when: both start `delayMillis` after the offerer sent this, the
    /// answerer subtracting half of `rttMicros` (the one-way time through the relay)...
    case punchStart(PunchStart)
    /// ...and either end says how it went (`ok`), or why there was no punch.
    case punchResult(id: UInt64, ok: Bool, message: String)

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
        case punchOffer = 0x20
        case punchAnswer = 0x21
        case punchStart = 0x22
        case punchResult = 0x23
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
        case .punchOffer: return .punchOffer
        case .punchAnswer: return .punchAnswer
        case .punchStart: return .punchStart
        case .punchResult: return .punchResult
        }
    }
}

/// A NAT's mapping as a punch sees it (one byte on the wire; NodeCandidates' `mapping` names it).
public enum NATMapping: UInt8, Sendable, Hashable, Codable, CaseIterable, CustomStringConvertible {
    /// No STUN server answered, or too few to tell.
    case unknown = 0
    /// No NAT: the STUN servers saw the host's own address and port.
    case none = 1
    /// Endpoint-independent and the port kept: the easiest NAT to punch.
    case portPreserving = 2
    /// Endpoint-independent: one mapping for every destination (predictable from a STUN answer).
    case endpointIndependent = 3
    /// A mapping per destination, but from a small range (not predictable enough to punch here).
    case endpointDependent = 4
    /// A random port per destination (MASQUERADE --random-fully, symmetric NATs): no punch can work.
    case random = 5

    public var description: String {
        switch self {
        case .unknown: return "unknown"
        case .none: return "none"
        case .portPreserving: return "portPreserving"
        case .endpointIndependent: return "endpointIndependent"
        case .endpointDependent: return "endpointDependent"
        case .random: return "random"
        }
    }

    public init?(name: String) {
        guard let m = Self.allCases.first(where: { $0.description == name }) else { return nil }
        self = m
    }

    /// Whether a STUN answer predicts the mapping a punch will get.
    public var isPredictable: Bool { self == .none || self == .portPreserving || self == .endpointIndependent }
}

/// One address a punch may aim at.
public struct PunchCandidate: Sendable, Hashable, CustomStringConvertible {
    public enum Kind: UInt8, Sendable, Hashable {
        /// One of the host's own addresses.
        case host = 1
        /// The address and port the NAT maps the link port to (from STUN).
        case reflexive = 2
    }

    public var kind: Kind
    public var ip: IPAddress
    public var port: UInt16

    public init(kind: Kind, ip: IPAddress, port: UInt16) {
        self.kind = kind
        self.ip = ip
        self.port = port
    }

    public var description: String {
        let host = self.ip.isIPv4 ? "\(self.ip)" : "[\(self.ip)]"
        return "\(self.kind == .host ? "host" : "reflexive") \(host):\(self.port)"
    }
}

/// An offer's or answer's body: the punch's id (the offerer's), the sender's mapping and candidates.
public struct PunchCandidates: Sendable, Hashable {
    public var id: UInt64
    public var mapping: NATMapping
    public var candidates: [PunchCandidate]

    public init(id: UInt64, mapping: NATMapping, candidates: [PunchCandidate]) {
        self.id = id
        self.mapping = mapping
        self.candidates = candidates
    }

    /// At most this many candidates travel.
    public static let maxCandidates = 16
}

/// The offerer's go: how, when, and who sends first.
public struct PunchStart: Sendable, Hashable {
    public enum Mode: UInt8, Sendable, Hashable {
        /// Both connect from their link ports at once (TCP simultaneous open).
        case simultaneousOpen = 1
        /// Only the offerer dials (the answerer has no NAT); the answerer's listener takes it.
        case offererDials = 2
        /// Only the answerer dials (the offerer has no NAT).
        case answererDials = 3
    }

    public var id: UInt64
    public var mode: Mode
    /// From the offerer's sending of this message to the first SYN of whoever goes first.
    public var delayMillis: UInt16
    /// The round trip the offerer measured through the relay (offer to answer).
    public var rttMicros: UInt32
    /// The second side starts this much later (a NAT that answers an early SYN with a RST must have sent
    /// its own first): 0 for both at once.
    public var staggerMillis: UInt16
    /// Who goes first when `staggerMillis` > 0: the answerer (true) or the offerer.
    public var answererFirst: Bool

    public init(
        id: UInt64,
        mode: Mode,
        delayMillis: UInt16,
        rttMicros: UInt32,
        staggerMillis: UInt16,
        answererFirst: Bool
    ) {
        self.id = id
        self.mode = mode
        self.delayMillis = delayMillis
        self.rttMicros = rttMicros
        self.staggerMillis = staggerMillis
        self.answererFirst = answererFirst
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
public struct RelaySessionWireError: Error, Hashable, Sendable, CustomStringConvertible, OffsetWireError {
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
        /// A value outside its field's range (a punch mapping, candidate kind, address family or mode).
        case badValue
    }

    public let code: Code
    public let offset: Int
    public let detail: String

    public init(_ code: Code, at offset: Int, _ detail: String) {
        self.code = code
        self.offset = offset
        self.detail = detail
    }

    public var description: String {
        "relay session message: \(self.detail) (\(self.code.rawValue) at byte \(self.offset))"
    }
}
