import Logging
import MeshSQLite
import NIOCore
import NIOPosix
import Synchronization

/// The store on one SQLite file (WAL): objects, the change history that watches resume from,
/// reservations (VIPs), and the global resourceVersion. Writes are serialised; each commits in
/// one transaction and is then published to the watch hub in order.
public final class SQLiteStore: Store {
    public struct Configuration: Sendable {
        public var path: String
        public var durability: Durability = .full
        public var hub = WatchHub.Configuration()

        public init(path: String) {
            self.path = path
        }
    }

    static let migrations = [
        """
        CREATE TABLE objects (
            resource TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL,
            rv INTEGER NOT NULL, labels TEXT NOT NULL, body BLOB NOT NULL,
            PRIMARY KEY (resource, namespace, name)) WITHOUT ROWID;
        CREATE TABLE events (
            rv INTEGER PRIMARY KEY, type INTEGER NOT NULL,
            resource TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL,
            labels TEXT NOT NULL, body BLOB NOT NULL);
        CREATE TABLE reservations (token TEXT PRIMARY KEY, owner TEXT NOT NULL) WITHOUT ROWID;
        CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
        INSERT INTO meta (key, value) VALUES ('resourceVersion', 0)
        """,
        // Node heartbeats, persisted coarsely beside the objects: no versions, no events.
        "CREATE TABLE heartbeats (name TEXT PRIMARY KEY, at INTEGER NOT NULL) WITHOUT ROWID",
        // Where a device's or workload's change moved it from (`StoreEvent.placedBefore`; nodes separated by
        // newlines), so that history loaded at start goes only to the node-scoped watchers it concerns.
        "ALTER TABLE events ADD COLUMN placed_before TEXT",
    ]

    let db: SQLiteDatabase
    public let hub: WatchHub
    let pool: NIOThreadPool
    let logger: Logger
    /// Serialises commit + publish so watchers see versions in order; counts what was written since
    /// the history on disk was last compacted.
    private let writer = Mutex<Compaction>(Compaction())

    /// When to trim the `events` table: every 512 writes, or once an eighth of the history's byte
    /// limit was written, so the file stays near the in-memory history in size.
    struct Compaction {
        var writes = 0
        var bytes = 0

        mutating func due(afterWriting size: Int, maxBytes: Int) -> Bool {
            self.writes += 1
            self.bytes += size
            guard self.writes >= 512 || self.bytes >= max(1, maxBytes / 8) else { return false }
            self = Compaction()
            return true
        }
    }

    /// Opens (creating when absent) the store at `configuration.path` and loads the watch history.
    public init(configuration: Configuration, logger: Logger) async throws {
        self.logger = logger
        let pool = NIOThreadPool(numberOfThreads: 1)
        pool.start()
        self.pool = pool
        let config = configuration
        let (db, current, history, placed) = try await pool.runIfActive {
            let db = try SQLiteDatabase(path: config.path, durability: config.durability)
            try db.migrate(SQLiteStore.migrations)
            let current = try db.query("SELECT value FROM meta WHERE key = 'resourceVersion'").first?[0].int ?? 0
            let rows = try db.query(
                "SELECT rv, type, resource, namespace, name, labels, body, placed_before FROM events WHERE rv > ? ORDER BY rv",
                [.int(current - Int64(config.hub.historyLimit))]
            )
            // Where the placed kinds' objects are now: their next changes move from there (`NodePlacement`).
            var placed: [StoredObject] = []
            for resource in NodePlacement.resources.sorted() {
                placed += try db.query(
                    "SELECT namespace, name, rv, labels, body FROM objects WHERE resource = ?",
                    [.text(resource)]
                ).map { try SQLiteStore.object(from: $0, resource: resource) }
            }
            return (db, current, try rows.map(SQLiteStore.event(from:)), placed)
        }
        self.db = db
        self.hub = WatchHub(current: current, history: history, placed: placed, configuration: config.hub)
        logger.info(
            "store \(config.path): resourceVersion \(current), \(history.count) changes of history",
            metadata: ["durability": "\(config.durability.rawValue)"]
        )
    }

    static func event(from row: [SQLValue]) throws -> StoreEvent {
        guard let rv = row[0].int, let type = row[1].int.flatMap(StoreEvent.Kind.init(rawValue:)),
            let resource = row[2].text, let ns = row[3].text, let name = row[4].text, let body = row[6].blob
        else { throw StoreError.unavailable("corrupt event row") }
        let key = ObjectKey(resource: resource, namespace: ns, name: name)
        var event = StoreEvent(
            kind: type,
            object: StoredObject(
                key: key,
                resourceVersion: rv,
                labels: Labels.decode(row[5].text ?? ""),
                json: ByteBuffer(bytes: body)
            )
        )
        if row.count > 7, let before = row[7].text {
            event.placedBefore = before.split(separator: "\n").map(String.init)
        }
        return event
    }

