import MeshCore
import MeshSQLite

#if canImport(Glibc)
import Glibc
#endif

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// The node agent's own SQLite file (`<dataDir>/edge.db`): what this node should run, its devices and
/// their models, each property's twin, the durable outbox and the reports the control plane refused.
///
/// - `workloads`: the workloads assigned to this node (as last seen) and the pid of each one's
///   process group, so an agent restarted while the cloud is away starts them again, and one that
///   crashed stops what it left running first.
/// - `twins`: per device and property, the desired value with the cloud's version and the reported
///   value with the edge's version.
/// - `outbox`: messages to the control plane, ids from AUTOINCREMENT (never reused), removed only
///   when the control plane answered them. `meta.epoch` names this file's id sequence.
/// - `events`: mapper event ids already taken, per device (the last 1,000 of each), so a QoS 1
///   message the broker delivers again after a crash is not counted twice.
public final class EdgeStore: Sendable {
    let db: SQLiteDatabase
    public let epoch: String

    static let migrations = [
        """
        CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE workloads(ns TEXT NOT NULL, name TEXT NOT NULL, json TEXT NOT NULL, pid INTEGER,
            PRIMARY KEY(ns, name));
        CREATE TABLE models(ns TEXT NOT NULL, name TEXT NOT NULL, json TEXT NOT NULL, PRIMARY KEY(ns, name));
        CREATE TABLE devices(twin_id TEXT PRIMARY KEY, ns TEXT NOT NULL, name TEXT NOT NULL, json TEXT NOT NULL);
        CREATE TABLE twins(twin_id TEXT NOT NULL, property TEXT NOT NULL,
            desired TEXT, desired_version INTEGER NOT NULL DEFAULT 0,
            reported TEXT, reported_version INTEGER NOT NULL DEFAULT 0, reported_time INTEGER,
            PRIMARY KEY(twin_id, property));
        CREATE TABLE outbox(id INTEGER PRIMARY KEY AUTOINCREMENT, json TEXT NOT NULL);
        CREATE TABLE events(twin_id TEXT NOT NULL, event_id TEXT NOT NULL, seq INTEGER NOT NULL,
            PRIMARY KEY(twin_id, event_id));
        CREATE TABLE rejected(id INTEGER PRIMARY KEY, json TEXT NOT NULL, reason TEXT NOT NULL, time TEXT NOT NULL)
        """
    ]

    /// `cacheKiB`: the most SQLite keeps of the file in its own page cache (nil: SQLite's default, 2000
    /// KiB). The file's pages stay in the kernel's page cache either way; a small cache mostly saves the
    /// process's own memory (AgentConfig.storeCacheKiB).
    public init(path: String, durability: Durability = .full, cacheKiB: Int? = nil) throws {
        self.db = try SQLiteDatabase(path: path, durability: durability)
        if let kib = cacheKiB { try self.db.execute("PRAGMA cache_size = -\(max(kib, 1))") }
        try self.db.migrate(Self.migrations)
        if let e = try self.db.query("SELECT value FROM meta WHERE key = 'epoch'").first?[0].text {
            self.epoch = e
        } else {
            let e = UUID().uuidString.lowercased()
            try self.db.query("INSERT INTO meta(key, value) VALUES('epoch', ?)", [.text(e)])
            self.epoch = e
        }
    }

    /// The page cache's size limit, KiB.
    public var cacheKiB: Int {
        let pages = (try? self.db.query("PRAGMA cache_size").first?[0].int) ?? 0
        let pageSize = (try? self.db.query("PRAGMA page_size").first?[0].int) ?? 4096
        return Int(pages < 0 ? -pages : pages * pageSize / 1024)
    }

    static func json(_ value: some Encodable) throws -> String {
        String(decoding: try MeshJSON.encode(value), as: UTF8.self)
    }

    static func decode<T: Decodable>(_ type: T.Type, _ text: String?) throws -> T {
        try JSONDecoder().decode(T.self, from: Data((text ?? "").utf8))
    }

