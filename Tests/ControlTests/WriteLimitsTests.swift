import Control
import Foundation
import MeshCore
import MeshTestSupport
import NIOCore
import Testing

/// The pieces that bound what writes can cost: the history by bytes, slow watchers by bytes, and
/// the per-identity write rate.
@Suite(.rationed) struct WriteLimitsTests {
    /// An event whose JSON is about `size` bytes.
    func event(_ rv: Int64, size: Int) -> StoreEvent {
        let pad = String(repeating: "x", count: size)
        return StoreEvent(
            kind: .modified,
            object: StoredObject(
                key: key("big"),
                resourceVersion: rv,
                labels: [:],
                json: ByteBuffer(string: #"{"metadata":{"name":"big","resourceVersion":"\#(rv)"},"pad":"\#(pad)"}"#)
            )
        )
    }

    @Test func historyIsBoundedByBytesAndOlderVersionsAreGone() throws {
        var config = WatchHub.Configuration()
        config.historyMaxBytes = 1024 * 1024
        let hub = WatchHub(current: 0, configuration: config)
        for rv in 1...100 { hub.publish(self.event(Int64(rv), size: 100 * 1024)) }
        let (changes, bytes) = hub.historySize
        #expect(bytes <= 1024 * 1024 && changes == 10, "\(changes) changes, \(bytes) bytes")
        #expect(hub.oldestResumable == 90)
        #expect(throws: StoreError.gone(requested: 89, oldest: 91)) {
            try hub.subscribe(after: 89, filter: WatchFilter(resource: "services"))
        }
        // The newest change is kept even when it alone is over the limit.
        hub.publish(self.event(101, size: 2 * 1024 * 1024))
        #expect(hub.historySize.changes == 1)
        #expect(hub.oldestResumable == 100)
    }

    @Test func aWatcherFallingTooManyBytesBehindIsEnded() async throws {
        var config = WatchHub.Configuration()
        config.maxPendingBytes = 512 * 1024
        let hub = WatchHub(current: 0, configuration: config)
        let sub = try hub.subscribe(after: 0, filter: WatchFilter(resource: "services"))
        for rv in 1...20 { hub.publish(self.event(Int64(rv), size: 100 * 1024)) }
        #expect(sub.overflowed)
        sub.cancel()
    }

    @Test func theStoreFileFollowsTheHistoryBytes() async throws {
        let dir = TempDir()
        var c = SQLiteStore.Configuration(path: dir.path + "/control.db")
        c.durability = .normal
        c.hub.historyMaxBytes = 2 * 1024 * 1024
        let store = try await SQLiteStore(configuration: c, logger: testLogger)
        let pad = String(repeating: "y", count: 200 * 1024)
        for i in 0..<200 {
            _ = try await store.commit(
                Write(
                    key: key("big"),
                    expect: .any,
                    operation: .put { rv in
                        (
                            ByteBuffer(
                                string:
                                    #"{"metadata":{"name":"big","resourceVersion":"\#(rv)"},"i":\#(i),"p":"\#(pad)"}"#
                            ), [:]
                        )
                    }
                )
            )
        }
        try await store.close()
        // 200 writes of 200 KiB (40 MiB) leave about the 2 MiB of history (plus what one compaction
        // step may lag) and the object; reopened, the history is what was kept.
        let reopened = try await SQLiteStore(configuration: c, logger: testLogger)
        let (changes, bytes) = reopened.hub.historySize
        #expect(changes >= 5 && bytes <= 2 * 1024 * 1024, "\(changes) changes, \(bytes) bytes")
        try await reopened.close()
        let size = fileSize(dir.path + "/control.db")
        #expect(size < 8 * 1024 * 1024, "control.db is \(size) bytes")
    }

    @Test func theNewSettingsAreChecked() {
        var c = ControlConfig()
        #expect(throws: Never.self) { try c.validate() }
        c.writesPerSecond = -1
        #expect(throws: ManifestError("writesPerSecond: must be 0 (no limit) or more")) { try c.validate() }
        c = ControlConfig()
        c.writeBurst = 0
        #expect(throws: ManifestError("writeBurst: must be at least 1")) { try c.validate() }
        c = ControlConfig()
        c.historyMaxBytes = 1000
        #expect(throws: ManifestError("historyMaxBytes: must be at least 1048576 (1 MiB)")) { try c.validate() }
        c = ControlConfig()
        c.tlsHandshakeTimeoutSeconds = 0
        #expect(throws: ManifestError("tlsHandshakeTimeoutSeconds: must be at least 0.1")) { try c.validate() }
        c = ControlConfig()
        c.heapTrimIntervalSeconds = -1
        #expect(throws: ManifestError("heapTrimIntervalSeconds: must be 0 (never) or more")) { try c.validate() }
        c.heapTrimIntervalSeconds = 0
        #expect(throws: Never.self) { try c.validate() }
        c.idleBufferReleaseMilliseconds = -1
        #expect(throws: ManifestError("idleBufferReleaseMilliseconds: must be 0 (never) or more")) { try c.validate() }
    }

    @Test func writesAreLimitedPerIdentityAndTheAdminIsNot() throws {
        let limiter = WriteRateLimiter(node: .init(perSecond: 2, burst: 3))
        let t0 = ContinuousClock.now
        for _ in 0..<3 { #expect(limiter.take("mesh://node/a", now: t0) == nil) }
        let wait = try #require(limiter.take("mesh://node/a", now: t0))
        #expect(wait == .milliseconds(500))
        // Another node has its own bucket; the admin has no limit by default.
        #expect(limiter.take("mesh://node/b", now: t0) == nil)
        for _ in 0..<100 { #expect(limiter.take("mesh://admin/admin", now: t0) == nil) }
        // Half a second later one more write is allowed, and only one.
        let t1 = t0 + .milliseconds(500)
        #expect(limiter.take("mesh://node/a", now: t1) == nil)
        #expect(limiter.take("mesh://node/a", now: t1) != nil)
    }
}

func fileSize(_ path: String) -> Int {
    ((try? FileManager.default.attributesOfItem(atPath: path))?[.size] as? NSNumber)?.intValue ?? 0
}
