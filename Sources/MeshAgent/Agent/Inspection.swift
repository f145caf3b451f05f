import DNS
import MeshClient
import MeshCore
import NodeAgent
import Relay

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// What `meshctl status`, `meshctl route` and `meshctl dns` ask an agent (`/status`, `/route`, `/dns` on its
/// admin API): answers put together from the parts that know them, never a second copy of their state.
struct AgentInspection: Sendable {
    let config: AgentConfig
    let started: Date
    let dns: DNSServer
    let node: NodeAgent
    let certificate: @Sendable () -> (identity: String, notAfter: Date)?
    let renewals: @Sendable () -> Int

    // MARK: status

    /// The body of `GET /status`.
    struct Status: Codable, Sendable {
        var node: String
        var site: String?
        var version: String
        var started: String
        var uptimeSeconds: Int
        var control: Control
        var relay: RelayClientStatus
        /// This node's NAT as the relays' STUN servers see it (nil until measured, or without a link port).
        var nat: NATStatus?
        var interface: Interface
        var certificate: CertificateStatus?

        struct Control: Codable, Sendable {
            var url: String
            /// `connected`, `offline` (the control plane stopped answering: serving from the cache) or
            /// `connecting` (not answered yet since the start).
            var state: String
            var offlineSince: String?
            var lastContact: String?
            var heartbeats: Int
            var failedAttempts: Int
            var lastError: String?
            /// Where the served table came from: `control` or `cache`.
            var table: String
            var resourceVersions: String
            var services: Int
            var routes: Int
            /// Routes the data plane serves now (listening, or an entry of the VIP listener); the others
            /// failed (see `/routes`). Optional: agents before it did not report it.
            var routesServed: Int?
        }

        struct Interface: Codable, Sendable {
            /// `loopback` or `meshInterface(NAME)`.
            var mode: String
            var dns: String
            var linkListen: String
        }

        struct CertificateStatus: Codable, Sendable {
            var identity: String
            var notAfter: String
            var expiresInSeconds: Int
            var renewals: Int
        }
    }

    func status(
        applier: SnapshotApplier,
        dataPlane: DataPlane,
        relay: RelayClientStatus,
        nat: NATStatus?,
        now: Date = Date()
    ) async
        -> Status
    {
        let table = applier.state.withLock { $0 }
        let beats = self.node.snapshot
        let state: String
        if beats.offlineSince != nil {
            state = "offline"
        } else if beats.lastContact != nil {
            state = "connected"
        } else {
            state = "connecting"
        }
        let dnsAddress = (try? await self.dns.listeningAddresses().udp).map { "\($0.ipAddress ?? "?"):\($0.port ?? 0)" }
        return Status(
            node: self.config.nodeName,
            site: self.config.site,
            version: MeshRelease.version,
            started: Self.stamp(self.started),
            uptimeSeconds: Int(now.timeIntervalSince(self.started)),
            control: .init(
                url: self.config.controlServer,
                state: state,
                offlineSince: beats.offlineSince.map(Self.stamp),
                lastContact: beats.lastContact.map(Self.stamp),
                heartbeats: beats.heartbeats,
                failedAttempts: beats.failures,
                lastError: beats.lastError,
                table: table?.source ?? "none",
                resourceVersions: table?.versions ?? "-",
                services: table?.services ?? 0,
                routes: table?.routes ?? 0,
                routesServed: dataPlane.servedRoutes
            ),
            relay: relay,
            nat: nat,
            interface: .init(
                mode: dataPlane.currentMode.description,
                dns: dnsAddress ?? "not listening",
                linkListen: self.config.linkListen
            ),
            certificate: self.certificate().map {
                .init(
                    identity: $0.identity,
                    notAfter: Self.stamp($0.notAfter),
                    expiresInSeconds: Int($0.notAfter.timeIntervalSince(now)),
                    renewals: self.renewals()
                )
            }
        )
    }

    static func stamp(_ date: Date) -> String { Timestamp.format(secondsSinceEpoch: Int(date.timeIntervalSince1970)) }

    // MARK: route

    /// The body of `GET /route?name=SVC.NS[&key=K]`.
    struct RouteView: Codable, Sendable {
        var service: String
        var namespace: String
        var fqdn: String
        var vip: String?
        var ports: [Port]
        var endpoints: [Endpoint]
        var key: String?
        /// With `key`: the endpoint each hashing route would pick for it.
        var picks: [RoutePick]?
        /// With `key`, when no route of the service hashes: why the key does not choose.
        var pickNote: String?

        struct Port: Codable, Sendable {
            var port: Int
            var proto: String
            var policy: String
            var listening: Bool
            var error: String?
            var activeConnections: Int
            var requests: Int
            var failures: Int
            var retries: Int
            var bytesIn: Int
            var bytesOut: Int
        }

        struct Endpoint: Codable, Sendable {
            var port: Int
            var address: String
            var node: String?
            var site: String?
            var weight: Int
            var ready: Bool
            var healthy: Bool
            var ejected: Bool
            var ejectedForSeconds: Double?
            /// `local` (dialed at its address, as on one LAN), or the peer link's path (`direct`, `punched`,
            /// `relayed`), or `no link` (a link to `via` is dialed on the first connection).
            var path: String
            var via: String?
            var relay: String?
            var rttMicros: Int64?
            var active: Int
            var total: Int
            var failures: Int
            /// Bytes sent to it (client to endpoint) and received from it, by connections and requests that
            /// ended (the port's `bytesIn`/`bytesOut` move with every read).
            var bytesIn: Int
            var bytesOut: Int
        }
    }

