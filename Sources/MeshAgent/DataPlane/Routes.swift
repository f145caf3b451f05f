import MeshCore

// The data plane's input contract. The control plane's Service / Endpoints objects are mapped into these
// plain values by the agent; nothing here knows about the control API.

/// A service's identity: `namespace/name`.
public struct ServiceKey: Sendable, Hashable, Comparable, CustomStringConvertible {
    public var namespace: String
    public var name: String

    public init(namespace: String, name: String) {
        self.namespace = namespace
        self.name = name
    }

    public var description: String { "\(self.namespace)/\(self.name)" }

    public static func < (lhs: ServiceKey, rhs: ServiceKey) -> Bool {
        (lhs.namespace, lhs.name) < (rhs.namespace, rhs.name)
    }
}

/// How a VIP:port is proxied.
public enum RouteProtocol: String, Sendable, Hashable, CaseIterable {
    /// L4 TCP: one upstream connection per client connection, bytes spliced both ways.
    case tcp
    /// L4 UDP: one upstream flow per client address.
    case udp
    /// L7 HTTP/1.1: requests balanced one by one over pooled upstream connections.
    case http

    /// The socket type the listener binds (`http` listens on TCP).
    var isDatagram: Bool { self == .udp }
}

/// Where a consistent-hash policy takes its key from.
public enum HashKey: Sendable, Hashable {
    /// The value of this request header (case-insensitive name). HTTP only.
    case header(String)
    /// The value of this cookie. HTTP only.
    case cookie(String)
    /// The client's IP address (all protocols).
    case sourceIP
}

/// How a route picks a backend for each connection (L4) or request (HTTP).
public enum BalancerPolicy: Sendable, Hashable, CustomStringConvertible {
    /// Smooth weighted round robin (nginx's algorithm): exact distribution by weight.
    case roundRobin
    /// Weighted random.
    case random
    /// Power of two choices over in-flight requests divided by weight.
    case leastRequest
    /// Maglev consistent hashing on the key; a missing header or cookie falls back to the source IP.
    case consistentHash(HashKey)

    public var description: String {
        switch self {
        case .roundRobin: return "roundRobin"
        case .random: return "random"
        case .leastRequest: return "leastRequest"
        case .consistentHash(.header(let h)): return "consistentHash(header:\(h))"
        case .consistentHash(.cookie(let c)): return "consistentHash(cookie:\(c))"
        case .consistentHash(.sourceIP): return "consistentHash(sourceIP)"
        }
    }
}

/// One endpoint of a service.
public struct Backend: Sendable, Hashable {
    public var ip: IPAddress
    public var port: Int
    /// The node the endpoint runs on, when known.
    public var node: String?
    /// The site (edge location) of that node; compared with `RouteTable.localSite` for locality.
    public var site: String?
    /// Relative weight, at least 1 (smaller values are treated as 1).
    public var weight: Int
    /// Whether the endpoint passes its readiness check; not-ready endpoints get no traffic.
    public var ready: Bool
    /// How the agent reaches it: a socket to `ip:port` (`.direct`), or a stream over the peer link to the
    /// node that serves it (`.peer(node)`, an endpoint of a node at another site).
    public var reach: Reach

    public init(
        ip: IPAddress,
        port: Int,
        node: String? = nil,
        site: String? = nil,
        weight: Int = 1,
        ready: Bool = true,
        reach: Reach = .direct
    ) {
        self.ip = ip
        self.port = port
        self.node = node
        self.site = site
        self.weight = weight
        self.ready = ready
        self.reach = reach
    }

    /// The identity that per-backend state (health, in-flight counts) is kept under across table changes.
    var id: BackendID { BackendID(ip: self.ip, port: self.port, via: self.reach.peer) }
}

/// How the data plane reaches a backend. Decided when the route table is built (`AgentMapping`), from the
/// endpoint's node and site: only an endpoint of a registered node at another site goes over a link.
public enum Reach: Sendable, Hashable, CustomStringConvertible {
    /// A socket to the backend's address.
    case direct
    /// A stream over the peer link to this node, which dials the backend on its side.
    case peer(String)

    /// The peer node, for `.peer`.
    public var peer: String? {
        if case .peer(let node) = self { return node }
        return nil
    }

    public var description: String {
        switch self {
        case .direct: return "direct"
        case .peer(let node): return "link to \(node)"
        }
    }
}

