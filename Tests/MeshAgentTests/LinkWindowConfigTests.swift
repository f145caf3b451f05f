import MeshCore
import MeshTestSupport
import Relay
import Testing

@testable import MeshAgent

@Suite("The agent's peer-link stream window (linkStreamWindowKiB)", .rationed)
struct LinkWindowConfigTests {
    @Test("by default the links use yamux's 256 KiB window")
    func defaultWindow() throws {
        let config = try ConfigFile.decode(AgentConfig.self, yaml: "")
        #expect(config.linkStreamWindowKiB == 256)
        try config.validate()
        #expect(config.linkConfiguration().mux.receiveWindow == 256 * 1024)
        #expect(config.linkConfiguration().mux.receiveWindow == YamuxDefaults.initialWindow)
    }

    @Test("a window set in the config file becomes the mux receive window of every link")
    func configuredWindow() throws {
        let config = try ConfigFile.decode(AgentConfig.self, yaml: "linkStreamWindowKiB: 1024\n")
        try config.validate()
        let links = config.linkConfiguration()
        #expect(links.mux.receiveWindow == 1024 * 1024)
        // Only the window changes: the other link settings keep their defaults.
        let defaults = LinkConfiguration()
        #expect(links.mux.maxStreams == defaults.mux.maxStreams)
        #expect(links.mux.maxFrameSize == defaults.mux.maxFrameSize)
        #expect(links.idleTimeout == defaults.idleTimeout)
        #expect(links.relayDelay == defaults.relayDelay)
    }

    @Test("windows from 256 KiB to 16 MiB are accepted", arguments: [256, 4096, 16384])
    func bounds(kib: Int) throws {
        var config = AgentConfig()
        config.linkStreamWindowKiB = kib
        try config.validate()
        #expect(config.linkConfiguration().mux.receiveWindow == UInt32(kib * 1024))
    }

    @Test(
        "a window below yamux's or above 16 MiB is refused with an error naming the field",
        arguments: [0, 255, -1, 16385]
    )
    func outOfRange(kib: Int) throws {
        var config = AgentConfig()
        config.linkStreamWindowKiB = kib
        let error = #expect(throws: ManifestError.self) { try config.validate() }
        #expect(error?.message.hasPrefix("linkStreamWindowKiB:") == true)
        #expect(error?.message.contains("\(kib)") == true)
    }

    @Test("a window that is not a number is refused when the file is read")
    func notANumber() {
        #expect(throws: (any Error).self) {
            try ConfigFile.decode(AgentConfig.self, yaml: "linkStreamWindowKiB: big\n")
        }
    }
}
