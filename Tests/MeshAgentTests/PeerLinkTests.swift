import MeshCore
import MeshIdentity
import MeshTestSupport
import MeshWire
import NIOCore
import NIOPosix
import Relay
import Testing

@testable import MeshAgent

/// Two nodes' peer links on loopback, with one test CA: node b serves the endpoints (its link manager checks
/// streams against its table, as the agent does), node a's data plane reaches them over the link.
private struct TwoNodes {
    let a: LinkManager
    let b: LinkManager
    let listener: LinkListener
    let table: CurrentTable

    static func make() async throws -> TwoNodes {
        let ca = try CertificateAuthority.create()
        func tls(_ node: String) throws -> MeshLinkTLS { try MeshLinkTLS(node: node, issuedBy: ca) }
        let table = CurrentTable()
        let b = LinkManager(
            tls: try tls("b"),
            group: testGroup,
            resolve: { _ in [] },
            check: { target, peer in PeerDirectory.check(target, from: peer, localNode: "b", in: table.value) }
        )
        let listener = LinkListener(manager: b, address: try SocketAddress(ipAddress: "127.0.0.1", port: 0))
        let address = try await listener.bind()
        let a = LinkManager(
            tls: try tls("a"),
            group: testGroup,
            resolve: { node in node == "b" ? [address] : [] },
            check: { _, _ in StreamRefusal(.notLocalEndpoint, "a serves nothing") }
        )
        return TwoNodes(a: a, b: b, listener: listener, table: table)
    }

    /// Node b's table: `services` each with its one endpoint served by b.
    func serve(_ services: [(name: String, server: TestServer, proto: PortProtocol)]) {
        var snapshot = ServiceSnapshot()
        for s in services {
            let key = service(s.name)
            snapshot.services[key] = TableService(
                MeshService(
                    metadata: ObjectMeta(name: key.name, namespace: key.namespace),
                    spec: ServiceSpec(ports: [ServicePort(port: 8080, protocol: s.proto)])
                )
            )
            snapshot.endpoints[key] = TableEndpoints(
                Endpoints(
                    metadata: ObjectMeta(name: key.name, namespace: key.namespace),
                    spec: EndpointsSpec(addresses: [
                        EndpointAddress(
                            ip: s.server.ip.description,
                            ports: [EndpointPort(port: s.server.port)],
                            node: "b"
                        )
                    ])
                )
            )
        }
        self.table.set(snapshot)
    }

    func stop() async {
        try? await self.listener.close()
        await self.a.shutdown()
        await self.b.shutdown()
    }
}

/// A backend of node b at site b, reached over the link to b.
private func remote(_ server: TestServer) -> Backend {
    Backend(ip: server.ip, port: server.port, node: "b", site: "b", reach: .peer("b"))
}

