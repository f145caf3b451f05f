import Foundation
import Logging
import MeshClient
import MeshCore
import MeshHTTP
import MeshTestSupport
import NIOHTTP1
import ServiceLifecycle
import Testing

@testable import MeshCtl

let chromium = ["/usr/bin/chromium-headless-shell", "/usr/lib/chromium/headless_shell", "/usr/bin/chromium"]
    .first { FileManager.default.isExecutableFile(atPath: $0) }

/// `meshctl dashboard` against a real control plane: the picture it serves follows the watch (a long poll
/// wakes on a change), and the page drawn by a real headless Chromium holds the nodes, relays and links,
/// coloured by path, and the colour changes when a link's path does.
@Suite(.serialized) struct DashboardTests {
    struct Mesh {
        let cp: RunningControl
        let a1: ControlClient
        let b1: ControlClient
        let dashboard: Dashboard
        let group: ServiceGroup
        let task: Task<Void, any Error>
        let page: HTTPClient
        let url: String
    }

    func withMesh(_ body: (Mesh) async throws -> Void) async throws {
        let cp = try await RunningControl()
        for (name, site) in [("a1", "a"), ("b1", "b")] {
            try await cp.client.apply(Node(metadata: ObjectMeta(name: name), spec: NodeSpec(site: site)))
        }
        try await cp.client.apply(
            MeshCore.Relay(metadata: ObjectMeta(name: "r1"), spec: RelaySpec(addresses: ["198.18.0.10:7800"]))
        )
        try await cp.client.apply(
            MeshService(
                metadata: ObjectMeta(name: "web", namespace: "shop"),
                spec: ServiceSpec(ports: [ServicePort(name: "http", port: 80, protocol: .http)])
            )
        )
        try await cp.client.apply(
            Endpoints(
                metadata: ObjectMeta(name: "web", namespace: "shop"),
                spec: EndpointsSpec(addresses: [
                    EndpointAddress(
                        ip: "10.1.0.7",
                        ports: [EndpointPort(name: "http", port: 8080)],
                        node: "b1",
                        site: "b"
                    )
                ])
            )
        )
        let a1 = try cp.client(try cp.issue(.node("a1")))
        let b1 = try cp.client(try cp.issue(.node("b1")))
        try await a1.heartbeat(node: "a1", report: NodeHeartbeatReport(relay: "r1"))
        try await b1.heartbeat(node: "b1", report: NodeHeartbeatReport(relay: "r1"))
        var configuration = Dashboard.Configuration()
        configuration.port = 0
        configuration.longPoll = .seconds(30)
        var logger = Logger(label: "dashboard-test")
        logger.logLevel = .critical
        let dashboard = Dashboard(client: cp.client, configuration: configuration, logger: logger)
        let group = ServiceGroup(configuration: .init(services: [.init(service: dashboard)], logger: logger))
        let task = Task { try await group.run() }
        let url = try await dashboard.url()
        let port = Int(url.split(separator: ":").last!.dropLast())!
        let mesh = Mesh(
            cp: cp,
            a1: a1,
            b1: b1,
            dashboard: dashboard,
            group: group,
            task: task,
            page: HTTPClient(endpoint: HTTPEndpoint(host: "127.0.0.1", port: port)),
            url: url
        )
        do {
            try await body(mesh)
        } catch {
            await group.triggerGracefulShutdown()
            _ = try? await task.value
            try await cp.stop()
            throw error
        }
        await group.triggerGracefulShutdown()
        try await task.value
        try await cp.stop()
    }

    func state(_ mesh: Mesh, after: Int? = nil) async throws -> MeshView {
        let response = try await mesh.page.send(.GET, after.map { "/state?after=\($0)" } ?? "/state")
        #expect(response.status == .ok)
        return try JSONDecoder().decode(MeshView.self, from: Data(response.body.readableBytesView))
    }

