import Logging
import MeshIdentity
import NIOCore
import Synchronization

/// The store on etcd, for several `mesh-control` replicas over one etcd cluster.
///
/// Keys under `prefix` (default `/mesh/`):
/// - `o/<resource>/<namespace>/<name>`: an object (`EtcdValue`: labels and JSON without its version);
/// - `tomb`: the final JSON of the last deletion, written in the deletion's transaction (watch
///   events of a deletion carry it, at the deletion's revision);
/// - `r/<token>` → owner and `ro/<owner>\0<token>`: reservations (VIPs, certificate serials) and
///   their index by owner;
/// - `hb/<node>`: saved heartbeat times; `beats/<replica>`: the beats a replica took lately
///   (shared liveness, see `NodeLifecycle`); `pki/`: the shared CA.
///
/// resourceVersion is the etcd revision. A write reads what it depends on (the object and the
/// reservations) and commits in one transaction whose compares are their `mod_revision`s, retrying
/// when another writer came between. Each replica keeps a cache of every object and a `WatchHub`,
/// both fed by one etcd watch over the prefix: lists and watches are served from them; a list first
/// asks etcd for its revision and waits for the cache to reach it (read-your-writes across replicas).
public final class EtcdStore: Store {
    public struct Configuration: Sendable {
        public var client: EtcdClient.Configuration
        /// Every key lives under it; replicas of one mesh share it.
        public var prefix = "/mesh/"
        public var hub = WatchHub.Configuration()
        /// This replica's name among the others (its key for shared beats).
        public var replica: String
        /// How long a list or watch waits for this replica's cache to reach the revision asked for.
        public var catchUpTimeout: Duration = .seconds(5)

        public init(endpoints: [String], replica: String) {
            self.client = EtcdClient.Configuration(endpoints: endpoints)
            self.replica = replica
        }
    }

    struct Waiter {
        var revision: Int64
        var continuation: CheckedContinuation<Bool, Never>
    }

    struct State {
        /// resource → key → object, at `revision`.
        var objects: [String: [ObjectKey: StoredObject]] = [:]
        /// Each kind's objects in list order, kept until the kind changes: a fleet of agents listing a kind
        /// at once (a restart) sorts it once, not once per agent under this lock.
        var sorted: [String: [StoredObject]] = [:]
        var revision: Int64
        var waiters: [Int: Waiter] = [:]
        var nextWaiter = 0
        var beatsHandler: (@Sendable ([String: Int64]) -> Void)?
        var feederError: String?
    }

    public let client: EtcdClient
    public let hub: WatchHub
    public let configuration: Configuration
    let root: [UInt8]
    let logger: Logger
    private let state: Mutex<State>
    private let feeder = Mutex<Task<Void, Never>?>(nil)

    public init(configuration: Configuration, logger: Logger) async throws {
        guard !configuration.prefix.isEmpty, configuration.prefix.hasSuffix("/") else {
            throw StoreError.unavailable("etcd prefix \"\(configuration.prefix)\" must end with /")
        }
        self.configuration = configuration
        self.logger = logger
        self.client = try EtcdClient(configuration: configuration.client)
        self.root = Array(configuration.prefix.utf8)
        let (revision, cache, count) = try await Self.load(
            self.client,
            root: self.root,
            history: configuration.hub.historyLimit
        )
        self.hub = WatchHub(current: revision, placed: Self.placed(cache), configuration: configuration.hub)
        self.state = Mutex(State(objects: cache, revision: revision))
        logger.info(
            "etcd store \(configuration.client.endpoints.joined(separator: ",")) prefix \(configuration.prefix): revision \(revision), \(count) objects; replica \(configuration.replica)"
        )
        let task = Task { [weak self] in
            guard let self else { return }
            await self.feed(from: revision)
        }
        self.feeder.withLock { $0 = task }
    }

    // MARK: keys

    func key(_ suffix: String) -> [UInt8] { self.root + Array(suffix.utf8) }

    func objectKey(_ k: ObjectKey) -> [UInt8] { self.key("o/\(k.resource)/\(k.namespace)/\(k.name)") }

