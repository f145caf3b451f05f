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

/// Who a client requires at the other end of a TLS connection. Every mesh client names one: a CA
/// signature alone proves only that the server is *some* member of the mesh (a node's certificate
/// is signed by the same CA as the control plane's).
public enum ExpectedPeer: Sendable, Hashable, CustomStringConvertible {
    /// The control plane: any `mesh://control/<name>`.
    case controlPlane
    /// Exactly this identity: a link to `mesh://node/B`, a relay `mesh://relay/R`.
    case exactly(MeshPrincipal)

    public func accepts(_ identity: MeshPrincipal?) -> Bool {
        switch (self, identity) {
        case (.controlPlane, .control?): return true
        case (.exactly(let wanted), let got?): return wanted == got
        default: return false
        }
    }

    public var description: String {
        switch self {
        case .controlPlane: return "the control plane (mesh://control/...)"
        case .exactly(let identity): return identity.uri
        }
    }
}

/// Certificate serials that are no longer honoured, as lowercase hex (`MeshTLS.serialHex`). Shared
/// by the control plane (which keeps it) and by clients, links and relays (which fetch it from
/// `GET /apis/mesh.edge/v1/revokedcertificates` and replace it here).
public final class RevokedSerials: Sendable {
    private let serials: Mutex<Set<String>>

    public init(_ serials: Set<String> = []) {
        self.serials = Mutex(serials)
    }

    public func contains(_ serial: String) -> Bool { self.serials.withLock { $0.contains(serial) } }
    public func insert(_ serial: String) { _ = self.serials.withLock { $0.insert(serial) } }
    public func replace(with serials: Set<String>) { self.serials.withLock { $0 = serials } }
    public var all: Set<String> { self.serials.withLock { $0 } }
}

/// The one check every mesh client runs on the server's certificate chain (through NIOSSL's custom
/// verification callback, which replaces BoringSSL's): the leaf is signed by a trusted mesh CA and
/// valid now, carries the expected `mesh://` identity, may serve (EKU serverAuth) and is not
/// revoked. The mesh identity takes the place of a host name check. The last failure's reason is
/// kept, so a refused handshake can say *why* ("presented mesh://node/n1, not the control plane").
public final class PeerVerifier: Sendable {
    public enum Trust: Sendable {
        /// CA certificates (the mesh CA from `ca.crt`).
        case certificates([Certificate])
        /// A CA not known yet, pinned by its `sha256:` SubjectPublicKeyInfo hash (the join): the
        /// server's chain must hold that CA, self-signed, and it must have signed the leaf.
        case pinnedHash(String)
    }

    /// Why a chain was refused.
    public struct Refusal: Error, Sendable, CustomStringConvertible {
        public enum Kind: Sendable { case untrusted, wrongIdentity, revoked }
        public var kind: Kind
        public var message: String
        public var description: String { self.message }

        init(_ kind: Kind, _ message: String) {
            self.kind = kind
            self.message = message
        }
    }

    public let expected: ExpectedPeer
    public let trust: Trust
    public let revoked: RevokedSerials?
    private let failure = Mutex<Refusal?>(nil)

    public init(expected: ExpectedPeer, trust: Trust, revoked: RevokedSerials? = nil) {
        self.expected = expected
        if case .pinnedHash(let h) = trust {
            self.trust = .pinnedHash(h.lowercased())
        } else {
            self.trust = trust
        }
        self.revoked = revoked
    }

    /// Why the last refused chain was refused (nil: none refused yet).
    public var lastRefusal: Refusal? { self.failure.withLock { $0 } }

    /// The callback for `NIOSSLClientHandler(customVerificationCallback:)`.
    public var callback: @Sendable ([NIOSSLCertificate], EventLoopPromise<NIOSSLVerificationResult>) -> Void {
        { chain, promise in
            switch self.verify(chain) {
            case .success: promise.succeed(.certificateVerified)
            case .failure(let reason):
                self.failure.withLock { $0 = reason }
                promise.succeed(.failed)
            }
        }
    }