@Suite("Peer links in the data plane: TCP, HTTP and UDP to a node of another site", .timeLimit(.minutes(1)), .rationed)
struct PeerLinkDataPlaneTests {
    @Test("TCP: the client socket is spliced to a stream; bytes and half-close both ways; /peers counts them")
    func tcpOverALink() async throws {
        let nodes = try await TwoNodes.make()
        let echo = try await TestServers.echo()
        nodes.serve([("echo", echo, .tcp)])
        let dataPlane = DataPlane(
            configuration: testConfiguration(),
            eventLoopGroup: testGroup,
            logger: testLogger,
            peers: LinkPeerStreams(links: nodes.a)
        )
        let vip = TestAddresses.vip()
        try await dataPlane.apply(
            RouteTable(routes: [Route(service: service("echo"), vip: vip, port: 8080, backends: [remote(echo)])])
        )
        let payload = String(repeating: "0123456789", count: 20_000)
        let reply = try await TestClient.exchange(TestClient.vipAddress(vip, 8080), send: payload, halfClose: true)
        #expect(String(buffer: reply) == payload)
        let rows = await nodes.a.stats()
        #expect(rows.count == 1)
        #expect(rows.first?.node == "b" && rows.first?.path == "direct")
        #expect((rows.first?.bytesSent ?? 0) >= UInt64(payload.utf8.count))
        #expect((rows.first?.bytesReceived ?? 0) >= UInt64(payload.utf8.count))
        // The route and the endpoint count the spliced connection's bytes when it ends, and it is no longer
        // active then.
        let route = { dataPlane.snapshot().routes.first }
        #expect(
            await eventually {
                route()?.backends.first?.bytesSent == payload.utf8.count
                    && route()?.backends.first?.bytesReceived == payload.utf8.count
            }
        )
        #expect(route()?.bytesIn == payload.utf8.count && route()?.bytesOut == payload.utf8.count)
        #expect(await eventually { route()?.activeConnections == 0 && route()?.backends.first?.active == 0 })
        #expect(route()?.backends.first?.total == 1 && route()?.backends.first?.failures == 0)
        await dataPlane.shutdown(drain: false)
        await echo.close()
        await nodes.stop()
    }

    @Test("TCP: a stream the peer refuses (not its endpoint) closes the client and counts a connect failure")
    func tcpRefused() async throws {
        let nodes = try await TwoNodes.make()
        let echo = try await TestServers.echo()
        nodes.serve([])  // b serves nothing
        let dataPlane = DataPlane(
            configuration: testConfiguration(),
            eventLoopGroup: testGroup,
            logger: testLogger,
            peers: LinkPeerStreams(links: nodes.a)
        )
        let vip = TestAddresses.vip()
        try await dataPlane.apply(
            RouteTable(routes: [Route(service: service("echo"), vip: vip, port: 8080, backends: [remote(echo)])])
        )
        // Closed with "hello" unread: an empty read or a reset, never an answer.
        let reply = try? await TestClient.exchange(TestClient.vipAddress(vip, 8080), send: "hello", halfClose: true)
        #expect((reply?.readableBytes ?? 0) == 0)
        #expect(nodes.a.refusedReceived[StreamRefusal.Code.unknownService.rawValue] == 1)
        #expect(nodes.b.refusedSent[StreamRefusal.Code.unknownService.rawValue] == 1)
        let route = try #require(dataPlane.snapshot().routes.first)
        #expect(route.backends.first?.failures ?? 0 >= 1)
        await dataPlane.shutdown(drain: false)
        await echo.close()
        await nodes.stop()
    }

    @Test(
        "HTTP: requests to a remote backend go over the link, kept alive across requests",
        arguments: HTTPEngine.allCases
    )
    func httpOverALink(engine: HTTPEngine) async throws {
        try await TestEngine.$current.withValue(engine) { try await self.httpOverALink() }
    }

    private func httpOverALink() async throws {
        let nodes = try await TwoNodes.make()
        let web = try await TestServers.http("web-b")
        nodes.serve([("web", web, .http)])
        let dataPlane = DataPlane(
            configuration: testConfiguration(),
            eventLoopGroup: testGroup,
            logger: testLogger,
            peers: LinkPeerStreams(links: nodes.a)
        )
        let vip = TestAddresses.vip()
        try await dataPlane.apply(httpRoute("web", vip, [remote(web)]))
        let address = TestClient.vipAddress(vip, 8080)
        try await TestHTTPConnection.with(address) { connection in
            for _ in 0..<3 {
                let response = try #require(try await connection.request(.GET, "/"))
                #expect(response.status == 200 && response.body == "web-b")
            }
        }
        let rows = await nodes.a.stats()
        #expect(rows.map(\.node) == ["b"])
        await dataPlane.shutdown(drain: false)
        await web.close()
        await nodes.stop()
    }

    @Test("HTTP: a refused stream is a 502 from the proxy, not a hang", arguments: HTTPEngine.allCases)
    func httpRefused(engine: HTTPEngine) async throws {
        try await TestEngine.$current.withValue(engine) { try await self.httpRefused() }
    }

    private func httpRefused() async throws {
        let nodes = try await TwoNodes.make()
        let web = try await TestServers.http("web-b")
        nodes.serve([])
        let dataPlane = DataPlane(
            configuration: testConfiguration(),
            eventLoopGroup: testGroup,
            logger: testLogger,
            peers: LinkPeerStreams(links: nodes.a)
        )
        let vip = TestAddresses.vip()
        try await dataPlane.apply(httpRoute("web", vip, [remote(web)]))
        let response = try #require(try await TestHTTPConnection.get(TestClient.vipAddress(vip, 8080), "/"))
        #expect(response.status == 502)
        await dataPlane.shutdown(drain: false)
        await web.close()
        await nodes.stop()
    }

    @Test("UDP: a flow's datagrams go over a stream and the answers come back from VIP:port")
    func udpOverALink() async throws {
        let nodes = try await TwoNodes.make()
        let echo = try await TestServers.udpEcho(name: "udp-b")
        nodes.serve([("dns", echo, .udp)])
        let dataPlane = DataPlane(
            configuration: testConfiguration(),
            eventLoopGroup: testGroup,
            logger: testLogger,
            peers: LinkPeerStreams(links: nodes.a)
        )
        let vip = TestAddresses.vip()
        try await dataPlane.apply(
            RouteTable(routes: [
                Route(service: service("dns"), vip: vip, port: 8080, proto: .udp, backends: [remote(echo)])
            ])
        )
        let target = TestClient.vipAddress(vip, 8080)
        let client = try await DatagramBootstrap(group: testGroup).bind(host: "127.0.0.1", port: 0) { channel in
            channel.eventLoop.makeCompletedFuture {
                try NIOAsyncChannel<AddressedEnvelope<ByteBuffer>, AddressedEnvelope<ByteBuffer>>(
                    wrappingChannelSynchronously: channel
                )
            }
        }
        let raw = client.channel
        let closer = raw.eventLoop.scheduleTask(in: .seconds(20)) { raw.close(promise: nil) }
        let replies = try await client.executeThenClose { inbound, outbound in
            var iterator = inbound.makeAsyncIterator()
            var replies: [(String, SocketAddress)] = []
            for text in ["one", "", String(repeating: "x", count: 1200)] {
                try await outbound.write(AddressedEnvelope(remoteAddress: target, data: ByteBuffer(string: text)))
                guard let reply = try await iterator.next() else { break }
                replies.append((String(buffer: reply.data), reply.remoteAddress))
            }
            return replies
        }
        closer.cancel()
        #expect(replies.map(\.0).count == 3)
        #expect(replies.allSatisfy { $0.1 == target })
        #expect(replies.first?.0.hasSuffix("one") == true)
        await dataPlane.shutdown(drain: false)
        await echo.close()
        await nodes.stop()
    }
}

