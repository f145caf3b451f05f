import Logging
import MeshCore
import MeshHTTP
import MeshIdentity
import NIOCore
import X509

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Node certificates from the join on: which serials each node was issued (resource
/// `nodecertificates`, one record per node, written at join and renewal), the revocation list
/// (resource `revokedcertificates`, one entry per serial, mirrored in memory as `revoked`) and
/// its enforcement on every request that presents a client certificate.
///
/// Rules (README "Security"):
/// - a join for a name that has a Node is refused unless the token is bound to that name; a join
///   creates the Node (phase Unknown until the agent's first beat), so the name is taken at once;
/// - a join revokes the certificates issued earlier to that name: after a re-join (a wiped disk,
///   or a takeover the operator allowed) the old key is worthless;
/// - `POST .../nodes/NAME/revoke` (admin) revokes every certificate of NAME still valid (with
///   `?serial=HEX`, only that one);
/// - `POST .../nodes/NAME/certificate` (NAME itself, over its current certificate) renews: a new
///   certificate for the same name only; the old one stays valid until it expires.
struct NodeCredentials: Sendable {
    static let issuedResource = "nodecertificates"
    /// The same records for relays (`mesh://relay/NAME`), which join with relay tokens.
    static let relayIssuedResource = "relaycertificates"
    static let revokedResource = "revokedcertificates"
    static let revokedPath = "/apis/mesh.edge/v1/revokedcertificates"

    let store: any Store
    let revoked: RevokedSerials
    /// The lifetime of the node certificates the join and the renewal issue.
    let validity: TimeInterval
    /// What certificates are signed at and expired records are dropped by (tests advance one by hand).
    var clock: any MeshClock = .system

    /// Now on `clock`, as certificates count time.
    var now: Date { Date(timeIntervalSince1970: TimeInterval(self.clock.epochMillis) / 1000) }

    struct Issued: Codable, Sendable {
        var node: String
        var certificates: [Entry]
    }

    struct Entry: Codable, Sendable, Equatable {
        var serial: String
        var notAfter: String
    }

    static func issuedKey(_ node: String, role: JoinRole = .node) -> ObjectKey {
        ObjectKey(resource: role == .relay ? Self.relayIssuedResource : Self.issuedResource, namespace: "", name: node)
    }

    static func identity(_ name: String, role: JoinRole) -> MeshPrincipal {
        role == .relay ? .relay(name) : .node(name)
    }

    /// The reservation a certificate serial takes in the store (owned by the node's record).
    static func serialToken(_ serial: String) -> String { "serial/\(serial)" }

    static func revokedKey(_ serial: String) -> ObjectKey {
        ObjectKey(resource: Self.revokedResource, namespace: "", name: serial)
    }

    /// Reads the revocation list into memory (at start).
    func load() async throws {
        self.revoked.replace(with: Set(try await self.list().map(\.serial)))
    }

    func list() async throws -> [RevokedCertificate] {
        let (items, _) = try await self.store.list(resource: Self.revokedResource, namespace: "")
        return try items.map {
            try $0.decode(RevokedCertificate.self)
        }.sorted { ($0.revokedAt, $0.serial) < ($1.revokedAt, $1.serial) }
    }

    /// Records a certificate issued to `node` (a relay's name for `role` relay); with `supersede`,
    /// first revokes the ones issued to it before (still valid). Returns what it revoked.
    func record(
        _ certificate: Certificate,
        node: String,
        role: JoinRole = .node,
        supersede: Bool
    ) async throws -> [RevokedCertificate] {
        let entry = Entry(
            serial: MeshTLS.serialHex(certificate.serialNumber),
            notAfter: Timestamp.format(secondsSinceEpoch: Int(certificate.notValidAfter.timeIntervalSince1970))
        )
        var done: [RevokedCertificate] = []
        for _ in 0..<16 {
            let stored = try await self.store.get(Self.issuedKey(node, role: role))
            var record =
                try stored.map { try $0.decode(Issued.self) }
                ?? Issued(node: node, certificates: [])
            let now = self.clock.epochSeconds
            record.certificates.removeAll { (Timestamp.parse($0.notAfter) ?? 0) <= now }
            if supersede {
                done = try await self.revoke(
                    record.certificates,
                    identity: Self.identity(node, role: role),
                    reason: "superseded by a new join"
                )
                record.certificates = []
            }
            record.certificates.append(entry)
            let json = ByteBuffer(bytes: try MeshJSON.encode(record))
            do {
                _ = try await self.store.commit(
                    Write(
                        key: Self.issuedKey(node, role: role),
                        expect: stored.map { .version($0.resourceVersion) } ?? .absent,
                        operation: .put { _ in (json, [:]) },
                        // The store makes serials unique across replicas that sign at once.
                        reserve: [Self.serialToken(entry.serial)]
                    )
                )
                return done
            } catch StoreError.conflict, StoreError.alreadyExists {
                continue
            }
        }
        throw Status.conflict("the certificates of \(Self.identity(node, role: role)) are changing too fast; retry")
    }

    /// Revokes every certificate issued to `node` that is still valid (only `serial`, when given).
    func revoke(
        node: String,
        role: JoinRole = .node,
        serial: String? = nil,
        reason: String?
    ) async throws -> [RevokedCertificate] {
        let kind = role == .relay ? Relay.resource.plural : Node.resource.plural
        guard let stored = try await self.store.get(Self.issuedKey(node, role: role)) else {
            throw Status(
                code: 404,
                reason: .notFound,
                message: "no certificate was issued to \(role.rawValue) \"\(node)\" by a join or a renewal here",
                details: .init(name: node, kind: kind)
            )
        }
        let record = try stored.decode(Issued.self)
        let now = self.clock.epochSeconds
        var valid = record.certificates.filter { (Timestamp.parse($0.notAfter) ?? 0) > now }
        if let serial {
            let wanted = serial.lowercased()
            valid = valid.filter { $0.serial == wanted }
            if valid.isEmpty && !self.revoked.contains(wanted) {
                throw Status(
                    code: 404,
                    reason: .notFound,
                    message: "\(role.rawValue) \"\(node)\" holds no valid certificate with serial \(serial)",
                    details: .init(name: node, kind: kind)
                )
            }
        }
        return try await self.revoke(
            valid,
            identity: Self.identity(node, role: role),
            reason: reason ?? "revoked by an administrator"
        )
    }

    private func revoke(
        _ entries: [Entry],
        identity: MeshPrincipal,
        reason: String
    ) async throws -> [RevokedCertificate] {
        var done: [RevokedCertificate] = []
        for e in entries where !self.revoked.contains(e.serial) {
            let item = RevokedCertificate(
                serial: e.serial,
                identity: identity.uri,
                revokedAt: Timestamp.now(),
                notAfter: e.notAfter,
                reason: reason
            )
            let json = ByteBuffer(bytes: try MeshJSON.encode(item))
            _ = try await self.store.commit(
                Write(key: Self.revokedKey(e.serial), expect: .any, operation: .put { _ in (json, [:]) })
            )
            self.revoked.insert(e.serial)
            done.append(item)
        }
        return done
    }

    /// Whether the client certificate of `request` is revoked now, asked later and again (a watch, at each
    /// chunk it sends): it keeps the serial and the shared revocation set, not the request.
    func revocationCheck(_ request: HTTPRequest) -> @Sendable () -> Bool {
        guard let bytes = request.peerCertificateSerial else { return { false } }
        let (serial, revoked) = (MeshTLS.serialHex(bytes: bytes), self.revoked)
        return { revoked.contains(serial) }
    }

    /// The refusal of a request whose client certificate is revoked (nil: not revoked, or none).
    func denial(_ request: HTTPRequest) -> Status? {
        guard let bytes = request.peerCertificateSerial else { return nil }
        let serial = MeshTLS.serialHex(bytes: bytes)
        guard self.revoked.contains(serial) else { return nil }
        let who = request.peerIdentity ?? "this client"
        var fix = ""
        if case .node(let name) = request.peerIdentity.flatMap({ MeshPrincipal(uri: $0) }) {
            fix =
                ": the node must join again (meshctl delete node \(name), or a token bound to it: meshctl token create --node \(name))"
        }
        return Status(
            code: 401,
            reason: .unauthorized,
            message: "the client certificate of \(who) (serial \(serial)) is revoked\(fix)"
        )
    }
}

extension ControlAPI {
    /// The revocation list, node revocation and certificate renewal paths; nil for any other.
    func routeCredentials(_ request: HTTPRequest) async -> (HTTPResponse, String, String)? {
        let segments = request.path.split(separator: "/", omittingEmptySubsequences: true).map(String.init)
        let resource: String
        let verb: String
        let handler: () async throws -> HTTPResponse
        if request.path == NodeCredentials.revokedPath {
            resource = NodeCredentials.revokedResource
            verb = "list"
            handler = {
                guard request.method == .GET else { throw Self.notAllowed(request, allowed: "GET") }
                return .json(.ok, Self.encode(RevokedCertificateList(items: try await self.credentials.list())))
            }
        } else if segments.count == 6, segments[0...2] == ["apis", "mesh.edge", "v1"],
            segments[3] == "nodes" || segments[3] == Relay.resource.plural,
            segments[5] == "revoke" || segments[5] == "certificate"
        {
            let node = segments[4]
            let role: JoinRole = segments[3] == "nodes" ? .node : .relay
            resource = segments[3]
            verb = segments[5] == "revoke" ? "revoke" : "renew"
            handler = {
                guard request.method == .POST else { throw Self.notAllowed(request, allowed: "POST") }
                if verb == "revoke" {
                    let revoked = try await self.credentials.revoke(
                        node: node,
                        role: role,
                        serial: request.query["serial"],
                        reason: nil
                    )
                    self.logger.notice(
                        "revoked \(revoked.count) certificate(s) of \(role.rawValue) \(node) (by \(request.peerIdentity ?? "?"))"
                    )
                    return .json(.ok, Self.encode(RevokedCertificateList(items: revoked)))
                }
                return try await self.renew(request, node: node, role: role)
            }
        } else {
            return nil
        }
        do {
            return (try await handler(), verb, resource)
        } catch let status as Status {
            return (Self.respond(status), verb, resource)
        } catch let e as StoreError {
            return (
                Self.respond(Status(code: 503, reason: .serviceUnavailable, message: e.description)), verb, resource
            )
        } catch {
            self.logger.error("\(request.method) \(request.uri) failed: \(error)")
            return (
                Self.respond(Status(code: 500, reason: .internalError, message: "internal error: \(error)")), verb,
                resource
            )
        }
    }

    static func notAllowed(_ request: HTTPRequest, allowed: String) -> Status {
        Status(
            code: 405,
            reason: .methodNotAllowed,
            message: "\(request.method) is not allowed here (allowed: \(allowed))"
        )
    }

    /// Enrols a node: checks the CSR, then the token (bound name, name not taken, one usage taken
    /// atomically), creates the Node when it is new, and signs the node identity; certificates
    /// issued to that name before are revoked.
    func join(_ request: HTTPRequest) async throws -> HTTPResponse {
        guard let ca = self.ca else { throw Self.noCA }
        let join = try Self.decodeStrict(JoinRequest.self, request)
        let role = join.role ?? .node
        // Check the CSR before spending a usage of the token on it.
        let name: String
        do {
            name = try ca.signCSR(pem: join.csr, role: role).nodeName
        } catch let e as IdentityError {
            throw Status.badRequest(e.message)
        }
        if role == .relay { return try await self.joinRelay(join, name: name, ca: ca) }
        let nodeKey = ObjectKey(resource: Node.resource.plural, namespace: "", name: name)
        let taken = try await self.store.get(nodeKey) != nil
        try await self.tokens.consume(join.token, nodeName: name, nameTaken: taken)
        if !taken {
            do {
                _ = try await self.writer.save(
                    Node(metadata: ObjectMeta(name: name), spec: NodeSpec()),
                    namespace: nil,
                    urlName: name,
                    createOnly: true,
                    writer: MeshPrincipal.control("mesh-control").uri
                )
            } catch StoreError.alreadyExists {
                throw BootstrapTokenStore.nameTaken(name)
            }
        }
        let (_, certificate) = try ca.signNodeCSR(
            pem: join.csr,
            validity: self.credentials.validity,
            now: self.credentials.now
        )
        let superseded = try await self.credentials.record(certificate, node: name, supersede: true)
        self.logger.notice(
            "node \(name) joined with token \(join.token.prefix(6))\(taken ? " (re-join with a token bound to it)" : "")\(superseded.isEmpty ? "" : "; revoked its \(superseded.count) earlier certificate(s)")"
        )
        let answer = JoinResponse(
            nodeName: name,
            certificate: try certificate.serializeAsPEM().pemString,
            caCertificate: self.caPEM
        )
        return .json(.ok, Self.encode(answer))
    }

    /// Enrols a relay: only with a relay token for its name (`meshctl token create --relay NAME`);
    /// the CA signs `mesh://relay/NAME`, and certificates issued to that relay before are revoked.
    /// No object is created: the relay writes its Relay itself once it serves.
    func joinRelay(_ join: JoinRequest, name: String, ca: CertificateAuthority) async throws -> HTTPResponse {
        try await self.tokens.consume(join.token, nodeName: name, nameTaken: false, role: .relay)
        let (_, certificate) = try ca.signCSR(
            pem: join.csr,
            role: .relay,
            validity: self.credentials.validity,
            now: self.credentials.now
        )
        let superseded = try await self.credentials.record(certificate, node: name, role: .relay, supersede: true)
        self.logger.notice(
            "relay \(name) joined with token \(join.token.prefix(6))\(superseded.isEmpty ? "" : "; revoked its \(superseded.count) earlier certificate(s)")"
        )
        let answer = JoinResponse(
            nodeName: name,
            certificate: try certificate.serializeAsPEM().pemString,
            caCertificate: self.caPEM
        )
        return .json(.ok, Self.encode(answer))
    }

    /// Renews a node's (or a relay's) certificate: only the node (relay) itself, over its current
    /// (valid, unrevoked) certificate, and only for its own name.
    func renew(_ request: HTTPRequest, node: String, role: JoinRole = .node) async throws -> HTTPResponse {
        guard let ca = self.ca else { throw Self.noCA }
        let identity = NodeCredentials.identity(node, role: role)
        guard request.peerIdentity.flatMap({ MeshPrincipal(uri: $0) }) == identity else {
            throw Status(
                code: 403,
                reason: .forbidden,
                message:
                    "only \(identity.uri) itself may renew its certificate (a new \(role.rawValue) joins with a token)"
            )
        }
        let renewal = try Self.decodeStrict(CertificateRenewalRequest.self, request)
        let signed: (nodeName: String, certificate: Certificate)
        do {
            signed = try ca.signCSR(
                pem: renewal.csr,
                role: role,
                validity: self.credentials.validity,
                now: self.credentials.now
            )
        } catch let e as IdentityError {
            throw Status.badRequest(e.message)
        }
        guard signed.nodeName == node else {
            throw Status(
                code: 403,
                reason: .forbidden,
                message: "a renewal keeps the identity: \(identity.uri) may not ask for \(signed.nodeName)"
            )
        }
        _ = try await self.credentials.record(signed.certificate, node: node, role: role, supersede: false)
        self.logger.info(
            "renewed the certificate of \(role.rawValue) \(node): serial \(MeshTLS.serialHex(signed.certificate.serialNumber)), valid until \(signed.certificate.notValidAfter)"
        )
        let answer = JoinResponse(
            nodeName: node,
            certificate: try signed.certificate.serializeAsPEM().pemString,
            caCertificate: self.caPEM
        )
        return .json(.ok, Self.encode(answer))
    }
}
