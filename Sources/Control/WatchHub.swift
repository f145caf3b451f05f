import NIOCore
import Synchronization

/// Fans committed changes out to watchers, in order, with a bounded in-memory history so a watcher
/// can resume from a recent resourceVersion.
///
/// Each change is encoded once into its watch line and shared by every watcher. A watcher's
/// undelivered lines queue in its subscription; one that falls `maxPending` behind is ended (its
/// client resumes from the last version it saw, which the history still holds), so a slow client
/// never holds the hub back nor grows memory without bound.
public final class WatchHub: Sendable {
    public struct Configuration: Sendable {
        /// Changes kept for resuming watches; older versions get 410 Gone.
        public var historyLimit: Int = 10_000
        /// Lines a watcher may have undelivered before it is ended.
        public var maxPending: Int = 20_000

        public init() {}
    }

    struct Entry: Sendable {
        var event: StoreEvent
        /// `{"type":...,"object":...}\n`, encoded once.
        var line: ByteBuffer
    }

    private struct State {
        var history: [Entry] = []
        var head = 0
        var current: Int64
        var nextID = 0
        var subscribers: [Int: WatchSubscription] = [:]

        var kept: ArraySlice<Entry> { self.history[self.head...] }
    }

    private let state: Mutex<State>
    let configuration: Configuration

    /// A hub whose history starts with `history` (oldest first) and whose latest version is `current`.
    public init(current: Int64, history: [StoreEvent] = [], configuration: Configuration = .init()) {
        self.configuration = configuration
        let entries = history.suffix(configuration.historyLimit).map { Entry(event: $0, line: WatchHub.line(for: $0)) }
        self.state = Mutex(State(history: Array(entries), current: current))
    }

    /// The watch line of an event.
    static func line(for event: StoreEvent) -> ByteBuffer {
        var json = event.object.json
        var b = ByteBuffer()
        b.reserveCapacity(json.readableBytes + 32)
        b.writeString("{\"type\":\"\(event.kind.name)\",\"object\":")
        b.writeBuffer(&json)
        b.writeString("}\n")
        return b
    }

    /// A bookmark line: everything up to `rv` has been sent.
    static func bookmarkLine(_ rv: Int64, kind: String) -> ByteBuffer {
        ByteBuffer(
            string:
                "{\"type\":\"BOOKMARK\",\"object\":{\"apiVersion\":\"mesh.edge/v1\",\"kind\":\"\(kind)\",\"metadata\":{\"resourceVersion\":\"\(rv)\"}}}\n"
        )
    }

    public var currentResourceVersion: Int64 { self.state.withLock { $0.current } }

    /// The oldest version a watch may start after.
    public var oldestResumable: Int64 {
        self.state.withLock { s in (s.kept.first?.event.resourceVersion).map { $0 - 1 } ?? s.current }
    }

    public var subscriberCount: Int { self.state.withLock { $0.subscribers.count } }

    /// Records a committed change and hands it to every matching watcher. Callers publish in
    /// resourceVersion order.
    public func publish(_ event: StoreEvent) {
        let entry = Entry(event: event, line: WatchHub.line(for: event))
        self.state.withLock { s in
            precondition(event.resourceVersion > s.current, "events must be published in order")
            s.current = event.resourceVersion
            s.history.append(entry)
            if s.history.count - s.head > self.configuration.historyLimit { s.head += 1 }
            // Compact the array once the dropped prefix is as large as what is kept.
            if s.head > 1024 && s.head * 2 > s.history.count {
                s.history.removeFirst(s.head)
                s.head = 0
            }
            for sub in s.subscribers.values where sub.filter.matches(event.object) {
                sub.enqueue(.line(entry.line), rv: event.resourceVersion, maxPending: self.configuration.maxPending)
            }
        }
    }

    /// Starts a watch after `rv`: every kept change after it that matches, then live changes.
    public func subscribe(after rv: Int64, filter: WatchFilter) throws(StoreError) -> WatchSubscription {
        try self.state.withLock { s throws(StoreError) -> WatchSubscription in
            if rv > s.current { throw StoreError.tooNew(requested: rv, current: s.current) }
            let oldest = (s.kept.first?.event.resourceVersion).map { $0 - 1 } ?? s.current
            if rv < oldest { throw StoreError.gone(requested: rv, oldest: oldest + 1) }
            let id = s.nextID
            s.nextID += 1
            let sub = WatchSubscription(id: id, filter: filter, startedAfter: rv) { [weak self] id in
                self?.remove(id)
            }
            // Binary search the first kept entry after rv, then replay what matches.
            let kept = s.kept
            var lo = kept.startIndex
            var hi = kept.endIndex
            while lo < hi {
                let mid = (lo + hi) / 2
                if kept[mid].event.resourceVersion <= rv { lo = mid + 1 } else { hi = mid }
            }
            for entry in kept[lo...] where filter.matches(entry.event.object) {
                sub.enqueue(.line(entry.line), rv: entry.event.resourceVersion, maxPending: Int.max)
            }
            // Then a bookmark: the watcher has everything up to now and knows it at once, even when
            // nothing it watches changes for a long time.
            sub.enqueue(.bookmark(s.current), rv: s.current, maxPending: Int.max)
            s.subscribers[id] = sub
            return sub
        }
    }

