/// A named service, reached by name through DNS and by its VIP through the agent's proxy: the kind `Service`.
/// `MeshService` in Swift, so that it does not collide with swift-service-lifecycle's `Service` protocol.
public struct MeshService: MeshObject {
    public static let resource = ResourceType(
        kind: "Service",
        plural: "services",
        singular: "service",
        shortNames: ["svc"],
        namespaced: true,
        nameIsSubdomain: false
    )

    public var apiVersion: String = meshAPIVersion
    public var kind: String = "Service"
    public var metadata: ObjectMeta
    public var spec: ServiceSpec

    public init(metadata: ObjectMeta, spec: ServiceSpec) {
        self.metadata = metadata
        self.spec = spec
    }

    public func specErrors() -> [FieldError] { self.spec.errors() }
}

public struct ServiceSpec: Codable, Sendable, Equatable, Hashable {
    public var ports: [ServicePort]
    /// The VIP; assigned by the control plane when absent. `None` makes the service headless.
    public var clusterIP: String?
    /// Which family to allocate the VIP from when `clusterIP` is absent (default IPv4).
    public var ipFamily: IPFamily?
    public var loadBalancer: LoadBalancerSpec?
    /// Also answered under `clusterset.local` (Kubernetes Multi-Cluster Services).
    public var exported: Bool?
    /// The `Upgrade` protocols the L7 proxy lets through on this service's HTTP ports (`websocket`, `h2c`,
    /// ...); absent: the agent's default (`websocket` only). An empty list allows none.
    public var upgradeProtocols: [String]?

    public init(
        ports: [ServicePort],
        clusterIP: String? = nil,
        ipFamily: IPFamily? = nil,
        loadBalancer: LoadBalancerSpec? = nil,
        exported: Bool? = nil,
        upgradeProtocols: [String]? = nil
    ) {
        self.ports = ports
        self.clusterIP = clusterIP
        self.ipFamily = ipFamily
        self.loadBalancer = loadBalancer
        self.exported = exported
        self.upgradeProtocols = upgradeProtocols
    }

    public static let headless = "None"

    public var isHeadless: Bool { self.clusterIP == ServiceSpec.headless }

    /// The parsed VIP, when one is set.
    public var vip: IPAddress? { self.clusterIP.flatMap { IPAddress($0) } }

    func errors() -> [FieldError] {
        var errs: [FieldError] = []
        if self.ports.isEmpty && !self.isHeadless {
            errs.append(FieldError("spec.ports", "must have at least one port"))
        }
        var names = Set<String>()
        var portKeys = Set<String>()
        for (i, p) in self.ports.enumerated() {
            let path = "spec.ports[\(i)]"
            if !(1...65535).contains(p.port) { errs.append(FieldError("\(path).port", "must be 1-65535")) }
            if let t = p.targetPort, !(1...65535).contains(t) {
                errs.append(FieldError("\(path).targetPort", "must be 1-65535"))
            }
            if let n = p.name {
                if let e = Names.dns1123LabelError(n) { errs.append(FieldError("\(path).name", e)) }
                if !names.insert(n).inserted { errs.append(FieldError("\(path).name", "duplicate port name \"\(n)\"")) }
            } else if self.ports.count > 1 {
                errs.append(FieldError("\(path).name", "is required when a service has more than one port"))
            }
            let transport = p.protocol == .udp ? "UDP" : "TCP"
            if !portKeys.insert("\(p.port)/\(transport)").inserted {
                errs.append(FieldError("\(path).port", "duplicate port \(p.port)/\(transport)"))
            }
        }
        if let ip = self.clusterIP, ip != ServiceSpec.headless {
            if let addr = IPAddress(ip) {
                if let fam = self.ipFamily, (fam == .ipv4) != addr.isIPv4 {
                    errs.append(FieldError("spec.ipFamily", "is \(fam.rawValue) but clusterIP \(ip) is not"))
                }
            } else {
                errs.append(FieldError("spec.clusterIP", "must be an IP address or \"None\" (is \"\(ip)\")"))
            }
        }
        if let lb = self.loadBalancer { errs += lb.errors(ports: self.ports) }
        if let upgrades = self.upgradeProtocols {
            if upgrades.count > 8 { errs.append(FieldError("spec.upgradeProtocols", "must list at most 8 protocols")) }
            for (i, name) in upgrades.enumerated() where !Self.isUpgradeToken(name) {
                errs.append(
                    FieldError(
                        "spec.upgradeProtocols[\(i)]",
                        "must be a protocol name of 1-32 letters, digits, '-', '.' or '_' (like websocket or h2c)"
                    )
                )
            }
        }
        return errs
    }

