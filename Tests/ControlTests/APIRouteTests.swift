import MeshCore
import MeshHTTP
import NIOCore
import Testing

@testable import Control

/// The control API's route parser: paths to routes, and every miss with its status and message,
/// without a server.
@Suite struct APIRouteTests {
    func route(_ path: String) -> APIRoute? { try? APIRoute.parse(path).get() }

    func miss(_ path: String) -> APIRoute.Miss? {
        if case .failure(let m) = APIRoute.parse(path) { return m }
        return nil
    }

    @Test func pathsToRoutes() {
        let v1 = "/apis/mesh.edge/v1"
        #expect(self.route("/version") == .version)
        #expect(self.route(v1) == .discovery)
        #expect(self.route(v1 + "/") == .discovery)
        #expect(self.route(v1 + "/join") == .join)
        #expect(self.route(v1 + "/bootstraptokens") == .tokens(id: nil))
        #expect(self.route(v1 + "/bootstraptokens/") == .tokens(id: nil))
        #expect(self.route(v1 + "/bootstraptokens/abcdef") == .tokens(id: "abcdef"))
        #expect(self.route(v1 + "/services") == .collection(resource: "services", namespace: nil))
        #expect(self.route(v1 + "/namespaces/shop/services") == .collection(resource: "services", namespace: "shop"))
        #expect(
            self.route(v1 + "/namespaces/shop/endpoints/web")
                == .object(resource: "endpoints", namespace: "shop", name: "web")
        )
        #expect(self.route(v1 + "/nodes") == .collection(resource: "nodes", namespace: ""))
        #expect(
            self.route(v1 + "/nodes/edge-1.site-a") == .object(resource: "nodes", namespace: "", name: "edge-1.site-a")
        )
        #expect(self.route(v1 + "/nodes/n1/heartbeat") == .heartbeat(node: "n1"))
        // "namespaces" with fewer than three segments after it is a resource name, and not one we have.
        #expect(self.miss(v1 + "/namespaces/shop")?.status.code == 404)
    }

    @Test func missesSayWhatIsWrong() throws {
        let v1 = "/apis/mesh.edge/v1"
        let outside = try #require(self.miss("/api/v1/pods"))
        #expect(outside.status.code == 404 && outside.status.message.contains("the API is under /apis/mesh.edge/v1"))
        let unknown = try #require(self.miss(v1 + "/pods"))
        #expect(unknown.status.code == 404 && unknown.resource == "pods")
        #expect(unknown.status.message.contains("services, endpoints, nodes"))
        let badNamespace = try #require(self.miss(v1 + "/namespaces/Shop_1/services"))
        #expect(badNamespace.status.code == 400 && badNamespace.status.message.contains("namespace \"Shop_1\""))
        let clusterScoped = try #require(self.miss(v1 + "/namespaces/shop/nodes/n1"))
        #expect(clusterScoped.status.code == 400 && clusterScoped.status.message.contains("nodes are not namespaced"))
        let needsNamespace = try #require(self.miss(v1 + "/services/web"))
        #expect(needsNamespace.status.code == 400)
        #expect(needsNamespace.status.message.contains("/apis/mesh.edge/v1/namespaces/{namespace}/services/web"))
        let tooDeep = try #require(self.miss(v1 + "/namespaces/shop/services/web/status"))
        #expect(tooDeep.status.code == 404 && tooDeep.resource == "services")
        #expect(self.miss(v1 + "/nodes/n1/heartbeat/x")?.status.code == 404)
    }

    @Test func labelsAndAllowedMethods() {
        #expect(APIRoute.join.resourceLabel == "join")
        #expect(APIRoute.tokens(id: nil).resourceLabel == "bootstraptokens")
        #expect(APIRoute.heartbeat(node: "n1").resourceLabel == "nodes")
        #expect(APIRoute.object(resource: "services", namespace: "a", name: "b").name == "b")
        #expect(ControlAPI.allowed(.tokens(id: nil)) == "GET, POST")
        #expect(ControlAPI.allowed(.tokens(id: "x")) == "DELETE")
        #expect(ControlAPI.allowed(.heartbeat(node: "n")) == "POST")
        #expect(ControlAPI.allowed(.object(resource: "services", namespace: "a", name: "b")) == "GET, PUT, DELETE")
    }
}

/// The beat's answer made from a template (one per beat of every node, now that a beat also restarts the node's
/// watch): byte for byte what the encoder writes, and the encoder's own answer for anything that would need
/// escaping.
@Suite struct BeatAnswerTests {
    @Test func theTemplateWritesWhatTheEncoderWrites() {
        let answers = BeatAnswers()
        for grace in [60.0, 2.5, 0.1, 300, 1e-3] {
            for name in ["edge-a", "n1.example.com", "x", "sim-09999"] {
                for time in ["2026-12-07T23:50:00Z", "2026-12-07T23:50:00.123Z", "2026-12-07T23:50:00+01:00"] {
                    let beat = NodeHeartbeat(nodeName: name, time: time, phase: .ready, gracePeriodSeconds: grace)
                    let fast = answers.encode(beat)
                    #expect(fast == ControlAPI.encode(beat), "\(String(buffer: fast))")
                }
            }
        }
    }

    @Test func whatNeedsEscapingGoesThroughTheEncoder() {
        let answers = BeatAnswers()
        for name in ["quote\"d", "back\\slash", "tab\there", "é", "@NODE@"] {
            let beat = NodeHeartbeat(
                nodeName: name,
                time: "2026-12-07T23:50:00Z",
                phase: .ready,
                gracePeriodSeconds: 60
            )
            #expect(answers.encode(beat) == ControlAPI.encode(beat))
        }
        #expect(!BeatAnswers.plain("a\"b") && !BeatAnswers.plain("a b") && BeatAnswers.plain("a-b.c:d+e"))
    }

    @Test func theKindsOfAWatchAreReadWithoutTheSpacesAroundThem() {
        func kinds(_ query: String) -> [String] {
            ControlAPI.watchedResources(HTTPRequest(method: .GET, uri: "/apis/mesh.edge/v1/watch?resources=\(query)"))
        }
        #expect(kinds("services,endpoints") == ["services", "endpoints"])
        #expect(kinds("%20services%20,%09endpoints,,") == ["services", "endpoints"])
        #expect(kinds("") == [])
        #expect(kinds("%20,%20") == [])
    }
}
