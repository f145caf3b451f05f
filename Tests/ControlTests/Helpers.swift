import Control
import Foundation
import Logging
import MeshHTTP
import MeshSQLite
import MeshTestSupport
import NIOCore
import NIOHTTP1

/// A request as the server hands it to `ControlAPI`, from a client with identity `who` (nil: no certificate), with
/// a JSON body when one is given.
func apiRequest(_ method: HTTPMethod, _ uri: String, as who: String?, body: String = "") -> HTTPRequest {
    var r = HTTPRequest(
        method: method,
        uri: uri,
        headers: body.isEmpty ? [:] : ["Content-Type": "application/json"],
        body: ByteBuffer(string: body)
    )
    r.peerIdentity = who
    return r
}

let testLogger: Logger = {
    var l = Logger(label: "test")
    l.logLevel = .warning
    return l
}()

func openStore(_ dir: TempDir, historyLimit: Int = 10_000, durability: Durability = .normal) async throws -> SQLiteStore
{
    var c = SQLiteStore.Configuration(path: dir.path + "/control.db")
    c.durability = durability
    c.hub.historyLimit = historyLimit
    return try await SQLiteStore(configuration: c, logger: testLogger)
}

/// A JSON body stamped with its version, so reads can be checked against writes.
func body(_ name: String, _ rv: Int64, value: Int = 0) -> ByteBuffer {
    ByteBuffer(string: #"{"metadata":{"name":"\#(name)","resourceVersion":"\#(rv)"},"value":\#(value)}"#)
}

func key(_ name: String, ns: String = "shop", resource: String = "services") -> ObjectKey {
    ObjectKey(resource: resource, namespace: ns, name: name)
}

@discardableResult
func put(
    _ store: any Store,
    _ name: String,
    ns: String = "shop",
    resource: String = "services",
    expect: Precondition = .any,
    labels: [String: String] = [:],
    value: Int = 0,
    reserve: [String] = []
) async throws -> StoredObject {
    try await store.commit(
        Write(
            key: key(name, ns: ns, resource: resource),
            expect: expect,
            operation: .put { rv in (body(name, rv, value: value), labels) },
            reserve: reserve
        )
    )
}

@discardableResult
func remove(
    _ store: any Store,
    _ name: String,
    ns: String = "shop",
    resource: String = "services"
) async throws -> StoredObject {
    try await store.commit(
        Write(key: key(name, ns: ns, resource: resource), expect: .any, operation: .delete { rv in body(name, rv) })
    )
}

/// The resourceVersions in a chunk of watch lines (bookmarks excluded).
func versions(in chunk: ByteBuffer) -> [Int64] {
    String(buffer: chunk).split(separator: "\n").compactMap { line -> Int64? in
        guard !line.contains("\"BOOKMARK\"") else { return nil }
        guard let r = line.range(of: #""resourceVersion":""#) else { return nil }
        return Int64(line[r.upperBound...].prefix { $0.isNumber })
    }
}

/// Reads a subscription until `count` events arrived or `timeout` passed.
func collect(_ sub: WatchSubscription, count: Int, timeout: Duration = .seconds(10)) async -> [Int64] {
    await withTaskGroup(of: [Int64].self) { group in
        group.addTask {
            var seen: [Int64] = []
            while seen.count < count, let chunk = await sub.next(kind: "Service") {
                seen += versions(in: chunk)
            }
            return seen
        }
        group.addTask {
            try? await Task.sleep(for: timeout)
            sub.cancel()
            return []
        }
        let first = await group.next()!
        sub.cancel()
        group.cancelAll()
        return first
    }
}
