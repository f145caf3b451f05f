import Crypto

/// The TLS 1.3 key schedule functions the link record layer needs (RFC 8446 section 7), over the hash of the
/// connection's cipher suite. Pure functions of bytes.
public enum TLS13KeySchedule {
    /// The hash of a TLS 1.3 cipher suite, known from the length of its secrets.
    public enum Hash: Sendable, Hashable {
        case sha256
        case sha384

        /// The hash whose output is as long as `secret` (32: SHA-256, 48: SHA-384), or nil.
        public init?(secretLength: Int) {
            switch secretLength {
            case 32: self = .sha256
            case 48: self = .sha384
            default: return nil
            }
        }

        public var length: Int { self == .sha256 ? 32 : 48 }

        func digest(_ bytes: [UInt8]) -> [UInt8] {
            switch self {
            case .sha256: Array(SHA256.hash(data: bytes))
            case .sha384: Array(SHA384.hash(data: bytes))
            }
        }
    }

    /// HKDF-Expand-Label(secret, label, context, length) (RFC 8446 7.1): HKDF-Expand with the info
    /// `uint16 length || "tls13 " + label (8-bit length) || context (8-bit length)`.
    public static func expandLabel(
        _ hash: Hash,
        secret: [UInt8],
        label: String,
        context: [UInt8],
        length: Int
    ) -> [UInt8] {
        let fullLabel = Array("tls13 ".utf8) + Array(label.utf8)
        precondition(fullLabel.count <= 255 && context.count <= 255 && length <= 0xFFFF)
        var info: [UInt8] = [UInt8(length >> 8), UInt8(length & 0xFF), UInt8(fullLabel.count)]
        info += fullLabel
        info.append(UInt8(context.count))
        info += context
        let key = SymmetricKey(data: secret)
        let out: SymmetricKey
        switch hash {
        case .sha256: out = HKDF<SHA256>.expand(pseudoRandomKey: key, info: info, outputByteCount: length)
        case .sha384: out = HKDF<SHA384>.expand(pseudoRandomKey: key, info: info, outputByteCount: length)
        }
        return out.withUnsafeBytes { Array($0) }
    }

    /// TLS-Exporter(label, context, length) (RFC 8446 7.5) from the connection's exporter secret (what
    /// BoringSSL logs as `EXPORTER_SECRET`): HKDF-Expand-Label(Derive-Secret(secret, label, ""), "exporter",
    /// Hash(context), length).
    public static func exporter(
        _ hash: Hash,
        exporterSecret: [UInt8],
        label: String,
        context: [UInt8] = [],
        length: Int
    ) -> [UInt8] {
        let derived = Self.expandLabel(
            hash,
            secret: exporterSecret,
            label: label,
            context: hash.digest([]),
            length: hash.length
        )
        return Self.expandLabel(hash, secret: derived, label: "exporter", context: hash.digest(context), length: length)
    }
}

/// The secrets of a link's two directions after its TLS 1.3 handshake, from the connection's exporter secret:
/// each direction's traffic secret is a TLS exporter value of its own label, and its AES-128-GCM key and IV
/// come from that secret as TLS 1.3 derives them ("key", "iv"); the next secret of a direction is "traffic
/// upd" of the last (RFC 8446 7.2), which both ends derive after the same number of records.
public struct LinkRecordSecrets: Sendable, Equatable {
    public var hash: TLS13KeySchedule.Hash
    /// What the dialer sends (and the acceptor receives).
    public var dialerToAcceptor: [UInt8]
    /// What the acceptor sends.
    public var acceptorToDialer: [UInt8]

    /// Exporter labels of links (RFC 8446 7.5; "EXPERIMENTAL" as RFC 5705 asks of labels not registered).
    public static let dialerLabel = RecordLabels.link.dialer
    public static let acceptorLabel = RecordLabels.link.acceptor

    /// Both directions' secrets from the connection's exporter secret (32 or 48 bytes), or nil for another length;
    /// `labels` say what the connection is (a link, an HTTP connection), so that no two uses share keys.
    public init?(exporterSecret: [UInt8], labels: RecordLabels = .link) {
        guard let hash = TLS13KeySchedule.Hash(secretLength: exporterSecret.count) else { return nil }
        self.hash = hash
        self.dialerToAcceptor = TLS13KeySchedule.exporter(
            hash,
            exporterSecret: exporterSecret,
            label: labels.dialer,
            length: hash.length
        )
        self.acceptorToDialer = TLS13KeySchedule.exporter(
            hash,
            exporterSecret: exporterSecret,
            label: labels.acceptor,
            length: hash.length
        )
    }

    /// (send, receive) for the end that dialed (`dialer`) or accepted.
    public func directions(dialer: Bool) -> (send: [UInt8], receive: [UInt8]) {
        dialer ? (self.dialerToAcceptor, self.acceptorToDialer) : (self.acceptorToDialer, self.dialerToAcceptor)
    }
}

/// The exporter labels (RFC 8446 7.5) of each direction's traffic secret, per kind of connection.
public struct RecordLabels: Sendable, Hashable {
    /// What the end that dialed (the TLS client) sends with.
    public var dialer: String
    /// What the end that accepted (the TLS server) sends with.
    public var acceptor: String

    public init(dialer: String, acceptor: String) {
        self.dialer = dialer
        self.acceptor = acceptor
    }

    /// Peer links (Relay/Link).
    public static let link = RecordLabels(
        dialer: "EXPERIMENTAL mesh link dialer records",
        acceptor: "EXPERIMENTAL mesh link acceptor records"
    )
    /// HTTP connections to the control plane (and agents' admin APIs): ``HTTPRecords``.
    public static let http = RecordLabels(
        dialer: "EXPERIMENTAL mesh http client records",
        acceptor: "EXPERIMENTAL mesh http server records"
    )
}
