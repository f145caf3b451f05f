import Foundation
import Logging
import MeshCore
import MeshHTTP
import MeshIdentity
import Metrics
import NIOCore
import NIOHTTP1

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
    public static let version = "0.1.0"
    /// Where nodes enrol (no client certificate needed).
    public static let joinPath = "/apis/mesh.edge/v1/join"
    /// Join tokens (admin only).
    public static let tokensPath = "/apis/mesh.edge/v1/bootstraptokens"

    /// `ca`: the CA that signs joining nodes' CSRs (nil: joins are refused with 503).
    public init(
        store: any Store,
        vips: VIPAllocator,
        logger: Logger,
        ca: CertificateAuthority? = nil,
        caPEM: String = "",
        lifecycle: NodeLifecycle? = nil,
        nodeCertificateValidity: TimeInterval = CertificateAuthority.leafValidity,
        limiter: WriteRateLimiter? = nil,
        isReady: @escaping @Sendable () -> (Bool, String) = { (true, "ok") }
    ) {
        self.lifecycle = lifecycle
        self.limiter = limiter
        self.store = store
        self.vips = vips
        self.logger = logger
        self.ca = ca
        self.caPEM = caPEM
        self.tokens = BootstrapTokenStore(store: store)
        self.credentials = NodeCredentials(store: store, revoked: RevokedSerials(), validity: nodeCertificateValidity)
        self.health = HealthEndpoints(isReady: isReady)
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

    public func respond(to request: HTTPRequest) async -> HTTPResponse {
        let verdict: Authorization.Decision
        if !Authorization.isPublic(request), let revoked = self.credentials.denial(request) {
            verdict = .deny(revoked)
        } else {
            verdict = Authorization.decide(request)
        }
        if case .deny(let status) = verdict {
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
        if let security = await self.routeSecurity(request) {
            routed = security
        } else if let credentials = await self.routeCredentials(request) {
            routed = credentials
        } else {
            routed = await self.route(request)
        }
        let (response, verb, resource) = routed
        let code = Int(response.status.code)
        Counter(
            label: "mesh_control_requests_total",
            dimensions: [("verb", verb), ("resource", resource), ("code", "\(code)")]
        )
        .increment()
        if verb != "watch" {
            Metrics.Timer(label: "mesh_control_request_duration_seconds", dimensions: [("verb", verb)])
                .record(duration: ContinuousClock.now - start)
        }
        if code >= 500 {
            self.logger.error("\(request.method) \(request.uri) -> \(code)")
        } else {
            self.logger.debug("\(request.method) \(request.uri) -> \(code)")
        }
        return response
    }

    // MARK: join and tokens

    /// The join and token paths; nil for any other path.
    private func routeSecurity(_ request: HTTPRequest) async -> (HTTPResponse, String, String)? {
        let path = request.path
        let tokenID: String?
        if path == Self.joinPath {
            tokenID = nil
        } else if path == Self.tokensPath || path == Self.tokensPath + "/" {
            tokenID = ""
        } else if path.hasPrefix(Self.tokensPath + "/") {
            tokenID = String(path.dropFirst(Self.tokensPath.count + 1))
        } else {
            return nil
        }
        let resource = tokenID == nil ? "join" : BootstrapTokenStore.resource
        do {
            switch (request.method, tokenID) {
            case (.POST, nil):
                return (try await self.join(request), "create", resource)
            case (.POST, ""):
                guard let ca = self.ca else { throw Self.noCA }
                let wanted = try Self.decodeStrict(BootstrapTokenRequest.self, request)
                let created = try await self.tokens.create(wanted, caHash: ca.hash)
                return (.json(.created, Self.encode(created)), "create", resource)
            case (.GET, ""):
                return (
                    .json(.ok, Self.encode(BootstrapTokenList(items: try await self.tokens.list()))), "list", resource
                )
            case (.DELETE, .some(let id)) where !id.isEmpty:
                return (.json(.ok, Self.encode(try await self.tokens.delete(id))), "delete", resource)
            default:
                let allowed = tokenID == nil ? "POST" : (tokenID!.isEmpty ? "GET, POST" : "DELETE")
                var r = Self.respond(
                    Status(
                        code: 405,
                        reason: .methodNotAllowed,
                        message: "\(request.method) is not allowed here (allowed: \(allowed))"
                    )
                )
                r.headers.add(name: "Allow", value: allowed)
                return (r, "unknown", resource)
            }
        } catch let status as Status {
            return (Self.respond(status), Self.verb(request, name: tokenID), resource)
        } catch let e as StoreError {
            let status = Status(code: 503, reason: .serviceUnavailable, message: e.description)
            return (Self.respond(status), Self.verb(request, name: tokenID), resource)
        } catch {
            self.logger.error("\(request.method) \(request.uri) failed: \(error)")
            let status = Status(code: 500, reason: .internalError, message: "internal error: \(error)")
            return (Self.respond(status), Self.verb(request, name: tokenID), resource)
        }
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

    // MARK: routing

    private func route(_ request: HTTPRequest) async -> (HTTPResponse, String, String) {
        let segments = request.path.split(separator: "/", omittingEmptySubsequences: true).map(String.init)
        if segments == ["version"] {
            return (
                .json(.ok, ControlAPI.encode(["version": ControlAPI.version, "apiVersion": meshAPIVersion])), "get", ""
            )
        }
        guard segments.count >= 3, segments[0] == "apis", segments[1] == "mesh.edge", segments[2] == "v1" else {
            let status = Status(
                code: 404,
                reason: .notFound,
                message: "no such path \(request.path): the API is under /apis/mesh.edge/v1"
            )
            return (Self.respond(status), "unknown", "")
        }
        var rest = Array(segments.dropFirst(3))
        if rest.isEmpty {
            return (self.discovery(), "get", "")
        }
        var namespace: String?
        if rest[0] == "namespaces", rest.count >= 3 {
            namespace = rest[1]
            rest.removeFirst(2)
        }
        guard let entry = Registry.byPlural(rest[0]) else {
            let status = Status(
                code: 404,
                reason: .notFound,
                message:
                    "the server has no resource \"\(rest[0])\" (it has \(Registry.types.map(\.plural).joined(separator: ", ")))"
            )
            return (Self.respond(status), "unknown", rest[0])
        }
        let type = entry.type
        if let ns = namespace, let e = Names.dns1123LabelError(ns) {
            return (Self.respond(.badRequest("namespace \"\(ns)\" is invalid: \(e)")), "unknown", type.plural)
        }
        if namespace != nil && !type.namespaced {
            return (
                Self.respond(.badRequest("\(type.plural) are not namespaced: use /apis/mesh.edge/v1/\(type.plural)")),
                "unknown", type.plural
            )
        }
        let name = rest.count >= 2 ? rest[1] : nil
        if rest.count == 3, rest[2] == "heartbeat", type.plural == Node.resource.plural, let node = name {
            return (
                await self.heartbeat(request, node: node), request.method == .POST ? "heartbeat" : "unknown", "nodes"
            )
        }
        if rest.count > 2 {
            return (
                Self.respond(Status(code: 404, reason: .notFound, message: "no such path \(request.path)")), "unknown",
                type.plural
            )
        }
        if name != nil && type.namespaced && namespace == nil {
            return (
                Self.respond(
                    .badRequest(
                        "\(type.plural) are namespaced: use /apis/mesh.edge/v1/namespaces/{namespace}/\(type.plural)/\(name!)"
                    )
                ),
                "unknown", type.plural
            )
        }
        let ns = type.namespaced ? namespace : ""
        do {
            switch (request.method, name) {
            case (.GET, nil):
                if ["true", "1"].contains(request.query["watch"] ?? "") {
                    return (try await self.watch(entry, namespace: ns, request), "watch", type.plural)
                }
                return (try await self.list(entry, namespace: ns, request), "list", type.plural)
            case (.GET, .some(let n)):
                return (try await self.get(entry, namespace: ns!, name: n), "get", type.plural)
            case (.PUT, .some(let n)):
                return (
                    try await self.save(entry, namespace: ns, urlName: n, request, createOnly: false), "update",
                    type.plural
                )
            case (.POST, nil):
                return (
                    try await self.save(entry, namespace: ns, urlName: nil, request, createOnly: true), "create",
                    type.plural
                )
            case (.DELETE, .some(let n)):
                return (try await self.delete(entry, namespace: ns!, name: n), "delete", type.plural)
            default:
                let allowed = name == nil ? "GET, POST" : "GET, PUT, DELETE"
                let status = Status(
                    code: 405,
                    reason: .methodNotAllowed,
                    message: "\(request.method) is not allowed here (allowed: \(allowed))"
                )
                var r = Self.respond(status)
                r.headers.add(name: "Allow", value: allowed)
                return (r, "unknown", type.plural)
            }
        } catch let status as Status {
            return (Self.respond(status), Self.verb(request, name: name), type.plural)
        } catch let e as StoreError {
            return (Self.respond(self.status(for: e, type)), Self.verb(request, name: name), type.plural)
        } catch {
            self.logger.error("\(request.method) \(request.uri) failed: \(error)")
            let status = Status(code: 500, reason: .internalError, message: "internal error: \(error)")
            return (Self.respond(status), Self.verb(request, name: name), type.plural)
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

    private func status(for error: StoreError, _ type: ResourceType) -> Status {
        switch error {
        case .notFound(let k): return .notFound(type, k.name, namespace: k.namespace)
        case .alreadyExists(let k):
            return Status(
                code: 409,
                reason: .alreadyExists,
                message: "\(type.singular) \"\(k.name)\" already exists",
                details: .init(name: k.name, kind: type.plural)
            )
        case .conflict(let k, let current):
            let why = current.map { "it is now at resourceVersion \($0)" } ?? "it no longer exists"
            return .conflict(
                "Operation cannot be fulfilled on \(type.plural) \"\(k.name)\": the object has been modified (\(why)); read it again and retry"
            )
        case .reserved(let token, let owner):
            return Status(code: 409, reason: .conflict, message: "\(token) is already taken by \(owner)")
        case .gone, .tooNew: return .gone(error.description)
        case .unavailable(let why): return Status(code: 503, reason: .serviceUnavailable, message: why)
        }
    }

    // MARK: node heartbeats

    private func heartbeat(_ request: HTTPRequest, node: String) async -> HTTPResponse {
        guard request.method == .POST else {
            var r = Self.respond(
                Status(
                    code: 405,
                    reason: .methodNotAllowed,
                    message: "\(request.method) is not allowed here (allowed: POST)"
                )
            )
            r.headers.add(name: "Allow", value: "POST")
            return r
        }
        guard let lifecycle = self.lifecycle else {
            return Self.respond(
                Status(
                    code: 503,
                    reason: .serviceUnavailable,
                    message: "this control plane does not track node heartbeats"
                )
            )
        }
        do {
            return .json(.ok, Self.encode(try await lifecycle.beat(node)))
        } catch let status as Status {
            return Self.respond(status)
        } catch let e as StoreError {
            return Self.respond(self.status(for: e, Node.resource))
        } catch {
            self.logger.error("heartbeat of \(node) failed: \(error)")
            return Self.respond(Status(code: 500, reason: .internalError, message: "internal error: \(error)"))
        }
    }

    /// A stored Node's JSON with `status.lastHeartbeatTime` from memory when that is newer: beats
    /// are not written to the object, so reads show the live time (watch events carry the time of
    /// the last phase change).
    private func withLiveHeartbeat(_ stored: StoredObject) -> ByteBuffer {
        guard stored.key.resource == Node.resource.plural, let lifecycle = self.lifecycle,
            let millis = lifecycle.lastBeat(stored.key.name),
            var node = try? JSONDecoder().decode(Node.self, from: Data(stored.json.readableBytesView))
        else { return stored.json }
        let live = NodeLifecycle.format(millis)
        let kept = node.status?.lastHeartbeatTime.flatMap(Timestamp.parse) ?? 0
        guard Int(millis / 1000) > kept else { return stored.json }
        var status = node.status ?? NodeStatus()
        status.lastHeartbeatTime = live
        node.status = status
        return Self.encode(node)
    }

    /// The status a Node gets when written through the API: the control plane owns it, so the
    /// body's status is ignored; a node writing itself counts as a heartbeat (Ready).
    private func nodeStatus(_ node: Node, existing: Node?, writer: String?) -> (NodeStatus?, beat: Bool) {
        let selfWrite: Bool
        if case .node(let n) = writer.flatMap({ MeshIdentity(uri: $0) }), n == node.metadata.name {
            selfWrite = true
        } else {
            selfWrite = false
        }
        guard self.lifecycle != nil else { return (node.status, false) }
        if selfWrite {
            if let s = existing?.status, s.phase == .ready { return (s, true) }
            let now = Timestamp.now()
            return (NodeStatus(phase: .ready, lastHeartbeatTime: now, message: "heartbeating since \(now)"), true)
        }
        if let e = existing { return (e.status, false) }
        return (NodeStatus(phase: .unknown, message: "waiting for the node's first heartbeat"), false)
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

    private func get(_ entry: Registry.Entry, namespace: String, name: String) async throws -> HTTPResponse {
        let key = ObjectKey(resource: entry.type.plural, namespace: namespace, name: name)
        guard let object = try await self.store.get(key) else {
            throw Status.notFound(entry.type, name, namespace: namespace)
        }
        return .json(.ok, self.withLiveHeartbeat(object))
    }

    private func list(_ entry: Registry.Entry, namespace: String?, _ request: HTTPRequest) async throws -> HTTPResponse
    {
        let selector = try self.selector(request)
        let (items, rv) = try await self.store.list(resource: entry.type.plural, namespace: namespace)
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
        let filter = WatchFilter(
            resource: entry.type.plural,
            namespace: namespace,
            selector: try self.selector(request)
        )
        let param = request.query["resourceVersion"] ?? ""
        var initial = ByteBuffer()
        let subscription: WatchSubscription
        if param.isEmpty || param == "0" {
            // No version: the current objects as ADDED events, then every change after that list.
            let (items, rv) = try await self.store.list(resource: entry.type.plural, namespace: namespace)
            for item in items where filter.matches(item) {
                var line = WatchHub.line(for: StoreEvent(kind: .added, object: item))
                initial.writeBuffer(&line)
            }
            subscription = try self.store.watch(after: rv, filter: filter)
        } else {
            guard let rv = Int64(param), rv >= 0 else {
                throw Status.badRequest("resourceVersion \"\(param)\" is not a decimal number")
            }
            subscription = try self.store.watch(after: rv, filter: filter)
        }
        var timeout: Duration?
        if let t = request.query["timeoutSeconds"] {
            guard let seconds = Int(t), seconds > 0 else {
                throw Status.badRequest("timeoutSeconds must be a positive number")
            }
            timeout = .seconds(seconds)
        }
        let kind = entry.type.kind
        let logger = self.logger
        let credentials = self.credentials
        let (firstLines, limit) = (initial, timeout)
        Gauge(label: "mesh_control_watchers").record(self.watcherCount)
        return HTTPResponse(status: .ok, headers: ["Content-Type": "application/json"]) {
            .stream { writer in
                defer { subscription.cancel() }
                writer.clientClosed.whenComplete { _ in subscription.cancel() }
                let timer = limit.map { t in
                    Task {
                        try await Task.sleep(for: t)
                        subscription.cancel()
                    }
                }
                defer { timer?.cancel() }
                if firstLines.readableBytes > 0 { try await writer.write(firstLines) }
                while let chunk = await subscription.next(kind: kind) {
                    // A certificate revoked while it watches: the stream ends at the next event or
                    // bookmark, and the client's next request is refused.
                    if credentials.denial(request) != nil {
                        logger.notice(
                            "ended a watch on \(filter.resource) by \(request.peerIdentity ?? "?"): its certificate is revoked"
                        )
                        return
                    }
                    try await writer.write(chunk)
                }
                if subscription.overflowed {
                    logger.warning(
                        "ended a watch on \(filter.resource) that fell too far behind; the client resumes from its last version"
                    )
                }
            }
        }
    }

    var watcherCount: Int { (self.store as? SQLiteStore)?.hub.subscriberCount ?? 0 }

    // MARK: writes

    private func decodeBody(_ entry: Registry.Entry, _ request: HTTPRequest) throws -> any MeshObject {
        let body = try Self.jsonBody(request, what: "the object")
        do {
            let value = try JSONValue.parse(json: body)
            guard case .object = value else {
                throw ManifestError("the body must be a JSON object, not a \(value.typeName)")
            }
            if let kind = value["kind"]?.stringValue, kind != entry.type.kind {
                throw ManifestError(
                    "kind \"\(kind)\" does not belong under /\(entry.type.plural) (expected \(entry.type.kind))"
                )
            }
            let object = try entry.decode(value)
            try object.validate()
            return object
        } catch let e as ManifestError {
            throw Status.badRequest(e.message)
        } catch let e as ValidationError {
            throw Status.invalid(e)
        }
    }

    private func save(
        _ entry: Registry.Entry,
        namespace: String?,
        urlName: String?,
        _ request: HTTPRequest,
        createOnly: Bool
    ) async throws -> HTTPResponse {
        let object = try self.decodeBody(entry, request)
        return try await self.save(
            object,
            namespace: namespace,
            urlName: urlName,
            createOnly: createOnly,
            writer: request.peerIdentity
        )
    }

    func save<T: MeshObject>(
        _ input: T,
        namespace: String?,
        urlName: String?,
        createOnly: Bool,
        writer: String?
    ) async throws -> HTTPResponse {
        var object = input
        let type = T.resource
        if let n = urlName, n != object.metadata.name {
            throw Status.badRequest(
                "metadata.name \"\(object.metadata.name)\" does not match the name in the URL (\"\(n)\")"
            )
        }
        if type.namespaced {
            let ns = namespace ?? object.metadata.namespace ?? "default"
            if let bodyNS = object.metadata.namespace, bodyNS != ns {
                throw Status.badRequest(
                    "metadata.namespace \"\(bodyNS)\" does not match the namespace in the URL (\"\(ns)\")"
                )
            }
            object.metadata.namespace = ns
        } else {
            object.metadata.namespace = nil
        }
        let key = ObjectKey(resource: type.plural, namespace: object.effectiveNamespace, name: object.metadata.name)
        let wanted = object.metadata.version
        var proposed = Set<IPAddress>()
        for _ in 0..<16 {
            let existingStored = try await self.store.get(key)
            if createOnly, existingStored != nil { throw StoreError.alreadyExists(key) }
            let expect: Precondition
            if let w = wanted {
                guard let e = existingStored else { throw StoreError.conflict(key, current: nil) }
                guard e.resourceVersion == w else { throw StoreError.conflict(key, current: e.resourceVersion) }
                expect = .version(w)
            } else {
                expect = existingStored.map { .version($0.resourceVersion) } ?? .absent
            }
            let existing = try existingStored.map {
                try JSONDecoder().decode(T.self, from: Data($0.json.readableBytesView))
            }
            var prepared = object
            prepared.metadata.uid = existing?.metadata.uid ?? UUID().uuidString.lowercased()
            prepared.metadata.creationTimestamp = existing?.metadata.creationTimestamp ?? Timestamp.now()
            var reserve: [String] = []
            var vip: IPAddress?
            if var service = prepared as? Service {
                vip = try self.assignVIP(&service, existing: existing as? Service, proposed: &proposed)
                if let ip = vip { reserve.append(VIPAllocator.token(ip)) }
                prepared = service as! T
            }
            var beat = false
            if var node = prepared as? Node {
                (node.status, beat) = self.nodeStatus(node, existing: existing as? Node, writer: writer)
                prepared = node as! T
            }
            if let e = existing, let stored = existingStored {
                // Writing what is already there changes nothing: no new version, no watch event.
                var same = prepared
                same.metadata.resourceVersion = e.metadata.resourceVersion
                if same == e {
                    if let node = same as? Node {
                        self.lifecycle?.observed(node.metadata.name, phase: node.status?.phase, beat: beat)
                    }
                    var r = HTTPResponse.json(.ok, stored.json)
                    r.headers.add(name: "X-Mesh-Result", value: "unchanged")
                    return r
                }
            }
            let final = prepared
            let write = Write(
                key: key,
                expect: expect,
                operation: .put { rv in
                    var o = final
                    o.metadata.resourceVersion = String(rv)
                    return (ControlAPI.encode(o), o.metadata.labels ?? [:])
                },
                reserve: reserve
            )
            do {
                let stored = try await self.store.commit(write)
                if let ip = vip { self.vips.markUsed(ip) }
                if let node = final as? Node {
                    self.lifecycle?.observed(node.metadata.name, phase: node.status?.phase, beat: beat)
                }
                return .json(existingStored == nil ? .created : .ok, stored.json)
            } catch StoreError.conflict(_, let current) where wanted == nil {
                self.logger.debug(
                    "\(key) changed under an unconditional write (now \(current.map(String.init) ?? "gone")); retrying"
                )
                continue
            } catch StoreError.reserved(let token, let owner) where vip != nil && token == VIPAllocator.token(vip!) {
                if input is Service, (input as! Service).spec.clusterIP != nil {
                    throw Status.invalid(
                        ValidationError(
                            kind: type.kind,
                            name: object.metadata.name,
                            fields: [FieldError("spec.clusterIP", "\(vip!) is already allocated to \(owner)")]
                        )
                    )
                }
                self.vips.markUsed(vip!)
                continue
            }
        }
        throw Status(code: 409, reason: .conflict, message: "\(key) is changing too fast to write; retry")
    }

    /// Keeps, checks or allocates the service's VIP. Returns the VIP to reserve, if any.
    private func assignVIP(
        _ service: inout Service,
        existing: Service?,
        proposed: inout Set<IPAddress>
    ) throws -> IPAddress? {
        let name = service.metadata.name
        let invalid = { (message: String) -> Status in
            Status.invalid(
                ValidationError(kind: "Service", name: name, fields: [FieldError("spec.clusterIP", message)])
            )
        }
        if let old = existing {
            guard let requested = service.spec.clusterIP else {
                service.spec.clusterIP = old.spec.clusterIP
                service.spec.ipFamily = old.spec.ipFamily
                return old.spec.vip
            }
            if requested != old.spec.clusterIP {
                throw invalid(
                    "field is immutable: it is \(old.spec.clusterIP ?? "unset"); delete and recreate the service to change it"
                )
            }
            if service.spec.ipFamily == nil { service.spec.ipFamily = old.spec.ipFamily }
            return old.spec.vip
        }
        if service.spec.isHeadless { return nil }
        if let ip = service.spec.vip {
            if let why = self.vips.rejection(of: ip) { throw invalid(why) }
            service.spec.ipFamily = ip.isIPv4 ? .ipv4 : .ipv6
            return ip
        }
        let family = service.spec.ipFamily ?? .ipv4
        guard self.vips.cidr(for: family) != nil else {
            throw Status.invalid(
                ValidationError(
                    kind: "Service",
                    name: service.metadata.name,
                    fields: [FieldError("spec.ipFamily", "no service CIDR of family \(family.rawValue) is configured")]
                )
            )
        }
        guard let ip = self.vips.propose(family: family) else {
            throw Status(
                code: 500,
                reason: .internalError,
                message:
                    "no free VIP left in \(self.vips.cidr(for: family)!): delete unused services or widen serviceCIDRs"
            )
        }
        proposed.insert(ip)
        service.spec.clusterIP = ip.description
        service.spec.ipFamily = family
        return ip
    }

    private func delete(_ entry: Registry.Entry, namespace: String, name: String) async throws -> HTTPResponse {
        let key = ObjectKey(resource: entry.type.plural, namespace: namespace, name: name)
        for _ in 0..<16 {
            guard let existing = try await self.store.get(key) else {
                throw Status.notFound(entry.type, name, namespace: namespace)
            }
            let value = try JSONValue.parse(json: Data(existing.json.readableBytesView))
            let object = try entry.decode(value)
            let write = Write(
                key: key,
                expect: .version(existing.resourceVersion),
                operation: .delete { rv in Self.stamp(object, rv) }
            )
            do {
                let final = try await self.store.commit(write)
                if let service = object as? Service, let ip = service.spec.vip { self.vips.markFree(ip) }
                if object is Node { self.lifecycle?.deleted(name) }
                return .json(.ok, final.json)
            } catch StoreError.conflict {
                continue
            }
        }
        throw Status(code: 409, reason: .conflict, message: "\(key) is changing too fast to delete; retry")
    }

    private static func stamp<T: MeshObject>(_ object: T, _ rv: Int64) -> ByteBuffer {
        var o = object
        o.metadata.resourceVersion = String(rv)
        return ControlAPI.encode(o)
    }
}

extension HTTPResponse {
    init(status: HTTPResponseStatus, headers: HTTPHeaders, body: () -> Body) {
        self.init(status: status, headers: headers, body: body())
    }
}
