import Crypto
import MeshCore
import SwiftASN1
import X509

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// A private key and the certificate issued for it, as PEM text.
public struct IssuedCredential: Sendable {
    public var keyPEM: String
    public var certificatePEM: String

    public init(keyPEM: String, certificatePEM: String) {
        self.keyPEM = keyPEM
        self.certificatePEM = certificatePEM
    }
}

/// The mesh's certificate authority: an ECDSA P-256 key and a self-signed CA certificate. It issues
/// the control plane's serving certificate, admin client certificates and, from CSRs, node
/// certificates; each carries exactly one identity (`MeshPrincipal`) in a URI SAN.
public struct CertificateAuthority: Sendable {
    public let key: Certificate.PrivateKey
    public let certificate: Certificate

    /// The CA certificate's validity; leaves get `leafValidity`.
    public static let caValidity: TimeInterval = 10 * 365 * 86400
    public static let leafValidity: TimeInterval = 365 * 86400
    /// A little backdating so a peer whose clock is slightly behind accepts a fresh certificate.
    static let backdate: TimeInterval = 300

    public init(key: Certificate.PrivateKey, certificate: Certificate) {
        self.key = key
        self.certificate = certificate
    }

    /// A new CA with a fresh P-256 key.
    public static func create(commonName: String = "edge-mesh CA", now: Date = Date()) throws -> CertificateAuthority {
        let key = Certificate.PrivateKey(P256.Signing.PrivateKey())
        let name = try DistinguishedName { CommonName(commonName) }
        let certificate = try Certificate(
            version: .v3,
            serialNumber: Certificate.SerialNumber(),
            publicKey: key.publicKey,
            notValidBefore: now - Self.backdate,
            notValidAfter: now + Self.caValidity,
            issuer: name,
            subject: name,
            signatureAlgorithm: .ecdsaWithSHA256,
            extensions: try Certificate.Extensions {
                Critical(BasicConstraints.isCertificateAuthority(maxPathLength: 0))
                Critical(KeyUsage(keyCertSign: true, cRLSign: true))
                SubjectKeyIdentifier(hash: key.publicKey)
            },
            issuerPrivateKey: key
        )
        return CertificateAuthority(key: key, certificate: certificate)
    }

    /// Loads `<dir>/ca.key` and `<dir>/ca.crt`, or creates both when neither exists. A missing half,
    /// an unreadable or corrupt file, or a key that does not match the certificate is an error that
    /// names the file: a new CA would silently invalidate every certificate issued so far.
    public static func loadOrCreate(directory dir: String) throws -> (ca: CertificateAuthority, created: Bool) {
        let keyPath = dir + "/ca.key"
        let certPath = dir + "/ca.crt"
        switch (PEMFiles.exists(keyPath), PEMFiles.exists(certPath)) {
        case (false, false):
            let ca = try Self.create()
            try PEMFiles.write(try ca.keyPEM(), to: keyPath, mode: 0o600)
            try PEMFiles.write(try ca.certificatePEM(), to: certPath, mode: 0o644)
            return (ca, true)
        case (true, false):
            throw IdentityError(
                "\(certPath) is missing but \(keyPath) exists: restore it from a backup (a new CA would invalidate every issued certificate)"
            )
        case (false, true):
            throw IdentityError(
                "\(keyPath) is missing but \(certPath) exists: restore it from a backup (a new CA would invalidate every issued certificate)"
            )
        case (true, true):
            let key = try Self.loadKey(keyPath, what: "CA key")
            let certificate = try Self.loadCertificate(certPath, what: "CA certificate")
            guard certificate.publicKey == key.publicKey else {
                throw IdentityError("the CA key \(keyPath) does not belong to the CA certificate \(certPath)")
            }
            guard case .isCertificateAuthority = try certificate.extensions.basicConstraints else {
                throw IdentityError("\(certPath) is not a CA certificate")
            }
            return (CertificateAuthority(key: key, certificate: certificate), false)
        }
    }

