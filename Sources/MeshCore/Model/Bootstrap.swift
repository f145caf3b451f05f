/// Wire types of node enrolment (README "Security"): join tokens and the join exchange.

/// A join token as listed (`GET /apis/mesh.edge/v1/bootstraptokens`): never its secret.
public struct BootstrapToken: Codable, Sendable, Equatable {
    public var apiVersion: String = meshAPIVersion
    public var kind: String = "BootstrapToken"
    /// The token's id (the part before the dot).
    public var id: String
    public var description: String?
    /// RFC 3339 time after which the token is refused.
    public var expires: String
    /// Joins still allowed; nil: unlimited until it expires.
    public var usagesLeft: Int?
    public var creationTimestamp: String
    /// The one node name the token may join (and may re-join while a Node of that name exists);
    /// nil: any name not taken yet.
    public var nodeName: String?
    /// A relay token: it enrols only the relay of this name (`mesh://relay/NAME`), and no node.
    public var relayName: String?

    public init(
        id: String,
        description: String?,
        expires: String,
        usagesLeft: Int?,
        creationTimestamp: String,
        nodeName: String? = nil,
        relayName: String? = nil
    ) {
        self.id = id
        self.description = description
        self.expires = expires
        self.usagesLeft = usagesLeft
        self.creationTimestamp = creationTimestamp
        self.nodeName = nodeName
        self.relayName = relayName
    }
}

/// `GET /apis/mesh.edge/v1/bootstraptokens`.
public struct BootstrapTokenList: Codable, Sendable {
    public var apiVersion: String = meshAPIVersion
    public var kind: String = "BootstrapTokenList"
    public var items: [BootstrapToken]

    public init(items: [BootstrapToken]) {
        self.items = items
    }
}

/// `POST /apis/mesh.edge/v1/bootstraptokens`: what to create.
public struct BootstrapTokenRequest: Codable, Sendable, Equatable {
    public var apiVersion: String = meshAPIVersion
    public var kind: String = "BootstrapTokenRequest"
    /// Lifetime in seconds (default 24 h).
    public var ttlSeconds: Int?
    /// How many joins it allows (default: unlimited until it expires).
    public var usages: Int?
    public var description: String?
    /// Binds the token to this node name (see `BootstrapToken.nodeName`).
    public var nodeName: String?
    /// Makes it a relay token for this relay name (see `BootstrapToken.relayName`); not with `nodeName`.
    public var relayName: String?

    public init(
        ttlSeconds: Int? = nil,
        usages: Int? = nil,
        description: String? = nil,
        nodeName: String? = nil,
        relayName: String? = nil
    ) {
        self.ttlSeconds = ttlSeconds
        self.usages = usages
        self.description = description
        self.nodeName = nodeName
        self.relayName = relayName
    }
}

/// The answer to a token creation: the whole token, shown once, and the CA hash a joining node pins.
public struct BootstrapTokenSecret: Codable, Sendable, Equatable {
    public var apiVersion: String = meshAPIVersion
    public var kind: String = "BootstrapTokenSecret"
    /// `<id>.<secret>`.
    public var token: String
    /// `sha256:<hex>` of the CA's SubjectPublicKeyInfo.
    public var caCertHash: String
    public var expires: String
    public var usagesLeft: Int?
    /// The node name it is bound to, if any.
    public var nodeName: String?
    /// The relay it enrols, for a relay token.
    public var relayName: String?

    public init(
        token: String,
        caCertHash: String,
        expires: String,
        usagesLeft: Int?,
        nodeName: String? = nil,
        relayName: String? = nil
    ) {
        self.token = token
        self.caCertHash = caCertHash
        self.expires = expires
        self.usagesLeft = usagesLeft
        self.nodeName = nodeName
        self.relayName = relayName
    }
}

