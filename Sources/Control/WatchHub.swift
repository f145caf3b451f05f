import Glibc
import NIOCore
import Synchronization

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

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
        /// Bytes of watch lines the history keeps at most (the newest change is always kept), so
        /// that large objects written often cannot make the history hold gigabytes.
        public var historyMaxBytes: Int = 32 * 1024 * 1024
        /// Lines a watcher may have undelivered before it is ended.
        public var maxPending: Int = 20_000
        /// Bytes a watcher may have undelivered before it is ended (it resumes from its last version).
        public var maxPendingBytes: Int = 32 * 1024 * 1024

        public init() {}
    }

    struct Entry: Sendable {
        /// The change without its JSON (the line holds it; filters need only key and labels).
        var event: StoreEvent
        /// `{"type":...,"object":...}\n`, encoded once.
        var line: ByteBuffer
        /// For a placed kind (`NodePlacement`): which node-scoped watchers get which line.
        var placed: Placed?

        init(_ event: StoreEvent, placed: Placed? = nil) {
            self.line = WatchHub.line(for: event)
            self.event = event
            self.event.object.json = ByteBuffer()
            self.placed = placed
        }

        /// Bytes of the lines it holds.
        var bytes: Int {
            self.line.readableBytes + (self.placed?.entered?.readableBytes ?? 0)
                + (self.placed?.left?.readableBytes ?? 0)
        }

        /// The line a watcher with `filter` gets, if any.
        func line(for filter: WatchFilter) -> ByteBuffer? {
            guard filter.matchesIgnoringNode(self.event.object) else { return nil }
            guard let node = filter.node, let placed = self.placed else { return self.line }
            return placed.line(for: node, self.line)
        }
    }

    /// A change to a placed kind as node-scoped watchers see it: ADDED on the nodes it moved onto, DELETED on
    /// those it left, the change itself where it stays when what the node uses changed; nothing elsewhere.
    struct Placed: Sendable {
        /// The nodes before the change; nil: not known (history loaded at start), so every node-scoped
        /// watcher of the kind gets the change as it is.
        var before: [String]?
        var after: [String]
        /// What a node uses changed (`NodePlacement.digest`), or the object was added or deleted.
        var relevant: Bool
        var entered: ByteBuffer?
        var left: ByteBuffer?

        func line(for node: String, _ line: ByteBuffer) -> ByteBuffer? {
            guard let before = self.before else { return line }
            switch (before.contains(node), self.after.contains(node)) {
            case (false, false): return nil
            case (true, true): return self.relevant ? line : nil
            case (false, true): return self.entered ?? line
            case (true, false): return self.left ?? line
            }
        }

        /// A change of `kind` to `object` (with its JSON) from `before` to `after`: a move's ADDED and DELETED
        /// lines encoded here, once.
        static func of(
            _ kind: StoreEvent.Kind,
            _ object: StoredObject,
            before: [String]?,
            after: [String],
            relevant: Bool
        ) -> Placed {
            var placed = Placed(before: before, after: after, relevant: relevant)
            if kind == .modified, let before {
                if after.contains(where: { !before.contains($0) }) {
                    placed.entered = WatchHub.line(for: StoreEvent(kind: .added, object: object))
                }
                if before.contains(where: { !after.contains($0) }) {
                    placed.left = WatchHub.line(for: StoreEvent(kind: .deleted, object: object))
                }
            }
            return placed
        }

        /// The nodes whose watchers are offered the change; nil: every node-scoped watcher of the kind.
        var audience: Set<String>? { self.before.map { Set($0).union(self.after) } }
    }

    /// A node-scoped watcher's index key: a placed kind and the node.
    struct NodeKey: Hashable {
        var resource: String
        var node: String
    }

    private struct State {
        var history: [Entry] = []
        var head = 0
        /// Bytes of the lines in `history[head...]`.
        var keptBytes = 0
        var current: Int64
        var nextID = 0
        var subscribers: [Int: WatchSubscription] = [:]
        /// The watchers by resource: a change is offered only to those watching its kind (an agent's Node
        /// change was run through every watcher's filter: 35% of a replica's CPU with 10,000 watchers).
        /// Node-scoped watchers of a placed kind are not here but in `scoped` and `byNode`.
        var byResource: [String: [Int: WatchSubscription]] = [:]
        /// Node-scoped watchers of a placed kind, by kind and by kind and node: a device's change is
        /// offered to its node's watchers only, not run past 10,000 others.
        var scoped: [String: [Int: WatchSubscription]] = [:]
        var byNode: [NodeKey: [Int: WatchSubscription]] = [:]
        /// Each placed object's placement now: where its next change was before.
        private(set) var placements: [ObjectKey: NodePlacement] = [:]
        /// The same by kind and node: a node-scoped list reads its own objects, not the whole kind.
        private(set) var placedOn: [NodeKey: Set<ObjectKey>] = [:]

        mutating func setPlacement(_ key: ObjectKey, _ placement: NodePlacement?) {
            for n in self.placements[key]?.nodes ?? [] {
                let k = NodeKey(resource: key.resource, node: n)
                self.placedOn[k]?.remove(key)
                if self.placedOn[k]?.isEmpty == true { self.placedOn[k] = nil }
            }
            self.placements[key] = placement
            for n in placement?.nodes ?? [] {
                self.placedOn[NodeKey(resource: key.resource, node: n), default: []].insert(key)
            }
        }

        mutating func setPlacements(_ objects: [StoredObject]) {
            self.placements = [:]
            self.placedOn = [:]
            for o in objects { if let p = NodePlacement.of(o) { self.setPlacement(o.key, p) } }
        }

        mutating func add(_ sub: WatchSubscription) {
            self.subscribers[sub.id] = sub
            for r in sub.filter.resources {
                if let node = sub.filter.node, sub.filter.scopedByNode(r) {
                    self.scoped[r, default: [:]][sub.id] = sub
                    self.byNode[NodeKey(resource: r, node: node), default: [:]][sub.id] = sub
                } else {
                    self.byResource[r, default: [:]][sub.id] = sub
                }
            }
        }

        mutating func remove(_ id: Int) {
            guard let sub = self.subscribers.removeValue(forKey: id) else { return }
            for r in sub.filter.resources {
                if let node = sub.filter.node, sub.filter.scopedByNode(r) {
                    Self.drop(id, from: &self.scoped, r)
                    Self.drop(id, from: &self.byNode, NodeKey(resource: r, node: node))
                } else {
                    Self.drop(id, from: &self.byResource, r)
                }
            }
        }

        private static func drop<K: Hashable>(_ id: Int, from map: inout [K: [Int: WatchSubscription]], _ key: K) {
            map[key]?[id] = nil
            if map[key]?.isEmpty == true { map[key] = nil }
        }

        /// Forgets every watcher and returns them.
        mutating func removeAll() -> [WatchSubscription] {
            defer {
                self.subscribers.removeAll()
                self.byResource.removeAll()
                self.scoped.removeAll()
                self.byNode.removeAll()
            }
            return Array(self.subscribers.values)
        }

        var kept: ArraySlice<Entry> { self.history[self.head...] }

        /// Drops the oldest kept entries while over either limit; the newest stays.
        mutating func trim(_ c: Configuration) {
            while self.history.count - self.head > 1
                && (self.history.count - self.head > c.historyLimit || self.keptBytes > c.historyMaxBytes)
            {
                self.keptBytes -= self.history[self.head].bytes
                // Release the lines now: the dropped prefix stays in the array until it is compacted.
                self.history[self.head].line = ByteBuffer()
                self.history[self.head].placed = nil
                self.head += 1
            }
            // Compact the array once the dropped prefix is as large as what is kept.
            if self.head > 1024 && self.head * 2 > self.history.count {
                self.history.removeFirst(self.head)
                self.head = 0
            }
        }

        /// The watchers a change of `resource` is offered to: every one of the kind's unscoped watchers, and
        /// the node-scoped ones of `audience`'s nodes (nil: all of them).
        func offered(_ resource: String, audience: Set<String>?) -> [WatchSubscription] {
            var out = Array(self.byResource[resource]?.values ?? [:].values)
            guard let scoped = self.scoped[resource] else { return out }
            if let audience {
                for n in audience { out += self.byNode[NodeKey(resource: resource, node: n)]?.values ?? [:].values }
            } else {
                out += scoped.values
            }
            return out
        }

        /// Places `event` against the placements before it and records the one after it.
        mutating func place(_ event: StoreEvent, _ placement: NodePlacement?, json: ByteBuffer) -> Placed? {
            guard let placement else { return nil }
            let key = event.object.key
            let old = self.placements[key]
            self.setPlacement(key, event.kind == .deleted ? nil : placement)
            let before: [String]?
            switch event.kind {
            case .added: before = old?.nodes ?? []
            case .modified, .deleted: before = old?.nodes
            }
            var object = event.object
            object.json = json
            return Placed.of(
                event.kind,
                object,
                before: before,
                after: event.kind == .deleted ? [] : placement.nodes,
                relevant: event.kind != .modified || old == nil || old?.digest != placement.digest
            )
        }
    }

    private let state: Mutex<State>
    let configuration: Configuration

    /// A hub whose history starts with `history` (oldest first) and whose latest version is `current`.
    /// `placed`: the objects of the placed kinds at `current` (`NodePlacement`), where their next changes
    /// move from; changes in `history` go to every node-scoped watcher of their kind.
    public init(
        current: Int64,
        history: [StoreEvent] = [],
        placed: [StoredObject] = [],
        configuration: Configuration = .init()
    ) {
        self.configuration = configuration
        let entries = history.suffix(configuration.historyLimit).map { event in
            Entry(
                event,
                placed: NodePlacement.of(event.object).map {
                    Placed.of(
                        event.kind,
                        event.object,
                        before: event.kind == .added ? [] : event.placedBefore,
                        after: event.kind == .deleted ? [] : $0.nodes,
                        relevant: true
                    )
                }
            )
        }
        var state = State(history: Array(entries), current: current)
        state.keptBytes = entries.reduce(0) { $0 + $1.bytes }
        state.setPlacements(placed)
        state.trim(configuration)
        self.state = Mutex(state)
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
    /// The watches that `resource`'s changes go to.
    public func subscriberCount(of resource: String) -> Int {
        self.state.withLock { ($0.byResource[resource]?.count ?? 0) + ($0.scoped[resource]?.count ?? 0) }
    }

    /// The objects of `resource` placed on `node`, and the version the hub has published up to (a node-scoped
    /// list reads these from the store and watches from that version: what changed since comes by the watch).
    public func placed(on node: String, resource: String) -> (keys: [ObjectKey], version: Int64) {
        self.state.withLock { s in
            (Array(s.placedOn[NodeKey(resource: resource, node: node)] ?? []), s.current)
        }
    }

    /// The nodes the index places `key` on now (nil: not a placed object it holds).
    func nodes(of key: ObjectKey) -> [String]? {
        self.state.withLock { $0.placements[key]?.nodes }
    }

    /// The node-scoped watches of `resource` for `node`.
    public func subscriberCount(of resource: String, node: String) -> Int {
        self.state.withLock { $0.byNode[NodeKey(resource: resource, node: node)]?.count ?? 0 }
    }

    /// Changes and bytes of watch lines the history holds now.
    public var historySize: (changes: Int, bytes: Int) {
        self.state.withLock { ($0.history.count - $0.head, $0.keptBytes) }
    }

    /// The resourceVersion of the oldest change kept (nil: none kept).
    var oldestKeptVersion: Int64? { self.state.withLock { $0.kept.first?.event.resourceVersion } }

    /// Records a committed change and hands it to every matching watcher. Callers publish in
    /// resourceVersion order.
    public func publish(_ event: StoreEvent) {
        let placement = NodePlacement.of(event.object)
        var entry = Entry(event)
        let woken = self.state.withLock { s -> [WatchWaker] in
            precondition(event.resourceVersion > s.current, "events must be published in order")
            entry.placed = s.place(event, placement, json: event.object.json)
            s.current = event.resourceVersion
            s.history.append(entry)
            s.keptBytes += entry.bytes
            s.trim(self.configuration)
            var woken: [WatchWaker] = []
            func offer(_ sub: WatchSubscription) {
                guard let line = entry.line(for: sub.filter) else { return }
                let waiter = sub.enqueue(
                    .line(line),
                    rv: event.resourceVersion,
                    maxPending: self.configuration.maxPending,
                    maxBytes: self.configuration.maxPendingBytes
                )
                if let waiter { woken.append(waiter) }
            }
            let resource = event.object.key.resource
            if let placed = entry.placed {
                for sub in s.offered(resource, audience: placed.audience) { offer(sub) }
            } else {
                // Every other kind: its watchers in place, not copied (10,000 of them for a Service change).
                for sub in s.byResource[resource]?.values ?? [:].values { offer(sub) }
            }
            return woken
        }
        Self.wake(woken)
    }

    /// Resumes waiting watchers, after the hub's lock is released: never under it. Resuming a task takes
    /// the task's status lock, which a cancelled watch holds while its cancellation handler waits for the
    /// hub's lock to remove itself (a deadlock seen in a test run: `sendBookmarks` resuming a watcher under
    /// the hub's lock while the `WorkloadController`'s watch was being cancelled).
    private static func wake(_ waiters: [WatchWaker]) {
        for waiter in waiters { waiter.resume() }
    }

    /// Moves the latest version to `rv` without a change to publish (writes that watchers do not see,
    /// such as an etcd store's side keys): watches may then start after it.
    public func advance(to rv: Int64) {
        self.state.withLock { s in
            if rv > s.current { s.current = rv }
        }
    }

    /// Ends every watch and forgets the history: the store's state jumped to `current` (an etcd store
    /// that fell behind the compaction and listed again). Watchers resume, or relist on 410.
    /// `placed`: the placed kinds' objects at `current`, as in `init`.
    public func reset(current: Int64, placed: [StoredObject] = []) {
        let subs = self.state.withLock { s -> [WatchSubscription] in
            defer { _ = s.removeAll() }
            s.setPlacements(placed)
            s.history.removeAll()
            s.head = 0
            s.keptBytes = 0
            s.current = max(s.current, current)
            return Array(s.subscribers.values)
        }
        for sub in subs { sub.cancel() }
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
            // (A new subscription has no waiter to wake.)
            for entry in kept[lo...] {
                guard let line = entry.line(for: filter) else { continue }
                _ = sub.enqueue(
                    .line(line),
                    rv: entry.event.resourceVersion,
                    maxPending: Int.max,
                    maxBytes: Int.max
                )
            }
            // Then a bookmark: the watcher has everything up to now and knows it at once, even when
            // nothing it watches changes for a long time.
            _ = sub.enqueue(.bookmark(s.current), rv: s.current, maxPending: Int.max, maxBytes: Int.max)
            s.add(sub)
            return sub
        }
    }

    /// Tells every idle watcher how far the store has got, so it can resume from there.
    public func sendBookmarks() {
        let woken = self.state.withLock { s -> [WatchWaker] in
            s.subscribers.values.compactMap { $0.bookmark(s.current) }
        }
        Self.wake(woken)
    }

    /// Ends every watch (shutdown).
    public func closeAll() {
        let subs = self.state.withLock { s in s.removeAll() }
        for sub in subs { sub.cancel() }
    }

    private func remove(_ id: Int) {
        self.state.withLock { $0.remove(id) }
    }
}

