import Metrics
import NIOCore
import Prometheus
import Synchronization

/// The process's metrics: swift-metrics backed by one Prometheus registry, bootstrapped once.
public enum MeshMetrics {
    private static let bootstrapped = Mutex(false)

    /// The registry `/metrics` renders.
    public static let registry = PrometheusCollectorRegistry()
    /// swift-metrics timers (`MeshMetricsFactory`), rendered after the registry.
    public static let histograms = MeshDurationHistograms()

    /// The buckets of every duration histogram (timers).
    public static let durationBuckets: [Duration] = [
        .microseconds(50), .microseconds(100), .microseconds(250), .microseconds(500), .milliseconds(1),
        .milliseconds(2), .milliseconds(5), .milliseconds(10), .milliseconds(25), .milliseconds(50),
        .milliseconds(100), .milliseconds(250), .milliseconds(500), .seconds(1), .seconds(5),
    ]

    /// Installs the Prometheus backend for swift-metrics (idempotent; later calls do nothing).
    public static func bootstrap() {
        let first = bootstrapped.withLock { done -> Bool in
            defer { done = true }
            return !done
        }
        guard first else { return }
        // Timers are `histograms`'; swift-prometheus makes the rest.
        let prometheus = PrometheusMetricsFactory(registry: registry)
        MetricsSystem.bootstrap(
            MeshMetricsFactory(prometheus: prometheus, histograms: histograms, buckets: Self.durationBuckets)
        )
    }

    /// The Prometheus text exposition of every metric.
    public static func render() -> ByteBuffer {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(16 * 1024)
        registry.emit(into: &bytes)
        histograms.emit(into: &bytes)
        return ByteBuffer(bytes: bytes)
    }
}

/// `/healthz`, `/readyz` and `/metrics`, which every daemon serves beside its API.
public struct HealthEndpoints: Sendable {
    let isReady: @Sendable () -> (ready: Bool, reason: String)

    public init(isReady: @escaping @Sendable () -> (ready: Bool, reason: String) = { (true, "ok") }) {
        self.isReady = isReady
    }

    /// The response for `request` when it is one of the three paths, else nil.
    public func respond(to request: HTTPRequest) -> HTTPResponse? {
        guard request.method == .GET || request.method == .HEAD else { return nil }
        switch request.path {
        case "/healthz", "/livez":
            return .text(.ok, "ok")
        case "/readyz":
            let (ready, reason) = self.isReady()
            return .text(ready ? .ok : .serviceUnavailable, reason)
        case "/metrics":
            return HTTPResponse(
                status: .ok,
                headers: ["Content-Type": "text/plain; version=0.0.4; charset=utf-8"],
                body: .bytes(MeshMetrics.render())
            )
        default:
            return nil
        }
    }
}
