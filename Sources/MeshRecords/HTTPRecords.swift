import NIOCore

/// The mesh record layer on HTTP connections (the control plane's API, agents' admin APIs): what both ends
/// offer and where their exporter secrets wait. A client and a server that both offer ``recordsProtocol`` in
/// ALPN leave NIOSSL once the handshake is done (`stopTLS`: close_notify both ways) and seal their records
/// with ``SealedRecordHandler``, with keys from the handshake's exporter secret and the ``RecordLabels/http``
/// labels. The handshake, its certificates and their checks are TLS 1.3's as before; what goes is NIOSSL's and
/// BoringSSL's state for the connection's life (the SSL object, its certificates parsed for the session,
/// NIOSSL's write queue and buffers), which most of an idle agent's connection was (MeshHTTP/README.md). An
/// end that does not offer it (``httpProtocol`` only, or no ALPN) keeps TLS records throughout.
public enum HTTPRecords {
    /// ALPN of an HTTP/1.1 connection whose records the mesh record layer seals after the handshake.
    public static let recordsProtocol = "mesh-http-records/1"
    /// ALPN of HTTP/1.1 over TLS records (RFC 7301's registered name).
    public static let httpProtocol = "http/1.1"
    /// What a client or server offers, in its order of preference.
    public static let protocols = [recordsProtocol, httpProtocol]
    /// How long an end waits for its peer's close_notify when leaving TLS after the handshake (NIOSSL's
    /// `shutdownTimeout` of the contexts that offer the layer; MeshIdentity's `MeshTLS.offerHTTPRecords`).
    public static let setUpTimeout: TimeAmount = .seconds(30)

    /// The exporter secrets of this process's HTTPS client handshakes (the key-log callback of client contexts
    /// that offer ``recordsProtocol``). Clients and servers keep theirs apart: one process that is both (tests,
    /// `meshctl up`) logs each handshake on both sides, and each side takes its own.
    public static let clientSecrets = TLSExporterSecrets(capacity: 4096)
    /// The exporter secrets of this process's HTTPS server handshakes. A server may hold many handshakes between
    /// the key log's line and their end at once (a fleet reconnecting after a restart): entries of handshakes
    /// that never complete go oldest first past this many.
    public static let serverSecrets = TLSExporterSecrets(capacity: 65536)
}
