import MeshCore
import NIOCore
import Synchronization

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// What the HTTP proxy saw of one request that carried `x-mesh-trace: ID` (`meshctl trace` sends it): the
/// route and its policy, every backend tried (how it was reached, pooled or newly connected, with timings),
/// the upstream's first byte and the response. Requests without the field cost one field-name comparison in
/// the parser's scan and nothing else.
public struct RequestTrace: Sendable, Hashable, Codable {
    public var id: String
    public var namespace: String
    public var service: String
    public var vip: String
    public var port: Int
    public var policy: String
    public var method: String
    public var target: String
    /// When the request head was read (RFC 3339 with milliseconds).
    public var received: String
    /// Why the policy chose as it did.
    public var choice: String
    public var attempts: [Attempt]
    /// Microseconds from the request head to the upstream's response head.
    public var firstByteMicros: Int64?
    /// Microseconds from the request head to the end of the exchange.
    public var totalMicros: Int64?
    /// The status the client got (the upstream's, or the proxy's own on a failure).
    public var status: Int?
    /// The proxy's reason when it answered itself (no backend, connect error, timeout...).
    public var error: String?

    public struct Attempt: Sendable, Hashable, Codable {
        /// `ip:port`.
        public var backend: String
        public var node: String?
        public var site: String?
        /// The peer node whose link carried it; nil: dialed directly.
        public var via: String?
        /// `pooled` (an idle upstream connection was reused) or `new`.
        public var connection: String
        /// Microseconds from the request head to this attempt's start.
        public var startMicros: Int64
        /// Microseconds the new connection took (nil for a pooled one, or when it failed).
        public var connectMicros: Int64?
        public var error: String?
        /// For an attempt over a peer link: the link's path (`direct`, `punched`, `relayed`), relay and RTT
        /// as the agent's admin API adds them.
        public var path: String?
        public var relay: String?
        public var rttMicros: Int64?
    }
}

/// A traced request while it is in flight; owned by the proxy handler's event loop.
final class TraceRecording {
    var trace: RequestTrace
    let started: NIODeadline
    private var attemptStart: NIODeadline

    init(_ trace: RequestTrace, started: NIODeadline) {
        self.trace = trace
        self.started = started
        self.attemptStart = started
    }

    private func micros(_ now: NIODeadline, since: NIODeadline) -> Int64 { (now - since).nanoseconds / 1000 }

    func attempt(_ backend: Backend?, id: BackendID, pooled: Bool, now: NIODeadline) {
        self.attemptStart = now
        self.trace.attempts.append(
            .init(
                backend: "\(id.ip):\(id.port)",
                node: backend?.node,
                site: backend?.site,
                via: id.via,
                connection: pooled ? "pooled" : "new",
                startMicros: self.micros(now, since: self.started),
                connectMicros: nil,
                error: nil,
                path: id.via == nil ? "local" : nil
            )
        )
    }

    func connected(now: NIODeadline) {
        guard let last = self.trace.attempts.indices.last, self.trace.attempts[last].connection == "new" else { return }
        self.trace.attempts[last].connectMicros = self.micros(now, since: self.attemptStart)
    }

    func attemptFailed(_ error: String) {
        guard let last = self.trace.attempts.indices.last else { return }
        self.trace.attempts[last].error = error
    }

    func firstByte(status: Int, now: NIODeadline) {
        if self.trace.firstByteMicros == nil { self.trace.firstByteMicros = self.micros(now, since: self.started) }
        self.trace.status = status
    }

    func failed(status: Int, reason: String) {
        self.trace.status = status
        self.trace.error = reason
    }

    func finish(now: NIODeadline) -> RequestTrace {
        self.trace.totalMicros = self.micros(now, since: self.started)
        return self.trace
    }
}

/// The last traced requests of a data plane, by trace id (at most `capacity`, the oldest dropped first).
final class TraceLog: Sendable {
    let capacity: Int
    private let state = Mutex<(traces: [String: RequestTrace], order: [String])>(([:], []))

    init(capacity: Int = 256) { self.capacity = capacity }

    func record(_ trace: RequestTrace) {
        self.state.withLock { s in
            if s.traces.updateValue(trace, forKey: trace.id) == nil { s.order.append(trace.id) }
            while s.order.count > self.capacity { s.traces[s.order.removeFirst()] = nil }
        }
    }

    func trace(_ id: String) -> RequestTrace? { self.state.withLock { $0.traces[id] } }
}

extension HTTPProxyHandler {
    /// A recording for a request that asks to be traced, or nil (the usual case).
    func traceRecording(_ head: HTTPHead) -> TraceRecording? {
        TraceRecording.start(head, handle: self.handle, clientIPText: self.clientIPText)
    }
}

extension TraceRecording {
    /// A recording for a request that asks to be traced, or nil (the usual case); both engines use it.
    static func start(_ head: HTTPHead, handle: RouteHandle, clientIPText: String?) -> TraceRecording? {
        guard let field = head.traceField else { return nil }
        let id = String(head.value(field).prefix(128))
        let route = handle.route
        let choice: String
        switch route.policy {
        case .roundRobin: choice = "roundRobin: the next endpoint in weighted turn"
        case .random: choice = "random: an endpoint drawn by weight"
        case .leastRequest: choice = "leastRequest: the less loaded of two endpoints drawn by weight"
        case .consistentHash(let key):
            switch key {
            case .header(let name):
                let value = head.values(name: name).first
                choice =
                    value.map { "consistentHash: header \(name) = \"\($0)\"" }
                    ?? "consistentHash: no \(name) header, so the client's address \(clientIPText ?? "?")"
            case .cookie(let name):
                choice =
                    head.hashKey(key) != nil
                    ? "consistentHash: cookie \(name)" : "consistentHash: no \(name) cookie, so the client's address"
            case .sourceIP:
                choice = "consistentHash: the client's address \(clientIPText ?? "?")"
            }
        }
        let now = Date()
        let millis = Int(now.timeIntervalSince1970 * 1000) % 1000
        let stamp = Timestamp.format(secondsSinceEpoch: Int(now.timeIntervalSince1970))
        return TraceRecording(
            RequestTrace(
                id: id,
                namespace: route.service.namespace,
                service: route.service.name,
                vip: route.vip.description,
                port: route.port,
                policy: route.policy.description,
                method: "\(head.method)",
                target: String(head.uri.prefix(512)),
                received: stamp.dropLast() + "." + String(String(1000 + millis).dropFirst()) + "Z",
                choice: choice,
                attempts: []
            ),
            started: .now()
        )
    }
}
