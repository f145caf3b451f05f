import MeshCore
import MeshTestSupport
import Testing

@testable import MeshAgent

@Suite("The agent's memory settings (storeCacheKiB, mallocArenas)", .rationed)
struct FootprintConfigTests {
    @Test("by default: a 256 KiB SQLite cache per store, one malloc arena, an idle check every 5 s")
    func defaults() throws {
        let config = try ConfigFile.decode(AgentConfig.self, yaml: "")
        #expect(config.storeCacheKiB == 256)
        #expect(config.mallocArenas == 1)
        #expect(config.idleTrimSeconds == 5)
        try config.validate()
    }

    @Test("all three are read from the config file")
    func decoded() throws {
        let config = try ConfigFile.decode(
            AgentConfig.self,
            yaml: "storeCacheKiB: 2000\nmallocArenas: 0\nidleTrimSeconds: 0\n"
        )
        #expect(config.storeCacheKiB == 2000)
        #expect(config.mallocArenas == 0)
        #expect(config.idleTrimSeconds == 0)
        try config.validate()
    }

    @Test(
        "out of range: refused with an error naming the field and the value",
        arguments: [
            ("storeCacheKiB", 15), ("storeCacheKiB", 1_048_577), ("mallocArenas", -1), ("mallocArenas", 65),
            ("idleTrimSeconds", -1), ("idleTrimSeconds", 3601),
        ]
    )
    func outOfRange(field: String, value: Int) throws {
        let config = try ConfigFile.decode(AgentConfig.self, yaml: "\(field): \(value)\n")
        let error = #expect(throws: ManifestError.self) { try config.validate() }
        #expect(error?.message.hasPrefix("\(field):") == true)
        #expect(error?.message.contains("\(value)") == true)
    }

    @Test("not a number: refused when the file is read")
    func notANumber() {
        #expect(throws: (any Error).self) { try ConfigFile.decode(AgentConfig.self, yaml: "storeCacheKiB: big\n") }
        #expect(throws: (any Error).self) { try ConfigFile.decode(AgentConfig.self, yaml: "mallocArenas: many\n") }
        #expect(throws: (any Error).self) { try ConfigFile.decode(AgentConfig.self, yaml: "idleTrimSeconds: 5s\n") }
    }

    @Test("the cache size reaches agent.db; without it SQLite's default (2000 KiB) (edge.db: EdgeStoreCacheTests)")
    func agentCacheTakesTheCacheSize() throws {
        let dir = TempDir("footprint")
        let cache = try AgentCache(path: dir.path + "/agent.db", cacheKiB: 300)
        #expect(try cache.db.query("PRAGMA cache_size").first?[0].int == -300)
        let plain = try AgentCache(path: dir.path + "/plain.db")
        #expect(try plain.db.query("PRAGMA cache_size").first?[0].int == -2000)
    }

    @Test("mallocArenas 0 leaves glibc's default alone")
    func zeroArenasIsANoOp() {
        #expect(AgentProcessMemory.limitMallocArenas(0) == false)
    }

    @Test("dropping clean file pages unmaps code and read-only data, which fault back in when used")
    func dropCleanFilePages() throws {
        let before = AgentProcessMemory.residentFilePages()
        #expect(before > 0)
        let dropped = AgentProcessMemory.dropCleanFilePages()
        #expect(dropped > 0)
        #expect(AgentProcessMemory.residentFilePages() < before)
        // Code and data dropped just now run and read as before (a decode, a validation, a SQLite file).
        let config = try ConfigFile.decode(AgentConfig.self, yaml: "storeCacheKiB: 512\n")
        try config.validate()
        #expect(config.storeCacheKiB == 512)
        let dir = TempDir("footprint")
        let cache = try AgentCache(path: dir.path + "/agent.db", cacheKiB: 64)
        #expect(try cache.db.query("PRAGMA cache_size").first?[0].int == -64)
    }
}
