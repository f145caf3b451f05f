import Logging
import MeshCore
import MeshHTTP
import MeshIdentity
import NIOCore
import Synchronization
import X509

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Keeps a node's certificate fresh without a new token: at two thirds of its lifetime, a new key
/// and a CSR for the same name go to `POST /apis/mesh.edge/v1/nodes/<name>/certificate` over the
/// node's current mutual TLS identity. The new key and certificate are written to the state
/// directory (0600 key, atomically) and `tls` switches to them, so every later connection (and the
/// kept-alive heartbeat connection, before its next request) presents the new certificate.
public final class CertificateRenewer: Sendable {
    public let files: CredentialFiles
    public let nodeName: String
    /// A node's certificate, or a relay's (`mesh://relay/NAME`, renewed at `relays/NAME/certificate`).
    public let role: JoinRole
    public let tls: MeshClientTLS
    let client: ControlClient
    let logger: Logger
    let onRenew: (@Sendable (LoadedCredentials) -> Void)?
    private let current: Mutex<LoadedCredentials>
    /// Renewals done so far (tests, admin API).
    private let renewals = Atomic<Int>(0)

    public init(
        credentials: LoadedCredentials,
        files: CredentialFiles,
        nodeName: String,
        tls: MeshClientTLS,
        endpoint: HTTPEndpoint,
        role: JoinRole = .node,
        logger: Logger,
        onRenew: (@Sendable (LoadedCredentials) -> Void)? = nil
    ) {
        self.onRenew = onRenew
        self.files = files
        self.nodeName = nodeName
        self.role = role
        self.tls = tls
        self.client = ControlClient(endpoint: endpoint, mesh: tls)
        self.logger = logger
        self.current = Mutex(credentials)
    }

    /// The certificate in use.
    public var certificate: Certificate { self.current.withLock { $0.certificate } }
    public var renewalCount: Int { self.renewals.load(ordering: .relaxed) }

    /// Asks for a new certificate now, stores it and uses it.
    @discardableResult
    public func renew() async throws -> LoadedCredentials {
        let key = NodeKey()
        let request = CertificateRenewalRequest(csr: try key.csrPEM(nodeName: self.nodeName))
        let resource = self.role == .relay ? Relay.resource : Node.resource
        let path = ControlClient.path(resource, namespace: nil, name: self.nodeName) + "/certificate"
        let body = try await self.client.raw(.POST, path, body: ByteBuffer(bytes: try MeshJSON.encode(request))).body
        let answer = try ControlClient.decode(JoinResponse.self, body)
        let old = self.current.withLock { $0 }
        guard try MeshTLS.caHash(pem: answer.caCertificate) == CertificateAuthority.hash(of: old.caCertificate) else {
            throw IdentityError("the control plane answered the renewal with a CA other than this node's")
        }
        try self.files.write(keyPEM: try key.keyPEM(), certificatePEM: answer.certificate, caPEM: old.caPEM)
        let loaded = try self.files.load()
        let wanted: MeshPrincipal = self.role == .relay ? .relay(self.nodeName) : .node(self.nodeName)
        guard loaded.identity == wanted else {
            throw IdentityError(
                "the renewed certificate is for \(loaded.identity?.uri ?? "no identity"), not \(wanted.uri)"
            )
        }
        try self.tls.use(key: loaded.keyPEM, certificate: loaded.certificatePEM)
        self.current.withLock { $0 = loaded }
        self.renewals.add(1, ordering: .relaxed)
        self.onRenew?(loaded)
        self.logger.notice(
            "renewed this \(self.role.rawValue)'s certificate: serial \(MeshTLS.serialHex(loaded.certificate.serialNumber)), valid until \(loaded.certificate.notValidAfter)"
        )
        return loaded
    }

    /// Renews at two thirds of each certificate's lifetime until cancelled; a failed attempt is
    /// retried after a tenth of the time left (between 1 s and 5 min). Never throws.
    public func run() async {
        var failures = 0
        while !Task.isCancelled {
            let cert = self.certificate
            let now = Date()
            let due = MeshTLS.renewalTime(of: cert)
            var wait = due.timeIntervalSince(now)
            if failures > 0 {
                let left = cert.notValidAfter.timeIntervalSince(now)
                wait = min(max(left / 10, 1), 300)
            }
            if wait > 0 {
                do {
                    try await Task.sleep(for: .milliseconds(Int64(min(wait, 86400) * 1000)))
                } catch {
                    return
                }
                if Date() < MeshTLS.renewalTime(of: self.certificate), failures == 0 { continue }
            }
            do {
                try await self.renew()
                failures = 0
            } catch is CancellationError {
                return
            } catch {
                failures += 1
                let level: Logger.Level = failures == 1 ? .warning : .debug
                self.logger.log(
                    level: level,
                    "cannot renew this \(self.role.rawValue)'s certificate (valid until \(cert.notValidAfter)): \(error); retrying"
                )
            }
        }
    }
}
