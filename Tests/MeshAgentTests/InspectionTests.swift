import Foundation
import MeshCore
import MeshHTTP
import MeshTestSupport
import NIOHTTP1
import Testing

/// The agent's `/status`, `/route` and `/dns` (what `meshctl status`, `route` and `dns` print), asked of a
/// whole agent with a real control plane, DNS and proxy.
@Suite(
    .serialized,
    .enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/dig"), "needs dig (dnsutils)"),
    .rationed
)
struct InspectionTests {
    func json(_ agent: RunningAgent, _ path: String) async throws -> (HTTPResponseStatus, JSONValue?, String) {
        let r = try await agent.admin.send(.GET, path)
        let body = String(buffer: r.body)
        return (r.status, try? JSONValue.parse(json: Data(body.utf8)), body)
    }

    @Test func statusRouteAndDNSAnswerFromTheAgentsOwnParts() async throws {
        let one = try await TestServers.echo()
        let two = try await TestServers.echo()
        let controlDir = TempDir()
        let cp = try await RunningControl(dir: controlDir) { $0.serviceCIDRs = [AgentEndToEndTests.privateCIDR()] }
        let svc = try await cp.client.apply(
            MeshService(
                metadata: ObjectMeta(name: "echo", namespace: "shop"),
                spec: ServiceSpec(
                    ports: [ServicePort(name: "tcp", port: 7007, protocol: .tcp)],
                    loadBalancer: LoadBalancerSpec(
                        policy: .consistentHash,
                        hashOn: LoadBalancerSpec.HashOn(sourceIP: true)
                    )
                )
            )
        ).object
        try await cp.client.apply(
            Endpoints(
                metadata: ObjectMeta(name: "echo", namespace: "shop"),
                spec: EndpointsSpec(
                    addresses: [one, two].map {
                        EndpointAddress(
                            ip: "127.0.0.1",
                            ports: [EndpointPort(name: "tcp", port: $0.port)],
                            node: "edge-test",
                            site: "a"
                        )
                    }
                )
            )
        )
        let vip = try #require(svc.spec.clusterIP)
        let agentDir = TempDir()
        let agent = try await RunningAgent(
            control: cp.url,
            dataDir: agentDir.path,
            join: try await cp.token(usages: 1)
        ) { $0.heartbeatIntervalSeconds = 0.2 }
        #expect(await MeshTestSupport.eventually { (try? await echo(vip, 7007, "hello")) == "hello" })

        // /status: this node, connected, the table from the control plane, its certificate.
        var status: JSONValue = .null
        #expect(
            await MeshTestSupport.eventually {
                status = (try? await self.json(agent, "/status"))?.1 ?? .null
                return status["control"]?["state"] == .string("connected")
                    && status["control"]?["table"] == .string("control")
            }
        )
        #expect(status["node"] == .string("edge-test"))
        #expect(status["site"] == .string("a"))
        #expect(status["version"] == .string(MeshRelease.version))
        #expect(status["interface"]?["mode"] == .string("loopback"))
        #expect(status["interface"]?["dns"] == .string("127.0.0.1:\(agent.dnsPort)"))
        #expect(status["certificate"]?["identity"] == .string("mesh://node/edge-test"))
        if case .int(let left) = status["certificate"]?["expiresInSeconds"] ?? .null {
            #expect(left > 0)
        } else {
            Issue.record("no certificate expiry in \(status)")
        }

