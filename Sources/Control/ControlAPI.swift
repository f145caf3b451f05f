import Foundation
import Logging
import MeshCore
import MeshHTTP
import MeshIdentity
import Metrics
import NIOCore
import NIOHTTP1
import Synchronization

/// The control plane's REST + watch API (docs/API.md): Kubernetes paths, objects, watch events and
/// Status errors, over any `Store`.
public final class ControlAPI: HTTPResponder {
    let store: any Store
    let vips: VIPAllocator
    let logger: Logger
    let health: HealthEndpoints
    let ca: CertificateAuthority?
    let caPEM: String
    let tokens: BootstrapTokenStore
    /// Issued node certificates, the revocation list, renewal (`NodeCredentials`).
    let credentials: NodeCredentials
    /// Node liveness (heartbeats); nil: heartbeats are refused with 503 and Node status is kept as written.
    let lifecycle: NodeLifecycle?
    /// Per-identity write limits (nil: none).
    let limiter: WriteRateLimiter?
    /// Writes objects with the control plane's policies (VIPs, Node status).
    let writer: ObjectWriter
    /// The store's hub, whose index places devices and workloads for node-scoped lists (nil: decode each).
    let hub: WatchHub?
    /// An answered heartbeat's metrics, made once: a metric made per request is a lookup in the registry under
    /// its lock, twice per beat.
    let beatMetrics = RequestMetrics(verb: "heartbeat", resource: Node.resource.plural, code: 200)
    /// A beat's answer without a `JSONEncoder` pass (one per beat of every node).
    let beatAnswers = BeatAnswers()
    /// Started watches' metrics by resource label (`startedWatchMetrics`).
    private let watchMetrics = Mutex<[String: RequestMetrics]>([:])
    public static let version = "0.1.0"
    /// Where nodes enrol (no client certificate needed).
    public static let joinPath = "/apis/mesh.edge/v1/join"
    /// Join tokens (admin only).
    public static let tokensPath = "/apis/mesh.edge/v1/bootstraptokens"

    /// `ca`: the CA that signs joining nodes' CSRs (nil: joins are refused with 503). `clock`: what
    /// join tokens' expiries are set and checked on.
    public init(
        store: any Store,
        vips: VIPAllocator,
        logger: Logger,
        ca: CertificateAuthority? = nil,
        caPEM: String = "",
        lifecycle: NodeLifecycle? = nil,
        nodeCertificateValidity: TimeInterval = CertificateAuthority.leafValidity,
        limiter: WriteRateLimiter? = nil,
        isReady: @escaping @Sendable () -> (Bool, String) = { (true, "ok") },
        clock: any MeshClock = .system,
        hub: WatchHub? = nil
    ) {
        self.hub = hub
        self.lifecycle = lifecycle
        self.limiter = limiter
        self.store = store
        self.vips = vips
        self.logger = logger
        self.ca = ca
        self.caPEM = caPEM
        self.tokens = BootstrapTokenStore(store: store, clock: clock)
        self.credentials = NodeCredentials(
            store: store,
            revoked: RevokedSerials(),
            validity: nodeCertificateValidity,
            clock: clock
        )
        self.health = HealthEndpoints(isReady: isReady)
        self.writer = ObjectWriter(store: store, vips: vips, lifecycle: lifecycle, logger: logger)
    }

    /// Renders the server's own errors (malformed requests, limits, timeouts) as Status objects.
    public static let renderError: ErrorRenderer = { status, message in
        let reason: Status.Reason
        switch status.code {
        case 408: reason = .requestTimeout
        case 413: reason = .requestEntityTooLarge
        case 431: reason = .requestHeaderFieldsTooLarge
        case 503: reason = .serviceUnavailable
        default: reason = .badRequest
        }
        return ("application/json", ControlAPI.encode(Status(code: Int(status.code), reason: reason, message: message)))
    }

    static func encode(_ value: some Encodable) -> ByteBuffer {
        // Encoding our own model types cannot fail.
        ByteBuffer(bytes: try! MeshJSON.encode(value))
    }

    static func respond(_ status: Status) -> HTTPResponse {
        .json(HTTPResponseStatus(statusCode: status.code), encode(status))
    }

    /// Reads the revocation list (call once before serving).
    public func loadRevocations() async throws {
        try await self.credentials.load()
    }

    /// Whether a request may go on: a revoked or expired client certificate is refused first (public routes
    /// need none), then the route's authorization decides.
    private func verdict(_ request: HTTPRequest) -> Authorization.Decision {
        if !Authorization.isPublic(request), let revoked = self.credentials.denial(request) { return .deny(revoked) }
        return Authorization.decide(request)
    }

