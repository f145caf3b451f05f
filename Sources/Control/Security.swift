import Crypto
import Logging
import MeshCore
import MeshHTTP
import MeshIdentity
import NIOCore

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Who may do what on the control API (docs/API.md "Who may do what"): the identity is the `mesh://` URI SAN of
/// the client's verified certificate.
/// - no certificate: only `/healthz`, `/readyz` and `POST .../join`; anything else is 401;
/// - `mesh://admin/*`: everything;
/// - `mesh://node/<name>`: get, list and watch services, endpoints and nodes, discovery and
///   `/version`, the revocation list; update (PUT) only its own Node, `/apis/mesh.edge/v1/nodes/<name>`,
///   send its own heartbeat, `POST /apis/mesh.edge/v1/nodes/<name>/heartbeat`, and renew its own
///   certificate, `POST /apis/mesh.edge/v1/nodes/<name>/certificate`;
/// - `mesh://node/<name>` may also get, list and watch relays;
/// - `mesh://relay/<name>`: `/version`, the revocation list, get, list and watch relays and nodes,
///   and update (PUT) only its own Relay, `/apis/mesh.edge/v1/relays/<name>`;
/// - any other identity: 403.
/// A revoked client certificate is refused before any of this (`NodeCredentials`).
public enum Authorization {
    public enum Decision: Equatable, Sendable {
        case allow
        case deny(Status)
    }

    /// Paths anyone may use, with or without a certificate.
    static func isPublic(_ request: HTTPRequest) -> Bool {
        switch request.path {
        case "/healthz", "/readyz": return true
        case ControlAPI.joinPath: return true
        default: return false
        }
    }

    public static func decide(_ request: HTTPRequest) -> Decision {
        if Self.isPublic(request) { return .allow }
        guard let text = request.peerIdentity else {
            return .deny(
                Status(
                    code: 401,
                    reason: .unauthorized,
                    message:
                        "this API needs a client certificate issued by the mesh CA (meshctl finds the admin one in its meshconfig; agents join with a token)"
                )
            )
        }
        let identity = MeshPrincipal(uri: text)
        switch identity {
        case .admin:
            return .allow
        case .node(let name):
            let access = Self.nodeMay(request, node: name)
            if access == .allowed { return .allow }
            var status = Self.forbidden(text, request)
            if access == .notScopedToItself {
                status.message +=
                    ": a node lists and watches only the devices and workloads placed on it (add ?node=\(name))"
            }
            return .deny(status)
        case .relay(let name):
            if Self.relayMay(request, relay: name) { return .allow }
            return .deny(Self.forbidden(text, request))
        case .control, nil:
            return .deny(Self.forbidden(text, request))
        }
    }

    enum NodeAccess {
        case allowed, denied
        /// Allowed, but for naming devices or workloads without `node=` its own name.
        case notScopedToItself
    }

    /// What a node may do. Devices and workloads: lists and watches scoped to itself (`?node=`, `NodePlacement`),
    /// as Kubernetes' Node authorizer lets a kubelet read only the pods bound to it; a get by name is checked
    /// against the object's placement by the API (`ControlAPI.get`).
    static func nodeMay(_ request: HTTPRequest, node: String) -> NodeAccess {
        let segments = request.path.split(separator: "/", omittingEmptySubsequences: true).map(String.init)
        if request.method == .GET && (segments == ["version"] || segments == ["apis", "mesh.edge", "v1"]) {
            return .allowed
        }
        guard segments.count >= 4, segments[0] == "apis", segments[1] == "mesh.edge", segments[2] == "v1" else {
            return .denied
        }
        var rest = Array(segments.dropFirst(3))
        if rest[0] == "namespaces", rest.count >= 3 { rest.removeFirst(2) }
        /// A list or watch naming `kinds`: a placed kind only with `node=` its own name.
        func scoped(_ kinds: [String]) -> NodeAccess {
            !kinds.contains(where: NodePlacement.isPlaced) || request.query["node"] == node
                ? .allowed : .notScopedToItself
        }
        let readable: Set<String> = [
            "services", "endpoints", "nodes", Relay.resource.plural, NodeCredentials.revokedResource,
            Workload.resource.plural, Device.resource.plural, DeviceModel.resource.plural,
        ]
        switch request.method {
        case .GET where segments.count == 4 && segments[3] == APIRoute.watchSegment:
            return Self.mayWatchAll(request, readable) ? scoped(ControlAPI.watchedResources(request)) : .denied
        case .GET:
            guard readable.contains(rest[0]) && rest.count <= 2 else { return .denied }
            return rest.count == 1 ? scoped([rest[0]]) : .allowed
        case .PUT:
            return segments.count == 5 && segments[3] == "nodes" && segments[4] == node ? .allowed : .denied
        case .POST:
            let own =
                segments.count == 6 && segments[3] == "nodes" && segments[4] == node
                && (segments[5] == "heartbeat" || segments[5] == "certificate" || segments[5] == "reports")
            return own ? .allowed : .denied
        default:
            return .denied
        }
    }

