import Logging
import MeshAgent
import MeshClient
import MeshCore
import MeshHTTP
import NIOCore
import NIOHTTP1
import ServiceLifecycle
import Synchronization

/// `meshctl dashboard`: a page on 127.0.0.1 that draws the mesh (sites and their nodes, relays, the links
/// between nodes coloured by path with their RTT, services with their endpoints per site) and follows it
/// live. meshctl keeps the picture itself, from one watch per kind on the control plane with the admin
/// credentials (as `kubectl proxy` holds them); the page long-polls meshctl for it (`GET /state?after=N`).
/// Every asset is in the binary: no CDN, no network fetch.
public final class Dashboard: ServiceLifecycle.Service, Sendable {
    public struct Configuration: Sendable {
        public var host = "127.0.0.1"
        /// 0 picks a free port.
        public var port = 7781
        /// How long `GET /state?after=N` waits for a change before it answers with the same picture.
        public var longPoll: Duration = .seconds(20)

        public init() {}
    }

    let client: ControlClient
    let configuration: Configuration
    let logger: Logger
    let picture = MeshPicture()
    private let server = AsyncOnce<HTTPServer>()

    public init(client: ControlClient, configuration: Configuration = Configuration(), logger: Logger) {
        self.client = client
        self.configuration = configuration
        self.logger = logger
    }

    /// The page's URL once the server listens.
    public func url() async throws -> String {
        let address = try await self.server.value().localAddress()
        return "http://\(self.configuration.host):\(address.port ?? 0)/"
    }

    public func run() async throws {
        var http = HTTPServerConfiguration()
        http.host = self.configuration.host
        http.port = self.configuration.port
        http.requestTimeout = .seconds(Int64(self.configuration.longPoll.components.seconds) + 10)
        let server = HTTPServer(
            configuration: http,
            responder: DashboardResponder(picture: self.picture, longPoll: self.configuration.longPoll),
            logger: self.logger
        )
        self.server.set(server)
        let picture = self.picture
        let client = self.client
        let logger = self.logger
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await server.run() }
            // The four kinds over one watch.
            let reflector = MultiReflector(
                client: client,
                kinds: [
                    .of(Node.self, from: nil) { picture.apply($0) },
                    .of(MeshCore.Relay.self, from: nil) { picture.apply($0) },
                    .of(MeshService.self, from: nil) { picture.apply($0) },
                    .of(Endpoints.self, from: nil) { picture.apply($0) },
                ],
                logger: logger
            )
            group.addTask { await cancelWhenGracefulShutdown { await reflector.run() } }
            try await group.next()
            group.cancelAll()
        }
    }
}

/// The mesh as the control plane knows it, with a version that moves on every change (for long polls).
final class MeshPicture: Sendable {
    struct State {
        var version = 0
        /// The agent's own table type: services, endpoints and relays, folded the same way.
        var table = ServiceSnapshot()
        /// Every node (the agent follows none; the operator's picture has them all).
        var nodes: [String: Node] = [:]
        var synced: Set<String> = []
        var waiters: [(after: Int, continuation: CheckedContinuation<Void, Never>)] = []
    }

    private let state = Mutex(State())

    func apply<T: SnapshotMember>(_ update: ReflectorUpdate<T>) {
        self.record(update) { $0.table.apply(update) }
    }

    func apply(_ update: ReflectorUpdate<Node>) {
        self.record(update) { s in
            switch update {
            case .replaced(let items, _):
                s.nodes = Dictionary(items.map { ($0.metadata.name, $0) }, uniquingKeysWith: { _, b in b })
            case .changed(.added(let n)), .changed(.modified(let n)): s.nodes[n.metadata.name] = n
            case .changed(.deleted(let n)): s.nodes[n.metadata.name] = nil
            case .changed: break
            }
        }
    }