    public func respond(to request: HTTPRequest) async -> HTTPResponse {
        if case .deny(let status) = self.verdict(request) {
            Counter(
                label: "mesh_control_requests_total",
                dimensions: [("verb", "denied"), ("resource", ""), ("code", "\(status.code)")]
            )
            .increment()
            self.logger.debug(
                "\(request.method) \(request.uri) from \(request.peerIdentity ?? "anonymous") -> \(status.code)"
            )
            return Self.respond(status)
        }
        if let r = self.health.respond(to: request) { return r }
        if let limiter = self.limiter, let identity = request.peerIdentity, WriteRateLimiter.isWrite(request),
            let wait = limiter.take(identity)
        {
            Counter(
                label: "mesh_control_requests_total",
                dimensions: [("verb", "throttled"), ("resource", ""), ("code", "429")]
            )
            .increment()
            self.logger.debug("\(request.method) \(request.uri) from \(identity) -> 429 (write rate limit)")
            return limiter.refusal(identity: identity, wait: wait)
        }
        let start = ContinuousClock.now
        let routed: (HTTPResponse, String, String)
        if let credentials = await self.routeCredentials(request) {
            routed = credentials
        } else {
            switch APIRoute.parse(request.path) {
            case .failure(let miss):
                routed = (Self.respond(miss.status), "unknown", miss.resource)
            case .success(let route):
                routed = await self.answer(request, route)
            }
        }
        let (response, verb, resource) = routed
        self.answered(request, response, verb: verb, resource: resource, since: start)
        return response
    }

    /// A request's answer counted, timed and logged.
    private func answered(
        _ request: HTTPRequest,
        _ response: HTTPResponse,
        verb: String,
        resource: String,
        since start: ContinuousClock.Instant,
        metrics: RequestMetrics? = nil
    ) {
        let code = Int(response.status.code)
        let metrics = metrics ?? RequestMetrics(verb: verb, resource: resource, code: code)
        metrics.requests.increment()
        metrics.duration?.record(duration: ContinuousClock.now - start)
        if code >= 500 {
            self.logger.error("\(request.method) \(request.uri) -> \(code)")
        } else {
            self.logger.debug("\(request.method) \(request.uri) -> \(code)")
        }
    }

    /// What is answered on the connection's event loop, without a task:
    /// - a known node's heartbeat without a report: a lock and a time in memory (`NodeLifecycle.beatAtOnce`);
    /// - a watch from a version the store's hub holds (`watchAtOnce`): the pushed body is set up at once.
    /// Anything else (a refused or unknown caller, a report, a node to write Ready, a watch that lists first or
    /// waits for the store, a bad parameter, another route) goes to `respond(to:)`, which checks and answers it.
    public func respondAtOnce(to request: HTTPRequest) -> HTTPResponse? {
        if request.method == .GET, request.query["resourceVersion"] != nil,
            case .success(let route) = APIRoute.parse(request.path)
        {
            return self.watchAtOnce(request, route)
        }
        guard request.method == .POST, request.body.readableBytes == 0, let lifecycle = self.lifecycle,
            request.path.hasSuffix("/heartbeat"), case .success(let route) = APIRoute.parse(request.path),
            case .heartbeat(let node) = route
        else { return nil }
        // The checks `respond(to:)` makes first; heartbeats are not writes for the rate limit.
        guard self.verdict(request) == .allow else { return nil }
        let start = ContinuousClock.now
        guard let beat = lifecycle.beatAtOnce(node) else { return nil }
        let response = HTTPResponse.json(.ok, self.beatAnswers.encode(beat))
        self.answered(
            request,
            response,
            verb: "heartbeat",
            resource: route.resourceLabel,
            since: start,
            metrics: self.beatMetrics
        )
        return response
    }

    /// A request's metrics: its count by verb, resource and code, and its duration by verb (none for watches).
    struct RequestMetrics: Sendable {
        var requests: Counter
        var duration: Metrics.Timer?

        init(verb: String, resource: String, code: Int) {
            self.requests = Counter(
                label: "mesh_control_requests_total",
                dimensions: [("verb", verb), ("resource", resource), ("code", "\(code)")]
            )
            self.duration =
                verb == "watch"
                ? nil : Metrics.Timer(label: "mesh_control_request_duration_seconds", dimensions: [("verb", verb)])
        }
    }

    // MARK: routes

