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

/// The agent's admin API on 127.0.0.1:7780: `/status` (this agent: control plane, relay, interface,
/// certificate), `/routes` (every service's VIP, policy and backends with health and counters, and where the
/// table came from), `/route?name=SVC.NS[&key=K]` (one service's endpoints with their paths), `/peers` (the
/// peer links), `/dns?name=NAME[&type=T]` (an answer and its source), `/metrics`, `/healthz`, `/readyz`.
/// Requests whose `Host` is not a loopback name or address get 403 (``AdminHostCheck``); with
/// `adminAllowRemote` (mutual TLS), requests without an admin certificate of the mesh CA do.
struct AdminAPI: HTTPResponder {
    let config: AgentConfig
    let applier: SnapshotApplier
    let dataPlane: DataPlane
    let sync: ServiceTableSync
    let links: LinkManager
    let relay: RelaySessionClient
    let inspection: AgentInspection
    /// Workloads' logs and status, twins (`EdgeServices.adminResponse`).
    let edge: EdgeServices?
    let health: HealthEndpoints
    /// Direct paths through NATs (nil without a link port).
    let direct: DirectPaths?
    /// The peer nodes looked up for links (their sites, in `/peers`).
    let peers: NodeDirectory?

    init(
        config: AgentConfig,
        applier: SnapshotApplier,
        dataPlane: DataPlane,
        sync: ServiceTableSync,
        links: LinkManager,
        relay: RelaySessionClient,
        inspection: AgentInspection,
        direct: DirectPaths? = nil,
        edge: EdgeServices? = nil,
        peers: NodeDirectory? = nil
    ) {
        self.peers = peers
        self.inspection = inspection
        self.direct = direct
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

    static func json(_ value: some Encodable, what: String) -> HTTPResponse {
        do {
            return .json(.ok, ByteBuffer(bytes: try MeshJSON.encode(value)))
        } catch {
            return .text(.internalServerError, "cannot encode \(what): \(error)")
        }
    }

    /// `/routes`: the table's source and every route; the snapshot is gone when this returns.
    private func routesResponse() -> HTTPResponse {
        let s = self.applier.state.withLock { $0 }
        let table = Routes.Table(
            source: s?.source ?? "none",
            services: s?.services ?? 0,
            routes: s?.routes ?? 0,
            versions: s?.versions ?? "-",
            error: s?.error
        )
        do {
            let body = try Self.streamedRoutes(node: self.config.nodeName, site: self.config.site, table: table) {
                try self.dataPlane.snapshot(eachRoute: $0)
            }
            return .json(.ok, body)
        } catch {
            return .text(.internalServerError, "cannot encode the routes: \(error)")
        }
    }

    /// The `/routes` document, its routes encoded one at a time into the body: the same JSON as encoding
    /// `Routes` whole (keys sorted), without a tree of every route and backend in memory at once. Whole, a
    /// 10,000-service table took the agent's heap to 250 MB for 23 MB of JSON (heaptrack), more than an edge
    /// box with 256 MB has.
    static func streamedRoutes(
        node: String,
        site: String?,
        table: Routes.Table,
        snapshot: ((RouteSnapshot) throws -> Void) throws -> DataPlaneSnapshot
    ) throws -> ByteBuffer {
        var routes = ByteBuffer()
        var first = true
        let head = try snapshot { route in
            if !first { routes.writeInteger(UInt8(ascii: ",")) }
            first = false
            routes.writeBytes(try MeshJSON.encode(route))
        }
        // The document without routes has `"routes":[]` once: the data plane's (the table's `routes` is a number).
        let outer = try MeshJSON.encode(Routes(node: node, site: site, table: table, dataPlane: head))
        let marker = Array(#""routes":[]"#.utf8)
        guard let at = outer.firstRange(of: marker) else {
            throw EncodingError.invalidValue(marker, .init(codingPath: [], debugDescription: "no routes array"))
        }
        var body = ByteBuffer()
        body.reserveCapacity(outer.count + routes.readableBytes)
        body.writeBytes(outer[..<(at.lowerBound + marker.count - 1)])
        body.writeBuffer(&routes)
        body.writeBytes(outer[(at.upperBound - 1)...])
        return body
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
            let response = self.routesResponse()
            // Encoding every route (100,000 backends at 10,000 services) builds tens of MB of short-lived
            // objects, freed by now (the snapshot with them): hand them back to the system rather than keep the
            // agent's resident set at that peak.
            #if canImport(Glibc)
            _ = glibcMallocTrim(0)
            #endif
            return response
        case "/peers":
            let table = self.applier.current.value
            let punch = self.direct?.coordinator
            // Sites from the endpoints (a peer that dialed in): one pass over the table, only when needed.
            var fromEndpoints: [String: String]?
            var rows: [PeerRow] = []
            for s in await self.links.stats() {
                var site = self.peers?.known(s.node)?.spec.site
                if site == nil {
                    if fromEndpoints == nil { fromEndpoints = PeerDirectory.sites(in: table) }
                    site = fromEndpoints?[s.node]
                }
                rows.append(PeerRow(s, site: site, punch: punch?.stats(for: s.node)))
            }
            let list = PeerList(
                node: self.config.nodeName,
                site: self.config.site,
                linkListen: self.config.linkListen,
                relay: self.relay.status,
                nat: self.direct?.discovery.report.map(NATStatus.init),
                items: rows
            )
            return Self.json(list, what: "the peers")
        case "/status":
            let status = await self.inspection.status(
                applier: self.applier,
                dataPlane: self.dataPlane,
                relay: self.relay.status,
                nat: self.direct?.discovery.report.map(NATStatus.init)
            )
            return Self.json(status, what: "the status")
        case "/route":
            let links = await self.links.stats()
            switch self.inspection.route(
                name: request.query["name"] ?? "",
                key: request.query["key"],
                dataPlane: self.dataPlane,
                links: links
            ) {
            case .found(let view): return Self.json(view, what: "the route")
            case .badRequest(let why): return .text(.badRequest, why)
            case .notFound(let why): return .text(.notFound, why)
            }
        case "/trace":
            guard let id = request.query["id"], !id.isEmpty else {
                return .text(.badRequest, "give the trace id: /trace?id=ID (the x-mesh-trace value a request carried)")
            }
            let links = await self.links.stats()
            guard let trace = self.inspection.trace(id: id, dataPlane: self.dataPlane, links: links) else {
                return .text(
                    .notFound,
                    "no traced request with id \(id) (yet): only HTTP routes trace, and the exchange must have ended"
                )
            }
            return Self.json(trace, what: "the trace")
        case "/dns":
            switch await self.inspection.dns(name: request.query["name"], type: request.query["type"]) {
            case .found(let answer): return Self.json(answer, what: "the answer")
            case .badRequest(let why): return .text(.badRequest, why)
            case .failed(let why): return .text(.serviceUnavailable, why)
            }
        case "/ping":
            guard let node = request.query["node"], Names.dns1123SubdomainError(node) == nil else {
                return .text(.badRequest, "ping needs ?node=NAME (a node name)")
            }
            let count = request.query["count"].flatMap { Int($0) } ?? 10
            let interval = request.query["intervalMillis"].flatMap { Int64($0) } ?? 500
            let result = await PeerPing(links: self.links).run(
                node: node,
                count: count,
                interval: .milliseconds(max(10, min(interval, 10_000)))
            )
            return Self.json(result, what: "the probes")
        default:
            if let edge = self.edge, let r = edge.adminResponse(path: request.path, query: request.query) { return r }
            return .text(
                .notFound,
                "no \(request.path) here: try /status, /routes, /route?name=SVC.NS, /peers, /ping, /dns?name=NAME, /trace?id=ID, /workloads, /twins, /metrics, /healthz or /readyz"
            )
        }
    }
}