    static func relayMay(_ request: HTTPRequest, relay: String) -> Bool {
        let segments = request.path.split(separator: "/", omittingEmptySubsequences: true).map(String.init)
        switch request.method {
        case .GET:
            if segments == ["version"] || segments == ["apis", "mesh.edge", "v1"] { return true }
            guard segments.count == 4 || segments.count == 5, segments[0...2] == ["apis", "mesh.edge", "v1"] else {
                return false
            }
            let readable: Set<String> = [Relay.resource.plural, Node.resource.plural, NodeCredentials.revokedResource]
            if segments.count == 4 && segments[3] == APIRoute.watchSegment {
                return Self.mayWatchAll(request, readable)
            }
            return readable.contains(segments[3])
        case .PUT:
            return segments == ["apis", "mesh.edge", "v1", Relay.resource.plural, relay]
        case .POST:
            return segments == ["apis", "mesh.edge", "v1", Relay.resource.plural, relay, "certificate"]
        default:
            return false
        }
    }

    /// A watch over several kinds is allowed when a watch of each kind named would be (none named: the API
    /// answers 400).
    static func mayWatchAll(_ request: HTTPRequest, _ readable: Set<String>) -> Bool {
        ControlAPI.watchedResources(request).allSatisfy(readable.contains)
    }

    static func forbidden(_ identity: String, _ request: HTTPRequest) -> Status {
        Status(
            code: 403,
            reason: .forbidden,
            message: "\(identity) may not \(request.method) \(request.path)"
                + (request.path.hasSuffix("/" + APIRoute.watchSegment)
                    ? " (resources \(ControlAPI.watchedResources(request).joined(separator: ",")))" : "")
        )
    }
}

/// Join tokens in the store (resource `bootstraptokens`, cluster-scoped, named by id): the secret
/// only as a SHA-256 hash, an expiry, and the usages left. Used by the API's token and join paths.
struct BootstrapTokenStore: Sendable {
    let store: any Store
    /// What expiries are set and checked on (tests advance one by hand).
    var clock: any MeshClock = .system
    static let resource = "bootstraptokens"
    static let defaultTTL = 86400

    /// What the store holds for one token.
    struct Record: Codable, Sendable {
        var id: String
        var secretSHA256: String
        var description: String?
        var expires: String
        var usagesLeft: Int?
        var creationTimestamp: String
        /// The one node name this token joins (and may re-join); nil: any name not taken.
        var nodeName: String?
        /// A relay token: the one relay it enrols (and no node).
        var relayName: String?

        var listed: BootstrapToken {
            BootstrapToken(
                id: self.id,
                description: self.description,
                expires: self.expires,
                usagesLeft: self.usagesLeft,
                creationTimestamp: self.creationTimestamp,
                nodeName: self.nodeName,
                relayName: self.relayName
            )
        }
    }

    static func key(_ id: String) -> ObjectKey { ObjectKey(resource: Self.resource, namespace: "", name: id) }

