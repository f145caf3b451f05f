import MeshCore
import MeshTestSupport
import NIOCore
import Relay
import Testing

@testable import MeshAgent

@Suite("The agent's hole-punching settings (punch, punchKeepaliveSeconds, punchRetrySeconds)", .rationed)
struct PunchSettingsTests {
    static let noEnvironment: @Sendable (String) -> String? = { _ in nil }

    @Test("by default punching is on, punched links are pinged every 25 s, retries back off 1-10-30-60-120 s")
    func defaults() throws {
        let config = try ConfigFile.decode(AgentConfig.self, yaml: "")
        try config.validate()
        let p = config.punchConfiguration(linkPort: 7900, environment: Self.noEnvironment)
        #expect(p.enabled)
        #expect(p.linkPort == 7900)
        #expect(p.keepaliveInterval == .seconds(25))
        #expect(p.retryBackoff == [.seconds(1), .seconds(10), .seconds(30), .seconds(60), .seconds(120)])
        // The same as the coordinator's own defaults.
        let own = PunchConfiguration()
        #expect(p.keepaliveInterval == own.keepaliveInterval && p.retryBackoff == own.retryBackoff)
    }

    @Test("the config file's values become the coordinator's")
    func fromTheFile() throws {
        let config = try ConfigFile.decode(
            AgentConfig.self,
            yaml: "punch: false\npunchKeepaliveSeconds: 1.5\npunchRetrySeconds: [2, 5]\n"
        )
        try config.validate()
        let p = config.punchConfiguration(linkPort: 7901, environment: Self.noEnvironment)
        #expect(!p.enabled)
        #expect(p.keepaliveInterval == .milliseconds(1500))
        #expect(p.retryBackoff == [.seconds(2), .seconds(5)])
        // Everything else keeps its default.
        #expect(p.stagger == PunchConfiguration().stagger)
        #expect(p.keepaliveTimeout == PunchConfiguration().keepaliveTimeout)
    }

    @Test("the environment variables still override the file")
    func environmentOverrides() throws {
        let config = try ConfigFile.decode(AgentConfig.self, yaml: "punchKeepaliveSeconds: 30\n")
        let env: [String: String] = [
            "MESH_PUNCH_OFF": "1", "MESH_PUNCH_KEEPALIVE_SECONDS": "1", "MESH_PUNCH_RETRY_SECONDS": "0.5",
        ]
        let p = config.punchConfiguration(linkPort: 7900) { env[$0] }
        #expect(!p.enabled)
        #expect(p.keepaliveInterval == .seconds(1))
        #expect(p.retryBackoff == [.milliseconds(500)])
        // An unreadable override is ignored, not a zero.
        let q = config.punchConfiguration(linkPort: 7900) { $0 == "MESH_PUNCH_KEEPALIVE_SECONDS" ? "soon" : nil }
        #expect(q.keepaliveInterval == .seconds(30))
        #expect(q.enabled)
    }

    @Test(
        "out-of-range values are refused with an error naming the field",
        arguments: [
            ("punchKeepaliveSeconds: 0\n", "punchKeepaliveSeconds:"),
            ("punchKeepaliveSeconds: 601\n", "punchKeepaliveSeconds:"),
            ("punchKeepaliveSeconds: -3\n", "punchKeepaliveSeconds:"),
            ("punchRetrySeconds: []\n", "punchRetrySeconds:"),
            ("punchRetrySeconds: [1, 0]\n", "punchRetrySeconds[1]:"),
        ]
    )
    func refused(yaml: String, field: String) throws {
        let config = try ConfigFile.decode(AgentConfig.self, yaml: yaml)
        let error = #expect(throws: ManifestError.self) { try config.validate() }
        #expect(error?.message.hasPrefix(field) == true, "\(error?.message ?? "-")")
    }

    @Test(
        "a value of the wrong type is refused when the file is read",
        arguments: ["punch: maybe\n", "punchKeepaliveSeconds: often\n", "punchRetrySeconds: 5\n"]
    )
    func wrongType(yaml: String) {
        #expect(throws: (any Error).self) { try ConfigFile.decode(AgentConfig.self, yaml: yaml) }
    }
}
