import Control
import MeshTestSupport
import NIOCore
import Testing

@Suite(.rationed) struct WatchHubTests {
    func event(_ rv: Int64, _ name: String = "x", ns: String = "shop") -> StoreEvent {
        StoreEvent(
            kind: .added,
            object: StoredObject(key: key(name, ns: ns), resourceVersion: rv, labels: [:], json: body(name, rv))
        )
    }

    @Test func slowWatcherIsEndedAfterItsQueueFillsAndKeepsWhatWasQueued() async {
        var config = WatchHub.Configuration()
        config.maxPending = 5
        let hub = WatchHub(current: 0, configuration: config)
        let sub = try! hub.subscribe(after: 0, filter: WatchFilter(resource: "services"))
        for rv in 1...8 { hub.publish(self.event(Int64(rv))) }
        #expect(sub.overflowed)
        let chunk = await sub.next(kind: "Service")
        // The opening bookmark took one place in the queue.
        #expect(versions(in: chunk!) == [1, 2, 3, 4])
        #expect(await sub.next(kind: "Service") == nil)
        #expect(hub.subscriberCount == 0)
    }

    @Test func bookmarksOnlyWhenIdleAndCarryTheLatestVersion() async {
        let hub = WatchHub(current: 0)
        let sub = try! hub.subscribe(after: 0, filter: WatchFilter(resource: "services", namespace: "shop"))
        let opening = String(buffer: (await sub.next(kind: "Service"))!)
        #expect(opening.contains(#""type":"BOOKMARK""#) && opening.contains(#""resourceVersion":"0""#))
        hub.publish(self.event(1, ns: "other"))
        hub.publish(self.event(2, ns: "other"))
        hub.sendBookmarks()
        let chunk = String(buffer: (await sub.next(kind: "Service"))!)
        #expect(
            chunk
                == #"{"type":"BOOKMARK","object":{"apiVersion":"mesh.edge/v1","kind":"Service","metadata":{"resourceVersion":"2"}}}"#
                + "\n"
        )
        hub.publish(self.event(3))
        hub.sendBookmarks()  // not idle: the event is still queued, no bookmark behind it
        #expect(versions(in: (await sub.next(kind: "Service"))!) == [3])
        sub.cancel()
        #expect(hub.subscriberCount == 0)
    }

    @Test func historyIsBoundedAndResumableWithinIt() {
        var config = WatchHub.Configuration()
        config.historyLimit = 3
        let hub = WatchHub(current: 0, configuration: config)
        for rv in 1...10 { hub.publish(self.event(Int64(rv))) }
        #expect(hub.oldestResumable == 7)
        #expect(throws: StoreError.gone(requested: 6, oldest: 8)) {
            try hub.subscribe(after: 6, filter: WatchFilter(resource: "services"))
        }
        #expect(throws: Never.self) { try hub.subscribe(after: 7, filter: WatchFilter(resource: "services")).cancel() }
    }

    @Test func eventLinesAreEncodedOnce() {
        let line = String(buffer: WatchHubLine.of(self.event(4)))
        #expect(line == #"{"type":"ADDED","object":{"metadata":{"name":"x","resourceVersion":"4"},"value":0}}"# + "\n")
    }
}
