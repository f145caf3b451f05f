import Foundation
import MeshClient
import MeshCore
import MeshHTTP
import MeshIdentity
import MeshTestSupport
import NIOCore
import NIOHTTP1
import Testing

@testable import Control

/// Node heartbeats and liveness in the control plane, over real sockets with real SQLite files:
/// beats stay in memory, the Node is written (one MODIFIED event) only when its phase changes,
/// silent nodes turn NotReady after the grace, restarts give every node a grace of its own.
@Suite(.rationed) struct NodeLivenessTests {
    func node(_ name: String, status: NodeStatus? = nil) -> Node {
        Node(metadata: ObjectMeta(name: name), spec: NodeSpec(site: "a"), status: status)
    }

    func phase(_ cp: RunningControl, _ name: String) async throws -> NodeStatus? {
        try await cp.client.get(Node.self, name: name).status
    }

    @Test func beatsKeepANodeReadyWithoutWritesAndSilenceMakesItNotReady() async throws {
        let clock = ManualClock()
        let cp = try await RunningControl(clock: clock) { $0.nodeGracePeriodSeconds = 1 }
        #expect(await clock.waitForSleepers(1), "the lifecycle loop never started")
        let edge = try cp.client(try cp.issue(.node("edge-a")))
        // A node registering itself counts as a beat: it is created Ready.
        let created = try await edge.apply(self.node("edge-a")).object
        #expect(created.status?.phase == .ready)
        let rv = Int64(created.metadata.resourceVersion!)!
        let watch = NodeWatch(cp.client, after: rv)
        // Beats for longer than the grace (1.8 s of the clock, a beat every 150 ms, the loop looking
        // every 250 ms): Ready throughout, no new version, no watch event.
        for _ in 0..<12 {
            let beat = try await edge.heartbeat(node: "edge-a")
            #expect(beat.phase == .ready && beat.gracePeriodSeconds == 1)
            await clock.advance(by: .milliseconds(150))
        }
        let during = try await cp.client.get(Node.self, name: "edge-a")
        #expect(during.status?.phase == .ready)
        #expect(during.metadata.resourceVersion == created.metadata.resourceVersion)
        #expect(try await cp.rv() == rv)
        // Reads show the live heartbeat time (not written to the object).
        let live = try #require(during.status?.lastHeartbeatTime.flatMap(Timestamp.parse))
        #expect(live >= clock.epochSeconds - 1)
        #expect(watch.changes.isEmpty)

        // Silence: still Ready within the grace; NotReady past it, saying since when, with one MODIFIED event.
        let silentSince = clock.epochSeconds
        await clock.advance(by: .milliseconds(750), in: .milliseconds(250))
        #expect(try await self.phase(cp, "edge-a")?.phase == .ready, "NotReady within the grace")
        await clock.advance(by: .milliseconds(500), in: .milliseconds(250))
        let down = try #require(try await self.phase(cp, "edge-a"))
        #expect(down.phase == .notReady, "\(down)")
        #expect(down.message?.contains("no heartbeat since") == true, "\(down)")
        #expect(down.message?.contains("grace period 1s") == true)
        #expect(abs((down.lastHeartbeatTime.flatMap(Timestamp.parse) ?? 0) - silentSince) <= 2)
        #expect(await eventually { watch.changes.count == 1 })
        #expect(watch.changes.first?.type == "MODIFIED" && watch.changes.first?.phase == .notReady)

        // The next beat: Ready again, one more MODIFIED event.
        try await edge.heartbeat(node: "edge-a")
        #expect(try await self.phase(cp, "edge-a")?.phase == .ready)
        #expect(await eventually { watch.changes.count == 2 })
        #expect(watch.changes.last?.type == "MODIFIED" && watch.changes.last?.phase == .ready)
        // And beats after it write nothing again.
        let readyRV = try await cp.rv()
        for _ in 0..<3 { try await edge.heartbeat(node: "edge-a") }
        #expect(try await cp.rv() == readyRV)
        #expect(watch.changes.count == 2)
        watch.stop()
        try await cp.stop()
    }