    /// An `Upgrade` protocol name without its version: an RFC 9110 token, kept short and simple.
    static func isUpgradeToken(_ name: String) -> Bool {
        !name.isEmpty && name.utf8.count <= 32
            && name.utf8.allSatisfy { b in
                (b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x5A) || (b >= 0x61 && b <= 0x7A) || b == 0x2D
                    || b == 0x2E || b == 0x5F
            }
    }
}

public enum IPFamily: String, StrictEnum {
    case ipv4 = "IPv4"
    case ipv6 = "IPv6"
}

public struct ServicePort: Codable, Sendable, Equatable, Hashable {
    /// Required when the service has several ports; matches the endpoints' port names.
    public var name: String?
    public var port: Int
    public var `protocol`: PortProtocol
    /// The endpoints' port when they list no port of this name (default: `port`).
    public var targetPort: Int?

    public init(name: String? = nil, port: Int, protocol: PortProtocol = .tcp, targetPort: Int? = nil) {
        self.name = name
        self.port = port
        self.protocol = `protocol`
        self.targetPort = targetPort
    }

    enum CodingKeys: String, CodingKey { case name, port, `protocol`, targetPort }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        self.name = try c.decodeIfPresent(String.self, forKey: .name)
        self.port = try c.decode(Int.self, forKey: .port)
        self.protocol = try c.decodeIfPresent(PortProtocol.self, forKey: .protocol) ?? .tcp
        self.targetPort = try c.decodeIfPresent(Int.self, forKey: .targetPort)
    }
}

/// TCP and UDP are proxied at L4; HTTP at L7 (per-request balancing, retries, headers).
public enum PortProtocol: String, StrictEnum {
    case tcp = "TCP"
    case udp = "UDP"
    case http = "HTTP"
}

public struct LoadBalancerSpec: Codable, Sendable, Equatable, Hashable {
    public var policy: Policy
    /// What `consistentHash` hashes: exactly one of header, cookie or sourceIP.
    public var hashOn: HashOn?

    public init(policy: Policy, hashOn: HashOn? = nil) {
        self.policy = policy
        self.hashOn = hashOn
    }

    public enum Policy: String, StrictEnum {
        case roundRobin
        case random
        case leastRequest
        case consistentHash
    }

    public struct HashOn: Codable, Sendable, Equatable, Hashable {
        public var header: String?
        public var cookie: String?
        public var sourceIP: Bool?

        public init(header: String? = nil, cookie: String? = nil, sourceIP: Bool? = nil) {
            self.header = header
            self.cookie = cookie
            self.sourceIP = sourceIP
        }
    }

    func errors(ports: [ServicePort]) -> [FieldError] {
        var errs: [FieldError] = []
        guard self.policy == .consistentHash else {
            if self.hashOn != nil {
                errs.append(FieldError("spec.loadBalancer.hashOn", "applies only to policy consistentHash"))
            }
            return errs
        }
        guard let h = self.hashOn else {
            return [
                FieldError("spec.loadBalancer.hashOn", "is required for consistentHash: header, cookie or sourceIP")
            ]
        }
        let chosen = [h.header != nil, h.cookie != nil, h.sourceIP == true].filter { $0 }.count
        if chosen != 1 {
            errs.append(
                FieldError("spec.loadBalancer.hashOn", "must set exactly one of header, cookie or sourceIP: true")
            )
        }
        if let name = h.header, let e = Names.headerNameError(name) {
            errs.append(FieldError("spec.loadBalancer.hashOn.header", e))
        }
        if let name = h.cookie, name.isEmpty || name.contains(where: { ";=, \t".contains($0) }) {
            errs.append(FieldError("spec.loadBalancer.hashOn.cookie", "is not a valid cookie name"))
        }
        if h.header != nil || h.cookie != nil, !ports.contains(where: { $0.protocol == .http }) {
            errs.append(
                FieldError("spec.loadBalancer.hashOn", "header and cookie hashing need a port with protocol HTTP")
            )
        }
        return errs
    }
}