    /// The object key a stored key names, nil for other keys.
    func objectKey(_ bytes: [UInt8]) -> ObjectKey? { Self.objectKey(bytes, root: self.root) }

    static func objectKey(_ bytes: [UInt8], root: [UInt8]) -> ObjectKey? {
        let o = root + Array("o/".utf8)
        guard bytes.count > o.count, bytes.starts(with: o) else { return nil }
        let parts = String(decoding: bytes[o.count...], as: UTF8.self)
            .split(separator: "/", maxSplits: 2, omittingEmptySubsequences: false)
        guard parts.count == 3 else { return nil }
        return ObjectKey(resource: String(parts[0]), namespace: String(parts[1]), name: String(parts[2]))
    }

    static func object(_ key: ObjectKey, _ value: [UInt8], at revision: Int64) throws -> StoredObject {
        do {
            let d = try EtcdValue.decode(value)
            return StoredObject(key: key, resourceVersion: revision, labels: d.labels, json: d.json(at: revision))
        } catch {
            throw StoreError.unavailable("\(key): \(error)")
        }
    }

    // MARK: the feed (one etcd watch → cache + hub)

    private func feed(from revision: Int64) async {
        var after = revision
        var failures = 0
        while !Task.isCancelled {
            do {
                let request = WatchCreateRequest(
                    key: EtcdBytes(self.root),
                    rangeEnd: EtcdBytes(EtcdClient.prefixEnd(self.root)),
                    startRevision: EtcdInt(after + 1),
                    progressNotify: true,
                    prevKv: true
                )
                try await self.client.watch(request) { response in
                    if let compacted = response.compactRevision, response.canceled == true {
                        throw EtcdCompacted(compactRevision: compacted.value)
                    }
                    if response.canceled == true {
                        throw StoreError.unavailable("etcd cancelled the watch: \(response.cancelReason ?? "")")
                    }
                    failures = 0
                    if let events = response.events, !events.isEmpty {
                        after = try self.apply(events)
                    } else if response.created != true, let rev = response.header?.revision?.value, rev > after {
                        // A progress notification: nothing under the prefix changed up to rev.
                        self.advance(to: rev)
                        after = rev
                    }
                    return !Task.isCancelled
                }
            } catch let e as EtcdCompacted {
                // This replica fell behind etcd's kept history: start over from a fresh list; its
                // watchers are ended and resume (or relist, on 410) like after a restart.
                self.logger.warning("etcd history compacted at \(e.compactRevision) past this replica: reloading")
                if let rev = try? await self.reload() { after = rev }
            } catch {
                if Task.isCancelled { break }
                failures += 1
                self.state.withLock { $0.feederError = "\(error)" }
                if failures == 1 || failures % 20 == 0 {
                    self.logger.warning("etcd watch broke (\(error)); reopening after revision \(after)")
                }
            }
            try? await Task.sleep(for: .milliseconds(min(1000, 50 * failures)))
        }
    }

    /// Applies one watch response's events (whole revisions, in order). Returns the last revision.
    private func apply(_ events: [WatchEvent]) throws -> Int64 {
        var last: Int64 = 0
        var i = 0
        while i < events.count {
            let rev = events[i].kv.mod
            var j = i
            while j < events.count && events[j].kv.mod == rev { j += 1 }
            let group = events[i..<j]
            i = j
            last = rev
            var change: StoreEvent?
            let tomb = self.key("tomb")
            for e in group {
                if let key = self.objectKey(e.kv.key.bytes) {
                    if e.type == "DELETE" {
                        let final =
                            group.first { $0.kv.key.bytes == tomb && $0.type != "DELETE" }?.kv.value?.bytes
                            ?? e.prevKv?.value?.bytes ?? []
                        let o = try Self.object(key, final, at: rev)
                        change = StoreEvent(kind: .deleted, object: o)
                    } else {
                        let o = try Self.object(key, e.kv.value?.bytes ?? [], at: rev)
                        change = StoreEvent(kind: e.kv.version?.value == 1 ? .added : .modified, object: o)
                    }
                } else if e.type != "DELETE", e.kv.key.bytes.starts(with: self.key("beats/")) {
                    let replica = String(decoding: e.kv.key.bytes.dropFirst(self.root.count + 6), as: UTF8.self)
                    if replica != self.configuration.replica {
                        let beats = Self.decodeBeats(e.kv.value?.bytes ?? [])
                        self.state.withLock { $0.beatsHandler }?(beats)
                    }
                }
            }
            let ready = self.state.withLock { s -> [CheckedContinuation<Bool, Never>] in
                if let change {
                    let o = change.object
                    if change.kind == .deleted {
                        s.objects[o.key.resource]?[o.key] = nil
                    } else {
                        s.objects[o.key.resource, default: [:]][o.key] = o
                    }
                    s.sorted[o.key.resource] = nil
                    if rev > self.hub.currentResourceVersion { self.hub.publish(change) }
                } else {
                    self.hub.advance(to: rev)
                }
                s.revision = max(s.revision, rev)
                return Self.takeReady(&s)
            }
            for c in ready { c.resume(returning: true) }
        }
        return last
    }