    /// Answers one routed request: its response, its Kubernetes verb and resource (for metrics). Every
    /// error becomes a Status here, in one place.
    private func answer(_ request: HTTPRequest, _ route: APIRoute) async -> (HTTPResponse, String, String) {
        let resource = route.resourceLabel
        do {
            let (response, verb) = try await self.handle(request, route)
            return (response, verb, resource)
        } catch let status as Status where status.code == 405 {
            var r = Self.respond(status)
            r.headers.add(name: "Allow", value: Self.allowed(route))
            return (r, "unknown", resource)
        } catch let status as Status {
            return (Self.respond(status), Self.verb(request, name: route.name), resource)
        } catch let e as StoreError {
            let type = Registry.byPlural(resource)?.type
            return (Self.respond(Self.status(for: e, type)), Self.verb(request, name: route.name), resource)
        } catch {
            self.logger.error("\(request.method) \(request.uri) failed: \(error)")
            let status = Status(code: 500, reason: .internalError, message: "internal error: \(error)")
            return (Self.respond(status), Self.verb(request, name: route.name), resource)
        }
    }

    private func handle(_ request: HTTPRequest, _ route: APIRoute) async throws -> (HTTPResponse, String) {
        switch (route, request.method) {
        case (.version, .GET):
            return (.json(.ok, Self.encode(["version": Self.version, "apiVersion": meshAPIVersion])), "get")
        case (.discovery, .GET):
            return (self.discovery(), "get")
        case (.join, .POST):
            return (try await self.join(request), "create")
        case (.tokens(nil), .POST), (.tokens(""), .POST):
            guard let ca = self.ca else { throw Self.noCA }
            let wanted = try Self.decodeStrict(BootstrapTokenRequest.self, request)
            return (.json(.created, Self.encode(try await self.tokens.create(wanted, caHash: ca.hash))), "create")
        case (.tokens(nil), .GET), (.tokens(""), .GET):
            return (.json(.ok, Self.encode(BootstrapTokenList(items: try await self.tokens.list()))), "list")
        case (.tokens(.some(let id)), .DELETE) where !id.isEmpty:
            return (.json(.ok, Self.encode(try await self.tokens.delete(id))), "delete")
        case (.heartbeat(let node), .POST):
            return (try await self.heartbeat(node, request), "heartbeat")
        case (.reports(let node), .POST):
            return (try await self.reports(node, request), "create")
        case (.collection(let resource, let namespace), .GET):
            let entry = Registry.byPlural(resource)!
            if ["true", "1"].contains(request.query["watch"] ?? "") {
                return (try await self.watch(entry, namespace: namespace, request), "watch")
            }
            return (try await self.list(entry, namespace: namespace, request), "list")
        case (.watch, .GET):
            return (try await self.watchKinds(request), "watch")
        case (.object(let resource, let namespace, let name), .GET):
            return (
                try await self.get(Registry.byPlural(resource)!, namespace: namespace, name: name, request), "get"
            )
        case (.collection(let resource, let namespace), .POST):
            let kind = try Self.served(resource)
            return (try await self.save(kind, request, namespace: namespace, urlName: nil, createOnly: true), "create")
        case (.object(let resource, let namespace, let name), .PUT):
            let kind = try Self.served(resource)
            return (
                try await self.save(kind, request, namespace: namespace, urlName: name, createOnly: false), "update"
            )
        case (.object(let resource, let namespace, let name), .DELETE):
            return (try await self.writer.delete(try Self.served(resource), namespace: namespace, name: name), "delete")
        default:
            throw Self.notAllowed(request, allowed: Self.allowed(route))
        }
    }

    /// The methods a route takes, for 405 and its `Allow` header.
    static func allowed(_ route: APIRoute) -> String {
        switch route {
        case .version, .discovery: return "GET"
        case .join, .heartbeat, .reports: return "POST"
        case .tokens(let id): return (id ?? "").isEmpty ? "GET, POST" : "DELETE"
        case .collection: return "GET, POST"
        case .watch: return "GET"
        case .object: return "GET, PUT, DELETE"
        }
    }

    /// The policy of a kind the API writes (every kind in the registry has one).
    static func served(_ resource: String) throws -> any ControlManaged.Type {
        guard let kind = ObjectWriter.served[resource] else {
            throw Status(code: 405, reason: .methodNotAllowed, message: "\(resource) cannot be written here")
        }
        return kind
    }

    static let noCA = Status(
        code: 503,
        reason: .serviceUnavailable,
        message: "this control plane has no certificate authority, so it cannot enrol nodes"
    )