    /// The DOM after the page drew the current picture (`?once`: it stops following after one draw).
    func dom(_ mesh: Mesh) async throws -> String {
        let browser = try #require(chromium)
        let home = TempDir()
        let r = try await run(
            browser,
            [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--user-data-dir=\(home.path)", "--virtual-time-budget=10000", "--dump-dom", mesh.url + "?once",
            ],
            environment: ["HOME": home.path],
            timeout: .seconds(90)
        )
        #expect(r.status == 0, "\(r.stderr.suffix(2000))")
        return r.stdout
    }

    @Test func thePictureFollowsTheWatchAndALongPollWakesOnAChange() async throws {
        try await self.withMesh { mesh in
            var view = try await self.state(mesh)
            #expect(
                await eventually {
                    view = (try? await self.state(mesh)) ?? view
                    return view.synced && view.sites.count == 2 && view.relays.count == 1
                }
            )
            #expect(view.sites.map(\.name) == ["a", "b"])
            #expect(view.sites.first?.nodes.map(\.name) == ["a1"])
            #expect(view.sites.first?.nodes.first?.phase == "Ready")
            #expect(view.sites.first?.nodes.first?.relay == "r1")
            #expect(view.relays.map(\.name) == ["r1"])
            #expect(view.services.first { $0.name == "web" }?.endpoints == ["b": 1])
            #expect(view.links.isEmpty)

            // A long poll from the current version waits; a beat that reports a link wakes it.
            let before = view.version
            let waiting = Task { try await self.state(mesh, after: before) }
            try await mesh.a1.heartbeat(
                node: "a1",
                report: NodeHeartbeatReport(
                    relay: "r1",
                    links: [NodeLink(peer: "b1", path: "relayed", relay: "r1", rttMillis: 20)]
                )
            )
            let woken = try await waiting.value
            #expect(woken.version > before)
            #expect(woken.links == [.init(from: "a1", to: "b1", path: "relayed", relay: "r1", rttMillis: 20)])

            // Only a loopback Host is answered.
            let rebound = try await mesh.page.send(.GET, "/state", headers: ["Host": "evil.example"])
            #expect(rebound.status == .forbidden)
        }
    }

    @Test(.enabled(if: chromium != nil, "needs chromium-headless-shell (scripts/bootstrap installs it)"))
    func theBrowserDrawsNodesRelaysAndLinksColouredByPath() async throws {
        try await self.withMesh { mesh in
            try await mesh.a1.heartbeat(
                node: "a1",
                report: NodeHeartbeatReport(
                    relay: "r1",
                    links: [NodeLink(peer: "b1", path: "relayed", relay: "r1", rttMillis: 20)]
                )
            )
            #expect(await eventually { (try? await self.state(mesh))?.links.first?.path == "relayed" })
            let relayed = try await self.dom(mesh)
            #expect(relayed.contains(#"data-node="a1""#) && relayed.contains(#"data-node="b1""#), "\(relayed)")
            #expect(relayed.contains(#"data-site="a""#) && relayed.contains(#"data-site="b""#))
            #expect(relayed.contains(#"data-relay="r1""#))
            #expect(relayed.contains(#"data-service="web.shop""#))
            #expect(relayed.contains(#"class="link-line" data-from="a1" data-to="b1" data-path="relayed""#))
            #expect(relayed.contains(##"stroke="#ef6c00""##))

            // The link goes direct: the next drawing colours it green.
            try await mesh.a1.heartbeat(
                node: "a1",
                report: NodeHeartbeatReport(relay: "r1", links: [NodeLink(peer: "b1", path: "direct", rttMillis: 5)])
            )
            #expect(await eventually { (try? await self.state(mesh))?.links.first?.path == "direct" })
            let direct = try await self.dom(mesh)
            #expect(direct.contains(#"data-path="direct""#) && direct.contains(##"stroke="#2e7d32""##), "\(direct)")
            #expect(!direct.contains(##"stroke="#ef6c00""##))
        }
    }
}