    private func advance(to rev: Int64) {
        let ready = self.state.withLock { s -> [CheckedContinuation<Bool, Never>] in
            self.hub.advance(to: rev)
            s.revision = max(s.revision, rev)
            return Self.takeReady(&s)
        }
        for c in ready { c.resume(returning: true) }
    }

    private static func takeReady(_ s: inout State) -> [CheckedContinuation<Bool, Never>] {
        var out: [CheckedContinuation<Bool, Never>] = []
        for (id, w) in s.waiters where w.revision <= s.revision {
            out.append(w.continuation)
            s.waiters[id] = nil
        }
        return out
    }

    /// Reloads every object after this replica fell behind etcd's compaction.
    private func reload() async throws -> Int64 {
        let (revision, cache, _) = try await Self.load(self.client, root: self.root)
        let ready = self.state.withLock { s -> [CheckedContinuation<Bool, Never>] in
            s.objects = cache
            s.sorted = [:]
            s.revision = revision
            self.hub.reset(current: revision, placed: Self.placed(cache))
            return Self.takeReady(&s)
        }
        for c in ready { c.resume(returning: true) }
        return revision
    }

    /// The placed kinds' objects in a loaded cache (`NodePlacement`).
    static func placed(_ cache: [String: [ObjectKey: StoredObject]]) -> [StoredObject] {
        NodePlacement.resources.flatMap { Array(cache[$0]?.values ?? [:].values) }
    }

    /// Every object under the prefix, at one revision.
    static func load(
        _ client: EtcdClient,
        root: [UInt8],
        history: Int = 0
    ) async throws -> (revision: Int64, objects: [String: [ObjectKey: StoredObject]], count: Int) {
        let objects = root + Array("o/".utf8)
        var r: RangeResponse?
        var revision: Int64 = 0
        if history > 0 {
            // Start `history` revisions back (when etcd still has them), so that the watch replays them
            // into the hub: clients resume from versions before this replica started (a restart of
            // the only replica included) instead of getting 410 and listing again.
            // A young etcd (fewer revisions than `history`) is replayed from its first revision: a small
            // fleet's only replica, restarted, would otherwise send every agent back to list again.
            let current = try await client.revision()
            let from = max(1, current - Int64(history))
            if from < current,
                let past = try? await client.range(objects, end: EtcdClient.prefixEnd(objects), revision: from)
            {
                r = past
                revision = from
            }
        }
        if r == nil {
            r = try await client.range(objects, end: EtcdClient.prefixEnd(objects))
            revision = r?.header?.revision?.value ?? 0
        }
        var cache: [String: [ObjectKey: StoredObject]] = [:]
        for kv in r?.kvs ?? [] {
            guard let key = Self.objectKey(kv.key.bytes, root: root) else { continue }
            cache[key.resource, default: [:]][key] = try Self.object(key, kv.value?.bytes ?? [], at: kv.mod)
        }
        return (revision, cache, r?.kvs?.count ?? 0)
    }

