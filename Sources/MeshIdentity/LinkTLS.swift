import MeshCore
import MeshRecords
import NIOCore
import NIOSSL
import Synchronization
import X509

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// The check an accepting side runs on the *client's* certificate chain, when the client must hold a
/// mesh certificate (a peer link, a relay session): signed by a trusted mesh CA and valid now, an
/// identity `accepts` allows (for a link: any `mesh://node/...`), EKU clientAuth, not revoked.
/// NIOSSL's custom verification callback on the server handler; it replaces BoringSSL's checks.
public final class ClientVerifier: Sendable {
    public let trust: [Certificate]
    public let revoked: RevokedSerials?
    /// What is required, for messages: "a node (mesh://node/...)".
    public let wanted: String
    private let accepts: @Sendable (MeshPrincipal) -> Bool
    private let failure = Mutex<PeerVerifier.Refusal?>(nil)

    public init(
        trust: [Certificate],
        wanted: String,
        revoked: RevokedSerials? = nil,
        accepts: @escaping @Sendable (MeshPrincipal) -> Bool
    ) {
        self.trust = trust
        self.wanted = wanted
        self.revoked = revoked
        self.accepts = accepts
    }

    /// Why the last refused chain was refused (nil: none refused yet).
    public var lastRefusal: PeerVerifier.Refusal? { self.failure.withLock { $0 } }

    /// The callback for `NIOSSLServerHandler(context:customVerificationCallback:)`.
    public var callback: @Sendable ([NIOSSLCertificate], EventLoopPromise<NIOSSLVerificationResult>) -> Void {
        { chain, promise in
            let parsed = chain.compactMap { c in (try? c.toDERBytes()).flatMap { try? Certificate(derEncoded: $0) } }
            let result: Result<MeshPrincipal, PeerVerifier.Refusal> =
                parsed.count == chain.count
                ? self.verify(parsed)
                : .failure(PeerVerifier.Refusal(.untrusted, "the client's certificate chain does not parse"))
            switch result {
            case .success: promise.succeed(.certificateVerified)
            case .failure(let reason):
                self.failure.withLock { $0 = reason }
                promise.succeed(.failed)
            }
        }
    }

    /// Checks a presented chain (leaf first); the identity of the leaf when it passes.
    public func verify(_ chain: [Certificate], now: Date = Date()) -> Result<MeshPrincipal, PeerVerifier.Refusal> {
        guard let leaf = chain.first else {
            return .failure(PeerVerifier.Refusal(.untrusted, "the client sent no certificate"))
        }
        guard
            let ca = self.trust.first(where: {
                leaf.issuer == $0.subject && $0.publicKey.isValidSignature(leaf.signature, for: leaf)
            })
        else {
            return .failure(PeerVerifier.Refusal(.untrusted, "the client's certificate was not issued by the mesh CA"))
        }
        guard ca.notValidBefore <= now, now < ca.notValidAfter,
            CertificateAuthority.verify(leaf, issuedBy: ca, now: now)
        else {
            return .failure(
                PeerVerifier.Refusal(.untrusted, "the client's certificate (or the mesh CA) is not valid now")
            )
        }
        guard let identity = meshIdentity(of: leaf), self.accepts(identity) else {
            let got = meshIdentity(of: leaf)?.uri ?? "no mesh identity"
            return .failure(PeerVerifier.Refusal(.wrongIdentity, "the client presented \(got), not \(self.wanted)"))
        }
        guard let eku = try? leaf.extensions.extendedKeyUsage, eku.contains(.clientAuth) else {
            return .failure(
                PeerVerifier.Refusal(.wrongIdentity, "the client's certificate (\(identity)) has no clientAuth usage")
            )
        }
        let serial = MeshTLS.serialHex(leaf.serialNumber)
        if let revoked = self.revoked, revoked.contains(serial) {
            return .failure(
                PeerVerifier.Refusal(.revoked, "the client's certificate (\(identity), serial \(serial)) is revoked")
            )
        }
        return .success(identity)
    }
}

/// TLS settings of a peer link between two nodes (mutual TLS 1.3, both certificates from the mesh CA):
/// a client context presenting this node's certificate, a server context that *requires* one, and the
/// verifiers: the dialer requires exactly the node it meant, the acceptor any `mesh://node/...`.
public final class MeshLinkTLS: Sendable {
    public let identity: MeshPrincipal
    public let trust: [Certificate]
    public let revoked: RevokedSerials?
    /// The client context of relay sessions (no ALPN).
    public let clientContext: NIOSSLContext
    /// The client context of links: ALPN offers ``recordsProtocol`` then ``tlsProtocol``, and the key-log
    /// callback feeds ``secrets``.
    public let linkClientContext: NIOSSLContext
    /// The server context of links (ALPN and ``secrets`` as `linkClientContext`).
    public let serverContext: NIOSSLContext
    /// The server configuration of a node that does not offer the record layer (no ALPN, no key log); its
    /// context is made on first use (`tlsServerContext()`), as only `LinkConfiguration.sealedRecords = false`
    /// needs it.
    private let tlsServerConfiguration: TLSConfiguration
    private let tlsServer = Mutex<NIOSSLContext?>(nil)
    /// The exporter secrets of this node's link handshakes, until the link takes its own.
    public let secrets = TLSExporterSecrets()

