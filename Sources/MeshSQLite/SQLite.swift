import CSQLite
import Synchronization

/// An error from libsqlite3, with the statement that failed.
public struct SQLiteError: Error, Sendable, CustomStringConvertible {
    public let code: Int32
    public let message: String
    public let sql: String?

    public var description: String {
        "sqlite error \(self.code): \(self.message)" + (self.sql.map { " (in: \($0.prefix(120)))" } ?? "")
    }

    /// The database is locked by another process (busy timeout expired).
    public var isBusy: Bool { self.code & 0xff == SQLITE_BUSY || self.code & 0xff == SQLITE_LOCKED }
    /// A UNIQUE / PRIMARY KEY constraint failed.
    public var isConstraint: Bool { self.code & 0xff == SQLITE_CONSTRAINT }
}

/// A value bound to or read from a statement.
public enum SQLValue: Sendable, Equatable {
    case null
    case int(Int64)
    case double(Double)
    case text(String)
    case blob([UInt8])

    public var int: Int64? {
        if case .int(let v) = self { return v }
        return nil
    }

    public var text: String? {
        if case .text(let v) = self { return v }
        return nil
    }

    public var blob: [UInt8]? {
        switch self {
        case .blob(let b): return b
        case .text(let s): return Array(s.utf8)
        default: return nil
        }
    }
}

/// How hard a commit tries to reach the disk.
public enum Durability: String, Sendable, Codable {
    /// fsync on every commit: a committed write survives power loss.
    case full
    /// fsync at WAL checkpoints only: survives a process crash, may lose the last commits on power loss.
    case normal
}

/// One SQLite database file in WAL mode. Every call is serialised by an internal mutex, so the
/// connection may be shared between threads; long work belongs on a thread that may block.
public final class SQLiteDatabase: Sendable {
    // The handle and statement cache are only touched while holding `state`'s lock.
    private let state: Mutex<Connection>
    public let path: String

    /// Opens (creating when absent) the database at `path`; `:memory:` for a private in-memory one.
    public init(path: String, durability: Durability = .full) throws {
        self.path = path
        var db: OpaquePointer?
        let flags = SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX
        let rc = sqlite3_open_v2(path, &db, flags, nil)
        guard rc == SQLITE_OK, let handle = db else {
            let msg = db.map { String(cString: sqlite3_errmsg($0)) } ?? "out of memory"
            sqlite3_close_v2(db)
            throw SQLiteError(code: rc, message: "cannot open \(path): \(msg)", sql: nil)
        }
        sqlite3_extended_result_codes(handle, 1)
        let conn = Connection(handle: handle)
        self.state = Mutex(conn)
        try self.execute("PRAGMA busy_timeout = 5000")
        if path != ":memory:" {
            let mode = try self.query("PRAGMA journal_mode = WAL").first?[0].text ?? ""
            guard mode.lowercased() == "wal" else {
                throw SQLiteError(code: SQLITE_ERROR, message: "cannot switch \(path) to WAL (got \(mode))", sql: nil)
            }
        }
        try self.execute("PRAGMA synchronous = \(durability == .full ? "FULL" : "NORMAL")")
        try self.execute("PRAGMA foreign_keys = ON")
    }

    /// Runs statements that return no rows (schema changes, pragmas); several separated by `;`.
    public func execute(_ sql: String) throws {
        try self.state.withLock { conn in
            var err: UnsafeMutablePointer<CChar>?
            let rc = sqlite3_exec(conn.handle, sql, nil, nil, &err)
            if rc != SQLITE_OK {
                let msg = err.map { String(cString: $0) } ?? String(cString: sqlite3_errmsg(conn.handle))
                sqlite3_free(err)
                throw SQLiteError(code: rc, message: msg, sql: sql)
            }
        }
    }

    /// Runs one statement and returns its rows.
    @discardableResult
    public func query(_ sql: String, _ params: [SQLValue] = []) throws -> [[SQLValue]] {
        try self.state.withLock { conn in try conn.run(sql, params) }
    }

    /// Runs `body` inside one transaction (BEGIN IMMEDIATE ... COMMIT), rolled back when it throws.
    /// The connection is held for the whole body, so no other caller interleaves.
    public func transaction<T>(_ body: (borrowing Transaction) throws -> T) throws -> T {
        try self.state.withLock { conn in
            _ = try conn.run("BEGIN IMMEDIATE", [])
            do {
                let result = try body(Transaction(conn: conn))
                _ = try conn.run("COMMIT", [])
                return result
            } catch {
                _ = try? conn.run("ROLLBACK", [])
                throw error
            }
        }
    }