    /// The request's body, which must be JSON (415 for another content type, 400 when empty).
    static func jsonBody(_ request: HTTPRequest, what: String) throws -> Data {
        if let type = request.headers.first(name: "content-type"), !type.lowercased().hasPrefix("application/json") {
            throw Status(
                code: 415,
                reason: .unsupportedMediaType,
                message: "send JSON (Content-Type: application/json), not \(type)"
            )
        }
        guard request.body.readableBytes > 0 else {
            throw Status.badRequest("the request has no body: send \(what) as JSON")
        }
        return Data(request.body.readableBytesView)
    }

    /// A JSON body decoded strictly (unknown fields, wrong kind or apiVersion are 400s).
    static func decodeStrict<T: Codable>(_ type: T.Type, _ request: HTTPRequest) throws -> T {
        let body = try Self.jsonBody(request, what: "it")
        do {
            return try SecurityPayloads.decode(T.self, json: body)
        } catch let e as ManifestError {
            throw Status.badRequest(e.message)
        }
    }

    /// The Kubernetes verb of a request, for metrics.
    static func verb(_ request: HTTPRequest, name: String?) -> String {
        switch (request.method, name) {
        case (.GET, nil): return ["true", "1"].contains(request.query["watch"] ?? "") ? "watch" : "list"
        case (.GET, _): return "get"
        case (.PUT, _): return "update"
        case (.POST, _): return "create"
        case (.DELETE, _): return "delete"
        default: return "unknown"
        }
    }

    /// The answer to a store error. Missing, existing and conflicting objects are named by their kind; with
    /// no kind the API knows (the watch over several kinds), such an error is the store failing: 503.
    static func status(for error: StoreError, _ known: ResourceType?) -> Status {
        switch (error, known) {
        case (.gone, _), (.tooNew, _): return .gone(error.description)
        case (.reserved(let token, let owner), _):
            return Status(code: 409, reason: .conflict, message: "\(token) is already taken by \(owner)")
        case (.unavailable(let why), _): return Status(code: 503, reason: .serviceUnavailable, message: why)
        case (.notFound(let k), let type?): return .notFound(type, k.name, namespace: k.namespace)
        case (.alreadyExists(let k), let type?):
            return Status(
                code: 409,
                reason: .alreadyExists,
                message: "\(type.singular) \"\(k.name)\" already exists",
                details: .init(name: k.name, kind: type.plural)
            )
        case (.conflict(let k, let current), let type?):
            let why = current.map { "it is now at resourceVersion \($0)" } ?? "it no longer exists"
            return .conflict(
                "Operation cannot be fulfilled on \(type.plural) \"\(k.name)\": the object has been modified (\(why)); read it again and retry"
            )
        case (_, nil):
            return Status(code: 503, reason: .serviceUnavailable, message: error.description)
        }
    }

    // MARK: node heartbeats

    private func heartbeat(_ node: String, _ request: HTTPRequest) async throws -> HTTPResponse {
        guard let lifecycle = self.lifecycle else {
            throw Status(
                code: 503,
                reason: .serviceUnavailable,
                message: "this control plane does not track node heartbeats"
            )
        }
        // An empty body reports nothing; a JSON body reports the node's relay.
        var report: NodeHeartbeatReport?
        if request.body.readableBytes > 0 {
            let r = try Self.decodeStrict(NodeHeartbeatReport.self, request)
            if let e = r.error { throw Status.badRequest("the heartbeat's report: \(e)") }
            report = r
        }
        return .json(.ok, Self.encode(try await lifecycle.beat(node, report: report)))
    }

    /// A stored Node's JSON with `status.lastHeartbeatTime` from memory when that is newer: beats
    /// are not written to the object, so reads show the live time (watch events carry the time of
    /// the last phase change).
    private func withLiveHeartbeat(_ stored: StoredObject) -> ByteBuffer {
        guard stored.key.resource == Node.resource.plural, let lifecycle = self.lifecycle,
            let millis = lifecycle.lastBeat(stored.key.name),
            var node = try? stored.decode(Node.self)
        else { return stored.json }
        let live = NodeLifecycle.format(millis)
        let kept = node.status?.lastHeartbeatTime.flatMap(Timestamp.parse) ?? 0
        guard Int(millis / 1000) > kept else { return stored.json }
        var status = node.status ?? NodeStatus()
        status.lastHeartbeatTime = live
        node.status = status
        return Self.encode(node)
    }

    // MARK: reads