    /// Folds a change in with `fold` and wakes the long polls it answers.
    private func record<T: MeshObject>(_ update: ReflectorUpdate<T>, fold: (inout State) -> Void) {
        if case .changed(let event) = update {
            switch event {
            case .bookmark, .error: return
            case .added, .modified, .deleted: break
            }
        }
        let ready = self.state.withLock { s -> [CheckedContinuation<Void, Never>] in
            fold(&s)
            if case .replaced = update { s.synced.insert(T.resource.plural) }
            s.version += 1
            let version = s.version
            let due = s.waiters.filter { $0.after < version }.map(\.continuation)
            s.waiters.removeAll { $0.after < version }
            return due
        }
        for c in ready { c.resume() }
    }

    /// Waits until the version is past `after`, or `timeout` passes.
    func wait(after: Int, timeout: Duration) async {
        await withTaskGroup(of: Void.self) { group in
            group.addTask {
                await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
                    let now = self.state.withLock { s -> Bool in
                        if s.version > after { return true }
                        s.waiters.append((after, c))
                        return false
                    }
                    if now { c.resume() }
                }
            }
            group.addTask { try? await Task.sleep(for: timeout) }
            await group.next()
            group.cancelAll()
            // Whoever is still waiting (the timeout won): wake it so the group can end.
            let stale = self.state.withLock { s -> [CheckedContinuation<Void, Never>] in
                let due = s.waiters.filter { $0.after == after }.map(\.continuation)
                s.waiters.removeAll { $0.after == after }
                return due
            }
            for c in stale { c.resume() }
        }
    }

    /// The picture for the page.
    func view() -> MeshView {
        self.state.withLock { s in MeshView(s) }
    }
}

/// What the page draws (`GET /state`), shaped for it: sites with their nodes and each node's links,
/// relays, services with their endpoints per site.
struct MeshView: Codable, Sendable, Equatable {
    var version: Int
    /// Every kind has been listed once.
    var synced: Bool
    var sites: [Site]
    var relays: [RelayView]
    var links: [LinkView]
    var services: [ServiceView]

    struct Site: Codable, Sendable, Equatable {
        var name: String
        var nodes: [NodeView]
    }

    struct NodeView: Codable, Sendable, Equatable {
        var name: String
        var phase: String
        var lastSeen: String?
        var relay: String?
    }

    struct RelayView: Codable, Sendable, Equatable {
        var name: String
        var phase: String
        var addresses: [String]
    }

    /// One link between two nodes (each reported by at least one of them).
    struct LinkView: Codable, Sendable, Equatable {
        var from: String
        var to: String
        var path: String
        var relay: String?
        var rttMillis: Int?
    }

    struct ServiceView: Codable, Sendable, Equatable {
        var name: String
        var namespace: String
        var vip: String?
        var ports: [String]
        /// Endpoint addresses by site (`-` for endpoints without a site).
        var endpoints: [String: Int]
    }

    init(_ s: MeshPicture.State) {
        self.version = s.version
        self.synced = s.synced.count == 4
        var bySite: [String: [NodeView]] = [:]
        for node in s.nodes.values {
            let site = node.spec.site ?? "-"
            bySite[site, default: []].append(
                NodeView(
                    name: node.metadata.name,
                    phase: node.status?.phase?.rawValue ?? "Unknown",
                    lastSeen: node.status?.lastHeartbeatTime,
                    relay: node.status?.relay
                )
            )
        }
        self.sites = bySite.keys.sorted().map { Site(name: $0, nodes: bySite[$0]!.sorted { $0.name < $1.name }) }
        self.relays = s.table.relays.values.map {
            RelayView(
                name: $0.metadata.name,
                phase: $0.status?.phase?.rawValue ?? "Unknown",
                addresses: $0.spec.addresses
            )
        }.sorted { $0.name < $1.name }
        // A link is reported by both ends: one entry per pair, the lexically smaller node first.
        var links: [String: LinkView] = [:]
        for node in s.nodes.values {
            for l in node.status?.links ?? [] {
                let (a, b) = node.metadata.name < l.peer ? (node.metadata.name, l.peer) : (l.peer, node.metadata.name)
                let key = a + "|" + b
                if links[key] == nil || node.metadata.name == a {
                    links[key] = LinkView(from: a, to: b, path: l.path, relay: l.relay, rttMillis: l.rttMillis)
                }
            }
        }
        self.links = links.keys.sorted().map { links[$0]! }
        self.services = s.table.services.map { key, svc in
            var perSite: [String: Int] = [:]
            for a in s.table.endpoints[key] ?? TableEndpoints() { perSite[a.site ?? "-", default: 0] += 1 }
            return ServiceView(
                name: key.name,
                namespace: key.namespace,
                vip: svc.spec.clusterIP,
                ports: svc.spec.ports.map { "\($0.port)/\($0.protocol.rawValue)" },
                endpoints: perSite
            )
        }.sorted { ($0.namespace, $0.name) < ($1.namespace, $1.name) }
    }
}

