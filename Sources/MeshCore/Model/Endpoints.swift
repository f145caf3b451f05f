/// The backends of the service of the same name.
public struct Endpoints: MeshObject {
    public static let resource = ResourceType(
        kind: "Endpoints",
        plural: "endpoints",
        singular: "endpoints",
        shortNames: ["ep"],
        namespaced: true,
        nameIsSubdomain: false
    )

    public var apiVersion: String = meshAPIVersion
    public var kind: String = "Endpoints"
    public var metadata: ObjectMeta
    public var spec: EndpointsSpec

    public init(metadata: ObjectMeta, spec: EndpointsSpec) {
        self.metadata = metadata
        self.spec = spec
    }

    /// A bound that keeps one object (and one watch event) a sane size.
    public static let maxAddresses = 10_000

    public func specErrors() -> [FieldError] {
        var errs: [FieldError] = []
        if self.spec.addresses.count > Endpoints.maxAddresses {
            errs.append(FieldError("spec.addresses", "must hold at most \(Endpoints.maxAddresses) addresses"))
        }
        for (i, a) in self.spec.addresses.enumerated() {
            errs += a.errors(path: "spec.addresses[\(i)]")
        }
        return errs
    }
}

public struct EndpointsSpec: Codable, Sendable, Equatable, Hashable {
    public var addresses: [EndpointAddress]

    public init(addresses: [EndpointAddress]) {
        self.addresses = addresses
    }
}

public struct EndpointAddress: Codable, Sendable, Equatable, Hashable {
    public var ip: String
    public var ports: [EndpointPort]
    /// The node the endpoint runs on, and that node's site (used for locality).
    public var node: String?
    public var site: String?
    /// Relative share of traffic, 1-1000 (default 1).
    public var weight: Int?
    /// Not ready endpoints receive no traffic (default true).
    public var ready: Bool?
    /// For headless services: answered as `<hostname>.<service>.<namespace>.svc.<domain>`.
    public var hostname: String?

    public init(
        ip: String,
        ports: [EndpointPort],
        node: String? = nil,
        site: String? = nil,
        weight: Int? = nil,
        ready: Bool? = nil,
        hostname: String? = nil
    ) {
        self.ip = ip
        self.ports = ports
        self.node = node
        self.site = site
        self.weight = weight
        self.ready = ready
        self.hostname = hostname
    }

    public var isReady: Bool { self.ready ?? true }
    public var effectiveWeight: Int { self.weight ?? 1 }
    public var address: IPAddress? { IPAddress(self.ip) }

    func errors(path: String) -> [FieldError] {
        var errs: [FieldError] = []
        if IPAddress(self.ip) == nil {
            errs.append(FieldError("\(path).ip", "must be an IP address (is \"\(self.ip)\")"))
        }
        if self.ports.isEmpty { errs.append(FieldError("\(path).ports", "must have at least one port")) }
        var names = Set<String>()
        for (j, p) in self.ports.enumerated() {
            if !(1...65535).contains(p.port) { errs.append(FieldError("\(path).ports[\(j)].port", "must be 1-65535")) }
            if let n = p.name {
                if let e = Names.dns1123LabelError(n) { errs.append(FieldError("\(path).ports[\(j)].name", e)) }
                if !names.insert(n).inserted {
                    errs.append(FieldError("\(path).ports[\(j)].name", "duplicate port name \"\(n)\""))
                }
            }
        }
        if let w = self.weight, !(1...1000).contains(w) { errs.append(FieldError("\(path).weight", "must be 1-1000")) }
        if let n = self.node, let e = Names.dns1123SubdomainError(n) { errs.append(FieldError("\(path).node", e)) }
        if let s = self.site, let e = Names.dns1123LabelError(s) { errs.append(FieldError("\(path).site", e)) }
        if let h = self.hostname, let e = Names.dns1123LabelError(h) { errs.append(FieldError("\(path).hostname", e)) }
        return errs
    }
}

public struct EndpointPort: Codable, Sendable, Equatable, Hashable {
    /// Matches the service port of the same name; may be absent for a single-port service.
    public var name: String?
    public var port: Int

    public init(name: String? = nil, port: Int) {
        self.name = name
        self.port = port
    }
}