    /// ALPN of a link whose records, once the handshake is done, the mesh's own record layer seals
    /// (MeshRecords); ``tlsProtocol``, or no ALPN at all (an agent before it), keeps TLS records throughout.
    public static let recordsProtocol = "mesh-link-records/1"
    public static let tlsProtocol = "mesh-link-tls/1"

    /// How long a link's or a relay session's client waits for the peer's close_notify. Links with the record
    /// layer and relay circuits leave TLS with `stopTLS` right after the handshake (close_notify both ways),
    /// so this bounds a step of setting them up, not only a close: the 200 ms of other clients
    /// (`MeshTLS.clientShutdownTimeout`) failed links on a busy machine, where the peer's close_notify came
    /// later (`NIOSSLCloseTimedOutError`). NIOSSL's default, as the acceptor's side has.
    public static let handOffTimeout: TimeAmount = .seconds(5)

    public convenience init(_ credentials: LoadedCredentials, revoked: RevokedSerials? = nil) throws {
        try self.init(
            keyPEM: credentials.keyPEM,
            certificatePEM: credentials.certificatePEM,
            caPEM: credentials.caPEM,
            revoked: revoked
        )
    }

    /// Node `name`'s link TLS with a credential just issued by `ca` (a CA made in memory: tests, benchmarks).
    public convenience init(node name: String, issuedBy ca: CertificateAuthority) throws {
        let issued = try ca.issueCredential(identity: .node(name), serverAuth: true, clientAuth: true)
        try self.init(keyPEM: issued.keyPEM, certificatePEM: issued.certificatePEM, caPEM: try ca.certificatePEM())
    }

    public init(keyPEM: String, certificatePEM: String, caPEM: String, revoked: RevokedSerials? = nil) throws {
        let leaf: Certificate
        do {
            leaf = try Certificate(pemEncoded: certificatePEM)
        } catch {
            throw IdentityError("the link certificate does not parse: \(error)")
        }
        guard let identity = meshIdentity(of: leaf) else {
            throw IdentityError("the link certificate carries no mesh:// identity")
        }
        self.identity = identity
        self.revoked = revoked
        let cas = try MeshTLS.nioCertificates(caPEM).map { try Certificate(derEncoded: try $0.toDERBytes()) }
        guard !cas.isEmpty else { throw IdentityError("the CA file holds no certificate") }
        self.trust = cas
        self.clientContext = try MeshTLS.makeClientContext(key: keyPEM, certificate: certificatePEM) { config in
            config.shutdownTimeout = Self.handOffTimeout
        }
        let secrets = self.secrets
        self.linkClientContext = try MeshTLS.makeClientContext(key: keyPEM, certificate: certificatePEM) { config in
            config.applicationProtocols = [Self.recordsProtocol, Self.tlsProtocol]
            config.keyLogCallback = secrets.callback
            config.shutdownTimeout = Self.handOffTimeout
        }
        let chain = try MeshTLS.nioCertificates(certificatePEM)
        var config = TLSConfiguration.makeServerConfiguration(
            certificateChain: chain.map { .certificate($0) },
            privateKey: .privateKey(try MeshTLS.nioKey(keyPEM))
        )
        config.minimumTLSVersion = .tlsv13
        config.maximumTLSVersion = .tlsv13
        // Required (a client without a certificate fails the handshake); the callback does the checks.
        config.certificateVerification = .noHostnameVerification
        config.trustRoots = .certificates(try MeshTLS.nioCertificates(caPEM))
        self.tlsServerConfiguration = config
        config.applicationProtocols = [Self.recordsProtocol, Self.tlsProtocol]
        config.keyLogCallback = secrets.callback
        self.serverContext = try NIOSSLContext(configuration: config)
    }

    /// The dialer's check: the server is exactly `peer`.
    /// The server context of a node that does not offer the record layer, made once.
    public func tlsServerContext() throws -> NIOSSLContext {
        try self.tlsServer.withLock { context in
            if let context { return context }
            let made = try NIOSSLContext(configuration: self.tlsServerConfiguration)
            context = made
            return made
        }
    }

    public func dialerVerifier(expect peer: MeshPrincipal) -> PeerVerifier {
        PeerVerifier(expected: .exactly(peer), trust: .certificates(self.trust), revoked: self.revoked)
    }

    /// The acceptor's check: the client is a node (`mesh://node/...`).
    public func acceptorVerifier() -> ClientVerifier {
        ClientVerifier(trust: self.trust, wanted: "a node (mesh://node/...)", revoked: self.revoked) {
            if case .node = $0 { return true }
            return false
        }
    }
}