/// Serves the page and the picture; only to loopback Host names (a page from elsewhere that rebinds its
/// name to 127.0.0.1 still sends its own Host, and must not read the mesh through the admin's credentials).
struct DashboardResponder: HTTPResponder {
    let picture: MeshPicture
    let longPoll: Duration

    static func loopbackHost(_ values: [String]) -> Bool {
        guard values.count == 1, var host = values.first?.lowercased() else { return false }
        if host.hasPrefix("[") {
            guard let close = host.firstIndex(of: "]") else { return false }
            host = String(host[host.index(after: host.startIndex)..<close])
            return host == "::1"
        }
        if let colon = host.lastIndex(of: ":") { host = String(host[..<colon]) }
        return host == "localhost" || host == "127.0.0.1" || host.hasPrefix("127.")
    }

    func respond(to request: HTTPRequest) async -> HTTPResponse {
        guard Self.loopbackHost(request.headers["host"]) else {
            return .text(.forbidden, "the dashboard answers only to a loopback Host (127.0.0.1 or localhost)")
        }
        guard request.method == .GET else { return .text(.methodNotAllowed, "only GET here") }
        switch request.path {
        case "/":
            var headers = HTTPHeaders()
            headers.add(name: "content-type", value: "text/html; charset=utf-8")
            headers.add(
                name: "content-security-policy",
                value: "default-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
            )
            return HTTPResponse(status: .ok, headers: headers, body: .bytes(ByteBuffer(string: DashboardPage.html)))
        case "/state":
            if let after = request.query["after"].flatMap(Int.init) {
                await self.picture.wait(after: after, timeout: self.longPoll)
            }
            do {
                return .json(.ok, ByteBuffer(bytes: try MeshJSON.encode(self.picture.view())))
            } catch {
                return .text(.internalServerError, "cannot encode the picture: \(error)")
            }
        default:
            return .text(.notFound, "no \(request.path) here: / is the page, /state its data")
        }
    }
}

extension Dashboard {
    /// `meshctl dashboard`: serves on `listen` (a loopback address) until SIGINT or SIGTERM, printing the URL
    /// once it listens. False when it could not run.
    public static func serve(
        client: ControlClient,
        listen: String,
        out: @escaping @Sendable (String) -> Void,
        err: @escaping @Sendable (String) -> Void
    ) async -> Bool {
        let address: ListenAddress
        do {
            address = try ListenAddress(listen, field: "--listen")
        } catch {
            err("error: \(error)\n")
            return false
        }
        guard let ip = IPAddress(address.host), ip.isLoopback else {
            err(
                "error: --listen \(listen): the dashboard reads the mesh with the admin's credentials, so it listens on loopback only (127.0.0.1 or ::1)\n"
            )
            return false
        }
        var configuration = Configuration()
        configuration.host = address.host
        configuration.port = address.port
        var logger = Logger(label: "meshctl-dashboard")
        logger.logLevel = .warning
        let dashboard = Dashboard(client: client, configuration: configuration, logger: logger)
        let announce = Task {
            guard let url = try? await dashboard.url() else { return }
            out("dashboard on \(url) (Ctrl-C stops it)\n")
        }
        defer { announce.cancel() }
        return await Daemon.run([dashboard], name: "meshctl dashboard", logger: logger)
    }
}