    public static func loadKey(_ path: String, what: String) throws -> Certificate.PrivateKey {
        let text = try PEMFiles.read(path, what: what)
        do {
            return try Certificate.PrivateKey(pemEncoded: text)
        } catch {
            throw IdentityError("the \(what) \(path) is corrupt: not a PEM private key (\(error))")
        }
    }

    public static func loadCertificate(_ path: String, what: String) throws -> Certificate {
        let text = try PEMFiles.read(path, what: what)
        do {
            return try Certificate(pemEncoded: text)
        } catch {
            throw IdentityError("the \(what) \(path) is corrupt: not a PEM certificate (\(error))")
        }
    }

    public func keyPEM() throws -> String { try self.key.serializeAsPEM().pemString }
    public func certificatePEM() throws -> String { try self.certificate.serializeAsPEM().pemString }

    /// `sha256:<hex>` of the CA's SubjectPublicKeyInfo, as kubeadm's `--discovery-token-ca-cert-hash`.
    public var hash: String { Self.hash(of: self.certificate) }

    public static func hash(of certificate: Certificate) -> String {
        // The DER SubjectPublicKeyInfo (what `openssl pkey -pubin -outform der` prints).
        let spki = (try? certificate.publicKey.serializeAsPEM().derBytes) ?? []
        let digest = SHA256.hash(data: spki)
        return "sha256:" + digest.map { String($0, radix: 16).leftPadded(to: 2) }.joined()
    }

    /// Issues a certificate for `identity` on `publicKey`: the identity's URI SAN plus, for serving
    /// certificates, DNS names and IP addresses.
    public func issue(
        identity: MeshPrincipal,
        publicKey: Certificate.PublicKey,
        dnsNames: [String] = [],
        ipAddresses: [IPAddress] = [],
        serverAuth: Bool,
        clientAuth: Bool,
        now: Date = Date(),
        validity: TimeInterval = CertificateAuthority.leafValidity
    ) throws -> Certificate {
        var names: [GeneralName] = [.uniformResourceIdentifier(identity.uri)]
        names += dnsNames.map { .dnsName($0) }
        names += ipAddresses.map { .ipAddress(ASN1OctetString(contentBytes: ArraySlice($0.bytes))) }
        var usages: [ExtendedKeyUsage.Usage] = []
        if serverAuth { usages.append(.serverAuth) }
        if clientAuth { usages.append(.clientAuth) }
        let eku = try ExtendedKeyUsage(usages)
        let subject = try DistinguishedName { CommonName(identity.name) }
        let notAfter = min(now + validity, self.certificate.notValidAfter)
        return try Certificate(
            version: .v3,
            serialNumber: Certificate.SerialNumber(),
            publicKey: publicKey,
            notValidBefore: now - Self.backdate,
            notValidAfter: notAfter,
            issuer: self.certificate.subject,
            subject: subject,
            signatureAlgorithm: .ecdsaWithSHA256,
            extensions: try Certificate.Extensions {
                Critical(BasicConstraints.notCertificateAuthority)
                Critical(KeyUsage(digitalSignature: true))
                eku
                SubjectAlternativeNames(names)
                AuthorityKeyIdentifier(
                    keyIdentifier: try self.certificate.extensions.subjectKeyIdentifier?.keyIdentifier
                )
            },
            issuerPrivateKey: self.key
        )
    }

    /// A fresh key and a certificate for it.
    public func issueCredential(
        identity: MeshPrincipal,
        dnsNames: [String] = [],
        ipAddresses: [IPAddress] = [],
        serverAuth: Bool,
        clientAuth: Bool
    ) throws -> IssuedCredential {
        let key = Certificate.PrivateKey(P256.Signing.PrivateKey())
        let certificate = try self.issue(
            identity: identity,
            publicKey: key.publicKey,
            dnsNames: dnsNames,
            ipAddresses: ipAddresses,
            serverAuth: serverAuth,
            clientAuth: clientAuth
        )
        return IssuedCredential(
            keyPEM: try key.serializeAsPEM().pemString,
            certificatePEM: try certificate.serializeAsPEM().pemString
        )
    }