    @Test func aBeatReportsTheHomeRelayWrittenOnlyWhenItChanges() async throws {
        let cp = try await RunningControl()
        let edge = try cp.client(try cp.issue(.node("edge-a")))
        let created = try await edge.apply(self.node("edge-a")).object
        #expect(created.status?.relay == nil)
        // The first report writes status.relay (keeping the phase), once.
        try await edge.heartbeat(node: "edge-a", report: NodeHeartbeatReport(relay: "r1"))
        let homed = try #require(try await self.phase(cp, "edge-a"))
        #expect(homed.relay == "r1" && homed.phase == .ready)
        let rv = try await cp.rv()
        // The same relay again, or an empty body: no write.
        try await edge.heartbeat(node: "edge-a", report: NodeHeartbeatReport(relay: "r1"))
        try await edge.heartbeat(node: "edge-a")
        #expect(try await cp.rv() == rv)
        #expect(try await self.phase(cp, "edge-a")?.relay == "r1")
        // A re-home: one write.
        try await edge.heartbeat(node: "edge-a", report: NodeHeartbeatReport(relay: "r2"))
        #expect(try await self.phase(cp, "edge-a")?.relay == "r2")
        #expect(try await cp.rv() == rv + 1)
        // No relay any more ({}): cleared.
        try await edge.heartbeat(node: "edge-a", report: NodeHeartbeatReport(relay: nil))
        #expect(try await self.phase(cp, "edge-a")?.relay == nil)
        // A bad name, or an unknown field: 400 saying why.
        let bad = await #expect(throws: Status.self) {
            try await edge.heartbeat(node: "edge-a", report: NodeHeartbeatReport(relay: "R_1"))
        }
        #expect(bad?.code == 400 && bad?.message.contains("relay \"R_1\"") == true)
        let unknown = await #expect(throws: Status.self) {
            _ = try await edge.raw(
                .POST,
                "/apis/mesh.edge/v1/nodes/edge-a/heartbeat",
                body: ByteBuffer(string: #"{"relay":"r1","extra":1}"#)
            )
        }
        #expect(unknown?.code == 400)
        try await cp.stop()
    }

    @Test func aBeatReportsTheLinksWrittenOnlyWhenTheyChange() async throws {
        let cp = try await RunningControl()
        let edge = try cp.client(try cp.issue(.node("edge-a")))
        try await edge.apply(self.node("edge-a"))
        let relayed = [NodeLink(peer: "edge-b", path: "relayed", relay: "r1", rttMillis: 20)]
        try await edge.heartbeat(node: "edge-a", report: NodeHeartbeatReport(relay: "r1", links: relayed))
        #expect(try await self.phase(cp, "edge-a")?.links == relayed)
        let rv = try await cp.rv()
        // The same links, or a report without links (kept): no write.
        try await edge.heartbeat(node: "edge-a", report: NodeHeartbeatReport(relay: "r1", links: relayed))
        try await edge.heartbeat(node: "edge-a", report: NodeHeartbeatReport(relay: "r1"))
        #expect(try await cp.rv() == rv)
        #expect(try await self.phase(cp, "edge-a")?.links == relayed)
        // The link went direct: one write.
        let direct = [NodeLink(peer: "edge-b", path: "direct", rttMillis: 5)]
        try await edge.heartbeat(node: "edge-a", report: NodeHeartbeatReport(relay: "r1", links: direct))
        #expect(try await self.phase(cp, "edge-a")?.links == direct)
        #expect(try await cp.rv() == rv + 1)
        // A bad path: 400 saying which link and why.
        let bad = await #expect(throws: Status.self) {
            try await edge.heartbeat(
                node: "edge-a",
                report: NodeHeartbeatReport(relay: "r1", links: [NodeLink(peer: "edge-b", path: "teleported")])
            )
        }
        #expect(bad?.code == 400 && bad?.message.contains("links[0]: path \"teleported\"") == true)
        try await cp.stop()
    }

    @Test func linkRTTsAreRoundedToSteps() {
        #expect(NodeLink.roundedRTT(micros: nil) == nil)
        #expect(NodeLink.roundedRTT(micros: 100) == 1)
        #expect(NodeLink.roundedRTT(micros: 1_600) == 2)
        #expect(NodeLink.roundedRTT(micros: 3_400) == 2)
        #expect(NodeLink.roundedRTT(micros: 3_600) == 5)
        #expect(NodeLink.roundedRTT(micros: 41_000) == 50)
        #expect(NodeLink.roundedRTT(micros: 140_000) == 100)
        #expect(NodeLink.roundedRTT(micros: 160_000) == 200)
    }

    @Test func aBeatReportsHolePunchCandidatesWrittenOnlyWhenTheyChange() async throws {
        let cp = try await RunningControl()
        let edge = try cp.client(try cp.issue(.node("edge-a")))
        _ = try await edge.apply(self.node("edge-a")).object
        let found = NodeCandidates(
            local: ["198.19.1.2:7900"],
            reflexive: "198.18.0.21:7900",
            mapping: "portPreserving",
            updateTime: "2026-12-04T10:00:00Z"
        )
        try await edge.heartbeat(node: "edge-a", report: NodeHeartbeatReport(relay: "r1", candidates: found))
        let status = try #require(try await self.phase(cp, "edge-a"))
        #expect(status.candidates == found && status.relay == "r1")
        let rv = try await cp.rv()
        // The same again, or a report without candidates (not reported: kept): no write.
        try await edge.heartbeat(node: "edge-a", report: NodeHeartbeatReport(relay: "r1", candidates: found))
        try await edge.heartbeat(node: "edge-a", report: NodeHeartbeatReport(relay: "r1"))
        #expect(try await cp.rv() == rv)
        #expect(try await self.phase(cp, "edge-a")?.candidates == found)
        // The mapping changed: one write.
        var moved = found
        moved.mapping = "random"
        moved.reflexive = "198.18.0.21:40123"
        try await edge.heartbeat(node: "edge-a", report: NodeHeartbeatReport(relay: "r1", candidates: moved))
        #expect(try await self.phase(cp, "edge-a")?.candidates == moved)
        #expect(try await cp.rv() == rv + 1)
        // A mapping no agent sends: 400 saying why.
        var bad = found
        bad.mapping = "fullCone"
        let refused = await #expect(throws: Status.self) {
            try await edge.heartbeat(node: "edge-a", report: NodeHeartbeatReport(relay: "r1", candidates: bad))
        }
        #expect(refused?.code == 400 && refused?.message.contains("fullCone") == true)
        try await cp.stop()
    }

    @Test("a registered node's beat is answered at once, on the event loop; every other request goes to a task")
    func aKnownNodesBeatIsAnsweredAtOnce() async throws {
        MeshMetrics.bootstrap()
        let dir = TempDir()
        let store = try await openStore(dir)
        let lifecycle = NodeLifecycle(store: store, configuration: .init(), logger: testLogger, clock: ManualClock())
        try await lifecycle.load()
        let api = ControlAPI(
            store: store,
            vips: VIPAllocator(cidrs: [CIDR("198.18.128.0/24")!]),
            logger: testLogger,
            lifecycle: lifecycle
        )
        let beatA = "/apis/mesh.edge/v1/nodes/edge-a/heartbeat"
        let edgeA = "mesh://node/edge-a"
        // Not registered: left to the task, which says so.
        #expect(api.respondAtOnce(to: apiRequest(.POST, beatA, as: edgeA)) == nil)
        #expect(await api.respond(to: apiRequest(.POST, beatA, as: edgeA)).status == .notFound)
        // Registered by itself (created Ready): its beats are answered at once, and counted as beats.
        let created = await api.respond(
            to: apiRequest(
                .PUT,
                "/apis/mesh.edge/v1/nodes/edge-a",
                as: edgeA,
                body: String(decoding: try JSONEncoder().encode(self.node("edge-a")), as: UTF8.self)
            )
        )
        #expect(created.status == .created || created.status == .ok, "\(created.status)")
        let before = lifecycle.lastBeat("edge-a")
        // Counted as any answered request and any beat (the metrics are the process's: other tests count too).
        func counted(_ series: String) -> Double {
            let text = String(buffer: MeshMetrics.render())
            let line = text.split(separator: "\n").first { $0.hasPrefix(series + " ") }
            return line.flatMap { Double($0.split(separator: " ").last ?? "") } ?? 0
        }
        let requestsSeries = #"mesh_control_requests_total{verb="heartbeat",resource="nodes",code="200"}"#
        let (requests, beats) = (counted(requestsSeries), counted("mesh_control_node_heartbeats_total"))
        let answer = try #require(api.respondAtOnce(to: apiRequest(.POST, beatA, as: edgeA)))
        #expect(counted(requestsSeries) >= requests + 1)
        #expect(counted("mesh_control_node_heartbeats_total") >= beats + 1)
        #expect(answer.status == .ok)
        guard case .bytes(let bytes) = answer.body else {
            Issue.record("a heartbeat's answer is its bytes")
            return
        }
        let beat = try JSONDecoder().decode(NodeHeartbeat.self, from: Data(bytes.readableBytesView))
        #expect(beat.nodeName == "edge-a" && beat.phase == .ready)
        #expect((lifecycle.lastBeat("edge-a") ?? .min) >= (before ?? .min))
        // Everything else goes to the task: another node's beat (refused there), a beat without a certificate or
        // with a report, other methods and routes.
        for other in [
            apiRequest(.POST, beatA, as: "mesh://node/edge-b"),
            apiRequest(.POST, beatA, as: nil),
            apiRequest(.POST, beatA, as: edgeA, body: #"{"relay":null}"#),
            apiRequest(.GET, beatA, as: edgeA),
            apiRequest(.POST, "/apis/mesh.edge/v1/nodes/edge-a", as: edgeA),
            apiRequest(.GET, "/apis/mesh.edge/v1/nodes/edge-a", as: edgeA),
        ] {
            #expect(api.respondAtOnce(to: other) == nil, "\(other.method) \(other.uri) as \(other.peerIdentity ?? "-")")
        }
        #expect(await api.respond(to: apiRequest(.POST, beatA, as: "mesh://node/edge-b")).status == .forbidden)
    }

    @Test func aNodeBeatsOnlyForItselfAndOnlyOnceRegistered() async throws {
        let cp = try await RunningControl()
        let edgeA = try cp.client(try cp.issue(.node("edge-a")))
        try await cp.client.apply(self.node("edge-b"))
        // Another node's heartbeat: 403 with a Status naming who may not do what.
        let forbidden = await #expect(throws: Status.self) { try await edgeA.heartbeat(node: "edge-b") }
        #expect(forbidden?.code == 403 && forbidden?.reason == .forbidden)
        #expect(forbidden?.message.contains("mesh://node/edge-a may not POST") == true)
        // Its own, before it registered: 404 saying to register.
        let missing = await #expect(throws: Status.self) { try await edgeA.heartbeat(node: "edge-a") }
        #expect(missing?.code == 404 && missing?.message.contains("not registered") == true)
        // Without a certificate: 401.
        let anonymous = try cp.client(nil)
        let unauthenticated = await #expect(throws: Status.self) { try await anonymous.heartbeat(node: "edge-a") }
        #expect(unauthenticated?.code == 401)
        // Only POST.
        let wrongVerb = await #expect(throws: Status.self) {
            _ = try await cp.client.raw(.GET, "/apis/mesh.edge/v1/nodes/edge-b/heartbeat")
        }
        #expect(wrongVerb?.code == 405)
        // edge-b was never beaten for by anyone but could be by the admin.
        #expect(try await cp.client.heartbeat(node: "edge-b").phase == .ready)
        try await cp.stop()
    }

    @Test func theControlPlaneOwnsNodeStatus() async throws {
        let cp = try await RunningControl()
        // An admin's Node with a made-up status: the status is the control plane's to set.
        let stored = try await cp.client.apply(
            self.node("edge-c", status: NodeStatus(phase: .ready, lastHeartbeatTime: "2020-01-01T00:00:00Z"))
        ).object
        #expect(stored.status?.phase == .unknown)
        #expect(stored.status?.message == "waiting for the node's first heartbeat")
        // The node's own spec update keeps its status as the control plane set it.
        let edge = try cp.client(try cp.issue(.node("edge-c")))
        try await edge.heartbeat(node: "edge-c")
        var changed = try await edge.get(Node.self, name: "edge-c")
        changed.spec.site = "b"
        changed.status = NodeStatus(phase: .notReady)
        let updated = try await edge.apply(changed).object
        #expect(updated.spec.site == "b" && updated.status?.phase == .ready)
        // Deleted: its heartbeats are 404 again.
        try await cp.client.delete(Node.self, name: "edge-c")
        let gone = await #expect(throws: Status.self) { try await edge.heartbeat(node: "edge-c") }
        #expect(gone?.code == 404)
        try await cp.stop()
    }

    @Test func aRestartGivesEveryNodeAGraceBeforeItCanBeMarkedNotReady() async throws {
        let dir = TempDir()
        let clock = ManualClock()
        let cp = try await RunningControl(dir: dir, clock: clock) { $0.nodeGracePeriodSeconds = 30 }
        #expect(await clock.waitForSleepers(1), "the lifecycle loop never started")
        let port = cp.port
        let a = try cp.client(try cp.issue(.node("edge-a")))
        let b = try cp.client(try cp.issue(.node("edge-b")))
        try await a.apply(self.node("edge-a"))
        try await b.apply(self.node("edge-b"))
        // Two seconds later than its registration, so the time saved at shutdown is told apart.
        await clock.advance(by: .seconds(2))
        try await b.heartbeat(node: "edge-b")
        let lastBeatOfB = try #require(try await self.phase(cp, "edge-b")?.lastHeartbeatTime)
        #expect(Timestamp.parse(lastBeatOfB) == clock.epochSeconds)
        try await cp.stop()

        // The control plane is back on the same files: both nodes are still Ready, and stay so
        // past the normal grace (1 s) while agents find it again (4 s).
        let cp2 = try await RunningControl(dir: dir, clock: clock) {
            $0.nodeGracePeriodSeconds = 1
            $0.nodeStartupGracePeriodSeconds = 4
            $0.listen = "127.0.0.1:\(port)"
        }
        #expect(await clock.waitForSleepers(1), "the lifecycle loop never started")
        let rv = try await cp2.rv()
        let watch = NodeWatch(cp2.client, after: rv)
        #expect(try await self.phase(cp2, "edge-a")?.phase == .ready)
        #expect(try await self.phase(cp2, "edge-b")?.phase == .ready)
        // edge-a beats again every 250 ms of the clock; edge-b stays silent.
        func beatAndAdvance(_ total: Duration) async throws {
            var left = total
            while left > .zero {
                try await a.heartbeat(node: "edge-a")
                await clock.advance(by: .milliseconds(250))
                left -= .milliseconds(250)
            }
        }
        try await beatAndAdvance(.milliseconds(3750))
        #expect(try await self.phase(cp2, "edge-b")?.phase == .ready, "flipped within the start-up grace")
        // Past the start-up grace, edge-b is NotReady since its last beat before the restart
        // (saved at shutdown); edge-a never flipped.
        try await beatAndAdvance(.milliseconds(500))
        let b2 = try #require(try await self.phase(cp2, "edge-b"))
        #expect(b2.phase == .notReady, "\(b2)")
        #expect(b2.message == "no heartbeat since \(lastBeatOfB) (grace period 1s)", "\(b2)")
        #expect(try await self.phase(cp2, "edge-a")?.phase == .ready)
        #expect(await eventually { watch.changes.count >= 1 })
        #expect(watch.changes.map(\.name) == ["edge-b"])
        watch.stop()
        try await cp2.stop()
    }
}
