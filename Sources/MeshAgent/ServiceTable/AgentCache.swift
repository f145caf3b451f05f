import MeshCore
import MeshSQLite

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// The agent's copy of what it last saw from the control plane, in one SQLite file, so the site
/// keeps resolving and proxying while the control plane is unreachable, also across agent restarts.
/// Each applied change is one transaction: objects and the version to resume from move together.
public final class AgentCache: Sendable {
    static let migrations = [
        """
        CREATE TABLE objects (kind TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL, body BLOB NOT NULL,
            PRIMARY KEY (kind, namespace, name)) WITHOUT ROWID;
        CREATE TABLE versions (kind TEXT PRIMARY KEY, rv INTEGER NOT NULL) WITHOUT ROWID
        """
    ]

    let db: SQLiteDatabase

    /// `cacheKiB`: SQLite's page cache for the file (nil: SQLite's default, 2000 KiB; AgentConfig.storeCacheKiB).
    public init(path: String, cacheKiB: Int? = nil) throws {
        self.db = try SQLiteDatabase(path: path, durability: .normal)
        if let kib = cacheKiB { try self.db.execute("PRAGMA cache_size = -\(max(kib, 1))") }
        try self.db.migrate(Self.migrations)
    }

    /// Every cached object of `T` and the version to resume its watch from.
    public func load<T: MeshObject>(_ type: T.Type) throws -> (items: [T], resourceVersion: Int64?) {
        let kind = T.resource.plural
        let rows = try self.db.query("SELECT body FROM objects WHERE kind = ?", [.text(kind)])
        let decoder = JSONDecoder()
        let items = try rows.compactMap { row -> T? in
            guard let body = row[0].blob else { return nil }
            return try decoder.decode(T.self, from: Data(body))
        }
        let rv = try self.db.query("SELECT rv FROM versions WHERE kind = ?", [.text(kind)]).first?[0].int
        return (items, rv)
    }

    /// Replaces every cached `T` (after a list).
    public func replace<T: MeshObject>(_ items: [T], resourceVersion: Int64) throws {
        let kind = T.resource.plural
        let encoded = try items.map { ($0, try MeshJSON.encode($0)) }
        try self.db.transaction { tx in
            try tx.query("DELETE FROM objects WHERE kind = ?", [.text(kind)])
            for (item, body) in encoded {
                try tx.query(
                    "INSERT INTO objects (kind, namespace, name, body) VALUES (?, ?, ?, ?)",
                    [.text(kind), .text(item.effectiveNamespace), .text(item.metadata.name), .blob(Array(body))]
                )
            }
            try Self.setVersion(tx, kind, resourceVersion)
        }
    }

    /// Records one change (or only a newer version, for a bookmark).
    public func apply<T: MeshObject>(_ event: WatchEvent<T>) throws {
        let kind = T.resource.plural
        try self.db.transaction { tx in
            switch event {
            case .added(let o), .modified(let o):
                try tx.query(
                    "INSERT OR REPLACE INTO objects (kind, namespace, name, body) VALUES (?, ?, ?, ?)",
                    [
                        .text(kind), .text(o.effectiveNamespace), .text(o.metadata.name),
                        .blob(Array(try MeshJSON.encode(o))),
                    ]
                )
            case .deleted(let o):
                try tx.query(
                    "DELETE FROM objects WHERE kind = ? AND namespace = ? AND name = ?",
                    [.text(kind), .text(o.effectiveNamespace), .text(o.metadata.name)]
                )
            case .bookmark, .error:
                break
            }
            if let rv = event.resourceVersion { try Self.setVersion(tx, kind, rv) }
        }
    }

    /// Keeps `object` without a version (an object looked up on its own, not followed: `NodeDirectory`).
    public func put<T: MeshObject>(_ object: T) throws {
        try self.db.query(
            "INSERT OR REPLACE INTO objects (kind, namespace, name, body) VALUES (?, ?, ?, ?)",
            [
                .text(T.resource.plural), .text(object.effectiveNamespace), .text(object.metadata.name),
                .blob(Array(try MeshJSON.encode(object))),
            ]
        )
    }

    /// One cached object, or nil.
    public func get<T: MeshObject>(_ type: T.Type, namespace: String = "", name: String) throws -> T? {
        let rows = try self.db.query(
            "SELECT body FROM objects WHERE kind = ? AND namespace = ? AND name = ?",
            [.text(T.resource.plural), .text(namespace), .text(name)]
        )
        guard let body = rows.first?[0].blob else { return nil }
        return try JSONDecoder().decode(T.self, from: Data(body))
    }

    /// Forgets one object kept with `put`.
    public func remove<T: MeshObject>(_ type: T.Type, namespace: String = "", name: String) throws {
        try self.db.query(
            "DELETE FROM objects WHERE kind = ? AND namespace = ? AND name = ?",
            [.text(T.resource.plural), .text(namespace), .text(name)]
        )
    }

    private static func setVersion(_ tx: borrowing Transaction, _ kind: String, _ rv: Int64) throws {
        try tx.query("INSERT OR REPLACE INTO versions (kind, rv) VALUES (?, ?)", [.text(kind), .int(rv)])
    }
}