    private func discovery() -> HTTPResponse {
        struct Resource: Encodable {
            var name, singularName, kind: String
            var namespaced: Bool
            var shortNames: [String]
            var verbs = ["get", "list", "watch", "create", "update", "delete"]
        }
        struct ResourceList: Encodable {
            var kind = "APIResourceList"
            var groupVersion = meshAPIVersion
            var resources: [Resource]
        }
        let list = ResourceList(
            resources: Registry.types.map {
                Resource(
                    name: $0.plural,
                    singularName: $0.singular,
                    kind: $0.kind,
                    namespaced: $0.namespaced,
                    shortNames: $0.shortNames
                )
            }
        )
        return .json(.ok, ControlAPI.encode(list))
    }

    private func selector(_ request: HTTPRequest) throws -> LabelSelector? {
        guard let text = request.query["labelSelector"], !text.isEmpty else { return nil }
        do {
            return try LabelSelector(parsing: text)
        } catch {
            throw Status.badRequest(error.description)
        }
    }

    /// A request's `node` parameter: only the devices and workloads placed on that node (`NodePlacement`).
    private func node(_ request: HTTPRequest) throws -> String? {
        guard let name = request.query["node"], !name.isEmpty else { return nil }
        if let e = Names.dns1123SubdomainError(name) { throw Status.badRequest("node \"\(name)\" \(e)") }
        return name
    }

    /// A list's objects and version. Scoped to a node, a placed kind's are the ones the hub's index places there
    /// (read by key: an agent's list of its own devices reads its own, not the fleet's 10,000, which cost 10^8
    /// at a fleet's set-up), at the version the hub has published: the objects read are at least that new,
    /// and a watch from it brings every change after it, moves included, in order. Without a hub (an API over
    /// a bare store): the whole kind, each object decoded to place it.
    func listed(
        _ entry: Registry.Entry,
        namespace: String?,
        node: String?
    ) async throws -> (items: [StoredObject], resourceVersion: Int64) {
        guard let node, NodePlacement.isPlaced(entry.type.plural) else {
            return try await self.store.list(resource: entry.type.plural, namespace: namespace)
        }
        guard let hub = self.hub else {
            let (all, rv) = try await self.store.list(resource: entry.type.plural, namespace: namespace)
            return (all.filter { NodePlacement.admits($0, node: node) }, rv)
        }
        let (keys, version) = hub.placed(on: node, resource: entry.type.plural)
        let wanted = keys.filter { k in namespace.map { $0 == k.namespace } ?? true }
        let items = try await self.store.get(wanted).sorted {
            ($0.key.namespace, $0.key.name) < ($1.key.namespace, $1.key.name)
        }
        return (items, version)
    }

    private func get(
        _ entry: Registry.Entry,
        namespace: String,
        name: String,
        _ request: HTTPRequest
    ) async throws -> HTTPResponse {
        let key = ObjectKey(resource: entry.type.plural, namespace: namespace, name: name)
        guard let object = try await self.store.get(key) else {
            throw Status.notFound(entry.type, name, namespace: namespace)
        }
        // A node reads only the devices and workloads placed on it (lists and watches: `Security.nodeMay`).
        if case .node(let node) = request.peerIdentity.flatMap({ MeshPrincipal(uri: $0) }),
            !NodePlacement.admits(object, node: node)
        {
            throw Status(
                code: 403,
                reason: .forbidden,
                message: "node \(node) may not read \(entry.type.singular) \(name): it is not placed on that node"
            )
        }
        return .json(.ok, self.withLiveHeartbeat(object))
    }

    private func list(_ entry: Registry.Entry, namespace: String?, _ request: HTTPRequest) async throws -> HTTPResponse
    {
        let selector = try self.selector(request)
        let node = try self.node(request)
        let (items, rv) = try await self.listed(entry, namespace: namespace, node: node)
        var body = ByteBuffer()
        body.reserveCapacity(items.reduce(128) { $0 + $1.json.readableBytes + 1 })
        body.writeString(
            "{\"apiVersion\":\"\(meshAPIVersion)\",\"kind\":\"\(entry.type.listKind)\",\"metadata\":{\"resourceVersion\":\"\(rv)\"},\"items\":["
        )
        var first = true
        let live = entry.type.plural == Node.resource.plural && self.lifecycle != nil
        for var item in items where selector?.matches(item.labels) ?? true {
            if !first { body.writeString(",") }
            first = false
            if live { item.json = self.withLiveHeartbeat(item) }
            body.writeBuffer(&item.json)
        }
        body.writeString("]}")
        return .json(.ok, body)
    }