    /// Signs a node's CSR. The node name is the CSR's common name and must be a DNS-1123 subdomain;
    /// the certificate carries only `mesh://node/<name>` (whatever else the CSR asks for), so a CSR
    /// can never yield an admin or control-plane identity.
    public func signNodeCSR(
        pem: String,
        validity: TimeInterval = CertificateAuthority.leafValidity,
        now: Date = Date()
    ) throws -> (nodeName: String, certificate: Certificate) {
        try self.signCSR(pem: pem, role: .node, validity: validity, now: now)
    }

    /// Signs a CSR for a node or a relay: the name is the CSR's common name (a DNS-1123 subdomain),
    /// the certificate carries only `mesh://node/<name>` or `mesh://relay/<name>` (whatever else the
    /// CSR asks for), for serving and as a client. `now`: when it is signed (its validity counts from then).
    public func signCSR(
        pem: String,
        role: JoinRole,
        validity: TimeInterval = CertificateAuthority.leafValidity,
        now: Date = Date()
    ) throws -> (nodeName: String, certificate: Certificate) {
        let csr: CertificateSigningRequest
        do {
            csr = try CertificateSigningRequest(pemEncoded: pem)
        } catch {
            throw IdentityError("csr: not a PEM certificate signing request (\(error))")
        }
        guard csr.publicKey.isValidSignature(csr.signature, for: csr) else {
            throw IdentityError("csr: its signature does not match its public key")
        }
        let names = csr.subject.flatMap { rdn in
            rdn.filter { $0.type == .RDNAttributeType.commonName }.compactMap { String($0.value) }
        }
        guard names.count == 1, let name = names.first else {
            throw IdentityError("csr: the subject must hold exactly one common name, the \(role.rawValue)'s name")
        }
        if let e = Names.dns1123SubdomainError(name) {
            throw IdentityError("csr: the \(role.rawValue) name \"\(name)\" is invalid: \(e)")
        }
        let certificate = try self.issue(
            identity: role == .relay ? .relay(name) : .node(name),
            publicKey: csr.publicKey,
            serverAuth: true,
            clientAuth: true,
            now: now,
            validity: validity
        )
        return (name, certificate)
    }

    /// True when `certificate` was signed by this CA and is valid now (and until `margin` from now).
    public func issued(_ certificate: Certificate, now: Date = Date(), margin: TimeInterval = 0) -> Bool {
        Self.verify(certificate, issuedBy: self.certificate, now: now, margin: margin)
    }

    /// True when `ca` signed `certificate` and the certificate is valid now (and `margin` beyond).
    public static func verify(
        _ certificate: Certificate,
        issuedBy ca: Certificate,
        now: Date = Date(),
        margin: TimeInterval = 0
    ) -> Bool {
        certificate.issuer == ca.subject
            && ca.publicKey.isValidSignature(certificate.signature, for: certificate)
            && certificate.notValidBefore <= now && now + margin < certificate.notValidAfter
    }
}

/// A key and CSR for a node joining the mesh.
public struct NodeKey: Sendable {
    public let key: Certificate.PrivateKey

    public init() {
        self.key = Certificate.PrivateKey(P256.Signing.PrivateKey())
    }

    public func csrPEM(nodeName: String) throws -> String {
        let csr = try CertificateSigningRequest(
            version: .v1,
            subject: try DistinguishedName { CommonName(nodeName) },
            privateKey: self.key,
            attributes: CertificateSigningRequest.Attributes(),
            signatureAlgorithm: .ecdsaWithSHA256
        )
        return try csr.serializeAsPEM().pemString
    }

    public func keyPEM() throws -> String { try self.key.serializeAsPEM().pemString }
}

/// The identity in a certificate: the first `mesh://` URI SAN that parses.
public func meshIdentity(of certificate: Certificate) -> MeshPrincipal? {
    guard let sans = try? certificate.extensions.subjectAlternativeNames else { return nil }
    for name in sans {
        if case .uniformResourceIdentifier(let uri) = name, let identity = MeshPrincipal(uri: uri) {
            return identity
        }
    }
    return nil
}

extension String {
    fileprivate func leftPadded(to n: Int) -> String {
        self.count >= n ? self : String(repeating: "0", count: n - self.count) + self
    }
}
