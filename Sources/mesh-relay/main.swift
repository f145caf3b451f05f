import ArgumentParser
import Logging
import MeshCore
import MeshHTTP
import MeshNIO
import Relay

@main
struct MeshRelay: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mesh-relay",
        abstract: "The mesh's relay: tells peers their public address (STUN binding, RFC 8489).",
        discussion: """
            Answers STUN Binding requests over UDP and TCP (default 127.0.0.1:3478; RFC 5389/8489 clients get \
            XOR-MAPPED-ADDRESS, RFC 3489 clients MAPPED-ADDRESS) and serves /metrics, /healthz and /readyz on \
            the admin address (default 127.0.0.1:7801). With --server it enrols with a relay token \
            (meshctl token create --relay NAME; identity mesh://relay/NAME) and publishes its Relay, with \
            the --advertise addresses of its relay sessions. Relayed circuits and hole-punch coordination \
            come later. Settings come from --config (YAML; every field has a default) and flags override them. \
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

    @Option(name: .long, help: "The control plane, https://IP:7700: enrol and publish this relay's Relay.")
    var server: String?

    @Option(name: .customLong("join-token"), help: "A relay token (meshctl token create --relay NAME), used once.")
    var joinToken: String?

    @Option(name: .customLong("ca-cert-hash"), help: "sha256:HEX of the control plane's CA (printed with the token).")
    var caCertHash: String?

    @Option(name: .long, help: "The relay's name; its identity is mesh://relay/NAME (default: the host name).")
    var name: String?

    @Option(name: .long, help: "The site it runs at.")
    var site: String?

    @Option(name: .long, help: "Relay sessions, host:port (default 127.0.0.1:7800).")
    var listen: String?

    @Option(name: .long, help: "Where agents reach --listen, IP:port; repeat for several (default: --listen).")
    var advertise: [String] = []

    @Option(name: .customLong("data-dir"), help: "Where its key and certificate are kept (pki/).")
    var dataDir: String?

    func run() async throws {
        // One event loop per CPU the relay may run on, set before any NIO singleton is used.
        EventLoopThreads.fitToAffinity()
        var settings: RelayConfig
        do {
            settings = try ConfigFile.load(RelayConfig.self, path: self.config)
            if !self.stunListen.isEmpty { settings.stunListen = self.stunListen }
            if let v = self.stunTCP { settings.stunTCP = v }
            if let v = self.adminListen { settings.adminListen = v }
            if let v = self.logLevel { settings.logLevel = v }
            if let v = self.server { settings.controlServer = v }
            if let v = self.joinToken { settings.joinToken = v }
            if let v = self.caCertHash { settings.caCertHash = v }
            if let v = self.name { settings.name = v }
            if let v = self.site { settings.site = v }
            if let v = self.listen { settings.listen = v }
            if !self.advertise.isEmpty { settings.advertise = self.advertise }
            if let v = self.dataDir { settings.dataDir = v }
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
