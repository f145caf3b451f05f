import MeshCore
import MeshRecords
import NIOCore
import NIOSSL
import X509

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Where one component's credentials live: its private key, its certificate and the CA it trusts.
public struct CredentialFiles: Sendable, Hashable, Codable {
    public var key: String
    public var certificate: String
    public var ca: String

    public init(key: String, certificate: String, ca: String) {
        self.key = key
        self.certificate = certificate
        self.ca = ca
    }

    /// `<dir>/<name>.key`, `<dir>/<name>.crt` and `<dir>/ca.crt`.
    public init(directory dir: String, name: String) {
        self.init(key: "\(dir)/\(name).key", certificate: "\(dir)/\(name).crt", ca: "\(dir)/ca.crt")
    }

    public var allExist: Bool {
        PEMFiles.exists(self.key) && PEMFiles.exists(self.certificate) && PEMFiles.exists(self.ca)
    }

    /// Writes a key (0600), its certificate and the CA certificate.
    public func write(keyPEM: String, certificatePEM: String, caPEM: String) throws {
        try PEMFiles.write(keyPEM, to: self.key, mode: 0o600)
        try PEMFiles.write(certificatePEM, to: self.certificate, mode: 0o644)
        try PEMFiles.write(caPEM, to: self.ca, mode: 0o644)
    }

    /// The three files read and parsed; errors name the file that is missing, unreadable or corrupt,
    /// or say that the certificate does not belong to the key or to the CA.
    public func load() throws -> LoadedCredentials {
        let keyPEM = try PEMFiles.read(self.key, what: "private key")
        let certPEM = try PEMFiles.read(self.certificate, what: "certificate")
        let caPEM = try PEMFiles.read(self.ca, what: "CA certificate")
        let key = try CertificateAuthority.loadKey(self.key, what: "private key")
        let cert = try CertificateAuthority.loadCertificate(self.certificate, what: "certificate")
        let ca = try CertificateAuthority.loadCertificate(self.ca, what: "CA certificate")
        guard cert.publicKey == key.publicKey else {
            throw IdentityError("the certificate \(self.certificate) does not belong to the key \(self.key)")
        }
        guard cert.issuer == ca.subject, ca.publicKey.isValidSignature(cert.signature, for: cert) else {
            throw IdentityError("the certificate \(self.certificate) was not issued by the CA in \(self.ca)")
        }
        return LoadedCredentials(
            keyPEM: keyPEM,
            certificatePEM: certPEM,
            caPEM: caPEM,
            certificate: cert,
            caCertificate: ca
        )
    }
}

/// Credentials read from files (or received on join), ready to build TLS contexts.
public struct LoadedCredentials: Sendable {
    public var keyPEM: String
    public var certificatePEM: String
    public var caPEM: String
    public var certificate: Certificate
    public var caCertificate: Certificate

    public var identity: MeshPrincipal? { meshIdentity(of: self.certificate) }
}

/// TLS settings of the mesh: TLS 1.3 only, ECDSA P-256 certificates from the mesh CA.
public enum MeshTLS {
    /// How long a client waits for the server's close_notify when it closes. A client closes once it
    /// has what it wanted (or gives up on a watch), so it need not wait for long: the default (5 s)
    /// held up an agent's shutdown while a server with half-closure kept its side of a watch open.
    static let clientShutdownTimeout: TimeAmount = .milliseconds(200)

    static func nioKey(_ pem: String) throws -> NIOSSLPrivateKey {
        try NIOSSLPrivateKey(bytes: Array(pem.utf8), format: .pem)
    }

    static func nioCertificates(_ pem: String) throws -> [NIOSSLCertificate] {
        try NIOSSLCertificate.fromPEMBytes(Array(pem.utf8))
    }

    /// The server side: presents its certificate and the CA (so pinning clients see it), asks every
    /// client for a certificate and verifies one when given. Clients without one still connect (the
    /// join endpoint and probes need that); the application decides what they may do.
    ///
    /// It offers the mesh record layer to HTTP clients (`HTTPRecords`, ALPN `mesh-http-records/1` then
    /// `http/1.1`; its exporter secrets go to `HTTPRecords.serverSecrets`), which `HTTPServer` switches to
    /// after the handshake when the client offers it too; pass `httpRecords: false` for TLS records only.
    public static func serverContext(_ credentials: LoadedCredentials, httpRecords: Bool = true) throws -> NIOSSLContext
    {
        try Self.serverContext(credentials, requireClientCertificate: false, httpRecords: httpRecords)
    }

