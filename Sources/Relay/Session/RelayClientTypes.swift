import Logging
import MeshCore
import MeshIdentity
import MeshNIO
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import NIOSSL
import ServiceLifecycle
import Synchronization

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Settings of an agent's relay client (``RelaySessionClient``).
public struct RelaySessionClientConfiguration: Sendable {
    /// TCP connect timeout per relay address.
    public var connectTimeout: TimeAmount = .seconds(3)
    /// A relay must answer `hello` (after connect and TLS) within this.
    public var welcomeTimeout: TimeAmount = .seconds(5)
    /// The client pings at the welcome's keepalive, but at least this often: with `pongTimeout`, a
    /// relay that went silent (no FIN: a host or path down) is noticed within 4 s.
    public var maxPingInterval: TimeAmount = .seconds(2)
    /// A ping not answered within this ends the session (re-home).
    public var pongTimeout: TimeAmount = .seconds(2)
    /// `circuit(to:)` and an accepted circuit must see `ready` within this (the relay's own accept
    /// timeout is 10 s).
    public var circuitTimeout: TimeAmount = .seconds(15)
    /// `circuit(to:)` with no home relay waits this long for one (a re-home under way).
    public var homeWait: TimeAmount = .seconds(5)
    /// When every relay failed: wait this long before the next round, doubling up to `maxBackoff`, each
    /// wait drawn uniformly from its upper half (jitter).
    public var minBackoff: Duration = .milliseconds(250)
    public var maxBackoff: Duration = .seconds(10)
    /// At most this many relays are raced for the home (in name order).
    public var maxRelaysRaced = 8

    public init() {}
}

/// Why the relay client could not give a circuit (or keep a session). `relay` names the relay when
/// one was involved.
public struct RelayClientError: Error, Sendable, Hashable, CustomStringConvertible {
    public enum Kind: Sendable, Hashable {
        /// No relay session is up (none known, none reachable).
        case noHome
        /// The relay said no: its code and text.
        case refused(RelayRefusal, String)
        /// The connection closed (a refused certificate names what the relay presented).
        case closed(String)
        /// The relay sent something out of place.
        case protocolError(String)
        /// No answer in time.
        case timedOut(String)
        /// No address of the relay could be reached.
        case unreachable(String)
    }

    public var relay: String?
    public var kind: Kind

    public init(relay: String?, _ kind: Kind) {
        self.relay = relay
        self.kind = kind
    }

    static func refused(_ code: RelayRefusal, _ text: String) -> Self { Self(relay: nil, .refused(code, text)) }
    static func closed(_ why: String) -> Self { Self(relay: nil, .closed(why)) }
    static func protocolError(_ why: String) -> Self { Self(relay: nil, .protocolError(why)) }

    func at(_ relay: String) -> Self { Self(relay: relay, self.kind) }

    public var description: String {
        let at = self.relay.map { "relay \($0)" } ?? "relay"
        switch self.kind {
        case .noHome: return "no relay session is up (no relay known or reachable)"
        case .refused(let code, let text): return "\(at) refused (\(code), code \(code.code)): \(text)"
        case .unreachable(let why): return "\(at) is unreachable: \(why)"
        default: return "\(at): \(self.detail)"
        }
    }

    /// The reason without the relay's name.
    public var detail: String {
        switch self.kind {
        case .noHome: return "no relay session is up"
        case .refused(let code, let text): return "refused (\(code)): \(text)"
        case .closed(let why), .protocolError(let why), .unreachable(let why): return why
        case .timedOut(let what): return "\(what) timed out"
        }
    }
}

/// The relay client's state, for `/peers` and `meshctl status`.
public struct RelayClientStatus: Sendable, Hashable, Codable {
    /// The home relay (nil while there is none).
    public var home: String?
    /// Its address the session uses.
    public var address: String?
    /// Since when the session is up.
    public var since: Date?
    /// The home's measured RTT: TCP connect + TLS handshake + hello/welcome (the race's winner).
    public var rttMicros: Int64?
    /// Sessions established so far (1 + re-homes).
    public var sessions = 0
    /// Why the last session ended or the last round failed.
    public var lastError: String?
    public var circuitsDialed = 0
    public var circuitsAccepted = 0
    public var circuitsFailed = 0

    public init() {}

    enum CodingKeys: String, CodingKey {
        case home, address, since, rttMicros, sessions, lastError, circuitsDialed, circuitsAccepted, circuitsFailed
    }

    /// `since` as an RFC 3339 time (`2026-12-03T10:00:00Z`), like every other time the admin API shows.
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encodeIfPresent(self.home, forKey: .home)
        try c.encodeIfPresent(self.address, forKey: .address)
        try c.encodeIfPresent(
            self.since.map { Timestamp.format(secondsSinceEpoch: Int($0.timeIntervalSince1970)) },
            forKey: .since
        )
        try c.encodeIfPresent(self.rttMicros, forKey: .rttMicros)
        try c.encode(self.sessions, forKey: .sessions)
        try c.encodeIfPresent(self.lastError, forKey: .lastError)
        try c.encode(self.circuitsDialed, forKey: .circuitsDialed)
        try c.encode(self.circuitsAccepted, forKey: .circuitsAccepted)
        try c.encode(self.circuitsFailed, forKey: .circuitsFailed)
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        self.home = try c.decodeIfPresent(String.self, forKey: .home)
        self.address = try c.decodeIfPresent(String.self, forKey: .address)
        self.since = try c.decodeIfPresent(String.self, forKey: .since).flatMap(Timestamp.parse).map {
            Date(timeIntervalSince1970: TimeInterval($0))
        }
        self.rttMicros = try c.decodeIfPresent(Int64.self, forKey: .rttMicros)
        self.sessions = try c.decode(Int.self, forKey: .sessions)
        self.lastError = try c.decodeIfPresent(String.self, forKey: .lastError)
        self.circuitsDialed = try c.decode(Int.self, forKey: .circuitsDialed)
        self.circuitsAccepted = try c.decode(Int.self, forKey: .circuitsAccepted)
        self.circuitsFailed = try c.decode(Int.self, forKey: .circuitsFailed)
    }
}