/// Who waits for a watcher's lines: a task in `next()`, or a pushed HTTP body's connection (`onReady`).
enum WatchWaker: Sendable {
    case task(CheckedContinuation<Void, Never>)
    case push(@Sendable () -> Void)

    func resume() {
        switch self {
        case .task(let c): c.resume()
        case .push(let wake): wake()
        }
    }
}

/// What a watcher has queued (`WatchSubscription.take`).
public enum WatchTaken: Sendable {
    case lines(ByteBuffer)
    case nothing
    case ended
}

/// One watcher's queue of lines. `next()` returns everything queued since the last call.
public final class WatchSubscription: Sendable {
    enum Item: Sendable {
        case line(ByteBuffer)
        case bookmark(Int64)
    }

    private struct State {
        var pending: [Item] = []
        var pendingBytes = 0
        var lastQueued: Int64
        var ended = false
        var waiter: CheckedContinuation<Void, Never>?
        /// Woken at every change, until the watch ends (`onReady`).
        var push: (@Sendable () -> Void)?
        var overflowed = false

        /// Who to wake now: a waiting task once; a push waker when the queue was empty before (`fresh`: a
        /// queue that was not has a wake under way, or a write whose end takes again) and when the watch ends.
        mutating func waker(fresh: Bool = true) -> WatchWaker? {
            if let w = self.waiter {
                self.waiter = nil
                return .task(w)
            }
            guard let push = self.push else { return nil }
            if self.ended {
                self.push = nil
                return .push(push)
            }
            return fresh ? .push(push) : nil
        }
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

