import Foundation
import Logging
import MeshCore
import MeshHTTP
import MeshTestSupport
import NIOCore
import ServiceLifecycle
import Synchronization
import Testing

@testable import MeshClient

/// What a reflector delivered, in order, across kinds: `Service list[a]@7`, `Endpoints added:a`,
/// `Service bookmark@9` (without the kind when `namingKinds` is false: `list[a]@7`).
final class KindLog: Sendable {
    private let items = Mutex<[String]>([])
    private let failOn = Mutex<String?>(nil)
    let namingKinds: Bool

    init(namingKinds: Bool = true) { self.namingKinds = namingKinds }

    struct Refused: Error {}

    func failOnce(at text: String) { self.failOn.withLock { $0 = text } }

    var all: [String] { self.items.withLock { $0 } }
    var changes: [String] { self.all.filter { !$0.contains("bookmark@") } }

    func record<T: MeshObject>(_ update: ReflectorUpdate<T>) throws {
        var text = self.namingKinds ? T.resource.kind + " " : ""
        switch update {
        case .replaced(let items, let rv):
            text += "list[\(items.map(\.metadata.name).sorted().joined(separator: ","))]@\(rv)"
        case .changed(.added(let o)): text += "added:\(o.metadata.name)"
        case .changed(.modified(let o)): text += "modified:\(o.metadata.name)"
        case .changed(.deleted(let o)): text += "deleted:\(o.metadata.name)"
        case .changed(.bookmark(let rv)): text += "bookmark@\(rv)"
        case .changed(.error(let status)): text += "error:\(status.code)"
        }
        let fail = self.failOn.withLock { f -> Bool in
            guard f == text else { return false }
            f = nil
            return true
        }
        self.items.withLock { $0.append(fail ? "refused:\(text)" : text) }
        if fail { throw Refused() }
    }

    /// The last bookmark each kind got.
    func lastBookmark(_ kind: String) -> Int64? {
        self.all.last { $0.hasPrefix(kind + " bookmark@") }.flatMap { Int64($0.split(separator: "@").last!) }
    }
}

func endpoints(_ name: String) -> Endpoints {
    Endpoints(
        metadata: ObjectMeta(name: name, namespace: "shop"),
        spec: EndpointsSpec(addresses: [EndpointAddress(ip: "198.18.0.7", ports: [EndpointPort(port: 8080)])])
    )
}

/// The reflector over several kinds that an agent follows its seven kinds with, against a real control plane:
/// one watch for all (the control plane counts one watcher), a kind's own version honoured when the kinds
/// resume from different versions, bookmarks to every kind, 410 and a consumer's failure list every kind again.
@Suite(.rationed) struct MultiReflectorTests {
    let logger = Logger(label: "multi-reflector-test")

    func start(_ cp: RunningControl, services: Int64?, endpoints: Int64?, into log: KindLog) -> Task<Void, Never> {
        var reflector = MultiReflector(
            client: cp.client,
            kinds: [
                .of(MeshService.self, from: services) { try log.record($0) },
                .of(Endpoints.self, from: endpoints) { try log.record($0) },
            ],
            logger: self.logger
        )
        reflector.backoff.initial = .milliseconds(20)
        reflector.backoff.maximum = .milliseconds(200)
        return Task { await reflector.run() }
    }