    // MARK: workloads

    /// Replaces the set of workloads this node should run; returns it.
    public func setWorkloads(_ workloads: [Workload]) throws {
        try self.db.transaction { tx in
            let keep = Set(workloads.map { "\($0.effectiveNamespace)/\($0.metadata.name)" })
            for row in try tx.query("SELECT ns, name FROM workloads") {
                let key = "\(row[0].text ?? "")/\(row[1].text ?? "")"
                if !keep.contains(key) {
                    try tx.query("DELETE FROM workloads WHERE ns = ? AND name = ?", [row[0], row[1]])
                }
            }
            for w in workloads {
                try tx.query(
                    """
                    INSERT INTO workloads(ns, name, json) VALUES(?, ?, ?)
                    ON CONFLICT(ns, name) DO UPDATE SET json = excluded.json
                    """,
                    [.text(w.effectiveNamespace), .text(w.metadata.name), .text(try Self.json(w))]
                )
            }
        }
    }

    public func workloads() throws -> [Workload] {
        try self.db.query("SELECT json FROM workloads ORDER BY ns, name").map {
            try Self.decode(Workload.self, $0[0].text)
        }
    }

    /// The process group a workload's process leads (nil: none running).
    public func setPID(namespace: String, name: String, pid: Int32?) throws {
        try self.db.query(
            "UPDATE workloads SET pid = ? WHERE ns = ? AND name = ?",
            [pid.map { .int(Int64($0)) } ?? .null, .text(namespace), .text(name)]
        )
    }

    /// Process groups left by an agent that did not stop cleanly.
    public func leftoverPIDs() throws -> [(namespace: String, name: String, pid: Int32)] {
        try self.db.query("SELECT ns, name, pid FROM workloads WHERE pid IS NOT NULL").map {
            ($0[0].text ?? "", $0[1].text ?? "", Int32($0[2].int ?? 0))
        }
    }

    // MARK: models and devices

    public func setModels(_ models: [DeviceModel]) throws {
        try self.db.transaction { tx in
            try tx.query("DELETE FROM models")
            for m in models {
                try tx.query(
                    "INSERT INTO models(ns, name, json) VALUES(?, ?, ?)",
                    [.text(m.effectiveNamespace), .text(m.metadata.name), .text(try Self.json(m))]
                )
            }
        }
    }

    public func model(namespace: String, name: String) throws -> DeviceModel? {
        try self.db.query("SELECT json FROM models WHERE ns = ? AND name = ?", [.text(namespace), .text(name)]).first
            .map { try Self.decode(DeviceModel.self, $0[0].text) }
    }

    /// Replaces this node's devices and takes their desired values: a value is taken only with a
    /// cloud version above the one held (stale versions are refused). Returns the ids of devices
    /// whose desired values changed.
    public func setDevices(_ devices: [Device]) throws -> [String] {
        try self.db.transaction { tx in
            let keep = Set(devices.map(\.twinID))
            for row in try tx.query("SELECT twin_id FROM devices") where !keep.contains(row[0].text ?? "") {
                try tx.query("DELETE FROM devices WHERE twin_id = ?", [row[0]])
                try tx.query("DELETE FROM twins WHERE twin_id = ?", [row[0]])
                try tx.query("DELETE FROM events WHERE twin_id = ?", [row[0]])
            }
            var changed: [String] = []
            for d in devices {
                try tx.query(
                    """
                    INSERT INTO devices(twin_id, ns, name, json) VALUES(?, ?, ?, ?)
                    ON CONFLICT(twin_id) DO UPDATE SET ns = excluded.ns, name = excluded.name, json = excluded.json
                    """,
                    [.text(d.twinID), .text(d.effectiveNamespace), .text(d.metadata.name), .text(try Self.json(d))]
                )
                var didChange = false
                for p in d.spec.properties ?? [] {
                    let version = d.twin(p.name)?.desiredVersion ?? 0
                    let row = try tx.query(
                        "SELECT desired, desired_version FROM twins WHERE twin_id = ? AND property = ?",
                        [.text(d.twinID), .text(p.name)]
                    ).first
                    if let row {
                        let held = row[1].int ?? 0
                        // The cloud's versions only grow; an equal version with another value is a
                        // control plane that lost its store (version 0): the value is taken then too.
                        guard version > held || (version == held && row[0].text != p.desired && version == 0) else {
                            continue
                        }
                        if row[0].text == p.desired && version == held { continue }
                        try tx.query(
                            "UPDATE twins SET desired = ?, desired_version = ? WHERE twin_id = ? AND property = ?",
                            [.text(p.desired), .int(version), .text(d.twinID), .text(p.name)]
                        )
                    } else {
                        try tx.query(
                            "INSERT INTO twins(twin_id, property, desired, desired_version) VALUES(?, ?, ?, ?)",
                            [.text(d.twinID), .text(p.name), .text(p.desired), .int(version)]
                        )
                    }
                    didChange = true
                }
                if didChange { changed.append(d.twinID) }
            }
            return changed
        }
    }