    /// Queues `item`; returns the watcher's waiting `next()` to resume, which the caller resumes once it holds
    /// no lock of its own (see `WatchHub.wake`).
    func enqueue(_ item: Item, rv: Int64, maxPending: Int, maxBytes: Int) -> WatchWaker? {
        let size: Int
        if case .line(let b) = item { size = b.readableBytes } else { size = 0 }
        return self.state.withLock { s -> WatchWaker? in
            guard !s.ended else { return nil }
            let fresh = s.pending.isEmpty
            if s.pending.count >= maxPending || (s.pendingBytes > 0 && s.pendingBytes + size > maxBytes) {
                s.ended = true
                s.overflowed = true
            } else {
                s.pending.append(item)
                s.pendingBytes += size
                s.lastQueued = rv
            }
            return s.waker(fresh: fresh)
        }
    }

    /// Queues a bookmark when nothing else is queued; returns the waiter to resume, as `enqueue` does.
    func bookmark(_ rv: Int64) -> WatchWaker? {
        self.state.withLock { s -> WatchWaker? in
            guard !s.ended, s.pending.isEmpty else { return nil }
            s.pending.append(.bookmark(rv))
            s.lastQueued = rv
            return s.waker()
        }
    }

    /// Ends the watch; `next()` returns what is still queued, then nil.
    public func cancel() {
        let waiter = self.state.withLock { s -> WatchWaker? in
            s.ended = true
            return s.waker()
        }
        waiter?.resume()
        self.onEnd(self.id)
    }

