import MeshCore
import MeshHTTP
import NIOCore
import NodeAgent
import Relay

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// The agent's admin API on 127.0.0.1:7780: `/routes` (every service's VIP, policy and backends
/// with health and counters, and where the table came from), `/peers` (the peer links), `/metrics`, `/healthz`, `/readyz`.
/// Requests whose `Host` is not a loopback name or address get 403 (``AdminHostCheck``); with
/// `adminAllowRemote` (mutual TLS), requests without an admin certificate of the mesh CA do.
struct AdminAPI: HTTPResponder {
    let config: AgentConfig
    let applier: SnapshotApplier
    let dataPlane: DataPlane
    let sync: ServiceTableSync
    let links: LinkManager
    let relay: RelaySessionClient
    /// Workloads' logs and status, twins (`EdgeServices.adminResponse`).
    let edge: EdgeServices?
    let health: HealthEndpoints

    init(
        config: AgentConfig,
        applier: SnapshotApplier,
        dataPlane: DataPlane,
        sync: ServiceTableSync,
        links: LinkManager,
        relay: RelaySessionClient,
        edge: EdgeServices? = nil
    ) {
        self.edge = edge
        self.config = config
        self.links = links
        self.relay = relay
        self.applier = applier
        self.dataPlane = dataPlane
        self.sync = sync
        self.health = HealthEndpoints { [applier] in
            guard let s = applier.state.withLock({ $0 }) else { return (false, "no service table yet") }
            if s.source == ServiceSnapshot.Source.cache.rawValue {
                return (true, "serving \(s.services) services from the cache; the control plane has not answered")
            }
            return (true, "serving \(s.services) services (\(s.versions))")
        }
    }

    /// What `/routes` returns.
    struct Routes: Encodable {
        var node: String
        var site: String?
        var table: Table
        var dataPlane: DataPlaneSnapshot

        struct Table: Encodable {
            var source: String
            var services: Int
            var routes: Int
            var versions: String
            var error: String?
        }
    }

    func respond(to request: HTTPRequest) async -> HTTPResponse {
        if self.config.adminAllowRemote {
            // Over mutual TLS (a DNS-rebinding page cannot present an admin's certificate).
            if let why = AdminHostCheck.refusal(peerIdentity: request.peerIdentity) {
                return .text(request.peerIdentity == nil ? .unauthorized : .forbidden, why)
            }
        } else if let why = AdminHostCheck.refusal(hostHeaders: request.headers["host"]) {
            return .text(.forbidden, why)
        }
        if let r = self.health.respond(to: request) { return r }
        guard request.method == .GET else { return .text(.methodNotAllowed, "only GET here") }
        switch request.path {
        case "/routes":
            let s = self.applier.state.withLock { $0 }
            let routes = Routes(
                node: self.config.nodeName,
                site: self.config.site,
                table: .init(
                    source: s?.source ?? "none",
                    services: s?.services ?? 0,
                    routes: s?.routes ?? 0,
                    versions: s?.versions ?? "-",
                    error: s?.error
                ),
                dataPlane: self.dataPlane.snapshot()
            )
            do {
                return .json(.ok, ByteBuffer(bytes: try MeshJSON.encode(routes)))
            } catch {
                return .text(.internalServerError, "cannot encode the routes: \(error)")
            }
        case "/peers":
            let nodes = self.applier.current.value.nodes
            let rows = await self.links.stats().map { PeerRow($0, site: nodes[$0.node]?.spec.site) }
            let list = PeerList(
                node: self.config.nodeName,
                site: self.config.site,
                linkListen: self.config.linkListen,
                relay: self.relay.status,
                items: rows
            )
            do {
                return .json(.ok, ByteBuffer(bytes: try MeshJSON.encode(list)))
            } catch {
                return .text(.internalServerError, "cannot encode the peers: \(error)")
            }
        default:
            if let edge = self.edge, let r = edge.adminResponse(path: request.path, query: request.query) { return r }
            return .text(.notFound, "no \(request.path) here: try /routes, /peers, /metrics, /healthz or /readyz")
        }
    }
}