    /// Brings the schema up to date: runs `migrations[i]` for every i at or above `PRAGMA user_version`,
    /// each in its own transaction that also bumps the version. Refuses a file newer than this code.
    public func migrate(_ migrations: [String]) throws {
        let current = Int(try self.query("PRAGMA user_version").first?[0].int ?? 0)
        guard current <= migrations.count else {
            throw SQLiteError(
                code: SQLITE_ERROR,
                message: "\(self.path) has schema version \(current), newer than this program's \(migrations.count)",
                sql: nil
            )
        }
        for (i, sql) in migrations.enumerated() where i >= current {
            try self.state.withLock { conn in
                var err: UnsafeMutablePointer<CChar>?
                let script = "BEGIN IMMEDIATE; \(sql); PRAGMA user_version = \(i + 1); COMMIT;"
                let rc = sqlite3_exec(conn.handle, script, nil, nil, &err)
                if rc != SQLITE_OK {
                    let msg = err.map { String(cString: $0) } ?? "error"
                    sqlite3_free(err)
                    sqlite3_exec(conn.handle, "ROLLBACK", nil, nil, nil)
                    throw SQLiteError(code: rc, message: "migration \(i + 1) failed: \(msg)", sql: sql)
                }
            }
        }
    }

    /// Copies the database into a checkpoint so the WAL file stays small.
    public func checkpoint() throws {
        try self.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    }
}

/// Statements run inside `SQLiteDatabase.transaction`.
public struct Transaction: ~Copyable {
    fileprivate let conn: Connection

    @discardableResult
    public func query(_ sql: String, _ params: [SQLValue] = []) throws -> [[SQLValue]] {
        try self.conn.run(sql, params)
    }

    /// Rows changed by the last statement.
    public var changes: Int { Int(sqlite3_changes(self.conn.handle)) }
}

/// The raw connection and its prepared-statement cache. Not thread-safe: owned by the mutex.
private final class Connection {
    let handle: OpaquePointer
    var statements: [String: OpaquePointer] = [:]

    init(handle: OpaquePointer) {
        self.handle = handle
    }

    deinit {
        for stmt in self.statements.values { sqlite3_finalize(stmt) }
        sqlite3_close_v2(self.handle)
    }

    func error(_ rc: Int32, _ sql: String) -> SQLiteError {
        SQLiteError(code: rc, message: String(cString: sqlite3_errmsg(self.handle)), sql: sql)
    }

    func statement(_ sql: String) throws -> OpaquePointer {
        if let s = self.statements[sql] { return s }
        var stmt: OpaquePointer?
        let rc = sqlite3_prepare_v3(self.handle, sql, -1, UInt32(SQLITE_PREPARE_PERSISTENT), &stmt, nil)
        guard rc == SQLITE_OK, let s = stmt else { throw self.error(rc, sql) }
        if self.statements.count > 64 {
            for old in self.statements.values { sqlite3_finalize(old) }
            self.statements.removeAll()
        }
        self.statements[sql] = s
        return s
    }

    func run(_ sql: String, _ params: [SQLValue]) throws -> [[SQLValue]] {
        let stmt = try self.statement(sql)
        defer {
            sqlite3_reset(stmt)
            sqlite3_clear_bindings(stmt)
        }
        for (i, p) in params.enumerated() {
            let idx = Int32(i + 1)
            let rc: Int32
            switch p {
            case .null: rc = sqlite3_bind_null(stmt, idx)
            case .int(let v): rc = sqlite3_bind_int64(stmt, idx, v)
            case .double(let v): rc = sqlite3_bind_double(stmt, idx, v)
            case .text(let v): rc = sqlite3_bind_text(stmt, idx, v, -1, sqliteTransient)
            case .blob(let v):
                rc = v.withUnsafeBytes {
                    sqlite3_bind_blob(stmt, idx, $0.baseAddress, Int32($0.count), sqliteTransient)
                }
            }
            guard rc == SQLITE_OK else { throw self.error(rc, sql) }
        }
        var rows: [[SQLValue]] = []
        while true {
            let rc = sqlite3_step(stmt)
            if rc == SQLITE_DONE { break }
            guard rc == SQLITE_ROW else { throw self.error(rc, sql) }
            let n = sqlite3_column_count(stmt)
            var row: [SQLValue] = []
            row.reserveCapacity(Int(n))
            for c in 0..<n {
                switch sqlite3_column_type(stmt, c) {
                case SQLITE_INTEGER: row.append(.int(sqlite3_column_int64(stmt, c)))
                case SQLITE_FLOAT: row.append(.double(sqlite3_column_double(stmt, c)))
                case SQLITE_TEXT: row.append(.text(String(cString: sqlite3_column_text(stmt, c))))
                case SQLITE_BLOB:
                    let count = Int(sqlite3_column_bytes(stmt, c))
                    if count == 0 {
                        row.append(.blob([]))
                    } else {
                        let base = sqlite3_column_blob(stmt, c)!.assumingMemoryBound(to: UInt8.self)
                        row.append(.blob(Array(UnsafeBufferPointer(start: base, count: count))))
                    }
                default: row.append(.null)
                }
            }
            rows.append(row)
        }
        return rows
    }
}

// SQLITE_TRANSIENT: SQLite copies the bound bytes before the call returns.
private let sqliteTransient = unsafeBitCast(-1, to: sqlite3_destructor_type.self)
