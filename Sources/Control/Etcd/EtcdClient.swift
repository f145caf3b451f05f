import MeshHTTP
import NIOCore
import NIOHTTP1
import Synchronization

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// A client of etcd's v3 API through its JSON gateway (grpc-gateway: HTTP/1.1, JSON bodies, keys
/// and values in base64, 64-bit integers as strings), the one every etcd since 3.4 serves on its
/// client port beside gRPC.
///
/// Why not gRPC: grpc-swift with its protobuf runtime and HTTP/2 would roughly double the control
/// plane's build time and binary size, for a handful of calls (range, txn, watch, compaction) that
/// the gateway serves as well; the agent never talks to etcd. The cost is JSON and base64 on the
/// wire and one connection per watch stream (HTTP/1.1 cannot multiplex): the store runs exactly one.
///
/// Unary calls go over a few kept-alive connections per endpoint; an endpoint that cannot be reached
/// is skipped for the next one (a cluster of several members).
public final class EtcdClient: Sendable {
    public struct Configuration: Sendable {
        /// `http://host:port` or `https://host:port` of each member.
        public var endpoints: [String]
        /// TLS to etcd (required for https endpoints): CA, and a client certificate when etcd wants one.
        public var tls: HTTPClientTLS?
        /// Kept-alive connections per endpoint for unary calls.
        public var connectionsPerEndpoint = 4
        public var requestTimeout: TimeAmount = .seconds(10)
        /// A member that does not accept a connection in this long is skipped for the next (a member on a
        /// dead host answers nothing; a refused connection fails at once either way).
        public var connectTimeout: TimeAmount = .seconds(2)

        public init(endpoints: [String], tls: HTTPClientTLS? = nil) {
            self.endpoints = endpoints
            self.tls = tls
        }
    }

    let endpoints: [HTTPEndpoint]
    private let pools: [[HTTPKeepAliveClient]]
    private let bases: [HTTPClient]
    /// Round robin over a pool's connections, and the endpoint in use (moves on when one fails).
    private let cursor = Atomic<Int>(0)
    private let current = Atomic<Int>(0)

    public init(configuration: Configuration) throws {
        var endpoints: [HTTPEndpoint] = []
        for text in configuration.endpoints {
            guard let e = HTTPEndpoint(url: text) else {
                throw StoreError.unavailable("etcd endpoint \"\(text)\" is not a URL such as http://127.0.0.1:2379")
            }
            if e.tls && configuration.tls == nil {
                throw StoreError.unavailable("etcd endpoint \(text) is https: TLS settings (etcdCA) are needed")
            }
            endpoints.append(e)
        }
        guard !endpoints.isEmpty else { throw StoreError.unavailable("no etcd endpoints given") }
        self.endpoints = endpoints
        var bases: [HTTPClient] = []
        var pools: [[HTTPKeepAliveClient]] = []
        for e in endpoints {
            var base = HTTPClient(endpoint: e, tls: e.tls ? configuration.tls : nil)
            base.requestTimeout = configuration.requestTimeout
            base.connectTimeout = configuration.connectTimeout
            bases.append(base)
            pools.append((0..<max(1, configuration.connectionsPerEndpoint)).map { _ in HTTPKeepAliveClient(base) })
        }
        self.bases = bases
        self.pools = pools
    }

    /// The gateway's names are snake_case: each message spells its keys out (`CodingKeys`), as a key strategy
    /// converted every key of every message, each time (2% of a replica's CPU while 10,000 nodes beat).
    static let encoder = JSONEncoder()

    static func decoder() -> JSONDecoder { JSONDecoder() }