        // /route: both endpoints, local path; the counters move with traffic.
        let (_, before, _) = try await self.json(agent, "/route?name=echo.shop")
        let endpoints = items(before?["endpoints"])
        #expect(endpoints.count == 2)
        #expect(endpoints.allSatisfy { $0["path"] == .string("local") && $0["node"] == .string("edge-test") })
        let total = { (v: JSONValue?) in items(v?["endpoints"]).map { $0["total"]?.intValue ?? 0 }.reduce(0, +) }
        let bytesIn = { (v: JSONValue?) in items(v?["ports"]).first?["bytesIn"]?.intValue ?? 0 }
        for i in 0..<3 { #expect(try await echo(vip, 7007, "request \(i)") == "request \(i)") }
        let (_, after, _) = try await self.json(agent, "/route?name=echo.shop.svc.cluster.local.")
        #expect(total(after) >= total(before) + 3)
        #expect(bytesIn(after) > bytesIn(before))
        // Per endpoint, the bytes of the connections that ended: 3 requests of 9 bytes each way, at least.
        let endpointBytes = { (v: JSONValue?, field: String) in
            items(v?["endpoints"]).map { $0[field]?.intValue ?? 0 }.reduce(0, +)
        }
        var ended: JSONValue?
        #expect(
            await MeshTestSupport.eventually {
                ended = (try? await self.json(agent, "/route?name=echo.shop"))?.1
                return endpointBytes(ended, "bytesIn") >= endpointBytes(before, "bytesIn") + 27
                    && endpointBytes(ended, "bytesOut") >= endpointBytes(before, "bytesOut") + 27
            },
            "\(ended.map { "\($0)" } ?? "no answer")"
        )

        // --key: the pick for a client address is the endpoint that address's connections actually get.
        let (_, keyed, _) = try await self.json(agent, "/route?name=echo.shop&key=127.0.0.1")
        let pick = items(keyed?["picks"]).first
        let chosen = try #require(pick?["backend"]?.stringValue)
        #expect([one.port, two.port].map { "127.0.0.1:\($0)" }.contains(chosen))
        let chosenPort = Int(chosen.split(separator: ":").last!)!
        let perEndpoint = { (v: JSONValue?) -> [String: Int] in
            Dictionary(
                items(v?["endpoints"]).map { ($0["address"]?.stringValue ?? "", $0["total"]?.intValue ?? 0) },
                uniquingKeysWith: +
            )
        }
        let countsBefore = perEndpoint(keyed)
        #expect(try await echo(vip, 7007, "keyed") == "keyed")  // from 127.0.0.1
        let (_, keyedAfter, _) = try await self.json(agent, "/route?name=echo.shop")
        #expect(
            perEndpoint(keyedAfter)["127.0.0.1:\(chosenPort)"] == (countsBefore["127.0.0.1:\(chosenPort)"] ?? 0) + 1
        )
        let (badKey, _, badKeyText) = try await self.json(agent, "/route?name=echo.shop&key=not-an-ip")
        #expect(badKey == .badRequest && badKeyText.contains("IP address"))

        // Names that are not services, or not in the table.
        let (missing, _, missingText) = try await self.json(agent, "/route?name=nope.shop")
        #expect(missing == .notFound && missingText.contains("nope.shop"))
        let (bad, _, badText) = try await self.json(agent, "/route?name=just-a-name")
        #expect(bad == .badRequest && badText.contains("NAME.NAMESPACE"))

        // /dns: the mesh zone answers the service's name with its VIP.
        let (_, answer, _) = try await self.json(agent, "/dns?name=echo.shop.svc.cluster.local&type=A")
        #expect(answer?["source"] == .string("zone"))
        #expect(items(answer?["answers"]).contains { $0.stringValue?.hasSuffix("IN A \(vip)") == true })
        let (badType, _, _) = try await self.json(agent, "/dns?name=echo.shop.svc.cluster.local&type=BOGUS")
        #expect(badType == .badRequest)

        // The control plane goes away: the status says offline, since when, and the table still serves.
        try await cp.stop()
        #expect(
            await MeshTestSupport.eventually(timeout: .seconds(20)) {
                let s = (try? await self.json(agent, "/status"))?.1
                return s?["control"]?["state"] == .string("offline")
                    && s?["control"]?["offlineSince"]?.stringValue != nil
            }
        )
        try await agent.stop()
        await one.close()
        await two.close()
    }
}

private func items(_ v: JSONValue?) -> [JSONValue] {
    if case .array(let a) = v ?? .null { return a }
    return []
}

extension JSONValue {
    fileprivate var intValue: Int? {
        if case .int(let n) = self { return Int(n) }
        return nil
    }
    fileprivate var stringValue: String? {
        if case .string(let s) = self { return s }
        return nil
    }
}