    /// Calls `wake` (from any thread, never under the hub's lock) when something is queued while the queue was
    /// empty, and when the watch ends: for a watch written by its connection's event loop, with no task
    /// waiting. Its writer takes until `take(kind:)` returns `.nothing` before it waits for the next wake.
    /// Wakes at once when something is queued already.
    public func onReady(_ wake: @escaping @Sendable () -> Void) {
        let now = self.state.withLock { s -> Bool in
            s.push = s.ended ? nil : wake
            return !s.pending.isEmpty || s.ended
        }
        if now { wake() }
    }

    /// Everything queued, each bookmark rendered as an object of `kind`: `.nothing` when nothing is, `.ended`
    /// once the watch has ended and its queue is drained.
    public func take(kind: String) -> WatchTaken {
        let taken = self.state.withLock { s -> [Item]? in
            if !s.pending.isEmpty {
                defer {
                    s.pending.removeAll(keepingCapacity: true)
                    s.pendingBytes = 0
                }
                return s.pending
            }
            if s.ended { s.push = nil }
            return s.ended ? [] : nil
        }
        guard let items = taken else { return .nothing }
        if items.isEmpty {
            self.onEnd(self.id)
            return .ended
        }
        // One line: the hub's own buffer, shared by every watcher, not a copy each.
        if items.count == 1, case .line(let b) = items[0] { return .lines(b) }
        var out = ByteBuffer()
        out.reserveCapacity(
            items.reduce(0) { n, item in if case .line(let b) = item { n + b.readableBytes } else { n + 128 } }
        )
        for item in items {
            switch item {
            case .line(var b): out.writeBuffer(&b)
            case .bookmark(let rv):
                var b = WatchHub.bookmarkLine(rv, kind: kind)
                out.writeBuffer(&b)
            }
        }
        return .lines(out)
    }

