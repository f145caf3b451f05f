import DNS
import MeshCore

/// Turns the service table into what DNS and the data plane serve. Pure functions: the same
/// snapshot always gives the same zone and routes.
public enum AgentMapping {
    /// The DNS zone of the table.
    public static func zoneInput(_ snapshot: ServiceSnapshot, domain: String) -> ZoneInput {
        var services: [DNSService] = []
        services.reserveCapacity(snapshot.services.count)
        for (name, service) in snapshot.services.sorted(by: { $0.key < $1.key }) {
            // Only a headless service's name answers its endpoints: a service with a VIP needs none here.
            let endpoints = service.spec.vip == nil ? snapshot.endpoints[name] ?? TableEndpoints() : TableEndpoints()
            services.append(
                DNSService(
                    name: name.name,
                    namespace: name.namespace,
                    clusterIPs: service.spec.vip.map { [$0] } ?? [],
                    ports: service.spec.ports.map {
                        DNSServicePort(
                            name: $0.name ?? "",
                            port: UInt16($0.port),
                            protocol: $0.protocol == .udp ? .udp : .tcp
                        )
                    },
                    exported: service.spec.exported ?? false,
                    endpoints: endpoints.compactMap { a in
                        a.address.map { DNSEndpoint(ip: $0, hostname: a.hostname, ready: a.isReady) }
                    }
                )
            )
        }
        return ZoneInput(domain: domain, services: services)
    }

    /// How an endpoint is reached from this agent: over a peer link only when it names a node, and a site
    /// other than this agent's (the control plane gives each address its registered node's site,
    /// `EndpointSites`); an endpoint with no node, no site, this agent's own node or a node of its own site is
    /// dialed directly, as on one LAN. An agent that is given no site of its own (`site:` unset, as `meshctl
    /// up` runs it) is a one-site mesh: it dials every endpoint directly.
    public static func reach(of address: EndpointAddress, localNode: String?, localSite: String?) -> Reach {
        Self.reach(node: address.node, site: address.site, localNode: localNode, localSite: localSite)
    }

    /// `reach(of:)` for an endpoint of node `name` at `site`.
    static func reach(node name: String?, site: String?, localNode: String?, localSite: String?) -> Reach {
        guard let localSite, let name, name != localNode, let site, site != localSite else { return .direct }
        return .peer(name)
    }

    /// The proxy routes of the table: one per VIP and port, with the endpoints' matching ports.
    public static func routeTable(
        _ snapshot: ServiceSnapshot,
        localSite: String?,
        localNode: String? = nil
    ) -> RouteTable {
        var routes: [Route] = []
        routes.reserveCapacity(snapshot.services.values.reduce(0) { $0 + $1.spec.ports.count })
        for (name, service) in snapshot.services.sorted(by: { $0.key < $1.key }) {
            guard let vip = service.spec.vip else { continue }  // headless: DNS only
            let addresses = snapshot.endpoints[name] ?? TableEndpoints()
            for port in service.spec.ports {
                // Straight into the route's compact list (BackendList), sized by the endpoints.
                var backends = BackendList.Builder(capacity: addresses.count)
                for a in addresses {
                    guard let ip = a.address,
                        let target = Self.targetPort(port, of: a.ports, servicePorts: service.spec.ports.count)
                    else {
                        continue
                    }
                    backends.append(
                        Backend(
                            ip: ip,
                            port: target,
                            node: a.node,
                            site: a.site,
                            weight: a.effectiveWeight,
                            ready: a.isReady,
                            reach: Self.reach(
                                node: a.node,
                                site: a.site,
                                localNode: localNode,
                                localSite: localSite
                            )
                        )
                    )
                }
                routes.append(
                    Route(
                        service: name,
                        vip: vip,
                        port: port.port,
                        proto: Self.proto(port.protocol),
                        policy: Self.policy(service.spec.loadBalancer, port: port),
                        backendList: backends.list,
                        upgradeProtocols: service.spec.upgradeProtocols.map(Set.init)
                    )
                )
            }
        }
        return RouteTable(routes: routes, localSite: localSite)
    }

    /// The endpoint's port for a service port: the one of the same name; for an unnamed port of a
    /// single-port service, the endpoint's only (or unnamed) port; else `targetPort` or the port itself.
    static func targetPort(_ port: ServicePort, of ports: [EndpointPort], servicePorts: Int) -> Int? {
        if let name = port.name, let match = ports.first(where: { $0.name == name }) { return match.port }
        if port.name == nil || servicePorts == 1 {
            if let unnamed = ports.first(where: { $0.name == nil }) { return unnamed.port }
            if ports.count == 1 { return ports[0].port }
        }
        if let t = port.targetPort { return t }
        return nil
    }

    static func proto(_ p: PortProtocol) -> RouteProtocol {
        switch p {
        case .tcp: return .tcp
        case .udp: return .udp
        case .http: return .http
        }
    }

    /// The data plane's policy; header and cookie hashing apply to HTTP ports, others hash the source IP.
    static func policy(_ spec: LoadBalancerSpec?, port: ServicePort) -> BalancerPolicy {
        guard let spec else { return .roundRobin }
        switch spec.policy {
        case .roundRobin: return .roundRobin
        case .random: return .random
        case .leastRequest: return .leastRequest
        case .consistentHash:
            if port.protocol == .http {
                if let h = spec.hashOn?.header { return .consistentHash(.header(h)) }
                if let c = spec.hashOn?.cookie { return .consistentHash(.cookie(c)) }
            }
            return .consistentHash(.sourceIP)
        }
    }
}