    public func device(_ twinID: String) throws -> Device? {
        try self.db.query("SELECT json FROM devices WHERE twin_id = ?", [.text(twinID)]).first.map {
            try Self.decode(Device.self, $0[0].text)
        }
    }

    public func deviceIDs() throws -> [String] {
        try self.db.query("SELECT twin_id FROM devices ORDER BY twin_id").compactMap { $0[0].text }
    }

    /// One property's twin on this node.
    public struct Twin: Sendable, Equatable {
        public var property: String
        public var desired: String?
        public var desiredVersion: Int64
        public var reported: String?
        public var reportedVersion: Int64
        public var reportedTime: Int64?

        public var converged: Bool { self.desired == nil || self.desired == self.reported }
    }

    public func twins(_ twinID: String) throws -> [Twin] {
        try self.db.query(Twin.select, [.text(twinID)]).map(Twin.init(row:))
    }

    // MARK: reports from mappers

    public enum ReportOutcome: Sendable, Equatable {
        /// Stored, with the twins after it (an outbox message per property).
        case accepted([Twin])
        /// The event id was taken before: nothing done.
        case duplicate
        case rejected(String)
    }

    /// Takes a mapper's update: every reported value checked against the model, each property's
    /// reported version bumped, one outbox message per property, the event id recorded; all in one
    /// transaction, or nothing.
    public func acceptReport(
        twinID: String,
        eventID: String,
        values: [(property: String, value: String)],
        timestamp: Int64
    ) throws -> ReportOutcome {
        guard let device = try self.device(twinID) else {
            return .rejected("unknown device \"\(twinID)\": no Device with this id is assigned to this node")
        }
        guard let model = try self.model(namespace: device.effectiveNamespace, name: device.spec.model) else {
            return .rejected("device \(twinID): its model \(device.spec.model) is not known here yet")
        }
        if values.isEmpty { return .rejected("the update reports no value (twin.<property>.actual.value)") }
        for (property, value) in values {
            guard let p = model.property(property) else {
                let known = model.spec.properties.map(\.name).joined(separator: ", ")
                return .rejected("model \(model.metadata.name) has no property \"\(property)\" (it has \(known))")
            }
            if let e = p.error(value) { return .rejected("\(property): \(e)") }
        }
        let when = Timestamp.format(secondsSinceEpoch: Int(timestamp > 0 ? timestamp / 1000 : Int64(Glibc.time(nil))))
        return try self.db.transaction { tx in
            if !eventID.isEmpty {
                let seen = try tx.query(
                    "SELECT 1 FROM events WHERE twin_id = ? AND event_id = ?",
                    [.text(twinID), .text(eventID)]
                )
                if !seen.isEmpty { return .duplicate }
                let seq =
                    (try tx.query("SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE twin_id = ?", [.text(twinID)])
                        .first?[0].int) ?? 1
                try tx.query(
                    "INSERT INTO events(twin_id, event_id, seq) VALUES(?, ?, ?)",
                    [.text(twinID), .text(eventID), .int(seq)]
                )
                if seq % 100 == 0 {
                    try tx.query(
                        "DELETE FROM events WHERE twin_id = ? AND seq <= ?",
                        [.text(twinID), .int(seq - 1000)]
                    )
                }
            }
            for (property, value) in values {
                try tx.query(
                    """
                    INSERT INTO twins(twin_id, property, reported, reported_version, reported_time) VALUES(?, ?, ?, 1, ?)
                    ON CONFLICT(twin_id, property) DO UPDATE SET reported = excluded.reported,
                        reported_version = reported_version + 1, reported_time = excluded.reported_time
                    """,
                    [.text(twinID), .text(property), .text(value), .int(timestamp)]
                )
                let version =
                    try tx.query(
                        "SELECT reported_version FROM twins WHERE twin_id = ? AND property = ?",
                        [.text(twinID), .text(property)]
                    ).first?[0].int ?? 1
                let report = TwinReport(
                    namespace: device.effectiveNamespace,
                    device: device.metadata.name,
                    property: property,
                    value: value,
                    version: version,
                    time: when
                )
                try tx.query(
                    "INSERT INTO outbox(json) VALUES(?)",
                    [.text(try Self.json(NodeReport(id: 0, twin: report)))]
                )
            }
            return .accepted(try tx.query(Twin.select, [.text(twinID)]).map(Twin.init(row:)))
        }
    }

