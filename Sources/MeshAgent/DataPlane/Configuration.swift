import NIOCore

/// Settings of the data plane. Every field has a default; tests shrink the timers.
public struct DataPlaneConfiguration: Sendable {
    /// Where VIPs are bound.
    public enum BindMode: Sendable, Hashable {
        /// Bind VIPs as given, without touching any interface: VIPs must be inside 127.0.0.0/8 or be `::1`
        /// (all of 127/8 routes to `lo`). The all-in-one and the tests use this.
        case loopback
        /// Hold every VIP on the dummy link `name` (created over netlink, removed on shutdown). Fails
        /// without CAP_NET_ADMIN.
        case meshInterface(name: String)
        /// `meshInterface(name:)`, falling back to `loopback` (logged once) when the link cannot be created.
        case automatic(name: String)
    }

    public var bindMode: BindMode
    /// Addresses held on the mesh interface besides the VIPs (the agent's DNS address).
    public var extraInterfaceAddresses: [String]

    /// Connect timeout towards one backend; a timed-out attempt counts as a failure for outlier detection.
    public var connectTimeout: TimeAmount
    /// Backends tried for one connection (L4) or one request (HTTP) before giving up.
    public var connectAttempts: Int
    /// A TCP connection with no bytes either way for this long is closed.
    public var tcpIdleTimeout: TimeAmount
    /// Accepted connections per TCP/HTTP listener at once; further ones are closed on accept.
    public var maxConnectionsPerListener: Int
    /// Write buffer water marks of every proxied channel: reading the other side stops above `high` and
    /// resumes below `low`, which is what bounds the memory held per connection.
    public var writeBufferLowWaterMark: Int
    public var writeBufferHighWaterMark: Int
    /// `listen(2)` backlog.
    public var backlog: Int

    public var udp: UDPConfiguration
    public var http: HTTPConfiguration
    public var outlier: OutlierConfiguration

    /// On shutdown (or when a route goes away), open connections get this long to finish before they are closed.
    public var drainTimeout: TimeAmount

    /// Mesh-interface mode: one listener for every TCP/HTTP VIP:port (nat `REDIRECT` + `SO_ORIGINAL_DST`,
    /// DataPlane/README.md) rather than a socket each. Off: a socket per VIP:port, as in loopback mode.
    public var vipRedirect = true
    /// The nat chain of the redirect rules (one per network namespace; replaced at start, removed at shutdown).
    public var vipRedirectChain = "MESH-VIP"

    public init(
        bindMode: BindMode = .loopback,
        extraInterfaceAddresses: [String] = ["169.254.96.16"],
        connectTimeout: TimeAmount = .seconds(2),
        connectAttempts: Int = 3,
        tcpIdleTimeout: TimeAmount = .minutes(10),
        maxConnectionsPerListener: Int = 16_384,
        writeBufferLowWaterMark: Int = 64 * 1024,
        writeBufferHighWaterMark: Int = 256 * 1024,
        backlog: Int = 1024,
        udp: UDPConfiguration = .init(),
        http: HTTPConfiguration = .init(),
        outlier: OutlierConfiguration = .init(),
        drainTimeout: TimeAmount = .seconds(10)
    ) {
        self.bindMode = bindMode
        self.extraInterfaceAddresses = extraInterfaceAddresses
        self.connectTimeout = connectTimeout
        self.connectAttempts = max(1, connectAttempts)
        self.tcpIdleTimeout = tcpIdleTimeout
        self.maxConnectionsPerListener = maxConnectionsPerListener
        self.writeBufferLowWaterMark = writeBufferLowWaterMark
        self.writeBufferHighWaterMark = max(writeBufferHighWaterMark, writeBufferLowWaterMark)
        self.backlog = backlog
        self.udp = udp
        self.http = http
        self.outlier = outlier
        self.drainTimeout = drainTimeout
    }
}

/// UDP flows: one connected upstream socket per client address.
public struct UDPConfiguration: Sendable {
    /// A flow with no datagram either way for this long is closed.
    public var flowIdleTimeout: TimeAmount
    /// Flows per listener; datagrams that would open a flow beyond this are dropped (and counted).
    public var maxFlowsPerListener: Int
    /// Datagrams queued per flow while its upstream socket is being set up.
    public var maxPendingDatagramsPerFlow: Int

    public init(
        flowIdleTimeout: TimeAmount = .seconds(60),
        maxFlowsPerListener: Int = 4096,
        maxPendingDatagramsPerFlow: Int = 32
    ) {
        self.flowIdleTimeout = flowIdleTimeout
        self.maxFlowsPerListener = maxFlowsPerListener
        self.maxPendingDatagramsPerFlow = maxPendingDatagramsPerFlow
    }
}