    static func hash(_ secret: String) -> String {
        SHA256.hash(data: Array(secret.utf8)).map { b in (b < 16 ? "0" : "") + String(b, radix: 16) }.joined()
    }

    func create(_ request: BootstrapTokenRequest, caHash: String) async throws -> BootstrapTokenSecret {
        let ttl = request.ttlSeconds ?? Self.defaultTTL
        guard ttl > 0, ttl <= 10 * 365 * 86400 else {
            throw Status.badRequest("ttlSeconds: must be between 1 and 315360000 (10 years)")
        }
        if let u = request.usages, u < 1 { throw Status.badRequest("usages: must be at least 1") }
        if let d = request.description, d.utf8.count > 256 {
            throw Status.badRequest("description: must be at most 256 bytes")
        }
        if let n = request.nodeName, let e = Names.dns1123SubdomainError(n) {
            throw Status.badRequest("nodeName: \"\(n)\" is invalid: \(e)")
        }
        if let r = request.relayName, let e = Names.dns1123SubdomainError(r) {
            throw Status.badRequest("relayName: \"\(r)\" is invalid: \(e)")
        }
        if request.relayName != nil && request.nodeName != nil {
            throw Status.badRequest("nodeName and relayName: a token enrols either a node or a relay, not both")
        }
        for _ in 0..<8 {
            let (id, secret) = JoinTokens.generate()
            let now = self.clock.epochSeconds
            let record = Record(
                id: id,
                secretSHA256: Self.hash(secret),
                description: request.description,
                expires: Timestamp.format(secondsSinceEpoch: now + ttl),
                usagesLeft: request.usages,
                creationTimestamp: Timestamp.format(secondsSinceEpoch: now),
                nodeName: request.nodeName,
                relayName: request.relayName
            )
            let json = ByteBuffer(bytes: try MeshJSON.encode(record))
            do {
                _ = try await self.store.commit(
                    Write(key: Self.key(id), expect: .absent, operation: .put { _ in (json, [:]) })
                )
            } catch StoreError.alreadyExists, StoreError.conflict {
                continue
            }
            return BootstrapTokenSecret(
                token: "\(id).\(secret)",
                caCertHash: caHash,
                expires: record.expires,
                usagesLeft: record.usagesLeft,
                nodeName: record.nodeName,
                relayName: record.relayName
            )
        }
        throw Status(code: 500, reason: .internalError, message: "could not pick an unused token id")
    }

    func list() async throws -> [BootstrapToken] {
        let (items, _) = try await self.store.list(resource: Self.resource, namespace: "")
        return try items.map { try Self.decode($0).listed }.sorted { $0.id < $1.id }
    }

    func delete(_ id: String) async throws -> BootstrapToken {
        for _ in 0..<16 {
            guard let stored = try await self.store.get(Self.key(id)) else {
                throw Status(
                    code: 404,
                    reason: .notFound,
                    message: "bootstraptoken \"\(id)\" not found",
                    details: .init(name: id, kind: Self.resource)
                )
            }
            let json = stored.json
            do {
                _ = try await self.store.commit(
                    Write(key: Self.key(id), expect: .version(stored.resourceVersion), operation: .delete { _ in json })
                )
                return try Self.decode(stored).listed
            } catch StoreError.conflict {
                continue
            }
        }
        throw Status.conflict("bootstraptoken \(id) is changing too fast to delete; retry")
    }

    static func decode(_ stored: StoredObject) throws -> Record {
        try stored.decode(Record.self)
    }

    /// The answer to a join for a name a Node already has, with the two ways to re-join it.
    static func nameTaken(_ name: String) -> Status {
        Status(
            code: 409,
            reason: .alreadyExists,
            message:
                "node \"\(name)\" already exists, and a join token cannot take over an existing node. To re-join \(name) (say, after its disk was wiped): delete it first (meshctl delete node \(name)), or join with a token bound to it (meshctl token create --node \(name)); otherwise choose another --node-name",
            details: .init(name: name, kind: Node.resource.plural)
        )
    }