    /// Waits for lines and returns them all, each bookmark rendered as an object of `kind`; nil once ended
    /// and drained.
    public func next(kind: String) async -> ByteBuffer? {
        while true {
            switch self.take(kind: kind) {
            case .lines(let b): return b
            case .ended: return nil
            case .nothing: break
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

    /// `next(kind:)`'s lines, each on its own for a decoder; nil once ended and drained.
    public func nextLines(kind: String) async -> [Data]? {
        await self.next(kind: kind).map(Self.lines)
    }

    /// A chunk's non-empty newline-separated lines. A scan with `memchr` over the bytes: splitting the
    /// buffer's view reads it a byte at a time through `ByteBuffer`, which costs a debug build most of a core
    /// under a busy watch.
    public static func lines(_ chunk: ByteBuffer) -> [Data] {
        chunk.withUnsafeReadableBytes { bytes in
            var out: [Data] = []
            guard var at = bytes.baseAddress else { return out }
            let end = at + bytes.count
            while at < end {
                let stop = memchr(at, Int32(UInt8(ascii: "\n")), end - at).map(UnsafeRawPointer.init) ?? end
                if stop > at { out.append(Data(bytes: at, count: stop - at)) }
                at = stop == end ? end : stop + 1
            }
            return out
        }
    }
}

/// The watch line of a change, as the hub encodes it (for tools and tests).
public enum WatchHubLine {
    public static func of(_ event: StoreEvent) -> ByteBuffer { WatchHub.line(for: event) }
}