    /// One unary call; tries each endpoint once, starting with the one that last worked.
    func call<Request: Encodable, Response: Decodable>(
        _ path: String,
        _ request: Request,
        as: Response.Type
    ) async throws -> Response {
        let body = ByteBuffer(bytes: try Self.encoder.encode(request))
        var headers = HTTPHeaders()
        headers.add(name: "Content-Type", value: "application/json")
        let start = self.current.load(ordering: .relaxed)
        var lastError: any Error = StoreError.unavailable("no etcd endpoint")
        for i in 0..<self.endpoints.count {
            let index = (start + i) % self.endpoints.count
            let pool = self.pools[index]
            let client = pool[self.cursor.wrappingAdd(1, ordering: .relaxed).oldValue % pool.count]
            let response: HTTPClientResponse
            do {
                response = try await client.send(.POST, path, headers: headers, body: body)
            } catch {
                lastError = StoreError.unavailable("etcd \(self.endpoints[index]): \(error)")
                continue
            }
            if response.status == .ok {
                if i > 0 { self.current.store(index, ordering: .relaxed) }
                return try Self.decoder().decode(Response.self, from: Data(response.body.readableBytesView))
            }
            let failure = try? Self.decoder().decode(
                GatewayError.self,
                from: Data(response.body.readableBytesView)
            )
            let message = failure?.message ?? failure?.error ?? response.body.getString(at: 0, length: 200) ?? ""
            // 14 (Unavailable), 4 (DeadlineExceeded): this member cannot serve (no leader, stopped): next one.
            if failure?.code == 14 || failure?.code == 4 || response.status.code >= 502 {
                lastError = StoreError.unavailable("etcd \(self.endpoints[index]): \(message)")
                continue
            }
            throw EtcdError(code: failure?.code ?? Int(response.status.code), message: message)
        }
        throw lastError
    }

    /// Opens a watch stream and hands each response to `handle` until it returns false, the stream
    /// ends or fails. Tries the endpoints in turn to open it.
    func watch(
        _ request: WatchCreateRequest,
        handle: (WatchResponse) async throws -> Bool
    ) async throws {
        let body = ByteBuffer(bytes: try Self.encoder.encode(WatchRequest(createRequest: request)))
        var headers = HTTPHeaders()
        headers.add(name: "Content-Type", value: "application/json")
        let start = self.current.load(ordering: .relaxed)
        var lastError: any Error = StoreError.unavailable("no etcd endpoint")
        for i in 0..<self.endpoints.count {
            let index = (start + i) % self.endpoints.count
            var opened = false
            do {
                try await self.bases[index].stream(.POST, "/v3/watch", headers: headers, body: body) { head, stream in
                    guard head.status == .ok else {
                        throw StoreError.unavailable("etcd \(self.endpoints[index]) watch: HTTP \(head.status.code)")
                    }
                    let decoder = Self.decoder()
                    while let line = try await stream.nextLine() {
                        let message = try decoder.decode(WatchLine.self, from: Data(line.readableBytesView))
                        if let error = message.error {
                            throw StoreError.unavailable("etcd watch: \(error.message ?? error.error ?? "error")")
                        }
                        guard let result = message.result else { continue }
                        opened = true
                        if !(try await handle(result)) { return }
                    }
                }
                return
            } catch let e as EtcdCompacted {
                throw e
            } catch {
                lastError = error
                // A stream that was open and broke is the caller's to reopen (from its revision).
                if opened { throw error }
            }
        }
        throw lastError
    }

    // MARK: calls

    func range(
        _ key: [UInt8],
        end: [UInt8]? = nil,
        revision: Int64? = nil,
        limit: Int64? = nil,
        keysOnly: Bool? = nil,
        countOnly: Bool? = nil
    ) async throws -> RangeResponse {
        try await self.call(
            "/v3/kv/range",
            RangeRequest(
                key: EtcdBytes(key),
                rangeEnd: end.map(EtcdBytes.init),
                limit: limit.map(EtcdInt.init),
                revision: revision.map(EtcdInt.init),
                keysOnly: keysOnly,
                countOnly: countOnly
            ),
            as: RangeResponse.self
        )
    }

    func txn(_ request: TxnRequest) async throws -> TxnResponse {
        try await self.call("/v3/kv/txn", request, as: TxnResponse.self)
    }

    func put(_ key: [UInt8], _ value: [UInt8], lease: Int64? = nil) async throws -> Int64 {
        let r = try await self.call(
            "/v3/kv/put",
            PutRequest(key: EtcdBytes(key), value: EtcdBytes(value), lease: lease.map(EtcdInt.init)),
            as: PutResponse.self
        )
        return r.header?.revision?.value ?? 0
    }

    /// Compacts the key-value history up to `revision` (watches from older revisions get 410 Gone).
    public func compact(revision: Int64) async throws {
        _ = try await self.call(
            "/v3/kv/compaction",
            CompactionRequest(revision: EtcdInt(revision), physical: true),
            as: HeaderOnly.self
        )
    }