    /// Waits until the cache has reached `revision`; false after `catchUpTimeout`.
    func waitFor(_ revision: Int64) async -> Bool {
        let timeout = self.configuration.catchUpTimeout
        return await withCheckedContinuation { (c: CheckedContinuation<Bool, Never>) in
            let id = self.state.withLock { s -> Int? in
                if s.revision >= revision { return nil }
                let id = s.nextWaiter
                s.nextWaiter += 1
                s.waiters[id] = Waiter(revision: revision, continuation: c)
                return id
            }
            guard let id else {
                c.resume(returning: true)
                return
            }
            Task {
                try? await Task.sleep(for: timeout)
                self.state.withLock { $0.waiters.removeValue(forKey: id) }?.continuation.resume(returning: false)
            }
        }
    }

    // MARK: Store

    public func currentResourceVersion() async throws -> Int64 {
        self.state.withLock { $0.revision }
    }

    public func get(_ key: ObjectKey) async throws -> StoredObject? {
        let r = try await self.client.range(self.objectKey(key))
        guard let kv = r.kvs?.first else { return nil }
        return try Self.object(key, kv.value?.bytes ?? [], at: kv.mod)
    }

    /// From the cache once it has caught up with etcd (one revision call, not one read per key).
    public func get(_ keys: [ObjectKey]) async throws -> [StoredObject] {
        let revision = try await self.client.revision()
        if await self.waitFor(revision) {
            return self.state.withLock { s in keys.compactMap { s.objects[$0.resource]?[$0] } }
        }
        var out: [StoredObject] = []
        for key in keys { if let o = try await self.get(key) { out.append(o) } }
        return out
    }

    public func list(
        resource: String,
        namespace: String?
    ) async throws -> (items: [StoredObject], resourceVersion: Int64) {
        let revision = try await self.client.revision()
        if await self.waitFor(revision) {
            return self.state.withLock { s in
                let all: [StoredObject]
                if let cached = s.sorted[resource] {
                    all = cached
                } else {
                    all = (s.objects[resource] ?? [:]).values.sorted {
                        ($0.key.namespace, $0.key.name) < ($1.key.namespace, $1.key.name)
                    }
                    s.sorted[resource] = all
                }
                return (namespace.map { ns in all.filter { $0.key.namespace == ns } } ?? all, s.revision)
            }
        }
        // The cache is behind (etcd unreachable for the watch, or writes outside the prefix that no
        // progress notification has covered yet): read etcd itself, consistently at one revision.
        let prefix = self.key("o/\(resource)/" + (namespace.map { "\($0)/" } ?? ""))
        let r = try await self.client.range(prefix, end: EtcdClient.prefixEnd(prefix))
        var items: [StoredObject] = []
        for kv in r.kvs ?? [] {
            guard let key = self.objectKey(kv.key.bytes) else { continue }
            items.append(try Self.object(key, kv.value?.bytes ?? [], at: kv.mod))
        }
        return (items, r.header?.revision?.value ?? revision)
    }

    public func watch(after resourceVersion: Int64, filter: WatchFilter) async throws -> WatchSubscription {
        if let subscription = try self.watchAtOnce(after: resourceVersion, filter: filter) { return subscription }
        if !(await self.waitFor(resourceVersion)) {
            let current = try await self.client.revision()
            if resourceVersion > current { throw StoreError.tooNew(requested: resourceVersion, current: current) }
            throw StoreError.unavailable(
                "this replica's cache is behind revision \(resourceVersion) (etcd at \(current)); retry"
            )
        }
        return try self.hub.subscribe(after: resourceVersion, filter: filter)
    }

    /// Only when this replica's cache has reached `resourceVersion` (else `watch` waits for it).
    public func watchAtOnce(after resourceVersion: Int64, filter: WatchFilter) throws -> WatchSubscription? {
        guard self.state.withLock({ $0.revision }) >= resourceVersion else { return nil }
        return try self.hub.subscribe(after: resourceVersion, filter: filter)
    }

    public func reservations(prefix: String) async throws -> [String: String] {
        let p = self.key("r/" + prefix)
        let r = try await self.client.range(p, end: EtcdClient.prefixEnd(p))
        var out: [String: String] = [:]
        let skip = self.root.count + 2
        for kv in r.kvs ?? [] {
            out[String(decoding: kv.key.bytes.dropFirst(skip), as: UTF8.self)] = kv.value?.string ?? ""
        }
        return out
    }