    /// `serverContext`, and with `requireClientCertificate` a handshake without a client certificate
    /// of the mesh CA fails (relay sessions, links): the application then checks the identity in it.
    public static func serverContext(
        _ credentials: LoadedCredentials,
        requireClientCertificate: Bool,
        httpRecords: Bool = false
    ) throws -> NIOSSLContext {
        let chain = try nioCertificates(credentials.certificatePEM) + nioCertificates(credentials.caPEM)
        var config = TLSConfiguration.makeServerConfiguration(
            certificateChain: chain.map { .certificate($0) },
            privateKey: .privateKey(try nioKey(credentials.keyPEM))
        )
        config.minimumTLSVersion = .tlsv13
        config.maximumTLSVersion = .tlsv13
        config.certificateVerification = requireClientCertificate ? .noHostnameVerification : .optionalVerification
        config.trustRoots = .certificates(try nioCertificates(credentials.caPEM))
        if httpRecords {
            Self.offerHTTPRecords(&config, secrets: HTTPRecords.serverSecrets)
            // A server's wait is for the client's close_notify, which the client sends right behind its Finished;
            // and it is also how long a closing TLS-records connection may hold a draining server (30 s kept
            // `mesh-control` and `meshctl up` from stopping within 10 s of SIGTERM): NIOSSL's 5 s.
            config.shutdownTimeout = .seconds(5)
        }
        return try NIOSSLContext(configuration: config)
    }

    /// ALPN offers the mesh record layer, then plain HTTP/1.1 over TLS; the key log feeds `secrets` (a client's
    /// by default; a server passes `HTTPRecords.serverSecrets`). Leaving
    /// TLS for the record layer waits for the peer's close_notify (`stopTLS`), a step of every connection's set-up
    /// now, not only of its close: the 200 ms of `clientShutdownTimeout` failed connections on a busy machine
    /// (`NIOSSLCloseTimedOutError`), and so did 5 s (a whole test suite beside two busy loops, where the server's
    /// close_notify waits behind every other connection's work, as it would behind a fleet's reconnect storm),
    /// so it is `HTTPRecords.setUpTimeout` (30 s, a request's own limit). A connection on the record layer
    /// closes without waiting for anything (`SealedRecordHandler`); one that stayed on TLS records (a peer that
    /// does not offer the layer) may wait that long for the peer's close_notify when it closes.
    public static func offerHTTPRecords(
        _ config: inout TLSConfiguration,
        secrets: TLSExporterSecrets = HTTPRecords.clientSecrets
    ) {
        config.applicationProtocols = HTTPRecords.protocols
        config.keyLogCallback = secrets.callback
        config.shutdownTimeout = HTTPRecords.setUpTimeout
    }

    /// A bare client context: trusts only the mesh CA, checks the server's name or IP, and presents
    /// a client certificate when given one. It does *not* check the server's mesh identity: mesh
    /// clients use `MeshTLS.client(...)` (PeerVerification.swift); this is for raw TLS tests.
    ///
    /// With `httpRecords`, it offers the mesh record layer (`HTTPRecords`) for `HTTPClient`, which switches to
    /// it after the handshake; off (the default), a raw TLS client over it speaks TLS records only.
    public static func clientContext(
        caPEM: String,
        key: String? = nil,
        certificate: String? = nil,
        httpRecords: Bool = false
    ) throws
        -> NIOSSLContext
    {
        var config = TLSConfiguration.makeClientConfiguration()
        config.minimumTLSVersion = .tlsv13
        config.maximumTLSVersion = .tlsv13
        config.certificateVerification = .fullVerification
        config.trustRoots = .certificates(try nioCertificates(caPEM))
        config.shutdownTimeout = Self.clientShutdownTimeout
        if let key, let certificate {
            config.certificateChain = try nioCertificates(certificate).map { .certificate($0) }
            config.privateKey = .privateKey(try nioKey(key))
        }
        if httpRecords { Self.offerHTTPRecords(&config, secrets: HTTPRecords.clientSecrets) }
        return try NIOSSLContext(configuration: config)
    }

    public static func clientContext(
        _ credentials: LoadedCredentials,
        httpRecords: Bool = false
    ) throws -> NIOSSLContext {
        try clientContext(
            caPEM: credentials.caPEM,
            key: credentials.keyPEM,
            certificate: credentials.certificatePEM,
            httpRecords: httpRecords
        )
    }

    static func isCA(_ certificate: Certificate) -> Bool {
        guard case .isCertificateAuthority = try? certificate.extensions.basicConstraints else { return false }
        return true
    }

    /// The `sha256:` hash of a PEM CA certificate.
    public static func caHash(pem: String) throws -> String {
        do {
            return CertificateAuthority.hash(of: try Certificate(pemEncoded: pem))
        } catch {
            throw IdentityError("the CA certificate does not parse: \(error)")
        }
    }

    /// Is `text` a CA hash as `meshctl token create` prints it (`sha256:` and 64 hex digits)?
    public static func isValidCAHash(_ text: String) -> Bool {
        let t = text.lowercased()
        guard t.hasPrefix("sha256:") else { return false }
        let hex = t.dropFirst(7)
        return hex.count == 64 && hex.allSatisfy { $0.isHexDigit }
    }

    /// The identity in a peer's (already verified) certificate.
    public static func identity(of certificate: NIOSSLCertificate) -> MeshPrincipal? {
        guard let der = try? certificate.toDERBytes(), let parsed = try? Certificate(derEncoded: der) else {
            return nil
        }
        return meshIdentity(of: parsed)
    }
}