/// `POST /apis/mesh.edge/v1/join` (no client certificate needed): a token and a PEM CSR whose
/// common name is the node's (or the relay's) name.
public struct JoinRequest: Codable, Sendable, Equatable {
    public var apiVersion: String = meshAPIVersion
    public var kind: String = "JoinRequest"
    public var token: String
    public var csr: String
    /// What joins: a node (the default) or a relay (only with a relay token for that name).
    public var role: JoinRole?

    public init(token: String, csr: String, role: JoinRole? = nil) {
        self.token = token
        self.csr = csr
        self.role = role
    }
}

/// Who a join enrols, and so which identity the CA signs.
public enum JoinRole: String, StrictEnum {
    /// An agent: `mesh://node/NAME`.
    case node
    /// A relay: `mesh://relay/NAME`.
    case relay
}

/// The join's answer, and the renewal's: the node's certificate and the CA certificate (PEM).
public struct JoinResponse: Codable, Sendable, Equatable {
    public var apiVersion: String = meshAPIVersion
    public var kind: String = "JoinResponse"
    /// The name the certificate is for (a relay's name, for a relay join).
    public var nodeName: String
    public var certificate: String
    public var caCertificate: String

    public init(nodeName: String, certificate: String, caCertificate: String) {
        self.nodeName = nodeName
        self.certificate = certificate
        self.caCertificate = caCertificate
    }
}

/// `POST /apis/mesh.edge/v1/nodes/NAME/certificate`, by the node NAME itself over its current
/// certificate: a CSR for the same name; the answer is a `JoinResponse` with the new certificate.
public struct CertificateRenewalRequest: Codable, Sendable, Equatable {
    public var apiVersion: String = meshAPIVersion
    public var kind: String = "CertificateRenewalRequest"
    public var csr: String

    public init(csr: String) {
        self.csr = csr
    }
}

/// One revoked certificate: refused by the control plane, and by links and relays that fetch the list.
public struct RevokedCertificate: Codable, Sendable, Equatable {
    /// The serial, lowercase hex without separators.
    public var serial: String
    /// The identity the certificate carried (`mesh://node/NAME`).
    public var identity: String
    public var revokedAt: String
    /// When the certificate expires anyway (after that, the entry can be dropped).
    public var notAfter: String
    public var reason: String?

    public init(serial: String, identity: String, revokedAt: String, notAfter: String, reason: String?) {
        self.serial = serial
        self.identity = identity
        self.revokedAt = revokedAt
        self.notAfter = notAfter
        self.reason = reason
    }
}

/// `GET /apis/mesh.edge/v1/revokedcertificates` (admin and nodes), and the answer of
/// `POST /apis/mesh.edge/v1/nodes/NAME/revoke` (admin: the certificates it revoked).
public struct RevokedCertificateList: Codable, Sendable, Equatable {
    public var apiVersion: String = meshAPIVersion
    public var kind: String = "RevokedCertificateList"
    public var items: [RevokedCertificate]

    public init(items: [RevokedCertificate]) {
        self.items = items
    }
}

/// Join tokens: `<id>.<secret>`, id `[a-z0-9]{6}`, secret `[a-z0-9]{16}` (as kubeadm's).
public enum JoinTokens {
    public static let alphabet = Array("abcdefghijklmnopqrstuvwxyz0123456789")

    /// Splits a token into id and secret; nil when it is not of the form.
    public static func parse(_ token: String) -> (id: String, secret: String)? {
        let parts = token.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 2, parts[0].count == 6, parts[1].count == 16,
            (parts[0] + parts[1]).allSatisfy({ Self.alphabet.contains($0) })
        else { return nil }
        return (String(parts[0]), String(parts[1]))
    }

    /// A fresh random token.
    public static func generate() -> (id: String, secret: String) {
        var rng = SystemRandomNumberGenerator()
        func random(_ n: Int) -> String {
            String((0..<n).map { _ in Self.alphabet[Int(rng.next(upperBound: UInt32(Self.alphabet.count)))] })
        }
        return (random(6), random(16))
    }
}