    public func commit(_ write: Write) async throws -> StoredObject {
        let key = write.key
        let owner = key.description
        let objectKey = self.objectKey(key)
        let ownedPrefix = self.key("ro/\(owner)\u{0}")
        let tokens = write.reserve + write.release
        for _ in 0..<64 {
            // One read at one revision: the object, the tokens, and what the owner holds.
            var read = TxnRequest()
            read.success = [RequestOp.range(objectKey)] + tokens.map { RequestOp.range(self.key("r/" + $0)) }
            read.success.append(.range(ownedPrefix, end: EtcdClient.prefixEnd(ownedPrefix)))
            let snapshot = try await self.client.txn(read)
            let ranges = (snapshot.responses ?? []).map { $0.responseRange?.kvs ?? [] }
            guard ranges.count == tokens.count + 2 else { throw StoreError.unavailable("etcd: short transaction") }
            let existing = ranges[0].first
            switch (write.expect, existing) {
            case (.any, _), (.absent, nil): break
            case (.absent, .some): throw StoreError.alreadyExists(key)
            case (.version(let want), let have):
                if want != have?.mod { throw StoreError.conflict(key, current: have?.mod) }
            }
            var txn = TxnRequest()
            txn.compare.append(.modified(objectKey, at: existing?.mod ?? 0))
            var holders: [String: (owner: String, mod: Int64)] = [:]
            for (i, token) in tokens.enumerated() {
                let kv = ranges[1 + i].first
                txn.compare.append(.modified(self.key("r/" + token), at: kv?.mod ?? 0))
                if let kv { holders[token] = (kv.value?.string ?? "", kv.mod) }
            }
            for token in write.reserve {
                if let h = holders[token], h.owner != owner { throw StoreError.reserved(token: token, owner: h.owner) }
                if holders[token] == nil {
                    txn.success.append(.put(self.key("r/" + token), Array(owner.utf8)))
                    txn.success.append(.put(ownedPrefix + Array(token.utf8), []))
                }
            }
            let value: [UInt8]
            switch write.operation {
            case .put(let encode):
                var labels: [String: String] = [:]
                let (json, slots) = try EtcdValue.split { rv in
                    let (json, l) = try encode(rv)
                    labels = l
                    return json
                }
                value = EtcdValue.encode(EtcdValue.Decoded(labels: labels, json: json, slots: slots))
                txn.success.append(.put(objectKey, value))
                for token in write.release where holders[token]?.owner == owner {
                    txn.success.append(.delete(self.key("r/" + token)))
                    txn.success.append(.delete(ownedPrefix + Array(token.utf8)))
                }
            case .delete(let encode):
                guard let existing else { throw StoreError.notFound(key) }
                let old = try EtcdValue.decode(existing.value?.bytes ?? [])
                value = try EtcdValue.encode(labels: old.labels, render: encode)
                txn.success.append(.delete(objectKey))
                txn.success.append(.put(self.key("tomb"), value))
                // Every reservation the object holds goes with it.
                let owned = ranges[tokens.count + 1]
                for kv in owned {
                    let token = Array(kv.key.bytes.dropFirst(ownedPrefix.count))
                    txn.success.append(.delete(self.key("r/") + token))
                }
                if !owned.isEmpty { txn.success.append(.delete(ownedPrefix, end: EtcdClient.prefixEnd(ownedPrefix))) }
            }
            let response = try await self.client.txn(txn)
            guard response.succeeded == true, let rev = response.header?.revision?.value else {
                continue  // someone wrote in between: read again (and fail then if it matters)
            }
            return try Self.object(key, value, at: rev)
        }
        throw StoreError.conflict(key, current: nil)
    }

    public func close() async throws {
        let task = self.feeder.withLock { t -> Task<Void, Never>? in
            defer { t = nil }
            return t
        }
        task?.cancel()
        await task?.value
        self.hub.closeAll()
        let waiters = self.state.withLock { s -> [Waiter] in
            defer { s.waiters.removeAll() }
            return Array(s.waiters.values)
        }
        for w in waiters { w.continuation.resume(returning: false) }
    }