    /// Checks a presented chain (leaf first); the identity of the leaf when it passes.
    public func verify(_ chain: [NIOSSLCertificate], now: Date = Date()) -> Result<MeshPrincipal, Refusal> {
        let parsed = chain.compactMap { c in (try? c.toDERBytes()).flatMap { try? Certificate(derEncoded: $0) } }
        guard parsed.count == chain.count, !parsed.isEmpty else {
            return .failure(Refusal(.untrusted, "the server's certificate chain does not parse"))
        }
        return self.verify(parsed, now: now)
    }

    public func verify(_ chain: [Certificate], now: Date = Date()) -> Result<MeshPrincipal, Refusal> {
        guard let leaf = chain.first else { return .failure(Refusal(.untrusted, "the server sent no certificate")) }
        let cas: [Certificate]
        switch self.trust {
        case .certificates(let trusted):
            cas = trusted
        case .pinnedHash(let pinned):
            cas = chain.filter {
                CertificateAuthority.hash(of: $0) == pinned && MeshTLS.isCA($0)
                    && CertificateAuthority.verify($0, issuedBy: $0, now: now)
            }
            if cas.isEmpty {
                return .failure(Refusal(.untrusted, "the server's chain holds no CA with hash \(pinned)"))
            }
        }
        guard
            let ca = cas.first(where: {
                leaf.issuer == $0.subject && $0.publicKey.isValidSignature(leaf.signature, for: leaf)
            })
        else {
            return .failure(Refusal(.untrusted, "the server's certificate was not issued by the mesh CA"))
        }
        guard ca.notValidBefore <= now, now < ca.notValidAfter else {
            return .failure(Refusal(.untrusted, "the mesh CA certificate is not valid now (until \(ca.notValidAfter))"))
        }
        guard CertificateAuthority.verify(leaf, issuedBy: ca, now: now) else {
            return .failure(
                Refusal(
                    .untrusted,
                    "the server's certificate is not valid now (valid \(leaf.notValidBefore) to \(leaf.notValidAfter))"
                )
            )
        }
        let identity = meshIdentity(of: leaf)
        guard self.expected.accepts(identity) else {
            return .failure(
                Refusal(
                    .wrongIdentity,
                    "the server presented \(identity?.uri ?? "no mesh identity"), not \(self.expected)"
                )
            )
        }
        guard let eku = try? leaf.extensions.extendedKeyUsage, eku.contains(.serverAuth) else {
            return .failure(
                Refusal(
                    .wrongIdentity,
                    "the server's certificate (\(identity!.uri)) is not for serving (no serverAuth)"
                )
            )
        }
        let serial = MeshTLS.serialHex(leaf.serialNumber)
        if let revoked = self.revoked, revoked.contains(serial) {
            return .failure(
                Refusal(.revoked, "the server's certificate (\(identity!.uri), serial \(serial)) is revoked")
            )
        }
        return .success(identity!)
    }
}

/// A client's TLS settings for one kind of peer: a context (TLS 1.3, the client's own certificate if
/// any) and the verifier that checks the server. The context can be replaced (certificate
/// renewal); each replacement bumps `generation`, so kept-alive connections know to reconnect.
public final class MeshClientTLS: Sendable {
    public let verifier: PeerVerifier
    private let state: Mutex<(context: NIOSSLContext, generation: UInt64)>

    init(context: NIOSSLContext, verifier: PeerVerifier) {
        self.verifier = verifier
        self.state = Mutex((context: context, generation: 0))
    }

    /// The context for the next connection, and its generation.
    public var current: (context: NIOSSLContext, generation: UInt64) { self.state.withLock { $0 } }

    /// Uses a new client key and certificate (same CA, same verifier) for later connections.
    public func use(key: String, certificate: String) throws {
        let context = try MeshTLS.makeClientContext(key: key, certificate: certificate, httpRecords: true)
        self.state.withLock { $0 = (context: context, generation: $0.generation + 1) }
    }
}

