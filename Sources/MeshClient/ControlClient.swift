import MeshCore
import MeshHTTP
import NIOCore
import NIOHTTP1

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// The control API from a client's side: typed CRUD, raw JSON access for tools, and watch.
/// API errors are thrown as the server's `Status`; transport failures as `HTTPClientError`.
public struct ControlClient: Sendable {
    public var http: HTTPClient
    /// When set, `raw` (and so every typed call but `watch`) goes over this one kept-alive
    /// connection instead of a connection per request; see `keepingAlive()`.
    public var session: HTTPKeepAliveClient?
    /// Watches go over `session` too (see `carryingWatches()`).
    public var watchesOverSession = false

    /// `tls` is required for an `https` endpoint (the control API is HTTPS only).
    public init(endpoint: HTTPEndpoint, tls: HTTPClientTLS? = nil) {
        self.http = HTTPClient(endpoint: endpoint, tls: tls)
    }

    public var endpoint: HTTPEndpoint { self.http.endpoint }

    /// Other replicas of the control plane (their URLs), tried in turn by `failingOver()` when this
    /// one cannot be reached. Empty: one control plane (or one address behind a load balancer).
    public var alternates: [HTTPEndpoint] = []

    /// A client of every replica in `endpoints`, talking to the first until it fails over.
    public init(endpoints: [HTTPEndpoint], tls: HTTPClientTLS? = nil) {
        precondition(!endpoints.isEmpty, "a control client needs at least one endpoint")
        self.init(endpoint: endpoints[0], tls: tls)
        self.alternates = Array(endpoints.dropFirst())
    }

    /// The same client on the next replica (the current one goes last), or nil with no alternates.
    /// A kept-alive session moves too, for every client sharing it (`HTTPKeepAliveClient.move(to:)`): a node's
    /// watch, beats and reports stay on one connection after a fail-over.
    public func failingOver() -> ControlClient? {
        guard let next = self.alternates.first else { return nil }
        var c = self
        c.alternates = Array(self.alternates.dropFirst()) + [self.http.endpoint]
        c.http.endpoint = next
        self.session?.move(to: next)
        return c
    }

    /// This client with its requests (not its watches) on one kept-alive connection: for a caller
    /// that talks to the control plane every few seconds forever (a node's heartbeat), where a TLS
    /// handshake per request would cost both sides more than the request itself.
    /// A client that keeps alive already is returned as it is, so that components handed one client share
    /// its connection.
    public func keepingAlive() -> ControlClient {
        if self.session != nil { return self }
        var c = self
        c.session = HTTPKeepAliveClient(self.http)
        return c
    }

    /// This client with its requests and its watch on one kept-alive connection: a node's whole conversation
    /// with the control plane on one connection. A request sent while the watch runs goes behind it; the
    /// control plane ends the watch for it and answers it, and the watch resumes from its last version
    /// (`HTTPKeepAliveClient`). For one watcher per connection: two watches on one would end each other.
    public func carryingWatches() -> ControlClient {
        var c = self.keepingAlive()
        c.watchesOverSession = true
        return c
    }

    /// `/apis/mesh.edge/v1/[namespaces/NS/]PLURAL[/NAME]`; a nil namespace of a namespaced kind means all.
    public static func path(_ type: ResourceType, namespace: String?, name: String? = nil) -> String {
        var p = "/apis/\(meshAPIVersion)"
        if type.namespaced, let ns = namespace { p += "/namespaces/\(HTTPRequest.percentEncode(ns))" }
        p += "/\(type.plural)"
        if let n = name { p += "/\(HTTPRequest.percentEncode(n))" }
        return p
    }

    static func query(_ items: [(String, String?)]) -> String {
        let parts = items.compactMap { k, v in v.map { "\(k)=\(HTTPRequest.percentEncode($0))" } }
        return parts.isEmpty ? "" : "?" + parts.joined(separator: "&")
    }

    // MARK: raw JSON

