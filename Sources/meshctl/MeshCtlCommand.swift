import ArgumentParser
import Foundation
import MeshClient
import MeshCore
import MeshCtl
import MeshHTTP

@main
struct MeshCtlCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "meshctl",
        abstract: "Run, inspect and change the edge mesh.",
        discussion: """
            Start an all-in-one mesh with `meshctl up`, then apply manifests and read them back:
              meshctl apply -f examples/
              meshctl get services -A
              meshctl watch endpoints -n shop
            The control plane is found at --server, $MESHCTL_SERVER, the meshconfig file's server, or \
            https://127.0.0.1:7700. Credentials (TLS client certificate, CA) come from the meshconfig file: \
            --meshconfig, $MESHCONFIG, ~/.config/edge-mesh/meshconfig.yaml (written by `meshctl up`), or the \
            admin.meshconfig of a control plane in the default data directory; flags override each file.
            Enrol a node: `meshctl token create` prints the mesh-agent command line that joins it.
            """,
        version: MeshRelease.version,
        subcommands: [
            Up.self, Apply.self, Get.self, Delete.self, Watch.self, Status.self, Route.self, Routes.self, Peers.self,
            Up.self, Apply.self, Get.self, Delete.self, Watch.self, Status.self, Route.self, Routes.self, Peers.self,
            Ping.self, DNSLookup.self, Trace.self, DashboardCommand.self, Twin.self, Logs.self, Token.self, Revoke.self,
            Version.self,
        ]
    )
}

struct ServerOptions: ParsableArguments {
    @Option(
        name: .long,
        help: "Control plane URL (default: $MESHCTL_SERVER, the meshconfig's, or https://127.0.0.1:7700)."
    )
    var server: String?

    @Option(name: .long, help: "meshconfig file (default: $MESHCONFIG or ~/.config/edge-mesh/meshconfig.yaml).")
    var meshconfig: String?

    @Option(name: .long, help: "CA certificate (PEM) that the control plane's certificate must chain to.")
    var certificateAuthority: String?

    @Option(name: .long, help: "Client certificate (PEM).")
    var clientCertificate: String?

    @Option(name: .long, help: "Client private key (PEM).")
    var clientKey: String?

    func operations() throws -> Operations {
        let settings = ClientSettings(
            server: self.server,
            meshconfig: self.meshconfig,
            certificateAuthority: self.certificateAuthority,
            clientCertificate: self.clientCertificate,
            clientKey: self.clientKey
        )
        do {
            return Operations(client: try settings.client())
        } catch let e as ManifestError {
            throw ValidationError(e.message)
        }
    }
}

extension OutputFormat: ExpressibleByArgument {}

struct Up: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the whole mesh on this machine, on loopback, in the foreground (Ctrl-C stops it)."
    )

    @Option(name: .long, help: "Where the mesh keeps its files (default: the user's state folder).")
    var dataDir: String?

    @Option(name: .long, help: "Control API address.")
    var listen: String = "127.0.0.1:7700"

    @Option(name: .long, help: "The agent's DNS address.")
    var dnsListen: String = "127.0.0.1:5353"

    @Option(name: .long, help: "The agent's admin API address.")
    var adminListen: String = "127.0.0.1:7780"

    @Option(name: .long, help: "The agent's peer-link address (links from agents of other sites), or off.")
    var linkListen: String = "127.0.0.1:7900"

    @Option(name: .long, help: "The STUN server's address (UDP and TCP).")
    var stunListen: String = "127.0.0.1:3478"

    @Option(name: .long, help: "The relay's session address (relay circuits).")
    var relayListen: String = "127.0.0.1:7800"

    @Option(name: .long, help: "The relay's admin address (/metrics, /healthz, /readyz).")
    var relayAdminListen: String = "127.0.0.1:7801"

    @Flag(name: .long, help: "Run the control plane only, no agent.")
    var noAgent = false

    @Option(name: .long, help: "The agent's node name (default: the host name).")
    var nodeName: String?

    @Option(name: .long, help: "Where the agent starts mosquitto for device mappers (when installed), or off.")
    var mqttListen: String = "127.0.0.1:1883"

    @Option(name: .long, help: "trace, debug, info, notice, warning, error or critical.")
    var logLevel: String = "info"

    func run() async throws {
        var mesh = AllInOne()
        if let d = self.dataDir { mesh.dataDir = d }
        mesh.controlListen = self.listen
        mesh.dnsListen = self.dnsListen
        mesh.adminListen = self.adminListen
        mesh.linkListen = self.linkListen
        mesh.stunListen = self.stunListen
        mesh.relayListen = self.relayListen
        mesh.relayAdminListen = self.relayAdminListen
        mesh.withAgent = !self.noAgent
        mesh.nodeName = self.nodeName
        mesh.mqttListen = self.mqttListen == "off" ? nil : self.mqttListen
        do {
            mesh.logLevel = try LogLevels.parse(self.logLevel)
            _ = try ListenAddress(self.listen, field: "--listen")
            _ = try ListenAddress(self.dnsListen, field: "--dns-listen")
            _ = try ListenAddress(self.adminListen, field: "--admin-listen")
            if self.linkListen != "off" { _ = try ListenAddress(self.linkListen, field: "--link-listen") }
            _ = try ListenAddress(self.stunListen, field: "--stun-listen")
            _ = try ListenAddress(self.relayListen, field: "--relay-listen")
            _ = try ListenAddress(self.relayAdminListen, field: "--relay-admin-listen")
            if self.mqttListen != "off" { _ = try ListenAddress(self.mqttListen, field: "--mqtt-listen") }
            if let n = self.nodeName, let e = Names.dns1123SubdomainError(n) {
                throw ManifestError("--node-name: \(e)")
            }
        } catch let e as ManifestError {
            throw ValidationError(e.message)
        }
        MeshLogging.bootstrap(level: mesh.logLevel)
        do {
            try await mesh.run()
        } catch {
            FileHandle.standardError.write(Data("error: \(error)\n".utf8))
            throw ExitCode.failure
        }
    }
}

struct Version: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Print meshctl's version and the control plane's.")

    @OptionGroup var server: ServerOptions

    func run() async throws {
        print("meshctl \(MeshRelease.version)")
        let ops = try self.server.operations()
        do {
            let body = try await ops.client.raw(.GET, "/version").body
            print("control plane: \(String(buffer: body))")
        } catch {
            print("control plane: unreachable (\(ops.explain(error)))")
        }
    }
}