@Suite("How an endpoint is reached (Reach), from its node and site; where a peer's link is dialed", .rationed)
struct ReachMappingTests {
    func node(_ name: String, site: String?, linkPort: Int? = 7900, addresses: [NodeAddress] = []) -> Node {
        Node(metadata: ObjectMeta(name: name), spec: NodeSpec(site: site, addresses: addresses, linkPort: linkPort))
    }

    @Test func onlyANodeOfAnotherSiteGoesOverALink() {
        // The control plane gives each address its node's site (EndpointSites): the address says it all.
        func reach(_ n: String?, _ site: String?, localSite: String? = "a") -> Reach {
            AgentMapping.reach(
                of: EndpointAddress(ip: "10.0.0.5", ports: [EndpointPort(port: 80)], node: n, site: site),
                localNode: "a1",
                localSite: localSite
            )
        }
        #expect(reach("b", "b") == .peer("b"))
        #expect(reach("a2", "a") == .direct)  // same site: one LAN
        #expect(reach("a1", "b") == .direct)  // this node
        #expect(reach(nil, "b") == .direct)  // no node: nothing to link to
        #expect(reach("ghost", nil) == .direct)  // no site: a node the control plane does not know, or siteless
        // An agent without a site of its own (the all-in-one) dials everything directly.
        #expect(reach("b", "b", localSite: nil) == .direct)
    }

