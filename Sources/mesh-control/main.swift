import ArgumentParser
import Control
import Logging
import MeshCore
import MeshHTTP

@main
struct MeshControl: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mesh-control",
        abstract: "The mesh's control plane: stores services, endpoints and nodes, and streams changes to agents.",
        discussion: """
            Serves the Kubernetes-style API of docs/API.md (default https://127.0.0.1:7700, TLS 1.3 with client \
            certificates) over an embedded SQLite store, or with --store etcd over an etcd cluster that several replicas share. On first start it creates the mesh CA in <data-dir>/pki, \
            its serving certificate and an admin certificate for meshctl (<data-dir>/admin.meshconfig). Settings come from --config (YAML; every field has a default) and flags override them. \
            SIGTERM or SIGINT drains requests and exits 0.
            """,
        version: ControlAPI.version
    )

    @Option(name: .long, help: "YAML config file (fields: listen, dataDir, serviceCIDRs, historyLimit, ...).")
    var config: String?

    @Option(name: .long, help: "API address, host:port.")
    var listen: String?

    @Option(name: .long, help: "Directory of the store (control.db).")
    var dataDir: String?

    @Option(name: .customLong("service-cidr"), help: "VIP range; repeat for IPv4 and IPv6.")
    var serviceCIDRs: [String] = []

    @Option(name: .customLong("cert-san"), help: "Extra name or IP in the API's certificate; repeat for more.")
    var certSANs: [String] = []

    @Option(name: .long, help: "trace, debug, info, notice, warning, error or critical.")
    var logLevel: String?

    @Option(name: .long, help: "sqlite (control.db in the data directory) or etcd (replicas over one etcd cluster).")
    var store: String?

    @Option(name: .long, help: "etcd members, comma-separated URLs (http://127.0.0.1:2379,...), with --store etcd.")
    var etcdEndpoints: String?

    @Option(name: .long, help: "Key prefix of this mesh in etcd (default /mesh/); its replicas share it.")
    var etcdPrefix: String?

    @Option(name: .long, help: "This replica's name among the others (default: host name and listen address).")
    var replicaName: String?

    func run() async throws {
        var settings: ControlConfig
        do {
            settings = try ConfigFile.load(ControlConfig.self, path: self.config)
            if let v = self.listen { settings.listen = v }
            if let v = self.dataDir { settings.dataDir = v }
            if !self.serviceCIDRs.isEmpty { settings.serviceCIDRs = self.serviceCIDRs }
            if !self.certSANs.isEmpty { settings.certSANs = self.certSANs }
            if let v = self.logLevel { settings.logLevel = v }
            if let v = self.store { settings.store = v }
            if let v = self.etcdEndpoints {
                settings.etcdEndpoints = v.split(separator: ",").map { String($0.trimmingPrefix(" ")) }
            }
            if let v = self.etcdPrefix { settings.etcdPrefix = v }
            if let v = self.replicaName { settings.replicaName = v }
            try settings.validate()
        } catch let e as ManifestError {
            throw ArgumentParser.ValidationError(e.message)
        }
        MeshLogging.bootstrap(level: try LogLevels.parse(settings.logLevel))
        let logger = Logger(label: "mesh-control")
        let server = ControlServer(config: settings, logger: logger)
        if !(await Daemon.run([server], name: "mesh-control", logger: logger)) { throw ExitCode.failure }
    }
}