    /// Sends a request and returns the body of a 2xx answer; throws the `Status` of any other.
    public func raw(
        _ method: HTTPMethod,
        _ path: String,
        body: ByteBuffer? = nil
    ) async throws -> (status: HTTPResponseStatus, body: ByteBuffer) {
        var headers = HTTPHeaders([("Accept", "application/json")])
        if body != nil { headers.add(name: "Content-Type", value: "application/json") }
        var response: HTTPClientResponse
        do {
            if let session = self.session {
                response = try await session.send(method, path, headers: headers, body: body)
            } else {
                response = try await self.http.send(method, path, headers: headers, body: body)
            }
        } catch let error as HTTPClientError where !self.alternates.isEmpty {
            // This replica cannot be reached: the others in turn (a connection each).
            var answered: HTTPClientResponse?
            for alternate in self.alternates {
                var http = self.http
                http.endpoint = alternate
                if let r = try? await http.send(method, path, headers: headers, body: body) {
                    answered = r
                    break
                }
            }
            guard let answered else { throw error }
            response = answered
        }
        guard (200..<300).contains(response.status.code) else {
            throw ControlClient.status(from: response.body, httpStatus: response.status)
        }
        return (response.status, response.body)
    }

    /// The `Status` an error response carries (or one made from its text).
    public static func status(from body: ByteBuffer, httpStatus: HTTPResponseStatus) -> Status {
        if let s = try? JSONDecoder().decode(Status.self, from: Data(body.readableBytesView)) { return s }
        let text = String(String(buffer: body).drop { $0.isWhitespace }.reversed().drop { $0.isWhitespace }.reversed())
        return Status(
            code: Int(httpStatus.code),
            reason: .internalError,
            message: "HTTP \(httpStatus.code) \(httpStatus.reasonPhrase)"
                + (text.isEmpty ? "" : ": \(text.prefix(300))")
        )
    }

    // MARK: typed

    static func decode<T: Decodable>(_ type: T.Type, _ body: ByteBuffer) throws -> T {
        do {
            return try JSONDecoder().decode(T.self, from: Data(body.readableBytesView))
        } catch let e as DecodingError {
            throw HTTPClientError("unexpected answer from the control plane: \(DecodingError.describe(e))")
        }
    }

    public func get<T: MeshObject>(_ type: T.Type, namespace: String? = nil, name: String) async throws -> T {
        let path = Self.path(T.resource, namespace: namespace ?? (T.resource.namespaced ? "default" : nil), name: name)
        return try Self.decode(T.self, try await self.raw(.GET, path).body)
    }

    /// Lists `T` in `namespace` (nil: all namespaces), optionally filtered by a label selector, and for devices
    /// and workloads by the node they are placed on (`node`; other kinds ignore it).
    public func list<T: MeshObject>(
        _ type: T.Type,
        namespace: String? = nil,
        labelSelector: String? = nil,
        node: String? = nil
    ) async throws -> ObjectList<T> {
        let path =
            Self.path(T.resource, namespace: namespace)
            + Self.query([("labelSelector", labelSelector), ("node", node)])
        return try Self.decode(ObjectList<T>.self, try await self.raw(.GET, path).body)
    }

    /// Creates or replaces the object (PUT). With `metadata.resourceVersion` set, only if unchanged since.
    @discardableResult
    public func apply<T: MeshObject>(_ object: T) async throws -> (object: T, created: Bool) {
        let ns = T.resource.namespaced ? (object.metadata.namespace ?? "default") : nil
        let path = Self.path(T.resource, namespace: ns, name: object.metadata.name)
        let body = ByteBuffer(bytes: try MeshJSON.encode(object))
        let (status, answer) = try await self.raw(.PUT, path, body: body)
        return (try Self.decode(T.self, answer), status == .created)
    }

    /// Creates the object (POST); fails with AlreadyExists when it exists.
    @discardableResult
    public func create<T: MeshObject>(_ object: T) async throws -> T {
        let ns = T.resource.namespaced ? (object.metadata.namespace ?? "default") : nil
        let body = ByteBuffer(bytes: try MeshJSON.encode(object))
        return try Self.decode(T.self, try await self.raw(.POST, Self.path(T.resource, namespace: ns), body: body).body)
    }

    /// Deletes the object and returns its final state.
    @discardableResult
    public func delete<T: MeshObject>(_ type: T.Type, namespace: String? = nil, name: String) async throws -> T {
        let path = Self.path(T.resource, namespace: namespace ?? (T.resource.namespaced ? "default" : nil), name: name)
        return try Self.decode(T.self, try await self.raw(.DELETE, path).body)
    }

    // MARK: nodes