    @Test func listsEachKindThenFollowsBothOverOneWatch() async throws {
        let cp = try await RunningControl()
        try await cp.client.apply(service("a"))
        try await cp.client.apply(endpoints("a"))
        let rv = try await cp.rv()
        // The control plane's own watchers (its controllers), before ours.
        let before = cp.server.watcherCount
        let log = KindLog()
        let task = self.start(cp, services: nil, endpoints: nil, into: log)
        #expect(
            await eventually { log.changes == ["Service list[a]@\(rv)", "Endpoints list[a]@\(rv)"] },
            "\(log.all)"
        )
        try await cp.client.apply(endpoints("b"))
        try await cp.client.apply(service("b"))
        _ = try await cp.client.delete(Endpoints.self, namespace: "shop", name: "a")
        #expect(
            await eventually {
                log.changes.dropFirst(2) == ["Endpoints added:b", "Service added:b", "Endpoints deleted:a"]
            },
            "in the order written, across kinds: \(log.all)"
        )
        // One watcher on the control plane for both kinds.
        #expect(cp.server.watcherCount == before + 1)
        task.cancel()
        await task.value
        try await cp.stop()
    }

    /// What `MultiReflector.Peek` read with `JSONDecoder` before it stepped over the bytes instead.
    struct DecodedPeek: Decodable {
        struct Object: Decodable {
            struct Meta: Decodable { var resourceVersion: String? }
            var kind: String?
            var metadata: Meta?
        }
        var type: WatchEventType
        var object: Object?
    }

    @Test func aLinesTypeKindAndVersionAreReadAsItsDecodeReadsThem() async throws {
        let cp = try await RunningControl()
        let from = try await cp.rv()
        try await cp.client.apply(service("a"))
        try await cp.client.apply(endpoints("a"))
        var changed = endpoints("a")
        changed.metadata.annotations = ["note": "web \"quoted\" é"]
        try await cp.client.apply(changed)
        _ = try await cp.client.delete(Endpoints.self, namespace: "shop", name: "a")
        // The control plane's own lines: the replay after `from`, then the bookmark that ends it.
        var lines: [ByteBuffer] = []
        try await cp.client.watchLines([MeshService.resource, Endpoints.resource], after: from) { line in
            lines.append(line)
            return !String(buffer: line).contains("\"BOOKMARK\"")
        }
        var types: [WatchEventType] = []
        for line in lines {
            let peek = try MultiReflector.Peek(line)
            let decoded = try JSONDecoder().decode(DecodedPeek.self, from: Data(line.readableBytesView))
            #expect(
                peek
                    == MultiReflector.Peek(
                        type: decoded.type,
                        kind: decoded.object?.kind,
                        resourceVersion: decoded.object?.metadata?.resourceVersion
                    ),
                "\(String(buffer: line))"
            )
            types.append(peek.type)
        }
        #expect(types == [.added, .added, .modified, .deleted, .bookmark])
        // Lines that are not watch events say what is wrong with them.
        for (text, why) in [
            (#"{"type":"ADDED","object":{"#, "malformed watch event from the control plane: malformed JSON: "),
            (
                #"{"type":"RENAMED","object":{}}"#,
                #"malformed watch event from the control plane: an unknown type "RENAMED""#
            ),
            (#"[{"type":"ADDED"}]"#, "malformed watch event from the control plane: no type"),
        ] {
            let error = #expect(throws: HTTPClientError.self) { try MultiReflector.Peek(ByteBuffer(string: text)) }
            #expect(error?.message.hasPrefix(why) == true, "\(String(describing: error))")
        }
        try await cp.stop()
    }

    @Test func eachKindResumesFromItsOwnVersionWithoutAList() async throws {
        let cp = try await RunningControl()
        try await cp.client.apply(service("a"))
        let servicesAt = try await cp.rv()
        try await cp.client.apply(endpoints("a"))
        try await cp.client.apply(service("b"))
        let endpointsAt = try await cp.rv()
        try await cp.client.apply(endpoints("b"))
        // Services resume after a, endpoints after b's service: the stream starts at the older version, and
        // the endpoints' change below their own version (a) is not delivered again.
        let log = KindLog()
        let task = self.start(cp, services: servicesAt, endpoints: endpointsAt, into: log)
        #expect(
            await eventually { log.changes == ["Service added:b", "Endpoints added:b"] },
            "\(log.all)"
        )
        // The bookmark after the replay moves the services on to the stream's version too (the endpoints are
        // there already: their last change is the latest).
        let now = try await cp.rv()
        #expect(await eventually { log.lastBookmark("Service") == now }, "\(log.all)")
        #expect(log.lastBookmark("Endpoints") == nil, "\(log.all)")
        task.cancel()
        await task.value
        try await cp.stop()
    }

    @Test func aCompactedVersionListsEveryKindAgain() async throws {
        let cp = try await RunningControl { $0.historyLimit = 3 }
        try await cp.client.apply(service("first"))
        let first = try await cp.rv()
        for i in 0..<8 { try await cp.client.apply(endpoints("e\(i)")) }
        let rv = try await cp.rv()
        let log = KindLog()
        let task = self.start(cp, services: first, endpoints: first, into: log)
        let names = (0..<8).map { "e\($0)" }.joined(separator: ",")
        #expect(
            await eventually { log.changes == ["Service list[first]@\(rv)", "Endpoints list[\(names)]@\(rv)"] },
            "\(log.all)"
        )
        task.cancel()
        await task.value
        try await cp.stop()
    }

    @Test func aConsumerFailureListsEveryKindAgainAndLosesNothing() async throws {
        let cp = try await RunningControl()
        try await cp.client.apply(service("a"))
        let log = KindLog()
        log.failOnce(at: "Endpoints added:x")
        let task = self.start(cp, services: nil, endpoints: nil, into: log)
        #expect(await eventually { log.changes.count == 2 }, "\(log.all)")
        try await cp.client.apply(endpoints("x"))
        let rv = try await cp.rv()
        #expect(
            await eventually {
                log.changes.suffix(2) == ["Service list[a]@\(rv)", "Endpoints list[x]@\(rv)"]
            },
            "after the consumer refused x, every kind is listed again: \(log.all)"
        )
        #expect(log.changes.contains("refused:Endpoints added:x"))
        task.cancel()
        await task.value
        try await cp.stop()
    }

    /// A stream that cannot be resumed (nothing listens) backs off: the attempts count up rather than each
    /// retry starting over at the first delay (a bug once: the count was reset before the watch was tried).
    @Test func resumingAgainstNothingBacksOff() async throws {
        let cp = try await RunningControl()
        let client = cp.client
        try await cp.stop()
        let recorder = LogRecorder()
        var reflector = MultiReflector(
            client: client,
            kinds: [.of(MeshService.self, from: 5) { _ in }, .of(Endpoints.self, from: 5) { _ in }],
            logger: recorder.logger(level: .debug)
        )
        reflector.backoff.initial = .milliseconds(1)
        reflector.backoff.maximum = .milliseconds(4)
        let task = Task { await reflector.run() }
        #expect(
            await eventually { !recorder.messages(.debug, containing: "(attempt 4)").isEmpty },
            "\(recorder.all.prefix(6).map(\.message))"
        )
        task.cancel()
        await task.value
    }

    /// Against a control plane from before the watch over several kinds (its answer to the path is 404: no
    /// resource "watch"), the reflector watches each kind on its own and loses nothing. The older control
    /// plane is the real one behind a plain-HTTP front that answers that path as the old one did and hands
    /// every other request through.
    @Test func anOlderControlPlaneIsWatchedKindByKind() async throws {
        let cp = try await RunningControl()
        try await cp.client.apply(service("a"))
        let upstream = cp.client
        let seen = Mutex<[String]>([])
        let front = ClosureResponder { request in
            seen.withLock { $0.append(request.uri) }
            if request.path == "/apis/mesh.edge/v1/watch" {
                return .json(
                    .notFound,
                    ByteBuffer(
                        string:
                            #"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"the server has no resource \"watch\"","reason":"NotFound","code":404}"#
                    )
                )
            }
            guard request.query["watch"] == "true" else {
                do {
                    return .json(.ok, try await upstream.raw(.GET, request.uri).body)
                } catch {
                    return .text(.badGateway, "\(error)")
                }
            }
            return HTTPResponse(
                status: .ok,
                headers: ["Content-Type": "application/json"],
                body: .stream { writer in
                    try await upstream.http.stream(.GET, request.uri) { _, body in
                        while var line = try await body.nextLine() {
                            line.writeString("\n")
                            try await writer.write(line)
                        }
                    }
                }
            )
        }
        var config = HTTPServerConfiguration()
        config.host = "127.0.0.1"
        config.port = 0
        config.drainTimeout = .milliseconds(200)
        let server = HTTPServer(configuration: config, responder: front, logger: self.logger)
        let group = ServiceGroup(configuration: .init(services: [.init(service: server)], logger: self.logger))
        let serving = Task { try await group.run() }
        let port = try await server.localAddress().port!
        let old = ControlClient(endpoint: HTTPEndpoint(host: "127.0.0.1", port: port, tls: false))
        let recorder = LogRecorder()
        let log = KindLog()
        let reflector = MultiReflector(
            client: old,
            kinds: [
                .of(MeshService.self, from: nil) { try log.record($0) },
                .of(Endpoints.self, from: nil) { try log.record($0) },
            ],
            logger: recorder.logger(level: .info)
        )
        let task = Task { await reflector.run() }
        #expect(
            await eventually { !recorder.messages(.notice, containing: "watching each kind on its own").isEmpty },
            "\(recorder.all.map(\.message))"
        )
        try await cp.client.apply(endpoints("e"))
        try await cp.client.apply(service("b"))
        #expect(
            await eventually { log.changes.contains("Endpoints added:e") && log.changes.contains("Service added:b") },
            "\(log.all)"
        )
        #expect(seen.withLock { $0.contains { $0.hasPrefix("/apis/mesh.edge/v1/endpoints?watch=true") } })
        task.cancel()
        await task.value
        await group.triggerGracefulShutdown()
        try await serving.value
        try await cp.stop()
    }
}
