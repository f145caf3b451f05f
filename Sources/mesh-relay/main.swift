import ArgumentParser
import Logging
import MeshCore
import MeshHTTP
import Relay

@main
struct MeshRelay: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mesh-relay",
        abstract: "The mesh's relay: tells peers their public address (STUN binding, RFC 8489).",
        discussion: """
            Answers STUN Binding requests over UDP and TCP (default 127.0.0.1:3478; RFC 5389/8489 clients get \
            XOR-MAPPED-ADDRESS, RFC 3489 clients MAPPED-ADDRESS) and serves /metrics, /healthz and /readyz on \
            the admin address (default 127.0.0.1:7801). Relayed circuits and hole-punch coordination come \
            later. Settings come from --config (YAML; every field has a default) and flags override them. \
            SIGTERM or SIGINT stops it and it exits 0.
            """,
        version: "0.1.0"
    )

    @Option(name: .long, help: "YAML config file (fields: stunListen, stunTCP, software, adminListen, ...).")
    var config: String?

    @Option(name: .customLong("stun-listen"), help: "STUN address, host:port or [v6]:port; repeat for several.")
    var stunListen: [String] = []

    @Flag(inversion: .prefixedNo, help: "Serve STUN over TCP too.")
    var stunTCP: Bool?

    @Option(name: .long, help: "Admin address (/metrics, /healthz, /readyz), host:port.")
    var adminListen: String?

    @Option(name: .long, help: "trace, debug, info, notice, warning, error or critical.")
    var logLevel: String?

    func run() async throws {
        var settings: RelayConfig
        do {
            settings = try ConfigFile.load(RelayConfig.self, path: self.config)
            if !self.stunListen.isEmpty { settings.stunListen = self.stunListen }
            if let v = self.stunTCP { settings.stunTCP = v }
            if let v = self.adminListen { settings.adminListen = v }
            if let v = self.logLevel { settings.logLevel = v }
            try settings.validate()
        } catch let e as ManifestError {
            throw ArgumentParser.ValidationError(e.message)
        }
        MeshLogging.bootstrap(level: try LogLevels.parse(settings.logLevel))
        let logger = Logger(label: "mesh-relay")
        let relay = RelayServer(config: settings, logger: logger)
        if !(await Daemon.run([relay], name: "mesh-relay", logger: logger)) { throw ExitCode.failure }
    }
}