    /// Tells the control plane this node is alive (`POST /apis/mesh.edge/v1/nodes/NAME/heartbeat`).
    /// A node that is not registered gets a 404 `Status`; another node's name a 403.
    /// With a `report` (the node's relay), the body carries it; the control plane writes the Node
    /// only when it changes.
    @discardableResult
    public func heartbeat(node name: String, report: NodeHeartbeatReport? = nil) async throws -> NodeHeartbeat {
        let path = Self.path(Node.resource, namespace: nil, name: name) + "/heartbeat"
        guard let report else { return try Self.decode(NodeHeartbeat.self, try await self.raw(.POST, path).body) }
        return try Self.decode(
            NodeHeartbeat.self,
            try await self.raw(.POST, path, body: ByteBuffer(bytes: try MeshJSON.encode(report))).body
        )
    }

    // MARK: watch

    /// Watches `type` after `resourceVersion` (nil: current objects first as ADDED), calling
    /// `onEvent` for each decoded event until it returns false, the server ends the stream, or the
    /// task is cancelled. A version too old to resume throws a `Status` with code 410.
    public func watch<T: MeshObject>(
        _ type: T.Type,
        namespace: String? = nil,
        after resourceVersion: Int64?,
        labelSelector: String? = nil,
        timeoutSeconds: Int? = nil,
        onEvent: (WatchEvent<T>) async throws -> Bool
    ) async throws {
        try await self.watchLines(
            T.resource,
            namespace: namespace,
            after: resourceVersion,
            labelSelector: labelSelector,
            timeoutSeconds: timeoutSeconds
        ) { line in
            try await onEvent(try Self.event(T.self, line))
        }
    }

    /// One watch line decoded as an event of `T`.
    static func event<T: MeshObject>(_ type: T.Type, _ line: ByteBuffer) throws -> WatchEvent<T> {
        do {
            return try JSONDecoder().decode(WatchEvent<T>.self, from: Data(line.readableBytesView))
        } catch let e as DecodingError {
            throw HTTPClientError("malformed watch event from the control plane: \(DecodingError.describe(e))")
        }
    }

    /// Watches and hands each raw event line (JSON, no newline) to `onLine` until it returns false.
    public func watchLines(
        _ type: ResourceType,
        namespace: String?,
        after resourceVersion: Int64?,
        labelSelector: String? = nil,
        node: String? = nil,
        timeoutSeconds: Int? = nil,
        onLine: (ByteBuffer) async throws -> Bool
    ) async throws {
        let path =
            Self.path(type, namespace: namespace)
            + Self.query([
                ("watch", "true"), ("resourceVersion", resourceVersion.map(String.init)),
                ("labelSelector", labelSelector), ("node", node),
                ("timeoutSeconds", timeoutSeconds.map(String.init)),
            ])
        try await self.streamLines(path, onLine: onLine)
    }

    /// The path of one watch over several kinds (`GET /apis/mesh.edge/v1/watch?resources=a,b`); with `node`,
    /// only the devices and workloads placed on that node.
    public static func watchPath(
        _ types: [ResourceType],
        after resourceVersion: Int64,
        node: String? = nil,
        timeoutSeconds: Int?
    ) -> String {
        "/apis/\(meshAPIVersion)/watch"
            + Self.query([
                ("resources", types.map(\.plural).joined(separator: ",")),
                ("resourceVersion", String(resourceVersion)), ("node", node),
                ("timeoutSeconds", timeoutSeconds.map(String.init)),
            ])
    }

    /// Watches several kinds in one stream after `resourceVersion` and hands each raw line to `onLine`
    /// until it returns false. A bookmark counts for every kind. `MultiReflector` is the usual caller.
    public func watchLines(
        _ types: [ResourceType],
        after resourceVersion: Int64,
        node: String? = nil,
        timeoutSeconds: Int? = nil,
        onLine: (ByteBuffer) async throws -> Bool
    ) async throws {
        try await self.streamLines(
            Self.watchPath(types, after: resourceVersion, node: node, timeoutSeconds: timeoutSeconds),
            onLine: onLine
        )
    }

    private func streamLines(_ path: String, onLine: (ByteBuffer) async throws -> Bool) async throws {
        let consume: (HTTPResponseHead, inout ResponseBodyStream) async throws -> Void = { head, body in
            guard head.status == .ok else {
                let bytes = try await body.collect(upTo: 1 << 20)
                throw ControlClient.status(from: bytes, httpStatus: head.status)
            }
            while !Task.isCancelled, let line = try await body.nextLine() {
                if line.readableBytes == 0 { continue }
                if try await !onLine(line) { return }
            }
        }
        if self.watchesOverSession, let session = self.session {
            try await session.stream(.GET, path, headers: ["Accept": "application/json"], consume: consume)
        } else {
            try await self.http.stream(.GET, path, headers: ["Accept": "application/json"], consume: consume)
        }
    }
}
