import Logging
import MeshClient
import MeshHTTP
import MeshTestSupport
import NodeAgent
import Testing

/// edge.db's SQLite page cache (EdgeConfiguration.storeCacheKiB, from the agent's storeCacheKiB).
@Suite(.rationed) struct EdgeStoreCacheTests {
    @Test func theStoreTakesTheCacheSizeAndKeepsSQLitesDefaultWithoutOne() throws {
        let dir = TempDir("edge-cache")
        #expect(try EdgeStore(path: dir.path + "/small.db", durability: .normal, cacheKiB: 300).cacheKiB == 300)
        #expect(try EdgeStore(path: dir.path + "/default.db", durability: .normal).cacheKiB == 2000)
        // The setting is the connection's, not the file's: reopened without one, SQLite's default again.
        #expect(try EdgeStore(path: dir.path + "/small.db", durability: .normal).cacheKiB == 2000)
    }

    @Test func edgeServicesOpenEdgeDbWithTheConfiguredCache() throws {
        let dir = TempDir("edge-cache")
        var config = EdgeConfiguration(nodeName: "cache-1", dataDir: dir.path)
        #expect(config.storeCacheKiB == nil)
        config.storeCacheKiB = 128
        let edge = try EdgeServices(
            configuration: config,
            client: ControlClient(endpoint: HTTPEndpoint(host: "127.0.0.1", port: 1)),
            logger: Logger(label: "test")
        )
        #expect(edge.store.cacheKiB == 128)
    }
}