    // MARK: heartbeats

    public func loadHeartbeats() async throws -> [String: Int64] {
        let p = self.key("hb/")
        let r = try await self.client.range(p, end: EtcdClient.prefixEnd(p))
        var out: [String: Int64] = [:]
        for kv in r.kvs ?? [] {
            if let at = Int64(kv.value?.string ?? "") {
                out[String(decoding: kv.key.bytes.dropFirst(p.count), as: UTF8.self)] = at
            }
        }
        return out
    }

    public func saveHeartbeats(_ beats: [String: Int64], forget: [String]) async throws {
        // etcd allows 128 operations per transaction by default: batches of 100.
        var ops = beats.map { RequestOp.put(self.key("hb/" + $0.key), Array(String($0.value).utf8)) }
        ops += forget.map { RequestOp.delete(self.key("hb/" + $0)) }
        var i = 0
        while i < ops.count {
            let chunk = Array(ops[i..<min(ops.count, i + 100)])
            _ = try await self.client.txn(TxnRequest(success: chunk))
            i += chunk.count
        }
    }

    /// Shares the beats this replica took since the last call with the other replicas (one put).
    public func shareBeats(_ beats: [String: Int64]) async throws {
        guard !beats.isEmpty else { return }
        _ = try await self.client.put(self.key("beats/" + self.configuration.replica), Self.encodeBeats(beats))
    }

    /// What to call with the beats other replicas share.
    public func onSharedBeats(_ handler: @escaping @Sendable ([String: Int64]) -> Void) {
        self.state.withLock { $0.beatsHandler = handler }
    }

    /// `name millis` lines.
    static func encodeBeats(_ beats: [String: Int64]) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(beats.count * 24)
        for (name, at) in beats {
            out += Array(name.utf8)
            out.append(0x20)
            out += Array(String(at).utf8)
            out.append(0x0a)
        }
        return out
    }

    static func decodeBeats(_ bytes: [UInt8]) -> [String: Int64] {
        var out: [String: Int64] = [:]
        for line in bytes.split(separator: 0x0a) {
            guard let space = line.firstIndex(of: 0x20),
                let at = Int64(String(decoding: line[(space + 1)...], as: UTF8.self))
            else { continue }
            out[String(decoding: line[..<space], as: UTF8.self)] = at
        }
        return out
    }

    // MARK: the shared CA

    /// Makes `<directory>/ca.key` and `ca.crt` the mesh CA every replica shares: etcd's copy when there
    /// is one; else this replica's (created when absent), published unless another replica won the race.
    public func shareCA(directory: String) async throws {
        let keyKey = self.key("pki/ca.key")
        let certKey = self.key("pki/ca.crt")
        for _ in 0..<3 {
            let r = try await self.client.txn(TxnRequest(success: [.range(keyKey), .range(certKey)]))
            let kvs = (r.responses ?? []).map { $0.responseRange?.kvs?.first }
            if kvs.count == 2, let k = kvs[0]?.value?.string, let c = kvs[1]?.value?.string {
                let keyPath = directory + "/ca.key"
                let certPath = directory + "/ca.crt"
                if (try? PEMFiles.read(certPath, what: "CA certificate")) != c
                    || (try? PEMFiles.read(keyPath, what: "CA key")) != k
                {
                    try PEMFiles.write(k, to: keyPath, mode: 0o600)
                    try PEMFiles.write(c, to: certPath, mode: 0o644)
                    self.logger.notice("took the mesh CA the replicas share from etcd")
                }
                return
            }
            let (ca, _) = try CertificateAuthority.loadOrCreate(directory: directory)
            let publish = try await self.client.txn(
                TxnRequest(
                    compare: [.modified(keyKey, at: 0), .modified(certKey, at: 0)],
                    success: [
                        .put(keyKey, Array(try ca.keyPEM().utf8)), .put(certKey, Array(try ca.certificatePEM().utf8)),
                    ]
                )
            )
            if publish.succeeded == true {
                self.logger.notice("published this replica's mesh CA in etcd for the others")
                return
            }
        }
        throw StoreError.unavailable("could not agree on the mesh CA in etcd")
    }
}