    static func unauthorized(_ message: String) -> Status {
        Status(code: 401, reason: .unauthorized, message: message)
    }

    /// Checks the token for a join of `nodeName` and takes one usage (atomically: a token with one
    /// usage admits one join). A token bound to a name joins only that name; `nameTaken` (a Node of
    /// that name exists) is refused unless the token is bound to that name: a token holder cannot
    /// take over a node that is there. A relay token (`relayName`) enrols only that relay, with
    /// `role` relay; a node token never enrols a relay.
    func consume(_ token: String, nodeName: String, nameTaken: Bool, role: JoinRole = .node) async throws {
        guard let (id, secret) = JoinTokens.parse(token) else {
            throw Status.badRequest("token: must look like abcdef.0123456789abcdef (6 and 16 of a-z, 0-9)")
        }
        for _ in 0..<16 {
            guard let stored = try await self.store.get(Self.key(id)) else {
                throw Self.unauthorized("join token \(id) is unknown (deleted, or never created here)")
            }
            var record = try Self.decode(stored)
            let given = Array(Self.hash(secret).utf8)
            let kept = Array(record.secretSHA256.utf8)
            var diff: UInt8 = given.count == kept.count ? 0 : 1
            for (a, b) in zip(given, kept) { diff |= a ^ b }
            guard diff == 0 else { throw Self.unauthorized("join token \(id): the secret is wrong") }
            if let expiry = Timestamp.parse(record.expires), expiry <= self.clock.epochSeconds {
                throw Self.unauthorized("join token \(id) expired at \(record.expires)")
            }
            if let left = record.usagesLeft {
                guard left > 0 else { throw Self.unauthorized("join token \(id) is used up") }
                record.usagesLeft = left - 1
            }
            switch (role, record.relayName) {
            case (.relay, nil):
                throw Status(
                    code: 403,
                    reason: .forbidden,
                    message:
                        "join token \(id) enrols nodes, not relays: a relay joins with a relay token (meshctl token create --relay \(nodeName))"
                )
            case (.relay, let bound?) where bound != nodeName:
                throw Status(
                    code: 403,
                    reason: .forbidden,
                    message: "join token \(id) enrols relay \(bound); it cannot enrol relay \(nodeName)"
                )
            case (.node, let bound?):
                throw Status(
                    code: 403,
                    reason: .forbidden,
                    message: "join token \(id) enrols relay \(bound) only; a node joins with a node token"
                )
            default:
                break
            }
            if let bound = record.nodeName, bound != nodeName {
                throw Status(
                    code: 403,
                    reason: .forbidden,
                    message: "join token \(id) is bound to node \(bound); it cannot join \(nodeName)"
                )
            }
            if nameTaken && record.nodeName == nil { throw Self.nameTaken(nodeName) }
            let json = ByteBuffer(bytes: try MeshJSON.encode(record))
            do {
                _ = try await self.store.commit(
                    Write(
                        key: Self.key(id),
                        expect: .version(stored.resourceVersion),
                        operation: .put { _ in (json, [:]) }
                    )
                )
                return
            } catch StoreError.conflict {
                continue
            }
        }
        throw Status.conflict("join token \(id) is being used concurrently; retry")
    }
}

/// Strict decoding of the join and token payloads, shared by the API and the fuzzer.
public enum SecurityPayloads {
    public static func decode<T: Codable>(_ type: T.Type, json data: Data) throws -> T {
        let value = try JSONValue.parse(json: data)
        guard case .object = value else {
            throw ManifestError("the body must be a JSON object, not a \(value.typeName)")
        }
        let expectedKind = "\(T.self)"
        if let kind = value["kind"]?.stringValue, kind != expectedKind {
            throw ManifestError("kind \"\(kind)\" does not belong here (expected \(expectedKind))")
        }
        if let v = value["apiVersion"]?.stringValue, v != meshAPIVersion {
            throw ManifestError("apiVersion \"\(v)\" is not served here (expected \(meshAPIVersion))")
        }
        return try Strict.decode(T.self, from: value)
    }
}
