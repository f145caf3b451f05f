import Control
import Dispatch
import Glibc
import MeshNIO
import MeshTestSupport
import NIOCore
import Synchronization
import Testing

@Suite(.rationed) struct WatchHubTests {
    func event(_ rv: Int64, _ name: String = "x", ns: String = "shop") -> StoreEvent {
        StoreEvent(
            kind: .added,
            object: StoredObject(key: key(name, ns: ns), resourceVersion: rv, labels: [:], json: body(name, rv))
        )
    }

    func change(_ rv: Int64, _ resource: String) -> StoreEvent {
        StoreEvent(
            kind: .added,
            object: StoredObject(
                key: key("x\(rv)", resource: resource),
                resourceVersion: rv,
                labels: [:],
                json: body("x\(rv)", rv)
            )
        )
    }

    /// Each change reaches the watchers of its kind only, a watcher of several kinds gets each of them, and a
    /// watcher that ends leaves no trace behind in the index by kind.
    @Test func changesReachTheWatchersOfTheirKindOnly() async {
        let hub = WatchHub(current: 0)
        let services = try! hub.subscribe(after: 0, filter: WatchFilter(resource: "services"))
        let both = try! hub.subscribe(after: 0, filter: WatchFilter(resources: ["services", "endpoints", "services"]))
        let nodes = try! hub.subscribe(after: 0, filter: WatchFilter(resource: "nodes"))
        #expect(both.filter.resources == ["services", "endpoints"])
        for sub in [services, both, nodes] { _ = await sub.next(kind: "Bookmark") }  // the opening bookmarks
        hub.publish(self.change(1, "services"))
        hub.publish(self.change(2, "endpoints"))
        hub.publish(self.change(3, "nodes"))
        hub.publish(self.change(4, "relays"))
        hub.sendBookmarks()
        #expect(versions(in: (await services.next(kind: "Service"))!) == [1])
        #expect(versions(in: (await both.next(kind: "Bookmark"))!) == [1, 2])
        #expect(versions(in: (await nodes.next(kind: "Node"))!) == [3])
        both.cancel()
        #expect(hub.subscriberCount == 2)
        hub.publish(self.change(5, "endpoints"))
        hub.publish(self.change(6, "services"))
        #expect(versions(in: (await services.next(kind: "Service"))!) == [6])
        services.cancel()
        nodes.cancel()
        #expect(hub.subscriberCount == 0)
        hub.publish(self.change(7, "services"))
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

    /// A pushed watcher (an HTTP watch its connection's event loop writes): woken at each change, it takes what
    /// is queued without waiting; after it ends it is woken once more, finds the end, and is never woken again.
    @Test func aPushedWatcherIsWokenWhenItsQueueFillsTakesWithoutWaitingAndLetsGoAtItsEnd() {
        let hub = WatchHub(current: 0)
        let sub = try! hub.subscribe(after: 0, filter: WatchFilter(resource: "services"))
        let wakes = Atomic<Int>(0)
        sub.onReady { wakes.add(1, ordering: .relaxed) }
        // The opening bookmark was queued already: woken at once.
        #expect(wakes.load(ordering: .relaxed) == 1)
        guard case .lines(let opening) = sub.take(kind: "Service") else {
            Issue.record("no opening bookmark")
            return
        }
        #expect(String(buffer: opening).contains(#""type":"BOOKMARK""#))
        guard case .nothing = sub.take(kind: "Service") else {
            Issue.record("something queued after the bookmark")
            return
        }
        hub.publish(self.event(1))
        #expect(wakes.load(ordering: .relaxed) == 2)
        hub.publish(self.event(2))
        #expect(wakes.load(ordering: .relaxed) == 2, "a queue that was not empty has its wake under way already")
        guard case .lines(let chunk) = sub.take(kind: "Service") else {
            Issue.record("the changes were not queued")
            return
        }
        #expect(versions(in: chunk) == [1, 2])
        hub.publish(self.event(3))
        #expect(wakes.load(ordering: .relaxed) == 3, "taken empty: the next change wakes again")
        guard case .lines(let last) = sub.take(kind: "Service") else {
            Issue.record("the last change was not queued")
            return
        }
        #expect(versions(in: last) == [3])
        sub.cancel()
        #expect(wakes.load(ordering: .relaxed) == 4)
        guard case .ended = sub.take(kind: "Service") else {
            Issue.record("no end after cancel")
            return
        }
        #expect(hub.subscriberCount == 0)
        hub.publish(self.event(4))
        sub.cancel()
        #expect(wakes.load(ordering: .relaxed) == 4, "the waker is let go at the end")
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

    @Test func aChunkIsCutIntoItsNonEmptyLines() {
        func cut(_ text: String, skipping skip: Int = 0) -> [String] {
            var b = ByteBuffer(string: String(repeating: "#", count: skip) + text)
            b.moveReaderIndex(forwardBy: skip)
            return WatchSubscription.lines(b).map { String(decoding: $0, as: UTF8.self) }
        }
        #expect(cut("") == [])
        #expect(cut("\n\n") == [])
        #expect(cut("{\"a\":1}\n") == ["{\"a\":1}"])
        #expect(cut("a\n\nbc\nd") == ["a", "bc", "d"])
        #expect(cut("\nx\n", skipping: 5) == ["x"])
        // Against the standard library's split, over random bytes with many newlines.
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<500 {
            let bytes = (0..<Int.random(in: 0..<64, using: &rng)).map { _ in
                Bool.random(using: &rng) ? UInt8(ascii: "\n") : UInt8.random(in: 0...255, using: &rng)
            }
            let lines = WatchSubscription.lines(ByteBuffer(bytes: bytes)).map { Array($0) }
            #expect(lines == bytes.split(separator: UInt8(ascii: "\n")).map { Array($0) }, "\(bytes)")
        }
    }

    @Test func eventLinesAreEncodedOnce() {
        let line = String(buffer: WatchHubLine.of(self.event(4)))
        #expect(line == #"{"type":"ADDED","object":{"metadata":{"name":"x","resourceVersion":"4"},"value":0}}"# + "\n")
    }

    /// Regression for a deadlock (412608a): a watcher cancelled while the hub fans out a change or a
    /// bookmark. The hub used to resume a waiting watcher under its own lock; resuming needs the watcher
    /// task's status lock, which the canceller holds while the cancellation handler ends the watch, and
    /// ending it needs the hub's lock. Here a thread of its own publishes and sends bookmarks without pause,
    /// another cancels watcher tasks that wait in `next()`, round after round; a watchdog thread reports if
    /// the rounds stop finishing. The fan-out and the cancels run on threads of their own, so a deadlock
    /// parks those two threads only, never the pool, and the test fails rather than hangs.
    @Test func cancellingWaitingWatchersDuringFanOutNeverDeadlocks() async throws {
        let hub = WatchHub(current: 0)
        let stress = WatchStress(hub: hub, event: { self.event($0) })
        let finished = await stress.run(rounds: 400, watchers: 16)
        #expect(finished, "no round finished for 60 s: the hub and a cancelled watcher deadlocked")
        #expect(stress.roundsDone == 400)
    }
}

/// The fan-out and cancel threads of `cancellingWaitingWatchersDuringFanOutNeverDeadlocks`.
private final class WatchStress: Sendable {
    let hub: WatchHub
    let event: @Sendable (Int64) -> StoreEvent
    private let stop = Atomic<Bool>(false)
    private let rounds = Atomic<Int>(0)
    private let outcome = Mutex<CheckedContinuation<Bool, Never>?>(nil)

    var roundsDone: Int { self.rounds.load(ordering: .relaxed) }

    init(hub: WatchHub, event: @escaping @Sendable (Int64) -> StoreEvent) {
        self.hub = hub
        self.event = event
    }

    /// True when every round finished; false when the watchdog saw no round finish for 60 s.
    func run(rounds: Int, watchers: Int) async -> Bool {
        await withCheckedContinuation { c in
            self.outcome.withLock { $0 = c }
            DedicatedThread.start(name: "watch-fan-out") { self.fanOut() }
            DedicatedThread.start(name: "watch-cancel") { self.cancelRounds(rounds, watchers) }
            DedicatedThread.start(name: "watch-watchdog") { self.watchdog() }
        }
    }

    private func finish(_ ok: Bool) {
        self.stop.store(true, ordering: .relaxed)
        self.outcome.withLock { c in
            c?.resume(returning: ok)
            c = nil
        }
    }

    private func fanOut() {
        var rv: Int64 = 0
        while !self.stop.load(ordering: .relaxed) {
            rv += 1
            self.hub.publish(self.event(rv))
            self.hub.sendBookmarks()
        }
    }

    private func cancelRounds(_ rounds: Int, _ watchers: Int) {
        for _ in 0..<rounds {
            let ended = DispatchSemaphore(value: 0)
            let waiting = DispatchSemaphore(value: 0)
            var tasks: [Task<Void, Never>] = []
            for _ in 0..<watchers {
                guard
                    let sub = try? self.hub.subscribe(
                        after: self.hub.currentResourceVersion,
                        filter: WatchFilter(resource: "services")
                    )
                else { continue }
                tasks.append(
                    Task {
                        var first = true
                        while true {
                            let chunk = await withTaskCancellationHandler {
                                await sub.next(kind: "Service")
                            } onCancel: {
                                sub.cancel()
                            }
                            if first {
                                first = false
                                waiting.signal()
                            }
                            if chunk == nil { break }
                        }
                        ended.signal()
                    }
                )
            }
            for _ in tasks { waiting.wait() }
            for task in tasks { task.cancel() }
            for _ in tasks { ended.wait() }
            self.rounds.add(1, ordering: .relaxed)
        }
        self.finish(true)
    }

    private func watchdog() {
        var seen = -1
        var still = 0
        while !self.stop.load(ordering: .relaxed) {
            usleep(100_000)
            let now = self.rounds.load(ordering: .relaxed)
            if now != seen {
                seen = now
                still = 0
            } else {
                still += 1
                if still >= 600 {
                    self.finish(false)
                    return
                }
            }
        }
    }

}