    @Test func theRouteTableCarriesReachAndKeepsSamePrivateAddressesOfTwoSitesApart() throws {
        var snapshot = ServiceSnapshot()
        let key = ServiceKey(namespace: "shop", name: "web")
        snapshot.services[key] = TableService(
            MeshService(
                metadata: ObjectMeta(name: "web", namespace: "shop"),
                spec: ServiceSpec(ports: [ServicePort(port: 80, protocol: .http)], clusterIP: "10.96.0.10")
            )
        )
        snapshot.endpoints[key] = TableEndpoints(
            Endpoints(
                metadata: ObjectMeta(name: "web", namespace: "shop"),
                spec: EndpointsSpec(addresses: [
                    EndpointAddress(ip: "10.0.0.5", ports: [EndpointPort(port: 80)], node: "b", site: "b"),
                    EndpointAddress(ip: "10.0.0.5", ports: [EndpointPort(port: 80)], node: "c", site: "c"),
                    EndpointAddress(ip: "10.0.0.7", ports: [EndpointPort(port: 80)], node: "a1", site: "a"),
                ])
            )
        )
        let table = AgentMapping.routeTable(snapshot, localSite: "a", localNode: "a1")
        let backends = try #require(table.routes.first?.backends)
        #expect(backends.map(\.reach) == [.peer("b"), .peer("c"), .direct])
        #expect(backends.map(\.site) == ["b", "c", "a"])
        // A peer that dialed in, never looked up: its site as its endpoints give it, for /peers.
        #expect(PeerDirectory.site(of: "c", in: snapshot) == "c")
        #expect(PeerDirectory.site(of: "ghost", in: snapshot) == nil)
        #expect(Set(backends.map(\.id)).count == 3)
        #expect(backends[0].id.description == "10.0.0.5:80 via b")
    }

    @Test func linkAddressesComeFromTheNodeInternalFirstAndNeedALinkPort() {
        let b = node(
            "b",
            site: "b",
            linkPort: 7901,
            addresses: [
                NodeAddress(type: .externalIP, address: "198.18.0.20"),
                NodeAddress(type: .internalIP, address: "10.1.0.2"),
                NodeAddress(type: .hostname, address: "b.example"),
            ]
        )
        let r = node(
            "r",
            site: "r",
            linkPort: nil,
            addresses: [.init(type: .externalIP, address: "198.18.0.30")]
        )
        #expect(
            PeerDirectory.linkAddresses(of: b).map { "\($0.ipAddress!):\($0.port!)" } == [
                "10.1.0.2:7901", "198.18.0.20:7901",
            ]
        )
        #expect(PeerDirectory.linkAddresses(of: r).isEmpty)
    }

    @Test func aStreamIsAcceptedOnlyForAnEndpointThisNodeServes() throws {
        var snapshot = ServiceSnapshot()
        let key = ServiceKey(namespace: "shop", name: "web")
        snapshot.services[key] = TableService(
            MeshService(
                metadata: ObjectMeta(name: "web", namespace: "shop"),
                spec: ServiceSpec(ports: [ServicePort(port: 80)])
            )
        )
        snapshot.endpoints[key] = TableEndpoints(
            Endpoints(
                metadata: ObjectMeta(name: "web", namespace: "shop"),
                spec: EndpointsSpec(addresses: [
                    EndpointAddress(ip: "10.0.0.5", ports: [EndpointPort(port: 8080)], node: "b"),
                    EndpointAddress(ip: "10.0.0.6", ports: [EndpointPort(port: 8080)], node: "c"),
                ])
            )
        )
        func target(_ ip: String, _ port: UInt16, service: String = "web") -> StreamTarget {
            StreamTarget(
                namespace: "shop",
                service: service,
                servicePort: 80,
                endpoint: WireIPAddress(IPAddress(ip)!),
                endpointPort: port,
                transport: .tcp
            )
        }
        #expect(PeerDirectory.check(target("10.0.0.5", 8080), from: "a", localNode: "b", in: snapshot) == nil)
        #expect(
            PeerDirectory.check(target("10.0.0.6", 8080), from: "a", localNode: "b", in: snapshot)?.code
                == .notLocalEndpoint
        )
        #expect(
            PeerDirectory.check(target("10.0.0.5", 22), from: "a", localNode: "b", in: snapshot)?.code
                == .notLocalEndpoint
        )
        #expect(
            PeerDirectory.check(target("10.0.0.5", 8080, service: "db"), from: "a", localNode: "b", in: snapshot)?
                .code == .unknownService
        )
        #expect(WireIPAddress(IPAddress("2001:db8::1")!).ipAddress == IPAddress("2001:db8::1"))
    }
}
