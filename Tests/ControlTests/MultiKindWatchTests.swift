import Control
import Foundation
import MeshClient
import MeshCore
import MeshHTTP
import MeshIdentity
import MeshTestSupport
import NIOCore
import NIOEmbedded
import NIOHTTP1
import Synchronization
import Testing

/// `GET /apis/mesh.edge/v1/watch?resources=a,b&resourceVersion=N`: one stream for several kinds, over real
/// TLS sockets. Changes of every kind named arrive in version order, of no other kind; bad requests get a
/// clear 400; each kind is authorized as its own watch is.
@Suite(.rationed) struct MultiKindWatchTests {
    func endpoints(_ name: String) -> Endpoints {
        Endpoints(
            metadata: ObjectMeta(name: name, namespace: "shop"),
            spec: EndpointsSpec(addresses: [
                EndpointAddress(ip: "198.18.0.7", ports: [EndpointPort(name: "http", port: 8080)], node: "n1")
            ])
        )
    }

    /// `TYPE Kind name` per line (a bookmark: `BOOKMARK Kind`), until `count` are in or the stream ends.
    func lines(
        _ client: ControlClient,
        _ types: [ResourceType],
        after rv: Int64,
        node: String? = nil,
        count: Int
    ) async throws -> [String] {
        let seen = Mutex<[String]>([])
        try await client.watchLines(types, after: rv, node: node, timeoutSeconds: 30) { line in
            let value = try JSONValue.parse(json: Data(line.readableBytesView))
            let type = value["type"]?.stringValue ?? "?"
            let kind = value["object"]?["kind"]?.stringValue ?? "?"
            let name = value["object"]?["metadata"]?["name"]?.stringValue
            let n = seen.withLock { s in
                s.append([type, kind, name].compactMap { $0 }.joined(separator: " "))
                return s.count
            }
            return n < count
        }
        return seen.withLock { $0 }
    }

