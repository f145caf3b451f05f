import CoreMetrics
import Prometheus
import Testing

@testable import MeshHTTP

/// `MeshDurationHistogram` renders what swift-prometheus's `Histogram<Duration>` renders for the same
/// values, byte for byte; the factory hands timers to it and everything else to swift-prometheus.
@Suite("Duration histograms: swift-prometheus's text, recorded without walking the buckets")
struct DurationHistogramTests {
    static let buckets: [Duration] = [.microseconds(50), .microseconds(100), .milliseconds(1), .seconds(1)]

    /// Below, on and above bounds, above every bound, zero and a negative value.
    static let values: [Int64] = [10_000, 50_000, 50_001, 99_999, 100_000, 3_000_000, 2_000_000_000, 0, -5]

    @Test("the same values render the same text as swift-prometheus, with and without labels")
    func sameText() {
        for labels in [[], [("service", "ns/web"), ("listener", "a\"b\\c\nd"), ("proto", "http")]] {
            // swift-prometheus's own timer, as its factory made it before `MeshMetricsFactory`.
            let registry = PrometheusCollectorRegistry()
            var prometheus = PrometheusMetricsFactory(registry: registry)
            prometheus.defaultDurationHistogramBuckets = Self.buckets
            let theirs = prometheus.makeTimer(label: "t_seconds", dimensions: labels)
            let ours = MeshDurationHistograms()
            let mine = ours.make(name: "t_seconds", labels: labels, buckets: DurationBuckets(Self.buckets))
            for v in Self.values {
                theirs.recordNanoseconds(v)
                mine.recordNanoseconds(v)
            }
            var text: [UInt8] = []
            ours.emit(into: &text)
            #expect(String(decoding: text, as: UTF8.self) == registry.emitToString(), "labels \(labels)")
        }
    }

    @Test("one histogram per name and label set; a destroyed one is no longer rendered")
    func families() {
        let histograms = MeshDurationHistograms()
        let factory = MeshMetricsFactory(
            prometheus: PrometheusMetricsFactory(registry: PrometheusCollectorRegistry()),
            histograms: histograms,
            buckets: Self.buckets
        )
        let a = factory.makeTimer(label: "x_seconds", dimensions: [("k", "1")])
        let again = factory.makeTimer(label: "x_seconds", dimensions: [("k", "1")])
        let b = factory.makeTimer(label: "x_seconds", dimensions: [("k", "2")])
        #expect((a as? MeshDurationHistogram) === (again as? MeshDurationHistogram))
        #expect((a as? MeshDurationHistogram) !== (b as? MeshDurationHistogram))
        a.recordNanoseconds(20_000)
        again.recordNanoseconds(20_000)
        var text: [UInt8] = []
        histograms.emit(into: &text)
        let rendered = String(decoding: text, as: UTF8.self)
        // One TYPE line for the family; both label sets under it.
        #expect(rendered.components(separatedBy: "# TYPE x_seconds histogram\n").count == 2)
        #expect(rendered.contains("x_seconds_count{k=\"1\"} 2\n") && rendered.contains("x_seconds_count{k=\"2\"} 0\n"))
        factory.destroyTimer(b)
        text = []
        histograms.emit(into: &text)
        #expect(!String(decoding: text, as: UTF8.self).contains("k=\"2\""))
        // Counters still go to swift-prometheus.
        #expect(factory.makeCounter(label: "c_total", dimensions: []) is Prometheus.Counter)
    }
}