    private func watch(_ entry: Registry.Entry, namespace: String?, _ request: HTTPRequest) async throws -> HTTPResponse
    {
        let start = try self.watchStart(.collection(resource: entry.type.plural, namespace: namespace), request)!
        guard let after = start.after else {
            // No version: the current objects as ADDED events, then every change after that list.
            var initial = ByteBuffer()
            let (items, rv) = try await self.listed(entry, namespace: namespace, node: start.filter.node)
            for item in items where start.filter.matchesIgnoringNode(item) {
                var line = WatchHub.line(for: StoreEvent(kind: .added, object: item))
                initial.writeBuffer(&line)
            }
            let subscription = try await self.store.watch(after: rv, filter: start.filter)
            return try self.stream(subscription, request, first: initial, bookmarkKind: start.bookmarkKind)
        }
        let subscription = try await self.store.watch(after: after, filter: start.filter)
        return try self.stream(subscription, request, first: ByteBuffer(), bookmarkKind: start.bookmarkKind)
    }

    /// The kind a BOOKMARK line of a watch over several kinds names: it counts for every kind watched.
    public static let multiWatchBookmarkKind = "Bookmark"

    /// `GET /apis/mesh.edge/v1/watch?resources=a,b&resourceVersion=N`: the changes to every kind listed, in
    /// resourceVersion order, in one stream (an agent follows seven kinds over one connection instead of
    /// seven). The version is required: the kinds' lists are separate reads, so the client lists each and
    /// watches from the smallest list version (`MultiReflector`). Each kind is authorized as its own watch is.
    private func watchKinds(_ request: HTTPRequest) async throws -> HTTPResponse {
        let start = try self.watchStart(.watch, request)!
        let subscription = try await self.store.watch(after: start.after!, filter: start.filter)
        return try self.stream(subscription, request, first: ByteBuffer(), bookmarkKind: start.bookmarkKind)
    }

    /// What a watch request asks for: its filter, the version it starts after (nil: list first, then watch),
    /// and the kind its bookmarks name. Nil for a route that is not a watch; a bad parameter throws its 400.
    private func watchStart(
        _ route: APIRoute,
        _ request: HTTPRequest
    ) throws -> (filter: WatchFilter, after: Int64?, bookmarkKind: String)? {
        switch route {
        case .collection(let resource, let namespace):
            guard ["true", "1"].contains(request.query["watch"] ?? ""), let entry = Registry.byPlural(resource) else {
                return nil
            }
            let filter = WatchFilter(
                resource: entry.type.plural,
                namespace: namespace,
                selector: try self.selector(request),
                node: try self.node(request)
            )
            let param = request.query["resourceVersion"] ?? ""
            let after = param.isEmpty || param == "0" ? nil : try Self.version(param)
            return (filter, after, entry.type.kind)
        case .watch:
            let named = Self.watchedResources(request)
            guard !named.isEmpty else {
                throw Status.badRequest(
                    "name the kinds to watch: /apis/mesh.edge/v1/watch?resources=services,endpoints"
                )
            }
            if let unknown = named.first(where: { Registry.byPlural($0) == nil }) {
                throw Status.badRequest(APIRoute.noSuchResource(unknown))
            }
            guard let param = request.query["resourceVersion"], !param.isEmpty else {
                throw Status.badRequest(
                    "a watch over several kinds starts after a resourceVersion: list each kind, then watch from the smallest list version"
                )
            }
            let filter = WatchFilter(
                resources: named,
                selector: try self.selector(request),
                node: try self.node(request)
            )
            return (filter, try Self.version(param), Self.multiWatchBookmarkKind)
        default:
            return nil
        }
    }

    /// A watch from a version the store's hub holds, started on the connection's event loop: no task, so no
    /// task's stack slabs freed around the watch's long-lived objects (a fleet's watches start in a storm).
    /// Nil (the task path answers) when the GET (`respondAtOnce` checked the method) is not such a watch, is
    /// refused, or has a bad parameter.
    private func watchAtOnce(_ request: HTTPRequest, _ route: APIRoute) -> HTTPResponse? {
        guard let start = try? self.watchStart(route, request), let after = start.after,
            self.verdict(request) == .allow,
            let subscription = try? self.store.watchAtOnce(after: after, filter: start.filter)
        else { return nil }
        guard
            let response = try? self.stream(
                subscription,
                request,
                first: ByteBuffer(),
                bookmarkKind: start.bookmarkKind
            )
        else { return nil }
        let resource = route.resourceLabel
        self.answered(
            request,
            response,
            verb: "watch",
            resource: resource,
            since: .now,
            metrics: self.startedWatchMetrics(resource)
        )
        return response
    }