    static func object(from row: [SQLValue], resource: String) throws -> StoredObject {
        guard let ns = row[0].text, let name = row[1].text, let rv = row[2].int, let body = row[4].blob else {
            throw StoreError.unavailable("corrupt object row")
        }
        return StoredObject(
            key: ObjectKey(resource: resource, namespace: ns, name: name),
            resourceVersion: rv,
            labels: Labels.decode(row[3].text ?? ""),
            json: ByteBuffer(bytes: body)
        )
    }

    public func currentResourceVersion() async throws -> Int64 {
        self.hub.currentResourceVersion
    }

    public func get(_ key: ObjectKey) async throws -> StoredObject? {
        try await self.get([key]).first
    }

    public func get(_ keys: [ObjectKey]) async throws -> [StoredObject] {
        let db = self.db
        return try await self.pool.runIfActive {
            try db.transaction { tx in
                try keys.compactMap { key in
                    try tx.query(
                        "SELECT namespace, name, rv, labels, body FROM objects WHERE resource = ? AND namespace = ? AND name = ?",
                        [.text(key.resource), .text(key.namespace), .text(key.name)]
                    ).first.map { try SQLiteStore.object(from: $0, resource: key.resource) }
                }
            }
        }
    }

    public func list(
        resource: String,
        namespace: String?
    ) async throws -> (items: [StoredObject], resourceVersion: Int64) {
        let db = self.db
        return try await self.pool.runIfActive {
            // One transaction: the objects and the version are one consistent snapshot.
            try db.transaction { tx in
                let rv = try tx.query("SELECT value FROM meta WHERE key = 'resourceVersion'").first?[0].int ?? 0
                let rows: [[SQLValue]]
                if let ns = namespace {
                    rows = try tx.query(
                        "SELECT namespace, name, rv, labels, body FROM objects WHERE resource = ? AND namespace = ? ORDER BY namespace, name",
                        [.text(resource), .text(ns)]
                    )
                } else {
                    rows = try tx.query(
                        "SELECT namespace, name, rv, labels, body FROM objects WHERE resource = ? ORDER BY namespace, name",
                        [.text(resource)]
                    )
                }
                return (try rows.map { try SQLiteStore.object(from: $0, resource: resource) }, rv)
            }
        }
    }

    /// Every reservation token with its owner (to rebuild allocators at start-up).
    public func reservations(prefix: String) async throws -> [String: String] {
        let db = self.db
        return try await self.pool.runIfActive {
            var out: [String: String] = [:]
            for row in try db.query(
                "SELECT token, owner FROM reservations WHERE token >= ? AND token < ?",
                [.text(prefix), .text(prefix + "\u{10FFFF}")]
            ) {
                if let t = row[0].text, let o = row[1].text { out[t] = o }
            }
            return out
        }
    }

    public func commit(_ write: Write) async throws -> StoredObject {
        let db = self.db
        let hub = self.hub
        let limit = Int64(hub.configuration.historyLimit)
        let maxBytes = hub.configuration.historyMaxBytes
        return try await self.pool.runIfActive {
            try self.writer.withLock { compaction in
                let event = try db.transaction { tx in
                    let event = try SQLiteStore.apply(write, tx, placedBefore: hub.nodes(of: write.key))
                    if compaction.due(afterWriting: event.object.json.readableBytes, maxBytes: maxBytes) {
                        // What the hub no longer keeps (by count or by bytes) cannot be resumed from.
                        let cutoff = max(event.resourceVersion - limit + 1, hub.oldestKeptVersion ?? 0)
                        try tx.query("DELETE FROM events WHERE rv < ?", [.int(cutoff)])
                    }
                    return event
                }
                hub.publish(event)
                return event.object
            }
        }
    }