/// The L7 HTTP/1.1 proxy.
public struct HTTPConfiguration: Sendable {
    /// Size of a request head in bytes (the request line and header lines with their CRLFs); larger heads get
    /// 431. Also the limit of a chunked request body's trailer section.
    public var maxHeaderListSize: Int
    /// Size of one header line (or the request line) in bytes with its CRLF; longer ones get 431.
    public var maxHeaderFieldSize: Int
    /// A client has this long to send a complete request head once it started one (or opened the connection).
    public var requestHeadTimeout: TimeAmount
    /// An idle keep-alive client connection is closed after this long.
    public var clientIdleTimeout: TimeAmount
    /// Time from the request head sent upstream to the response head received; then 504.
    public var upstreamResponseTimeout: TimeAmount
    /// Idle upstream connections kept per backend and event loop.
    public var maxIdleConnectionsPerBackend: Int
    /// Upstream connections (idle + busy) per backend and event loop; requests beyond it get 503.
    public var maxConnectionsPerBackend: Int
    /// An idle pooled upstream connection is closed after this long.
    public var upstreamIdleTimeout: TimeAmount
    /// Retries of one request (connect failures, and idempotent requests reset before any response).
    public var maxRetries: Int
    /// Retry budget: retries in flight may be at most this share of requests in flight...
    public var retryBudgetPercent: Double
    /// ...but this many concurrent retries are always allowed.
    public var minRetryConcurrency: Int
    /// Add `X-Forwarded-For` with the client address.
    public var addForwardedFor: Bool
    /// Add `X-Request-Id` when the request has none.
    public var addRequestID: Bool
    /// How many proxies in front of the data plane are trusted to set `X-Forwarded-For` and `Forwarded`.
    /// 0 (the default): a client's X-Forwarded-For, Forwarded and X-Real-IP are dropped and X-Forwarded-For is
    /// the client's address alone. N > 0: the last N addresses of the client's X-Forwarded-For are kept (those
    /// the trusted proxies added; anything before them could be forged) and the client's address appended;
    /// Forwarded and X-Real-IP pass.
    public var trustedForwardingHops: Int
    /// Protocols a client may upgrade to (`Upgrade:` tokens, lowercase) on routes that do not set their own:
    /// WebSocket by default; `h2c` only when asked for (it would carry requests past the proxy's parser).
    public var upgradeProtocols: Set<String>
    /// Request bodies up to this size (Content-Length, or chunked until they exceed it) are read whole before
    /// a backend is picked and an upstream connection taken: a slow client then holds no upstream connection.
    /// Larger bodies are streamed as they come.
    public var requestBufferSize: Int
    /// A response body with no bytes from the upstream for this long is cut off (both connections closed).
    public var responseBodyTimeout: TimeAmount
    /// What carries HTTP routes: NIO channels (`.nio`), or the epoll loops that carry TCP (`.epoll`,
    /// HTTPLoop/README.md).
    public var engine: HTTPEngine

    public init(
        maxHeaderListSize: Int = 64 * 1024,
        maxHeaderFieldSize: Int = 16 * 1024,
        requestHeadTimeout: TimeAmount = .seconds(10),
        clientIdleTimeout: TimeAmount = .seconds(60),
        upstreamResponseTimeout: TimeAmount = .seconds(15),
        maxIdleConnectionsPerBackend: Int = 32,
        maxConnectionsPerBackend: Int = 1024,
        upstreamIdleTimeout: TimeAmount = .seconds(50),
        maxRetries: Int = 2,
        retryBudgetPercent: Double = 20,
        minRetryConcurrency: Int = 3,
        addForwardedFor: Bool = true,
        addRequestID: Bool = true,
        trustedForwardingHops: Int = 0,
        upgradeProtocols: Set<String> = ["websocket"],
        requestBufferSize: Int = 64 * 1024,
        responseBodyTimeout: TimeAmount = .seconds(60),
        engine: HTTPEngine = .epoll
    ) {
        self.maxHeaderListSize = maxHeaderListSize
        self.maxHeaderFieldSize = maxHeaderFieldSize
        self.requestHeadTimeout = requestHeadTimeout
        self.clientIdleTimeout = clientIdleTimeout
        self.upstreamResponseTimeout = upstreamResponseTimeout
        self.maxIdleConnectionsPerBackend = maxIdleConnectionsPerBackend
        self.maxConnectionsPerBackend = maxConnectionsPerBackend
        self.upstreamIdleTimeout = upstreamIdleTimeout
        self.maxRetries = maxRetries
        self.retryBudgetPercent = retryBudgetPercent
        self.minRetryConcurrency = minRetryConcurrency
        self.addForwardedFor = addForwardedFor
        self.addRequestID = addRequestID
        self.trustedForwardingHops = max(0, trustedForwardingHops)
        self.upgradeProtocols = Set(upgradeProtocols.map { $0.lowercased() })
        self.requestBufferSize = max(0, requestBufferSize)
        self.responseBodyTimeout = responseBodyTimeout
        self.engine = engine
    }
}

/// Passive outlier detection, after Envoy's: a backend failing `consecutiveFailures` times in a row
/// (connect failure, reset before a response, or a 5xx) is ejected for `baseEjectionTime` × the number of
/// times it has been ejected (capped at `maxEjectionTime`), then comes back on its own.
public struct OutlierConfiguration: Sendable, Hashable {
    public var enabled: Bool
    public var consecutiveFailures: Int
    public var baseEjectionTime: TimeAmount
    public var maxEjectionTime: TimeAmount
    /// At most this share of a route's backends is ejected at once, but at least one may be, and one
    /// backend always stays in (so a route never loses its last backend to ejection).
    public var maxEjectionPercent: Int
    /// Count HTTP 5xx responses as failures (502, 503, 504 and the rest).
    public var countHTTP5xx: Bool

    public init(
        enabled: Bool = true,
        consecutiveFailures: Int = 5,
        baseEjectionTime: TimeAmount = .seconds(30),
        maxEjectionTime: TimeAmount = .seconds(300),
        maxEjectionPercent: Int = 10,
        countHTTP5xx: Bool = true
    ) {
        self.enabled = enabled
        self.consecutiveFailures = max(1, consecutiveFailures)
        self.baseEjectionTime = baseEjectionTime
        self.maxEjectionTime = maxEjectionTime
        self.maxEjectionPercent = maxEjectionPercent
        self.countHTTP5xx = countHTTP5xx
    }
}