    /// A started watch's metrics for `resource`, made once (a node's watch starts again at each of its beats; a
    /// metric made per request is a lookup in the registry under its lock).
    private func startedWatchMetrics(_ resource: String) -> RequestMetrics {
        self.watchMetrics.withLock { made in
            if let m = made[resource] { return m }
            let m = RequestMetrics(verb: "watch", resource: resource, code: 200)
            made[resource] = m
            return m
        }
    }

    /// The plurals in a request's `resources` parameter (comma-separated; empty parts skipped).
    static func watchedResources(_ request: HTTPRequest) -> [String] {
        (request.query["resources"] ?? "").split(separator: ",").compactMap { name in
            // Spaces around a name are ignored (a watch restarts at every beat: no Foundation trimming).
            let trimmed = name.drop { $0 == " " || $0 == "\t" }.reversed().drop { $0 == " " || $0 == "\t" }
            return trimmed.isEmpty ? nil : String(trimmed.reversed())
        }
    }

    /// A `resourceVersion` parameter as a number (400 when it is not one).
    static func version(_ param: String) throws -> Int64 {
        guard let rv = Int64(param), rv >= 0 else {
            throw Status.badRequest("resourceVersion \"\(param)\" is not a decimal number")
        }
        return rv
    }

    /// The streaming answer of a watch: `first`, then the subscription's lines until it ends, the client
    /// goes, `timeoutSeconds` pass, or the client's certificate is revoked.
    private func stream(
        _ subscription: WatchSubscription,
        _ request: HTTPRequest,
        first: ByteBuffer,
        bookmarkKind kind: String
    ) throws -> HTTPResponse {
        var timeout: TimeAmount?
        if let t = request.query["timeoutSeconds"] {
            guard let seconds = Int64(t), seconds > 0 else {
                subscription.cancel()
                throw Status.badRequest("timeoutSeconds must be a positive number")
            }
            // Capped at 136 years, so that the nanoseconds fit.
            timeout = .seconds(min(seconds, 1 << 32))
        }
        Gauge(label: "mesh_control_watchers").record(self.watcherCount)
        return HTTPResponse(
            status: .ok,
            headers: ["Content-Type": "application/json"],
            body: .push(
                WatchPush(
                    subscription,
                    first: first,
                    kind: kind,
                    timeout: timeout,
                    revoked: self.credentials.revocationCheck(request),
                    watcher: request.peerIdentity ?? "?",
                    logger: self.logger
                )
            )
        )
    }

    var watcherCount: Int {
        (self.store as? SQLiteStore)?.hub.subscriberCount ?? (self.store as? EtcdStore)?.hub.subscriberCount ?? 0
    }

    // MARK: writes

    /// A request's body decoded as the kind `T` and written.
    private func save<T: ControlManaged>(
        _ kind: T.Type,
        _ request: HTTPRequest,
        namespace: String?,
        urlName: String?,
        createOnly: Bool
    ) async throws -> HTTPResponse {
        let body = try Self.jsonBody(request, what: "the object")
        let object: T
        do {
            let value = try JSONValue.parse(json: body)
            guard case .object = value else {
                throw ManifestError("the body must be a JSON object, not a \(value.typeName)")
            }
            if let k = value["kind"]?.stringValue, k != T.resource.kind {
                throw ManifestError(
                    "kind \"\(k)\" does not belong under /\(T.resource.plural) (expected \(T.resource.kind))"
                )
            }
            object = try ObjectWriter.decode(T.self, value)
        } catch let e as ManifestError {
            throw Status.badRequest(e.message)
        } catch let e as ValidationError {
            throw Status.invalid(e)
        }
        if let device = object as? Device {
            try await self.writer.checkAgainstModel(device, namespace: namespace ?? "default")
        }
        return try await self.writer.save(
            object,
            namespace: namespace,
            urlName: urlName,
            createOnly: createOnly,
            writer: request.peerIdentity
        )
    }

}

extension HTTPResponse {
    init(status: HTTPResponseStatus, headers: HTTPHeaders, body: () -> Body) {
        self.init(status: status, headers: headers, body: body())
    }
}

/// A watch's body, written by its connection's event loop as changes come (no task waits beside an idle
/// watch): `first`, then the subscription's lines until it ends, the client goes, `timeoutSeconds` pass, or
/// the client's certificate is revoked.
final class WatchPush: HTTPEventSource {
    private struct State {
        var first: ByteBuffer?
        var timer: Scheduled<Void>?
        var ended = false
    }

    private let subscription: WatchSubscription
    private let kind: String
    private let timeout: TimeAmount?
    private let revoked: @Sendable () -> Bool
    private let watcher: String
    private let logger: Logger
    private let state: Mutex<State>

