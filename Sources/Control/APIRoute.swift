import MeshCore

/// Where a request to the control API goes: its path parsed once, purely (no I/O, no store), into one
/// route or a `Status` explaining why there is none (docs/API.md "Paths"). The credential paths
/// (`/revokedcertificates`, `nodes/NAME/revoke`, `nodes/NAME/certificate`) are NodeCredentials' own.
enum APIRoute: Equatable, Sendable {
    case version
    /// `/apis/mesh.edge/v1`: the APIResourceList.
    case discovery
    case join
    /// Join tokens; `id` nil: the collection.
    case tokens(id: String?)
    case heartbeat(node: String)
    /// A node's outbox batch (`NodeReports`).
    case reports(node: String)
    /// A list (or watch) or a create. `namespace` nil: every namespace; "" for a cluster-scoped kind.
    case collection(resource: String, namespace: String?)
    /// One object. `namespace` is "" for a cluster-scoped kind.
    case object(resource: String, namespace: String, name: String)
    /// `/apis/mesh.edge/v1/watch?resources=a,b&resourceVersion=N`: one stream of changes to several kinds
    /// (docs/API.md "One watch for several kinds").
    case watch

    /// Why a path has no route: the answer, and the resource it was about (for metrics).
    struct Miss: Error, Equatable {
        var status: Status
        var resource: String
    }

    static let prefix = ["apis", "mesh.edge", "v1"]
    /// The last segment of the watch over several kinds (no kind has this plural).
    static let watchSegment = "watch"

    /// The resource a route is about, as the `resource` dimension of the request metrics.
    var resourceLabel: String {
        switch self {
        case .version, .discovery: return ""
        case .watch: return "*"
        case .join: return "join"
        case .tokens: return BootstrapTokenStore.resource
        case .heartbeat, .reports: return Node.resource.plural
        case .collection(let r, _), .object(let r, _, _): return r
        }
    }

    /// The object's name, when the route names one (for the Kubernetes verb of a request).
    var name: String? {
        switch self {
        case .object(_, _, let name): return name
        case .tokens(let id): return id
        default: return nil
        }
    }

    static func parse(_ path: String) -> Result<APIRoute, Miss> {
        if path == ControlAPI.joinPath { return .success(.join) }
        if path == ControlAPI.tokensPath || path == ControlAPI.tokensPath + "/" {
            return .success(.tokens(id: nil))
        }
        if path.hasPrefix(ControlAPI.tokensPath + "/") {
            return .success(.tokens(id: String(path.dropFirst(ControlAPI.tokensPath.count + 1))))
        }
        let segments = path.split(separator: "/", omittingEmptySubsequences: true).map(String.init)
        if segments == ["version"] { return .success(.version) }
        guard segments.count >= 3, Array(segments[0..<3]) == Self.prefix else {
            return Self.miss(404, .notFound, "no such path \(path): the API is under /apis/mesh.edge/v1", "")
        }
        var rest = Array(segments.dropFirst(3))
        if rest.isEmpty { return .success(.discovery) }
        var namespace: String?
        if rest[0] == "namespaces", rest.count >= 3 {
            namespace = rest[1]
            rest.removeFirst(2)
        }
        if rest == [Self.watchSegment] {
            guard namespace == nil else {
                let message = "a watch over several kinds is cluster-wide: use /apis/mesh.edge/v1/watch?resources=..."
                return Self.miss(400, .badRequest, message, "*")
            }
            return .success(.watch)
        }
        guard let type = Registry.byPlural(rest[0])?.type else {
            return Self.miss(404, .notFound, Self.noSuchResource(rest[0]), rest[0])
        }
        if let ns = namespace, let e = Names.dns1123LabelError(ns) {
            return Self.miss(400, .badRequest, "namespace \"\(ns)\" is invalid: \(e)", type.plural)
        }
        if namespace != nil && !type.namespaced {
            let message = "\(type.plural) are not namespaced: use /apis/mesh.edge/v1/\(type.plural)"
            return Self.miss(400, .badRequest, message, type.plural)
        }
        if rest.count == 3, rest[2] == "heartbeat", type.plural == Node.resource.plural {
            return .success(.heartbeat(node: rest[1]))
        }
        if rest.count == 3, rest[2] == "reports", type.plural == Node.resource.plural {
            return .success(.reports(node: rest[1]))
        }
        if rest.count > 2 { return Self.miss(404, .notFound, "no such path \(path)", type.plural) }
        guard rest.count == 2 else {
            return .success(.collection(resource: type.plural, namespace: type.namespaced ? namespace : ""))
        }
        let name = rest[1]
        guard type.namespaced else { return .success(.object(resource: type.plural, namespace: "", name: name)) }
        guard let ns = namespace else {
            let message =
                "\(type.plural) are namespaced: use /apis/mesh.edge/v1/namespaces/{namespace}/\(type.plural)/\(name)"
            return Self.miss(400, .badRequest, message, type.plural)
        }
        return .success(.object(resource: type.plural, namespace: ns, name: name))
    }

    /// Why `name` is no resource: the kinds there are.
    static func noSuchResource(_ name: String) -> String {
        "the server has no resource \"\(name)\" (it has \(Registry.types.map(\.plural).joined(separator: ", ")))"
    }

    private static func miss(
        _ code: Int,
        _ reason: Status.Reason,
        _ message: String,
        _ resource: String
    )
        -> Result<APIRoute, Miss>
    {
        .failure(Miss(status: Status(code: code, reason: reason, message: message), resource: resource))
    }
}