    /// Tells every idle watcher how far the store has got, so it can resume from there.
    public func sendBookmarks() {
        self.state.withLock { s in
            for sub in s.subscribers.values {
                sub.bookmark(s.current)
            }
        }
    }

    /// Ends every watch (shutdown).
    public func closeAll() {
        let subs = self.state.withLock { s -> [WatchSubscription] in
            defer { s.subscribers.removeAll() }
            return Array(s.subscribers.values)
        }
        for sub in subs { sub.cancel() }
    }

    private func remove(_ id: Int) {
        _ = self.state.withLock { $0.subscribers.removeValue(forKey: id) }
    }
}

/// One watcher's queue of lines. `next()` returns everything queued since the last call.
public final class WatchSubscription: Sendable {
    enum Item: Sendable {
        case line(ByteBuffer)
        case bookmark(Int64)
    }

    private struct State {
        var pending: [Item] = []
        var lastQueued: Int64
        var ended = false
        var waiter: CheckedContinuation<Void, Never>?
        var overflowed = false
    }

    let id: Int
    public let filter: WatchFilter
    private let state: Mutex<State>
    private let onEnd: @Sendable (Int) -> Void

    init(id: Int, filter: WatchFilter, startedAfter rv: Int64, onEnd: @escaping @Sendable (Int) -> Void) {
        self.id = id
        self.filter = filter
        self.state = Mutex(State(lastQueued: rv))
        self.onEnd = onEnd
    }

    /// True when the watch was ended because its client did not keep up.
    public var overflowed: Bool { self.state.withLock { $0.overflowed } }

    func enqueue(_ item: Item, rv: Int64, maxPending: Int) {
        let waiter = self.state.withLock { s -> CheckedContinuation<Void, Never>? in
            guard !s.ended else { return nil }
            if s.pending.count >= maxPending {
                s.ended = true
                s.overflowed = true
            } else {
                s.pending.append(item)
                s.lastQueued = rv
            }
            defer { s.waiter = nil }
            return s.waiter
        }
        waiter?.resume()
    }

    func bookmark(_ rv: Int64) {
        let waiter = self.state.withLock { s -> CheckedContinuation<Void, Never>? in
            guard !s.ended, s.pending.isEmpty else { return nil }
            s.pending.append(.bookmark(rv))
            s.lastQueued = rv
            defer { s.waiter = nil }
            return s.waiter
        }
        waiter?.resume()
    }

    /// Ends the watch; `next()` returns what is still queued, then nil.
    public func cancel() {
        let waiter = self.state.withLock { s -> CheckedContinuation<Void, Never>? in
            s.ended = true
            defer { s.waiter = nil }
            return s.waiter
        }
        waiter?.resume()
        self.onEnd(self.id)
    }

    /// Waits for lines and returns them all, each bookmark rendered as an object of `kind`; nil once ended
    /// and drained.
    public func next(kind: String) async -> ByteBuffer? {
        while true {
            let taken = self.state.withLock { s -> [Item]? in
                if !s.pending.isEmpty {
                    defer { s.pending.removeAll(keepingCapacity: true) }
                    return s.pending
                }
                return s.ended ? [] : nil
            }
            if let items = taken {
                if items.isEmpty {
                    self.onEnd(self.id)
                    return nil
                }
                var out = ByteBuffer()
                for item in items {
                    switch item {
                    case .line(var b): out.writeBuffer(&b)
                    case .bookmark(let rv):
                        var b = WatchHub.bookmarkLine(rv, kind: kind)
                        out.writeBuffer(&b)
                    }
                }
                return out
            }
            await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
                let resumeNow = self.state.withLock { s -> Bool in
                    if !s.pending.isEmpty || s.ended { return true }
                    s.waiter = c
                    return false
                }
                if resumeNow { c.resume() }
            }
        }
    }
}

/// The watch line of a change, as the hub encodes it (for tools and tests).
public enum WatchHubLine {
    public static func of(_ event: StoreEvent) -> ByteBuffer { WatchHub.line(for: event) }
}