    /// The cluster's current revision.
    public func revision() async throws -> Int64 {
        try await self.range([0], limit: 1, countOnly: true).header?.revision?.value ?? 0
    }

    /// Each key's byte prefix end: the range end that covers every key starting with `prefix`.
    static func prefixEnd(_ prefix: [UInt8]) -> [UInt8] {
        var end = prefix
        while let last = end.last {
            if last < 0xff {
                end[end.count - 1] = last + 1
                return end
            }
            end.removeLast()
        }
        return [0]
    }
}

/// An error etcd answered (gRPC code and message).
public struct EtcdError: Error, Sendable, CustomStringConvertible {
    public var code: Int
    public var message: String
    public var description: String { "etcd: \(self.message) (code \(self.code))" }
}

/// The watch asked for a revision etcd has compacted away.
struct EtcdCompacted: Error {
    var compactRevision: Int64
}

// MARK: wire types (grpc-gateway JSON of etcdserverpb)

/// An int64 as the gateway writes it: a JSON string (numbers are accepted too).
struct EtcdInt: Codable, Sendable, Equatable {
    var value: Int64
    init(_ v: Int64) { self.value = v }
    init(from decoder: any Decoder) throws {
        let c = try decoder.singleValueContainer()
        if let s = try? c.decode(String.self), let v = Int64(s) {
            self.value = v
        } else {
            self.value = try c.decode(Int64.self)
        }
    }
    func encode(to encoder: any Encoder) throws {
        var c = encoder.singleValueContainer()
        try c.encode(String(self.value))
    }
}

/// Bytes as the gateway writes them: base64.
struct EtcdBytes: Codable, Sendable, Equatable {
    var bytes: [UInt8]
    init(_ b: [UInt8]) { self.bytes = b }
    init(_ s: String) { self.bytes = Array(s.utf8) }
    init(from decoder: any Decoder) throws {
        let s = try decoder.singleValueContainer().decode(String.self)
        guard let d = Data(base64Encoded: s) else {
            throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: "not base64"))
        }
        self.bytes = Array(d)
    }
    func encode(to encoder: any Encoder) throws {
        var c = encoder.singleValueContainer()
        try c.encode(Data(self.bytes).base64EncodedString())
    }
    var string: String { String(decoding: self.bytes, as: UTF8.self) }
}

struct ResponseHeader: Codable, Sendable {
    var revision: EtcdInt?
}

struct HeaderOnly: Codable, Sendable {
    var header: ResponseHeader?
}

struct GatewayError: Codable, Sendable {
    var error: String?
    var code: Int?
    var message: String?
}

struct KeyValue: Codable, Sendable {
    var key: EtcdBytes
    var createRevision: EtcdInt?
    var modRevision: EtcdInt?
    var version: EtcdInt?
    var value: EtcdBytes?
    var lease: EtcdInt?

    var mod: Int64 { self.modRevision?.value ?? 0 }

    enum CodingKeys: String, CodingKey {
        case key
        case createRevision = "create_revision"
        case modRevision = "mod_revision"
        case version
        case value
        case lease
    }
}

struct RangeRequest: Codable, Sendable {
    var key: EtcdBytes
    var rangeEnd: EtcdBytes?
    var limit: EtcdInt?
    var revision: EtcdInt?
    var keysOnly: Bool?
    var countOnly: Bool?

    enum CodingKeys: String, CodingKey {
        case key
        case rangeEnd = "range_end"
        case limit
        case revision
        case keysOnly = "keys_only"
        case countOnly = "count_only"
    }
}

struct RangeResponse: Codable, Sendable {
    var header: ResponseHeader?
    var kvs: [KeyValue]?
    var count: EtcdInt?
    var more: Bool?
}

struct PutRequest: Codable, Sendable {
    var key: EtcdBytes
    var value: EtcdBytes
    var lease: EtcdInt?
}

struct PutResponse: Codable, Sendable {
    var header: ResponseHeader?
}

struct DeleteRangeRequest: Codable, Sendable {
    var key: EtcdBytes
    var rangeEnd: EtcdBytes?

    enum CodingKeys: String, CodingKey {
        case key
        case rangeEnd = "range_end"
    }
}

