import CoreMetrics
import MeshCore
import MeshTestSupport
import NIOCore
import Testing

@testable import MeshAgent

/// `/routes` encodes its routes one at a time (`AdminAPI.streamedRoutes`): the same document as encoding it whole.
@Suite(.rationed) struct AdminRoutesTests {
    static func route(_ name: String, port: Int, backends: Int) throws -> Route {
        Route(
            service: ServiceKey(namespace: "shop", name: name),
            vip: try #require(IPAddress("127.77.0.\(port % 200 + 1)")),
            port: port,
            proto: .http,
            policy: .roundRobin,
            backends: (0..<backends).map { i in
                Backend(ip: .v4(0xC612_0000 | UInt32(i + 1)), port: 8080, node: "n\(i)", site: "a")
            }
        )
    }

    @Test(arguments: [0, 1, 3])
    func theStreamedDocumentIsTheWholeOne(routes count: Int) throws {
        let routes = try (0..<count).map {
            RouteHandle(
                route: try Self.route("s\($0)", port: 80 + $0, backends: 3),
                settings: RouteSettings(localSite: "a", outlier: .init(), metricsFactory: NOOPMetricsHandler.instance)
            )
            .snapshot(listening: true, error: nil)
        }
        let table = AdminAPI.Routes.Table(source: "control", services: count, routes: count, versions: "v", error: nil)
        let whole = try MeshJSON.encode(
            AdminAPI.Routes(
                node: "a1",
                site: "a",
                table: table,
                dataPlane: DataPlaneSnapshot(mode: .loopback, openChannels: 2, routes: routes)
            )
        )
        let streamed = try AdminAPI.streamedRoutes(node: "a1", site: "a", table: table) { body in
            for r in routes { try body(r) }
            return DataPlaneSnapshot(mode: .loopback, openChannels: 2, routes: [])
        }
        #expect(String(buffer: streamed) == String(decoding: whole, as: UTF8.self))
    }
}