    // MARK: outbox

    public func enqueue(_ workload: WorkloadReport) throws {
        try self.db.query(
            "INSERT INTO outbox(json) VALUES(?)",
            [.text(try Self.json(NodeReport(id: 0, workload: workload)))]
        )
    }

    /// The oldest messages, in id order.
    public func pending(limit: Int) throws -> [NodeReport] {
        try self.db.query("SELECT id, json FROM outbox ORDER BY id LIMIT ?", [.int(Int64(limit))]).map {
            var r = try Self.decode(NodeReport.self, $0[1].text)
            r.id = $0[0].int ?? 0
            return r
        }
    }

    public func outboxCount() throws -> Int {
        Int(try self.db.query("SELECT COUNT(*) FROM outbox").first?[0].int ?? 0)
    }

    /// Drops answered messages; a rejected one is kept in `rejected` with the control plane's reason.
    public func answered(_ results: [NodeReportResult], sent: [NodeReport]) throws {
        let byID = Dictionary(sent.map { ($0.id, $0) }, uniquingKeysWith: { a, _ in a })
        try self.db.transaction { tx in
            for r in results {
                if r.result == .rejected, let m = byID[r.id] {
                    try tx.query(
                        "INSERT OR REPLACE INTO rejected(id, json, reason, time) VALUES(?, ?, ?, ?)",
                        [.int(r.id), .text(try Self.json(m)), .text(r.message ?? "rejected"), .text(Timestamp.now())]
                    )
                }
                try tx.query("DELETE FROM outbox WHERE id = ?", [.int(r.id)])
            }
        }
    }

    /// Messages the control plane refused, with its reasons.
    public func rejected() throws -> [(report: NodeReport, reason: String)] {
        try self.db.query("SELECT id, json, reason FROM rejected ORDER BY id").map {
            var r = try Self.decode(NodeReport.self, $0[1].text)
            r.id = $0[0].int ?? 0
            return (r, $0[2].text ?? "")
        }
    }
}

extension EdgeStore.Twin {
    /// A device's twins, by property: what `init(row:)` reads.
    static let select = """
        SELECT property, desired, desired_version, reported, reported_version, reported_time
        FROM twins WHERE twin_id = ? ORDER BY property
        """

    /// A row of `select`.
    init(row: [SQLValue]) {
        self.init(
            property: row[0].text ?? "",
            desired: row[1].text,
            desiredVersion: row[2].int ?? 0,
            reported: row[3].text,
            reportedVersion: row[4].int ?? 0,
            reportedTime: row[5].int
        )
    }
}