struct DeleteRangeResponse: Codable, Sendable {
    var header: ResponseHeader?
    var deleted: EtcdInt?
}

struct CompactionRequest: Codable, Sendable {
    var revision: EtcdInt
    var physical: Bool
}

struct Compare: Codable, Sendable {
    /// EQUAL, GREATER, LESS, NOT_EQUAL.
    var result: String
    /// VERSION, CREATE, MOD, VALUE.
    var target: String
    var key: EtcdBytes
    var modRevision: EtcdInt?
    var createRevision: EtcdInt?
    var value: EtcdBytes?

    /// The key was last modified at `revision` (0: it does not exist).
    static func modified(_ key: [UInt8], at revision: Int64) -> Compare {
        Compare(result: "EQUAL", target: "MOD", key: EtcdBytes(key), modRevision: EtcdInt(revision))
    }

    enum CodingKeys: String, CodingKey {
        case result
        case target
        case key
        case modRevision = "mod_revision"
        case createRevision = "create_revision"
        case value
    }
}

struct RequestOp: Codable, Sendable {
    var requestRange: RangeRequest?
    var requestPut: PutRequest?
    var requestDeleteRange: DeleteRangeRequest?

    static func put(_ key: [UInt8], _ value: [UInt8]) -> RequestOp {
        RequestOp(requestPut: PutRequest(key: EtcdBytes(key), value: EtcdBytes(value)))
    }
    static func delete(_ key: [UInt8], end: [UInt8]? = nil) -> RequestOp {
        RequestOp(requestDeleteRange: DeleteRangeRequest(key: EtcdBytes(key), rangeEnd: end.map(EtcdBytes.init)))
    }
    static func range(_ key: [UInt8], end: [UInt8]? = nil) -> RequestOp {
        RequestOp(requestRange: RangeRequest(key: EtcdBytes(key), rangeEnd: end.map(EtcdBytes.init)))
    }

    enum CodingKeys: String, CodingKey {
        case requestRange = "request_range"
        case requestPut = "request_put"
        case requestDeleteRange = "request_delete_range"
    }
}

struct ResponseOp: Codable, Sendable {
    var responseRange: RangeResponse?
    var responsePut: PutResponse?
    var responseDeleteRange: DeleteRangeResponse?

    enum CodingKeys: String, CodingKey {
        case responseRange = "response_range"
        case responsePut = "response_put"
        case responseDeleteRange = "response_delete_range"
    }
}

struct TxnRequest: Codable, Sendable {
    var compare: [Compare] = []
    var success: [RequestOp] = []
    var failure: [RequestOp] = []
}

struct TxnResponse: Codable, Sendable {
    var header: ResponseHeader?
    var succeeded: Bool?
    var responses: [ResponseOp]?
}

struct WatchCreateRequest: Codable, Sendable {
    var key: EtcdBytes
    var rangeEnd: EtcdBytes?
    var startRevision: EtcdInt?
    var progressNotify: Bool?
    var prevKv: Bool?

    enum CodingKeys: String, CodingKey {
        case key
        case rangeEnd = "range_end"
        case startRevision = "start_revision"
        case progressNotify = "progress_notify"
        case prevKv = "prev_kv"
    }
}

struct WatchRequest: Codable, Sendable {
    var createRequest: WatchCreateRequest

    enum CodingKeys: String, CodingKey {
        case createRequest = "create_request"
    }
}

struct WatchEvent: Codable, Sendable {
    /// Absent for PUT (the default value), "DELETE" for deletions.
    var type: String?
    var kv: KeyValue
    var prevKv: KeyValue?

    enum CodingKeys: String, CodingKey {
        case type
        case kv
        case prevKv = "prev_kv"
    }
}

struct WatchResponse: Codable, Sendable {
    var header: ResponseHeader?
    var created: Bool?
    var canceled: Bool?
    var compactRevision: EtcdInt?
    var cancelReason: String?
    var events: [WatchEvent]?

    enum CodingKeys: String, CodingKey {
        case header
        case created
        case canceled
        case compactRevision = "compact_revision"
        case cancelReason = "cancel_reason"
        case events
    }
}

struct WatchLine: Codable, Sendable {
    var result: WatchResponse?
    var error: GatewayError?
}