extension MeshTLS {
    /// The one way mesh clients build their TLS settings: trust the mesh CA in `caPEM`, require
    /// `expect` of the server (and that its serial is not in `revoked`), present `key` and
    /// `certificate` when given.
    public static func client(
        caPEM: String,
        expect: ExpectedPeer,
        key: String? = nil,
        certificate: String? = nil,
        revoked: RevokedSerials? = nil
    ) throws -> MeshClientTLS {
        let cas: [Certificate]
        do {
            cas = try Self.nioCertificates(caPEM).map { try Certificate(derEncoded: try $0.toDERBytes()) }
        } catch {
            throw IdentityError("the CA certificate does not parse: \(error)")
        }
        guard !cas.isEmpty else { throw IdentityError("the CA file holds no certificate") }
        let verifier = PeerVerifier(expected: expect, trust: .certificates(cas), revoked: revoked)
        return MeshClientTLS(
            context: try Self.makeClientContext(key: key, certificate: certificate, httpRecords: true),
            verifier: verifier
        )
    }

    /// `client(caPEM:expect:...)` with loaded credentials (their CA, key and certificate).
    public static func client(
        _ credentials: LoadedCredentials,
        expect: ExpectedPeer,
        revoked: RevokedSerials? = nil
    ) throws -> MeshClientTLS {
        try Self.client(
            caPEM: credentials.caPEM,
            expect: expect,
            key: credentials.keyPEM,
            certificate: credentials.certificatePEM,
            revoked: revoked
        )
    }

    /// For joining: no client certificate; the server must present a chain with the CA pinned by
    /// `caHash`, and a certificate of that CA for `expect` (the control plane), before the token
    /// is sent.
    public static func join(caHash: String, expect: ExpectedPeer = .controlPlane) throws -> MeshClientTLS {
        MeshClientTLS(
            context: try Self.makeClientContext(key: nil, certificate: nil, httpRecords: true),
            verifier: PeerVerifier(expected: expect, trust: .pinnedHash(caHash))
        )
    }

    /// `httpRecords`: offer the mesh record layer to HTTP servers (`HTTPRecords`): the contexts of
    /// `MeshTLS.client` and `MeshTLS.join`, which `HTTPClient` uses.
    static func makeClientContext(
        key: String?,
        certificate: String?,
        httpRecords: Bool = false,
        configure: (inout TLSConfiguration) -> Void = { _ in }
    ) throws -> NIOSSLContext {
        var config = TLSConfiguration.makeClientConfiguration()
        config.minimumTLSVersion = .tlsv13
        config.maximumTLSVersion = .tlsv13
        // Not `.none`: the custom verification callback runs only when verification is on. The
        // callback replaces BoringSSL's chain and host name checks (`PeerVerifier`).
        config.certificateVerification = .noHostnameVerification
        // No trust roots for BoringSSL: `PeerVerifier` checks the chain against the mesh CA (or the pinned
        // hash). The default, the system's store, parsed ~140 certificates into every client context
        // (~0.2-0.3 MB of heap each, measured with massif in the edge agent) that nothing used; and a
        // handshake that somehow ran without the callback now fails instead of trusting public CAs.
        config.trustRoots = .certificates([])
        config.shutdownTimeout = Self.clientShutdownTimeout
        if let key, let certificate {
            config.certificateChain = try nioCertificates(certificate).map { .certificate($0) }
            config.privateKey = .privateKey(try nioKey(key))
        }
        if httpRecords { Self.offerHTTPRecords(&config, secrets: HTTPRecords.clientSecrets) }
        configure(&config)
        return try NIOSSLContext(configuration: config)
    }

    /// A certificate serial as lowercase hex without separators (the revocation list's form).
    public static func serialHex(_ serial: Certificate.SerialNumber) -> String {
        Self.serialHex(bytes: serial.bytes)
    }

    public static func serialHex(bytes: some Sequence<UInt8>) -> String {
        var text = ""
        for b in bytes {
            if b < 16 { text += "0" }
            text += String(b, radix: 16)
        }
        // DER integers may carry a leading zero byte; the serial is the same number without it.
        while text.hasPrefix("00") && text.count > 2 { text.removeFirst(2) }
        return text
    }

    /// When a certificate should be renewed: after two thirds of its lifetime (counted from its
    /// issue, not from the few minutes it is backdated for clock skew).
    public static func renewalTime(of certificate: Certificate) -> Date {
        let issued = min(certificate.notValidBefore + CertificateAuthority.backdate, certificate.notValidAfter)
        return issued + (certificate.notValidAfter.timeIntervalSince(issued)) * 2 / 3
    }
}