/// `ip:port` of a backend (and the peer node it is reached through, if any): per-backend state survives a
/// table change when this stays the same. Two sites may use the same private address; `via` keeps them
/// apart.
public struct BackendID: Sendable, Hashable, Comparable, CustomStringConvertible {
    public var ip: IPAddress
    public var port: Int
    /// The peer node whose link carries the traffic; nil: dialed directly.
    public var via: String?

    public init(ip: IPAddress, port: Int, via: String? = nil) {
        self.ip = ip
        self.port = port
        self.via = via
    }

    public var description: String {
        let address = self.ip.isIPv4 ? "\(self.ip):\(self.port)" : "[\(self.ip)]:\(self.port)"
        return self.via.map { "\(address) via \($0)" } ?? address
    }

    public static func < (lhs: BackendID, rhs: BackendID) -> Bool {
        (lhs.ip, lhs.port, lhs.via ?? "") < (rhs.ip, rhs.port, rhs.via ?? "")
    }
}

/// One VIP:port of one service and where its traffic goes.
public struct Route: Sendable, Hashable {
    public var service: ServiceKey
    public var vip: IPAddress
    public var port: Int
    public var proto: RouteProtocol
    public var policy: BalancerPolicy
    /// The endpoints, kept as `backendList` (about 40 bytes each, see `BackendList`); read and written as
    /// values.
    public var backends: [Backend] {
        get { Array(self.backendList) }
        set { self.backendList = BackendList(newValue) }
    }
    /// The endpoints as stored: compact entries in one array, node and site names once per route.
    public var backendList: BackendList
    /// HTTP only: the protocols a client may upgrade to (`Upgrade:` tokens, case-insensitive, e.g.
    /// `websocket`, `h2c`); nil: the data plane's `HTTPConfiguration.upgradeProtocols`. Other upgrade requests
    /// go up as plain requests, without their Upgrade field.
    public var upgradeProtocols: Set<String>?

    public init(
        service: ServiceKey,
        vip: IPAddress,
        port: Int,
        proto: RouteProtocol = .tcp,
        policy: BalancerPolicy = .roundRobin,
        backends: [Backend],
        upgradeProtocols: Set<String>? = nil
    ) {
        self.service = service
        self.vip = vip
        self.port = port
        self.proto = proto
        self.policy = policy
        self.backendList = BackendList(backends)
        self.upgradeProtocols = upgradeProtocols.map { Set($0.map { $0.lowercased() }) }
    }

    /// A route whose backends are already a `BackendList` (built without an array of `Backend` in between).
    public init(
        service: ServiceKey,
        vip: IPAddress,
        port: Int,
        proto: RouteProtocol = .tcp,
        policy: BalancerPolicy = .roundRobin,
        backendList: BackendList,
        upgradeProtocols: Set<String>? = nil
    ) {
        self.service = service
        self.vip = vip
        self.port = port
        self.proto = proto
        self.policy = policy
        self.backendList = backendList
        self.upgradeProtocols = upgradeProtocols.map { Set($0.map { $0.lowercased() }) }
    }

    /// The listener this route needs: TCP and HTTP share the stream socket kind, UDP has its own.
    var listenerKey: ListenerKey { ListenerKey(vip: self.vip, port: self.port, datagram: self.proto.isDatagram) }
}

/// Everything the data plane should serve: the whole table, applied at once by `DataPlane.apply`.
public struct RouteTable: Sendable, Hashable {
    public var routes: [Route]
    /// This agent's site: backends of the same site are preferred while any of them is healthy.
    public var localSite: String?

    public init(routes: [Route] = [], localSite: String? = nil) {
        self.routes = routes
        self.localSite = localSite
    }
}

/// One bound socket: VIP, port and socket kind.
struct ListenerKey: Hashable, Sendable, Comparable, CustomStringConvertible {
    var vip: IPAddress
    var port: Int
    var datagram: Bool

    var description: String {
        let host = self.vip.isIPv4 ? "\(self.vip)" : "[\(self.vip)]"
        return "\(host):\(self.port)/\(self.datagram ? "udp" : "tcp")"
    }

    static func < (lhs: ListenerKey, rhs: ListenerKey) -> Bool {
        (lhs.vip, lhs.port, lhs.datagram ? 1 : 0) < (rhs.vip, rhs.port, rhs.datagram ? 1 : 0)
    }
}