    init(
        _ subscription: WatchSubscription,
        first: ByteBuffer,
        kind: String,
        timeout: TimeAmount?,
        revoked: @escaping @Sendable () -> Bool,
        watcher: String,
        logger: Logger
    ) {
        self.subscription = subscription
        self.kind = kind
        self.timeout = timeout
        self.revoked = revoked
        self.watcher = watcher
        self.logger = logger
        self.state = Mutex(State(first: first.readableBytes > 0 ? first : nil))
    }

    func start(eventLoop: any EventLoop, wake: @escaping @Sendable () -> Void) {
        if let timeout {
            // On the connection's event loop: a scheduled task costs a few bytes.
            let subscription = self.subscription
            let timer = eventLoop.scheduleTask(in: timeout) { subscription.cancel() }
            self.state.withLock { $0.timer = timer }
        }
        self.subscription.onReady(wake)
    }

    func take() -> HTTPPushed {
        if let first = self.state.withLock({ s -> ByteBuffer? in
            defer { s.first = nil }
            return s.first
        }) {
            return .data(first)
        }
        switch self.subscription.take(kind: self.kind) {
        case .lines(let chunk):
            // A certificate revoked while it watches: the stream ends at the next event or bookmark, and the
            // client's next request is refused.
            if self.revoked() {
                self.logger.notice(
                    "ended a watch on \(self.subscription.filter.resource) by \(self.watcher): its certificate is revoked"
                )
                self.end()
                return .end
            }
            return .data(chunk)
        case .nothing:
            return .nothing
        case .ended:
            self.end()
            return .end
        }
    }

    func stop() {
        self.subscription.cancel()
    }

    /// Once: cancels the timer and the subscription, and says why the watch ended if it fell behind.
    private func end() {
        let (first, timer) = self.state.withLock { s in
            defer {
                s.ended = true
                s.timer = nil
            }
            return (!s.ended, s.timer)
        }
        guard first else { return }
        timer?.cancel()
        self.subscription.cancel()
        if self.subscription.overflowed {
            self.logger.warning(
                "ended a watch on \(self.subscription.filter.resource) that fell too far behind; the client resumes from its last version"
            )
        }
    }
}

/// A beat's answer, byte for byte as `MeshJSON.encode` writes it (sorted keys), made from a template encoded once
/// per grace period: a node's name (a DNS subdomain) and an RFC 3339 time need no escaping. Anything else goes
/// through the encoder.
final class BeatAnswers: Sendable {
    private struct Template {
        var grace: Double
        /// Before the name, between the name and the time, after the time.
        var parts: [[UInt8]]
    }
    private let template = Mutex<Template?>(nil)
    private static let name = "@NODE@"
    private static let time = "@TIME@"

    func encode(_ beat: NodeHeartbeat) -> ByteBuffer {
        guard beat.phase == .ready, beat.apiVersion == meshAPIVersion, beat.kind == "NodeHeartbeat",
            Self.plain(beat.nodeName), Self.plain(beat.time), let parts = self.parts(beat.gracePeriodSeconds)
        else { return ControlAPI.encode(beat) }
        var out = ByteBuffer()
        out.reserveCapacity(parts[0].count + parts[1].count + parts[2].count + beat.nodeName.utf8.count + 32)
        out.writeBytes(parts[0])
        out.writeString(beat.nodeName)
        out.writeBytes(parts[1])
        out.writeString(beat.time)
        out.writeBytes(parts[2])
        return out
    }

    /// Letters, digits and `-.:+` only: nothing JSON escapes.
    static func plain(_ text: String) -> Bool {
        text.utf8.allSatisfy { c in
            (c >= 0x61 && c <= 0x7A) || (c >= 0x41 && c <= 0x5A) || (c >= 0x30 && c <= 0x39) || c == 0x2D
                || c == 0x2E || c == 0x3A || c == 0x2B
        }
    }

    private func parts(_ grace: Double) -> [[UInt8]]? {
        if let t = self.template.withLock({ $0 }), t.grace == grace { return t.parts }
        let sample = NodeHeartbeat(nodeName: Self.name, time: Self.time, phase: .ready, gracePeriodSeconds: grace)
        let text = String(buffer: ControlAPI.encode(sample))
        let byName = text.components(separatedBy: Self.name)
        guard byName.count == 2 else { return nil }
        let byTime = byName[1].components(separatedBy: Self.time)
        guard byTime.count == 2 else { return nil }
        let parts = [Array(byName[0].utf8), Array(byTime[0].utf8), Array(byTime[1].utf8)]
        self.template.withLock { $0 = Template(grace: grace, parts: parts) }
        return parts
    }
}
