/// A relay (`mesh-relay`): where agents keep a session and ask for circuits to nodes they cannot dial.
/// Cluster-scoped; the relay itself writes it (`PUT /apis/mesh.edge/v1/relays/NAME`, as
/// `mesh://relay/NAME`), nodes list and watch it to pick their home relay.
public struct Relay: MeshObject {
    public static let resource = ResourceType(
        kind: "Relay",
        plural: "relays",
        singular: "relay",
        shortNames: ["rl"],
        namespaced: false,
        nameIsSubdomain: true
    )

    public var apiVersion: String = meshAPIVersion
    public var kind: String = "Relay"
    public var metadata: ObjectMeta
    public var spec: RelaySpec
    public var status: RelayStatus?

    public init(metadata: ObjectMeta, spec: RelaySpec, status: RelayStatus? = nil) {
        self.metadata = metadata
        self.spec = spec
        self.status = status
    }

    public func specErrors() -> [FieldError] {
        var errs: [FieldError] = []
        if let s = self.spec.site, let e = Names.dns1123LabelError(s) { errs.append(FieldError("spec.site", e)) }
        if self.spec.addresses.isEmpty {
            errs.append(FieldError("spec.addresses", "must list at least one IP:port where agents reach the relay"))
        }
        for (i, a) in self.spec.addresses.enumerated() {
            if let e = Self.addressError(a) { errs.append(FieldError("spec.addresses[\(i)]", e)) }
        }
        for (i, a) in (self.spec.stunAddresses ?? []).enumerated() {
            if let e = Self.addressError(a) { errs.append(FieldError("spec.stunAddresses[\(i)]", e)) }
        }
        if let t = self.status?.lastUpdateTime, Timestamp.parse(t) == nil {
            errs.append(FieldError("status.lastUpdateTime", "must be an RFC 3339 time such as 2026-01-02T15:04:05Z"))
        }
        if let n = self.status?.sessions, n < 0 { errs.append(FieldError("status.sessions", "must not be negative")) }
        return errs
    }

    /// Why `address` is not `IP:port` / `[IPv6]:port` with a port 1-65535 (nil: it is).
    static func addressError(_ address: String) -> String? {
        guard let (host, port) = Self.split(address) else {
            return "\"\(address)\" must be IP:port or [IPv6]:port"
        }
        if IPAddress(host) == nil { return "\"\(host)\" is not an IP address" }
        guard let p = Int(port), (1...65535).contains(p) else { return "port \"\(port)\" must be 1-65535" }
        return nil
    }

    static func split(_ address: String) -> (host: String, port: Substring)? {
        if address.hasPrefix("[") {
            guard let close = address.firstIndex(of: "]") else { return nil }
            let rest = address[address.index(after: close)...]
            guard rest.hasPrefix(":") else { return nil }
            return (String(address[address.index(after: address.startIndex)..<close]), rest.dropFirst())
        }
        let parts = address.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 2 else { return nil }
        return (String(parts[0]), parts[1])
    }
}

public struct RelaySpec: Codable, Sendable, Equatable, Hashable {
    /// The site the relay runs at (the cloud, usually).
    public var site: String?
    /// Where agents open relay sessions (7800/tcp), `IP:port` or `[IPv6]:port`, most preferred first.
    public var addresses: [String]
    /// Its STUN binding service (3478 udp+tcp), same form.
    public var stunAddresses: [String]?

    public init(site: String? = nil, addresses: [String], stunAddresses: [String]? = nil) {
        self.site = site
        self.addresses = addresses
        self.stunAddresses = stunAddresses
    }
}

public struct RelayStatus: Codable, Sendable, Equatable, Hashable {
    public var phase: Phase?
    /// When the relay last wrote its status (RFC 3339, UTC).
    public var lastUpdateTime: String?
    /// Node sessions open at that time.
    public var sessions: Int?
    public var message: String?

    public init(phase: Phase? = nil, lastUpdateTime: String? = nil, sessions: Int? = nil, message: String? = nil) {
        self.phase = phase
        self.lastUpdateTime = lastUpdateTime
        self.sessions = sessions
        self.message = message
    }

    public enum Phase: String, StrictEnum {
        /// Serving sessions.
        case ready = "Ready"
        /// Shutting down, or not accepting sessions.
        case draining = "Draining"
    }
}
