import MeshCore
import NIOCore

/// Where the data plane's VIPs live. In JSON (`/routes`, `/status`) it is its description:
/// `pending`, `loopback`, `meshInterface(<name>)` or `stopped`.
public enum DataPlaneMode: Sendable, Hashable, Codable, CustomStringConvertible {
    /// Before the first `apply` or `run`.
    case pending
    /// VIPs are loopback addresses, one listener per service port.
    case loopback
    /// VIPs are addresses of the mesh interface with this name.
    case meshInterface(String)
    case stopped

    public var description: String {
        switch self {
        case .pending: "pending"
        case .loopback: "loopback"
        case .meshInterface(let name): "meshInterface(\(name))"
        case .stopped: "stopped"
        }
    }

    public init(from decoder: any Decoder) throws {
        let text = try decoder.singleValueContainer().decode(String.self)
        switch text {
        case "pending": self = .pending
        case "loopback": self = .loopback
        case "stopped": self = .stopped
        default:
            guard text.hasPrefix("meshInterface("), text.hasSuffix(")") else {
                throw DecodingError.dataCorrupted(
                    .init(codingPath: decoder.codingPath, debugDescription: "not a data-plane mode: \(text)")
                )
            }
            self = .meshInterface(String(text.dropFirst("meshInterface(".count).dropLast()))
        }
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(self.description)
    }
}

/// What `DataPlane.snapshot()` returns: every route's listener, counters and backends (for `/routes`).
public struct DataPlaneSnapshot: Sendable, Hashable, Codable {
    public var mode: DataPlaneMode
    /// Channels (client and upstream side) the data plane has open right now.
    public var openChannels: Int
    public var routes: [RouteSnapshot]
}

public struct RouteSnapshot: Sendable, Hashable, Codable {
    public var namespace: String
    public var service: String
    public var vip: String
    public var port: Int
    public var proto: String
    public var policy: String
    /// Whether the listener is bound; false with `error` set when binding failed.
    public var listening: Bool
    public var error: String?
    public var activeConnections: Int
    public var totalConnections: Int
    public var requests: Int
    public var failures: Int
    public var retries: Int
    public var bytesIn: Int
    public var bytesOut: Int
    public var backends: [BackendSnapshot]

    init(route: Route, listening: Bool, error: String?, stats: RouteStats?, backends: [BackendSnapshot]) {
        self.namespace = route.service.namespace
        self.service = route.service.name
        self.vip = route.vip.description
        self.port = route.port
        self.proto = route.proto.rawValue
        self.policy = route.policy.description
        self.listening = listening
        self.error = error
        self.activeConnections = stats?.activeConnections.load(ordering: .relaxed) ?? 0
        self.totalConnections = stats?.totalConnections.load(ordering: .relaxed) ?? 0
        self.requests = stats?.requests.load(ordering: .relaxed) ?? 0
        self.failures = stats?.failures.load(ordering: .relaxed) ?? 0
        self.retries = stats?.retries.load(ordering: .relaxed) ?? 0
        self.bytesIn = stats?.bytesIn.load(ordering: .relaxed) ?? 0
        self.bytesOut = stats?.bytesOut.load(ordering: .relaxed) ?? 0
        self.backends = backends
    }
}

public struct BackendSnapshot: Sendable, Hashable, Codable {
    public var ip: String
    public var port: Int
    public var node: String?
    public var site: String?
    /// The peer node whose link carries this backend's traffic; nil: dialed directly.
    public var via: String?
    public var weight: Int
    public var ready: Bool
    /// Ready and not ejected.
    public var healthy: Bool
    public var ejected: Bool
    /// Seconds left in the current ejection.
    public var ejectedForSeconds: Double?
    public var ejections: Int
    public var consecutiveFailures: Int
    /// Connections (L4) or requests (HTTP) on it now.
    public var active: Int
    /// Connections or requests sent to it so far.
    public var total: Int
    public var failures: Int
    /// Bytes sent to it (client to backend) and received from it, by connections and requests that ended.
    public var bytesSent: Int
    public var bytesReceived: Int

    /// A backend no connection has used yet: what a fresh balancer slot shows (healthy when ready and its port
    /// is one a socket can use, the only way a slot lacks an address).
    init(fresh backend: Backend) {
        self.ip = backend.ip.description
        self.port = backend.port
        self.node = backend.node
        self.site = backend.site
        self.via = backend.reach.peer
        self.weight = max(1, backend.weight)
        self.ready = backend.ready
        self.healthy = backend.ready && (1...65_535).contains(backend.port)
        self.ejected = false
        self.ejectedForSeconds = nil
        self.ejections = 0
        self.consecutiveFailures = 0
        self.active = 0
        self.total = 0
        self.failures = 0
        self.bytesSent = 0
        self.bytesReceived = 0
    }

    init(slot: LoadBalancer.Slot, now: NIODeadline) {
        self.ip = slot.backend.ip.description
        self.port = slot.backend.port
        self.node = slot.backend.node
        self.site = slot.backend.site
        self.via = slot.id.via
        self.weight = slot.weight
        self.ready = slot.backend.ready
        self.healthy = slot.usable
        self.ejected = slot.outlier.isEjected
        self.ejectedForSeconds = slot.outlier.ejectedUntil.map { Double(($0 - now).nanoseconds) / 1e9 }
        self.ejections = slot.outlier.ejections
        self.consecutiveFailures = slot.outlier.consecutiveFailures
        self.active = slot.inFlight
        self.total = slot.picks
        self.failures = slot.failures
        self.bytesSent = slot.bytes.sent
        self.bytesReceived = slot.bytes.received
    }
}

/// Which backend a key would get on one route (`DataPlane.wouldPick`).
public struct RoutePick: Sendable, Hashable, Codable {
    public var port: Int
    public var proto: String
    public var policy: String
    /// `ip:port`; nil when no backend is usable.
    public var backend: String?
    public var via: String?
}

public struct RoutePickError: Error, CustomStringConvertible {
    public var description: String
}
