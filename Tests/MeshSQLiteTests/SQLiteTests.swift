import MeshSQLite
import MeshTestSupport
import Testing

@Suite(.rationed) struct SQLiteTests {
    @Test func migratesOnceAndKeepsDataAcrossReopen() throws {
        let dir = TempDir()
        let path = dir.path + "/t.db"
        let migrations = [
            "CREATE TABLE t (k TEXT PRIMARY KEY, v BLOB)", "ALTER TABLE t ADD COLUMN n INTEGER DEFAULT 7",
        ]
        do {
            let db = try SQLiteDatabase(path: path)
            try db.migrate(migrations)
            try db.migrate(migrations)  // idempotent
            try db.query("INSERT INTO t (k, v) VALUES (?, ?)", [.text("a"), .blob([0, 1, 255])])
        }
        let db = try SQLiteDatabase(path: path)
        try db.migrate(migrations)
        let rows = try db.query("SELECT k, v, n FROM t")
        #expect(rows == [[.text("a"), .blob([0, 1, 255]), .int(7)]])
        #expect(try db.query("PRAGMA journal_mode").first?[0].text == "wal")
        #expect(try db.query("PRAGMA user_version").first?[0].int == 2)
    }

    @Test func refusesAFileFromANewerProgram() throws {
        let dir = TempDir()
        let db = try SQLiteDatabase(path: dir.path + "/t.db")
        try db.migrate(["CREATE TABLE a (x)", "CREATE TABLE b (x)"])
        #expect {
            try db.migrate(["CREATE TABLE a (x)"])
        } throws: { ($0 as? SQLiteError)?.message.contains("newer than this program") == true }
    }

    @Test func failedMigrationLeavesTheVersion() throws {
        let dir = TempDir()
        let db = try SQLiteDatabase(path: dir.path + "/t.db")
        #expect(throws: SQLiteError.self) { try db.migrate(["CREATE TABLE a (x)", "CREATE TABLE a (x)"]) }
        #expect(try db.query("PRAGMA user_version").first?[0].int == 1)
    }

    @Test func transactionsRollBackOnError() throws {
        let db = try SQLiteDatabase(path: ":memory:")
        try db.execute("CREATE TABLE t (k TEXT PRIMARY KEY)")
        struct Boom: Error {}
        #expect(throws: Boom.self) {
            try db.transaction { tx in
                try tx.query("INSERT INTO t VALUES ('a')")
                throw Boom()
            }
        }
        #expect(try db.query("SELECT COUNT(*) FROM t").first?[0].int == 0)
        let err = #expect(throws: SQLiteError.self) {
            try db.transaction { tx in
                try tx.query("INSERT INTO t VALUES ('b')")
                try tx.query("INSERT INTO t VALUES ('b')")
            }
        }
        #expect(err?.isConstraint == true)
        #expect(try db.query("SELECT COUNT(*) FROM t").first?[0].int == 0)
    }

    @Test func errorsNameTheStatement() throws {
        let db = try SQLiteDatabase(path: ":memory:")
        let err = #expect(throws: SQLiteError.self) { try db.query("SELEC 1") }
        #expect(err?.description.contains("SELEC 1") == true)
        #expect(throws: SQLiteError.self) { try SQLiteDatabase(path: "/nonexistent-dir/x/y.db") }
    }
}