    @Test func everyKindNamedArrivesInOrderAndNoOther() async throws {
        let cp = try await RunningControl()
        let start = try await cp.rv()
        try await cp.client.apply(service("a"))
        try await cp.client.apply(self.endpoints("a"))
        // No site: endpoints naming the node are not rewritten with it (EndpointSites), a change of no kind here.
        try await cp.client.apply(Node(metadata: ObjectMeta(name: "n1"), spec: NodeSpec()))
        try await cp.client.apply(self.endpoints("b"))
        _ = try await cp.client.delete(MeshService.self, namespace: "shop", name: "a")
        let got = try await self.lines(cp.client, [MeshService.resource, Endpoints.resource], after: start, count: 5)
        #expect(
            got == [
                "ADDED Service a", "ADDED Endpoints a", "ADDED Endpoints b", "DELETED Service a",
                "BOOKMARK \(ControlAPI.multiWatchBookmarkKind)",
            ]
        )
        try await cp.stop()
    }

    /// `?node=`: a node's own devices (and workloads) in lists and in the watch over several kinds; the other
    /// kinds whole. Over real sockets, through the API's parameter parsing and the store's hub.
    @Test func aNodeScopedListAndWatchGetThatNodesDevicesOnly() async throws {
        let cp = try await RunningControl()
        let model = DeviceModel(
            metadata: ObjectMeta(name: "thermostat", namespace: "shop"),
            spec: DeviceModelSpec(properties: [DeviceProperty(name: "mode", type: .string)])
        )
        try await cp.client.apply(model)
        let start = try await cp.rv()
        for (name, node) in [("d1", "n1"), ("d2", "n2"), ("d3", "n1")] {
            try await cp.client.apply(
                Device(
                    metadata: ObjectMeta(name: name, namespace: "shop"),
                    spec: DeviceSpec(model: "thermostat", node: node)
                )
            )
        }
        try await cp.client.apply(service("a"))
        let listed = try await cp.client.list(Device.self, node: "n1").items.map(\.metadata.name)
        #expect(listed == ["d1", "d3"])
        #expect(try await cp.client.list(Device.self).items.count == 3)
        #expect(try await cp.client.list(DeviceModel.self, node: "n1").items.count == 1)
        let got = try await self.lines(
            cp.client,
            [Device.resource, MeshService.resource],
            after: start,
            node: "n1",
            count: 4
        )
        #expect(got == ["ADDED Device d1", "ADDED Device d3", "ADDED Service a", "BOOKMARK Bookmark"])
        let bad = try await cp.client.http.send(.GET, "/apis/mesh.edge/v1/devices?node=-n1-")
        #expect(
            bad.status.code == 400 && String(buffer: bad.body).contains("node \\\"-n1-\\\""),
            "\(String(buffer: bad.body))"
        )
        try await cp.stop()
    }

    /// A node lists, watches and gets only the devices placed on it (Kubernetes' Node authorizer does the same
    /// for a kubelet's pods): another node's twins are not its to read.
    @Test func aNodeReadsOnlyItsOwnDevices() async throws {
        let cp = try await RunningControl()
        try await cp.client.apply(
            DeviceModel(
                metadata: ObjectMeta(name: "thermostat", namespace: "shop"),
                spec: DeviceModelSpec(properties: [DeviceProperty(name: "mode", type: .string)])
            )
        )
        for (name, node) in [("d1", "n1"), ("d2", "n2")] {
            try await cp.client.apply(
                Device(
                    metadata: ObjectMeta(name: name, namespace: "shop"),
                    spec: DeviceSpec(model: "thermostat", node: node)
                )
            )
        }
        let n1 = try cp.client(try cp.issue(.node("n1")))
        #expect(try await n1.list(Device.self, node: "n1").items.map(\.metadata.name) == ["d1"])
        #expect(try await n1.get(Device.self, namespace: "shop", name: "d1").spec.node == "n1")
        for path in [
            "/apis/mesh.edge/v1/devices", "/apis/mesh.edge/v1/namespaces/shop/workloads",
            "/apis/mesh.edge/v1/devices?node=n2", "/apis/mesh.edge/v1/namespaces/shop/devices/d2",
        ] {
            let r = try await n1.http.send(.GET, path, headers: ["Accept": "application/json"])
            #expect(r.status.code == 403, "\(path): \(String(buffer: r.body))")
        }
        let other = try await n1.http.send(.GET, "/apis/mesh.edge/v1/namespaces/shop/devices/d2")
        #expect(String(buffer: other.body).contains("not placed on that node"), "\(String(buffer: other.body))")
        #expect(try await n1.list(DeviceModel.self).items.count == 1)
        try await cp.stop()
    }

    @Test func badRequestsAreRefusedWithTheReason() async throws {
        let cp = try await RunningControl()
        let rv = try await cp.rv()
        func refusal(_ path: String, _ method: HTTPMethod = .GET) async throws -> (Int, String) {
            let r = try await cp.client.http.send(method, path, headers: ["Accept": "application/json"])
            let status = try? JSONDecoder().decode(Status.self, from: Data(r.body.readableBytesView))
            return (Int(r.status.code), status?.message ?? "")
        }
        let base = "/apis/mesh.edge/v1/watch"
        var (code, message) = try await refusal("\(base)?resources=services,endpoints")
        #expect(code == 400 && message.contains("list each kind"), "\(message)")
        (code, message) = try await refusal("\(base)?resourceVersion=\(rv)")
        #expect(code == 400 && message.contains("name the kinds"), "\(message)")
        (code, message) = try await refusal("\(base)?resources=services,gadgets&resourceVersion=\(rv)")
        #expect(code == 400 && message.contains("\"gadgets\""), "\(message)")
        (code, message) = try await refusal("\(base)?resources=services&resourceVersion=ten")
        #expect(code == 400 && message.contains("not a decimal number"), "\(message)")
        (code, message) = try await refusal("/apis/mesh.edge/v1/namespaces/shop/watch?resources=services")
        #expect(code == 400 && message.contains("cluster-wide"), "\(message)")
        (code, _) = try await refusal("\(base)?resources=services&resourceVersion=\(rv)", .POST)
        #expect(code == 405)
        (code, message) = try await refusal("\(base)?resources=services&resourceVersion=\(rv + 1000)")
        #expect(code == 410 && message.contains("list again"), "\(message)")
        try await cp.stop()
    }

    /// A watch from a version the hub holds is set up on the connection's event loop (`respondAtOnce`): a pushed
    /// body that brings the changes after that version. A watch that lists first, a refused caller and a bad
    /// parameter are left to the task path, which answers them (the tests above, over real sockets).
    @Test func aWatchFromAHeldVersionIsStartedAtOnce() async throws {
        let dir = TempDir()
        let store = try await openStore(dir)
        let api = ControlAPI(store: store, vips: VIPAllocator(cidrs: [CIDR("198.18.128.0/24")!]), logger: testLogger)
        let admin = MeshPrincipal.admin("ops").uri
        func create(_ name: String) async throws {
            let body = String(decoding: try JSONEncoder().encode(service(name)), as: UTF8.self)
            let created = await api.respond(
                to: apiRequest(.POST, "/apis/mesh.edge/v1/namespaces/shop/services", as: admin, body: body)
            )
            #expect(created.status == .created, "\(created.status)")
        }
        try await create("before")
        let rv = try await store.currentResourceVersion()
        let kinds = "/apis/mesh.edge/v1/watch?resources=services,endpoints&resourceVersion=\(rv)"
        let one = "/apis/mesh.edge/v1/namespaces/shop/services?watch=true&resourceVersion=\(rv)"
        for (n, uri) in [kinds, one].enumerated() {
            let answer = try #require(api.respondAtOnce(to: apiRequest(.GET, uri, as: admin)), "\(uri)")
            #expect(answer.status == .ok)
            guard case .push(let source) = answer.body else {
                Issue.record("a watch answered at once is a pushed body: \(uri)")
                continue
            }
            let loop = EmbeddedEventLoop()
            let woken = Atomic<Int>(0)
            source.start(eventLoop: loop, wake: { woken.add(1, ordering: .relaxed) })
            try await create("at-once-\(n)")
            #expect(woken.load(ordering: .relaxed) >= 1)
            guard case .data(let chunk) = source.take() else {
                Issue.record("the change is queued for the pushed watch: \(uri)")
                continue
            }
            let added = try String(buffer: chunk).split(separator: "\n").compactMap { text -> String? in
                let line = try JSONValue.parse(json: Data(text.utf8))
                guard line["type"]?.stringValue == "ADDED" else { return nil }
                return line["object"]?["metadata"]?["name"]?.stringValue
            }
            #expect(added.last == "at-once-\(n)", "\(String(buffer: chunk))")
            source.stop()
            try await loop.shutdownGracefully()
        }
        // Left to the task path: no version (a list first), a refused caller, bad parameters, another method.
        for (method, uri, who) in [
            (HTTPMethod.GET, "/apis/mesh.edge/v1/namespaces/shop/services?watch=true", admin),
            (.GET, "/apis/mesh.edge/v1/namespaces/shop/services?watch=true&resourceVersion=0", admin),
            (.GET, kinds, nil),
            (
                .GET, "/apis/mesh.edge/v1/watch?resources=relays,services&resourceVersion=\(rv)",
                MeshPrincipal.relay("r1").uri
            ),
            (.GET, "/apis/mesh.edge/v1/watch?resources=devices&resourceVersion=\(rv)", MeshPrincipal.node("n1").uri),
            (.GET, "/apis/mesh.edge/v1/watch?resources=services&resourceVersion=ten", admin),
            (.GET, "/apis/mesh.edge/v1/watch?resources=gadgets&resourceVersion=\(rv)", admin),
            (.GET, kinds + "&timeoutSeconds=0", admin),
            (.GET, "/apis/mesh.edge/v1/namespaces/shop/services?resourceVersion=\(rv)", admin),
            (.POST, kinds, admin),
        ] {
            #expect(api.respondAtOnce(to: apiRequest(method, uri, as: who)) == nil, "\(method) \(uri)")
        }
        try await store.close()
    }

    @Test func eachKindIsAuthorizedAsItsOwnWatchIs() async throws {
        let cp = try await RunningControl()
        let rv = try await cp.rv()
        let node = try cp.client(try cp.issue(.node("n1")))
        let relay = try cp.client(try cp.issue(.relay("r1")))
        func code(_ client: ControlClient, _ resources: String) async throws -> (Int, String) {
            // timeoutSeconds=1: an allowed watch ends by itself after a second.
            let r = try await client.http.send(
                .GET,
                "/apis/mesh.edge/v1/watch?resources=\(resources)&resourceVersion=\(rv)&timeoutSeconds=1",
                headers: ["Accept": "application/json"]
            )
            return (Int(r.status.code), String(buffer: r.body))
        }
        let agentKinds = "services,endpoints,nodes,relays,workloads,devicemodels,devices"
        #expect(try await code(node, agentKinds + "&node=n1").0 == 200)
        // Devices and workloads: its own only.
        var (status, message) = try await code(node, agentKinds)
        #expect(status == 403 && message.contains("add ?node=n1"), "\(message)")
        #expect(try await code(node, "devices&node=n2").0 == 403)
        #expect(try await code(node, "services,endpoints").0 == 200)
        (status, message) = try await code(node, "services,bootstraptokens")
        #expect(status == 403 && message.contains("bootstraptokens"), "\(message)")
        #expect(try await code(relay, "relays,nodes").0 == 200)
        #expect(try await code(relay, "relays,services").0 == 403)
        try await cp.stop()
    }
}