    /// `web.shop`, `web.shop.svc.cluster.local` or the same with a final dot → (service, namespace).
    static func serviceName(_ text: String, domain: String) -> (name: String, namespace: String)? {
        var t = text.lowercased()
        if t.hasSuffix(".") { t.removeLast() }
        let suffix = ".svc." + domain.lowercased()
        if t.hasSuffix(suffix) { t.removeLast(suffix.count) }
        let parts = t.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 2, parts.allSatisfy({ !$0.isEmpty }) else { return nil }
        return (String(parts[0]), String(parts[1]))
    }

    enum RouteAnswer {
        case found(RouteView)
        case badRequest(String)
        case notFound(String)
    }

    func route(name: String, key: String?, dataPlane: DataPlane, links: [LinkStats]) -> RouteAnswer {
        guard let (service, namespace) = Self.serviceName(name, domain: self.config.domain) else {
            return .badRequest(
                "\"\(name)\" is not a service name: give NAME.NAMESPACE or NAME.NAMESPACE.svc.\(self.config.domain)"
            )
        }
        let routes = dataPlane.snapshot().routes.filter { $0.namespace == namespace && $0.service == service }
        guard !routes.isEmpty else {
            return .notFound(
                "no service \(service).\(namespace) in this agent's table (meshctl get services -n \(namespace) lists them)"
            )
        }
        let byNode = Self.byNode(links)
        var view = RouteView(
            service: service,
            namespace: namespace,
            fqdn: "\(service).\(namespace).svc.\(self.config.domain)",
            vip: routes.first?.vip,
            ports: routes.map {
                .init(
                    port: $0.port,
                    proto: $0.proto,
                    policy: $0.policy,
                    listening: $0.listening,
                    error: $0.error,
                    activeConnections: $0.activeConnections,
                    requests: $0.requests,
                    failures: $0.failures,
                    retries: $0.retries,
                    bytesIn: $0.bytesIn,
                    bytesOut: $0.bytesOut
                )
            },
            endpoints: []
        )
        for route in routes {
            for b in route.backends {
                let link = b.via.flatMap { byNode[$0] }
                view.endpoints.append(
                    .init(
                        port: route.port,
                        address: ListenAddress(host: b.ip, port: b.port).description,
                        node: b.node,
                        site: b.site,
                        weight: b.weight,
                        ready: b.ready,
                        healthy: b.healthy,
                        ejected: b.ejected,
                        ejectedForSeconds: b.ejectedForSeconds,
                        path: Self.path(via: b.via, link),
                        via: b.via,
                        relay: link?.relay,
                        rttMicros: link?.rttMicros,
                        active: b.active,
                        total: b.total,
                        failures: b.failures,
                        bytesIn: b.bytesSent,
                        bytesOut: b.bytesReceived
                    )
                )
            }
        }
        if let key {
            view.key = key
            do {
                let picks = try dataPlane.wouldPick(namespace: namespace, service: service, key: key)
                view.picks = picks
                if picks.isEmpty {
                    let policies = Set(routes.map(\.policy)).sorted().joined(separator: ", ")
                    view.pickNote =
                        "no port of \(service).\(namespace) hashes a key (policy \(policies)): the pick does not depend on it"
                }
            } catch {
                return .badRequest("\(error)")
            }
        }
        return .found(view)
    }

    /// The links by peer node.
    static func byNode(_ links: [LinkStats]) -> [String: LinkStats] {
        Dictionary(links.map { ($0.node, $0) }, uniquingKeysWith: { a, _ in a })
    }

    /// How an endpoint is reached: `local` (dialed at its address), its peer link's path, or `no link`.
    static func path(via: String?, _ link: LinkStats?) -> String {
        via == nil ? "local" : (link?.path ?? "no link")
    }

    // MARK: trace

    /// The body of `GET /trace?id=ID`: what the proxy saw of the request that carried `x-mesh-trace: ID`,
    /// with each attempt's peer link as it is now.
    func trace(id: String, dataPlane: DataPlane, links: [LinkStats]) -> RequestTrace? {
        guard var trace = dataPlane.trace(id) else { return nil }
        let byNode = Self.byNode(links)
        for i in trace.attempts.indices {
            guard let via = trace.attempts[i].via else { continue }
            let link = byNode[via]
            trace.attempts[i].path = Self.path(via: via, link)
            trace.attempts[i].relay = link?.relay
            trace.attempts[i].rttMicros = link?.rttMicros
        }
        return trace
    }

    // MARK: dns

    enum DNSAnswer {
        case found(DNSExplanation)
        case badRequest(String)
        case failed(String)
    }

    func dns(name: String?, type: String?) async -> DNSAnswer {
        guard let name, !name.isEmpty else { return .badRequest("give the name to look up: /dns?name=NAME[&type=A]") }
        guard let qtype = DNSType(text: type ?? "A") else {
            return .badRequest("\(DNSExplainError.unknownType(type ?? ""))")
        }
        do {
            return .found(try await self.dns.explain(name: name, type: qtype))
        } catch let e as DNSExplainError {
            if case .notServing = e { return .failed("\(e)") }
            return .badRequest("\(e)")
        } catch {
            return .failed("cannot look \(name) up: \(error)")
        }
    }
}