    /// `placedBefore`: where the hub places the object now (nil: not a placed kind, or not indexed), kept
    /// with the event for the history loaded at the next start.
    private static func apply(
        _ write: Write,
        _ tx: borrowing Transaction,
        placedBefore: [String]?
    ) throws -> StoreEvent {
        let key = write.key
        let keyParams: [SQLValue] = [.text(key.resource), .text(key.namespace), .text(key.name)]
        let rv = (try tx.query("SELECT value FROM meta WHERE key = 'resourceVersion'").first?[0].int ?? 0) + 1
        let existing = try tx.query(
            "SELECT rv FROM objects WHERE resource = ? AND namespace = ? AND name = ?",
            keyParams
        ).first?[0].int
        switch (write.expect, existing) {
        case (.any, _): break
        case (.absent, nil): break
        case (.absent, .some): throw StoreError.alreadyExists(key)
        case (.version(let want), let have): if want != have { throw StoreError.conflict(key, current: have) }
        }
        let owner = key.description
        for token in write.reserve {
            let holder = try tx.query("SELECT owner FROM reservations WHERE token = ?", [.text(token)]).first?[0].text
            if let h = holder, h != owner { throw StoreError.reserved(token: token, owner: h) }
            if holder == nil {
                try tx.query("INSERT INTO reservations (token, owner) VALUES (?, ?)", [.text(token), .text(owner)])
            }
        }
        for token in write.release {
            try tx.query("DELETE FROM reservations WHERE token = ? AND owner = ?", [.text(token), .text(owner)])
        }
        let event: StoreEvent
        switch write.operation {
        case .put(let encode):
            let (json, labels) = try encode(rv)
            let labelText = Labels.encode(labels)
            let body: [SQLValue] = keyParams + [.int(rv), .text(labelText), .blob(Array(json.readableBytesView))]
            try tx.query(
                "INSERT OR REPLACE INTO objects (resource, namespace, name, rv, labels, body) VALUES (?, ?, ?, ?, ?, ?)",
                body
            )
            event = StoreEvent(
                kind: existing == nil ? .added : .modified,
                object: StoredObject(key: key, resourceVersion: rv, labels: labels, json: json)
            )
        case .delete(let encode):
            guard existing != nil else { throw StoreError.notFound(key) }
            let json = try encode(rv)
            let labels =
                try tx.query(
                    "SELECT labels FROM objects WHERE resource = ? AND namespace = ? AND name = ?",
                    keyParams
                ).first?[0].text ?? ""
            try tx.query("DELETE FROM objects WHERE resource = ? AND namespace = ? AND name = ?", keyParams)
            try tx.query("DELETE FROM reservations WHERE owner = ?", [.text(owner)])
            event = StoreEvent(
                kind: .deleted,
                object: StoredObject(key: key, resourceVersion: rv, labels: Labels.decode(labels), json: json)
            )
        }
        let before: SQLValue =
            existing == nil
            ? (NodePlacement.isPlaced(key.resource) ? .text("") : .null)
            : placedBefore.map { .text($0.joined(separator: "\n")) } ?? .null
        try tx.query(
            "INSERT INTO events (rv, type, resource, namespace, name, labels, body, placed_before) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [.int(rv), .int(event.kind.rawValue)] + keyParams + [
                .text(Labels.encode(event.object.labels)), .blob(Array(event.object.json.readableBytesView)), before,
            ]
        )
        try tx.query("UPDATE meta SET value = ? WHERE key = 'resourceVersion'", [.int(rv)])
        return event
    }

    public func loadHeartbeats() async throws -> [String: Int64] {
        let db = self.db
        return try await self.pool.runIfActive {
            var out: [String: Int64] = [:]
            for row in try db.query("SELECT name, at FROM heartbeats") {
                if let n = row[0].text, let at = row[1].int { out[n] = at }
            }
            return out
        }
    }

    public func saveHeartbeats(_ beats: [String: Int64], forget: [String]) async throws {
        guard !beats.isEmpty || !forget.isEmpty else { return }
        let db = self.db
        let rows = Array(beats)
        try await self.pool.runIfActive {
            // One transaction (one fsync at most) for the whole batch, 500 rows per statement.
            try db.transaction { tx in
                var i = 0
                while i < rows.count {
                    let chunk = rows[i..<min(rows.count, i + 500)]
                    let sql =
                        "INSERT OR REPLACE INTO heartbeats (name, at) VALUES "
                        + Array(repeating: "(?, ?)", count: chunk.count).joined(separator: ", ")
                    try tx.query(sql, chunk.flatMap { [SQLValue.text($0.key), .int($0.value)] })
                    i += chunk.count
                }
                for name in forget {
                    try tx.query("DELETE FROM heartbeats WHERE name = ?", [.text(name)])
                }
            }
        }
    }

    public func watch(after resourceVersion: Int64, filter: WatchFilter) throws -> WatchSubscription {
        try self.hub.subscribe(after: resourceVersion, filter: filter)
    }

    /// Always at once: the hub holds every version the store has written.
    public func watchAtOnce(after resourceVersion: Int64, filter: WatchFilter) throws -> WatchSubscription? {
        try self.watch(after: resourceVersion, filter: filter)
    }

    public func close() async throws {
        self.hub.closeAll()
        let db = self.db
        try? await self.pool.runIfActive { try db.checkpoint() }
        try await self.pool.shutdownGracefully()
    }
}

/// Labels as stored: `key=value` lines (neither may hold a newline; names forbid it).
enum Labels {
    static func encode(_ labels: [String: String]) -> String {
        labels.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: "\n")
    }

    static func decode(_ text: String) -> [String: String] {
        var out: [String: String] = [:]
        for line in text.split(separator: "\n") {
            let kv = line.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            out[String(kv[0])] = kv.count == 2 ? String(kv[1]) : ""
        }
        return out
    }
}
