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

struct Apply: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Create or update objects from YAML or JSON manifests (several documents per file)."
    )

    @OptionGroup var server: ServerOptions

    @Option(
        name: [.short, .customLong("filename")],
        help: "A file, a directory of *.yaml/*.yml/*.json, or - for stdin."
    )
    var files: [String]

    @Option(name: .shortAndLong, help: "Print the stored objects as json instead of a line each.")
    var output: String?

    func run() async throws {
        guard !self.files.isEmpty else { throw ValidationError("give at least one -f FILE") }
        let ops = try self.server.operations()
        let docs: [ManifestDocument]
        do {
            docs = try Manifests.load(self.files)
        } catch {
            // A bad file is not a usage error: its message, exit 1.
            FileHandle.standardError.write(Data("error: \(ops.explain(error))\n".utf8))
            throw ExitCode.failure
        }
        if docs.isEmpty { throw ValidationError("no objects in \(self.files.joined(separator: ", "))") }
        if !(await ops.apply(docs, outputJSON: self.output == "json")) { throw ExitCode.failure }
    }
}

struct Get: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show objects: meshctl get services [NAME] [-n NS | -A] [-o table|wide|json|yaml|name] [-l k=v]."
    )

    @OptionGroup var server: ServerOptions

    @Argument(
        help: "services (svc), endpoints (ep), nodes (no), relays, workloads (wl), devices (dev) or devicemodels (dm)."
    )
    var kind: String

    @Argument(help: "One object's name; all when omitted.")
    var name: String?

    @Option(name: .shortAndLong, help: "Namespace (default: default).")
    var namespace: String?

    @Flag(name: [.customShort("A"), .customLong("all-namespaces")], help: "Every namespace.")
    var allNamespaces = false

    @Option(name: [.customShort("l"), .customLong("selector")], help: "Label selector, e.g. app=web,tier!=db.")
    var selector: String?

    @Option(name: .shortAndLong, help: "table, wide, json, yaml or name.")
    var output: OutputFormat = .table

    func run() async throws {
        let type = try Self.kindOrThrow(self.kind)
        let ops = try self.server.operations()
        let ok = await ops.get(
            type,
            name: self.name,
            namespace: self.namespace,
            allNamespaces: self.allNamespaces,
            selector: self.selector,
            format: self.output
        )
        if !ok { throw ExitCode.failure }
    }

    static func kindOrThrow(_ kind: String) throws -> ResourceType {
        do {
            return try Operations.kind(kind)
        } catch let e as ManifestError {
            throw ValidationError(e.message)
        }
    }
}

struct Delete: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Delete objects by name (meshctl delete svc web -n shop) or from manifests (-f)."
    )

    @OptionGroup var server: ServerOptions

    @Argument(help: "KIND NAME... (omit with -f).")
    var args: [String] = []

    @Option(name: [.short, .customLong("filename")], help: "Delete the objects these manifests name.")
    var files: [String] = []

    @Option(name: .shortAndLong, help: "Namespace (default: default).")
    var namespace: String?

    @Flag(name: .long, help: "Succeed when an object is already gone.")
    var ignoreNotFound = false

    func run() async throws {
        let ops = try self.server.operations()
        if !self.files.isEmpty {
            guard self.args.isEmpty else { throw ValidationError("give either -f FILE or KIND NAME, not both") }
            let docs: [ManifestDocument]
            do {
                docs = try Manifests.load(self.files)
            } catch {
                // A bad file is not a usage error: its message, exit 1.
                FileHandle.standardError.write(Data("error: \(ops.explain(error))\n".utf8))
                throw ExitCode.failure
            }
            if !(await ops.delete(docs, ignoreNotFound: self.ignoreNotFound)) { throw ExitCode.failure }
            return
        }
        guard self.args.count >= 2 else { throw ValidationError("give KIND and at least one NAME, or -f FILE") }
        let type = try Get.kindOrThrow(self.args[0])
        let ok = await ops.delete(
            type,
            names: Array(self.args.dropFirst()),
            namespace: self.namespace,
            ignoreNotFound: self.ignoreNotFound
        )
        if !ok { throw ExitCode.failure }
    }
}

struct Watch: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Print changes to objects as they happen (Ctrl-C stops)."
    )

    @OptionGroup var server: ServerOptions

    @Argument(
        help: "services (svc), endpoints (ep), nodes (no), relays, workloads (wl), devices (dev) or devicemodels (dm)."
    )
    var kind: String

    @Option(name: .shortAndLong, help: "Namespace (default: default).")
    var namespace: String?

    @Flag(name: [.customShort("A"), .customLong("all-namespaces")], help: "Every namespace.")
    var allNamespaces = false

    @Option(name: [.customShort("l"), .customLong("selector")], help: "Label selector.")
    var selector: String?

    @Option(name: .shortAndLong, help: "table (a line per change), json (one event per line) or yaml.")
    var output: OutputFormat = .table

    @Option(name: .long, help: "Stop after this many changes (the current objects count as ADDED changes).")
    var maxEvents: Int?

    func run() async throws {
        let type = try Get.kindOrThrow(self.kind)
        let ops = try self.server.operations()
        let ok = await ops.watch(
            type,
            namespace: self.namespace,
            allNamespaces: self.allNamespaces,
            selector: self.selector,
            format: self.output,
            maxEvents: self.maxEvents
        )
        if !ok { throw ExitCode.failure }
    }
}

/// `--agent` of the commands that ask an agent's admin API.
struct AgentOptions: ParsableArguments {
    @Option(name: .long, help: "The agent's admin API (default: $MESHCTL_AGENT or http://127.0.0.1:7780).")
    var agent: String?

    func view() throws -> AgentView {
        let url = self.agent ?? ProcessInfo.processInfo.environment["MESHCTL_AGENT"] ?? "http://127.0.0.1:7780"
        guard let endpoint = HTTPEndpoint(url: url) else { throw ValidationError("--agent \"\(url)\" is not a URL") }
        return AgentView(agent: endpoint)
    }
}

struct Status: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract:
            "Show this node's agent: its control-plane connection and table version, whether it is offline and since when, its relay session, NAT, interface mode, version and certificate."
    )

    @OptionGroup var agent: AgentOptions

    @Option(name: .shortAndLong, help: "table, json or yaml.")
    var output: OutputFormat = .table

    func run() async throws {
        if !(try await self.agent.view().status(format: self.output)) { throw ExitCode.failure }
    }
}

struct Route: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract:
            "Show where traffic for a service goes from this node: per endpoint its node, site, weight, health, path (local, direct, punched or relayed), relay, link RTT and counters.",
        discussion: """
            NAME is SERVICE.NAMESPACE or the service's name in DNS (web.shop.svc.cluster.local).
            With --key, also which endpoint a consistent-hash policy picks for that key: the header's or \
            cookie's value for HTTP routes hashing one, otherwise a client IP address.
            """
    )

    @Argument(help: "SERVICE.NAMESPACE or the service's DNS name.")
    var name: String

    @Option(name: .long, help: "Show which endpoint the policy would pick for this key.")
    var key: String?

    @OptionGroup var agent: AgentOptions

    @Option(name: .shortAndLong, help: "table, json or yaml.")
    var output: OutputFormat = .table

    func run() async throws {
        if !(try await self.agent.view().route(name: self.name, key: self.key, format: self.output)) {
            throw ExitCode.failure
        }
    }
}

struct DashboardCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dashboard",
        abstract:
            "Serve a live page of the mesh on 127.0.0.1: sites and their nodes (Ready or NotReady, last seen), relays, the links between nodes coloured by path with their RTT, and services with their endpoints per site.",
        discussion: """
            meshctl follows the control plane with the admin credentials (like `kubectl proxy`) and the page
            asks meshctl; every asset is served by meshctl itself. Open the printed URL in a browser.
            """
    )

    @OptionGroup var server: ServerOptions

    @Option(name: .long, help: "Where the page is served (a loopback address; port 0 picks a free one).")
    var listen: String = "127.0.0.1:7781"

    func run() async throws {
        let ops = try self.server.operations()
        let ok = await Dashboard.serve(
            client: ops.client,
            listen: self.listen,
            out: { FileHandle.standardOutput.write(Data($0.utf8)) },
            err: { FileHandle.standardError.write(Data($0.utf8)) }
        )
        if !ok { throw ExitCode.failure }
    }
}

struct Trace: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract:
            "Send one real HTTP request to a service through this node's agent, and show each step with its timing: DNS and the VIP, the policy's choice and why, the endpoint, its path over the links, the connection, the first byte and the response.",
        discussion: """
            TARGET is a service's name (web.shop, web.shop.svc.cluster.local, NAME:PORT) or an http:// URL
            with a path. The request carries an x-mesh-trace header; the agent's proxy records what it did
            with it. Only HTTP routes are traced: `meshctl route` shows where TCP and UDP connections go.
            """
    )

    @Argument(help: "The service (NAME.NAMESPACE[:PORT], its DNS name, or an http:// URL).")
    var target: String

    @OptionGroup var agent: AgentOptions

    @Option(name: .shortAndLong, help: "table, json or yaml.")
    var output: OutputFormat = .table

    func run() async throws {
        if !(try await self.agent.view().trace(self.target, format: self.output)) { throw ExitCode.failure }
    }
}

struct DNSLookup: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dns",
        abstract:
            "Look a name up through the agent's DNS, and say where the answer came from: the mesh zone, the cache (with the TTL left) or which upstream."
    )

    @Argument(help: "The name to look up.")
    var name: String

    @Argument(help: "The record type (A, AAAA, SRV, PTR, TXT, CNAME, MX, NS, SOA, ANY or a number).")
    var type: String = "A"

    @OptionGroup var agent: AgentOptions

    @Option(name: .shortAndLong, help: "table, json or yaml.")
    var output: OutputFormat = .table

    func run() async throws {
        if !(try await self.agent.view().dns(name: self.name, type: self.type, format: self.output)) {
            throw ExitCode.failure
        }
    }
}

struct Routes: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show what an agent is serving: every VIP:port, its policy, backends, health and counters."
    )

    @OptionGroup var agent: AgentOptions

    @Option(name: .shortAndLong, help: "table, wide (with backends), json or yaml.")
    var output: OutputFormat = .table

    func run() async throws {
        if !(try await self.agent.view().routes(format: self.output)) { throw ExitCode.failure }
    }
}

struct Peers: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract:
            "Show an agent's peer links: per remote node its site, path (direct, punched or relayed), relay, RTT, streams, bytes, and why a link is not direct."
    )

    @OptionGroup var agent: AgentOptions

    @Option(name: .shortAndLong, help: "table, wide (with the dialer, NAT types, upgrades, fallbacks), json or yaml.")
    var output: OutputFormat = .table

    func run() async throws {
        if !(try await self.agent.view().peers(format: self.output)) { throw ExitCode.failure }
    }
}

struct Ping: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract:
            "Probe the link to a node from an agent, like `tailscale ping`: each probe's path and RTT, until a direct (or punched) path is in use or the count runs out."
    )

    @Argument(help: "The node to probe.")
    var node: String

    @Option(name: .shortAndLong, help: "At most this many probes (1-100).")
    var count: Int = 10

    @Option(name: .long, help: "Milliseconds between probes.")
    var intervalMillis: Int = 500

    @OptionGroup var agent: AgentOptions

    @Option(name: .shortAndLong, help: "table, json or yaml.")
    var output: OutputFormat = .table

    func run() async throws {
        guard (1...100).contains(self.count) else { throw ValidationError("--count must be 1-100") }
        let ok = try await self.agent.view().ping(
            node: self.node,
            count: self.count,
            intervalMillis: self.intervalMillis,
            format: self.output
        )
        if !ok { throw ExitCode.failure }
    }
}

struct Token: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Join tokens that enrol nodes: create, list, delete.",
        subcommands: [TokenCreate.self, TokenList.self, TokenDelete.self]
    )
}

struct TokenCreate: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "create",
        abstract: "Create a join token; prints it, the CA hash and the mesh-agent command that joins a node."
    )

    @OptionGroup var server: ServerOptions

    @Option(name: .long, help: "How long it is valid: 90s, 30m, 24h, 7d (default 24h).")
    var ttl: String = "24h"

    @Option(name: .long, help: "How many nodes may join with it (default: unlimited until it expires).")
    var usages: Int?

    @Option(name: .long, help: "A note shown by `meshctl token list`.")
    var description: String?

    @Option(
        name: .long,
        help:
            "Bind the token to this node name: it joins only that name, also when the Node exists (re-joining a node whose disk was wiped)."
    )
    var node: String?

    @Option(
        name: .long,
        help: "Make it a relay token: it enrols only the relay of this name (mesh-relay --name NAME), and no node."
    )
    var relay: String?

    @Option(name: .shortAndLong, help: "text or json.")
    var output: String = "text"

    func run() async throws {
        if self.node != nil && self.relay != nil {
            throw ValidationError("--node and --relay: a token enrols either a node or a relay")
        }
        if let r = self.relay, let e = Names.dns1123SubdomainError(r) {
            throw ValidationError("--relay \"\(r)\": \(e)")
        }
        guard let seconds = Durations.seconds(self.ttl), seconds > 0 else {
            throw ValidationError("--ttl \"\(self.ttl)\" is not a duration such as 30m, 24h or 7d")
        }
        if let u = self.usages, u < 1 { throw ValidationError("--usages must be at least 1") }
        if let n = self.node, let e = Names.dns1123SubdomainError(n) {
            throw ValidationError("--node \"\(n)\": \(e)")
        }
        let ops = try self.server.operations()
        guard
            let token = await ops.createToken(
                ttlSeconds: seconds,
                usages: self.usages,
                description: self.description,
                nodeName: self.node,
                relayName: self.relay
            )
        else { throw ExitCode.failure }
        ops.printToken(token, json: self.output == "json")
    }
}

struct TokenList: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "list",
        abstract: "List join tokens (never their secrets)."
    )

    @OptionGroup var server: ServerOptions

    @Option(name: .shortAndLong, help: "table or json.")
    var output: String = "table"

    func run() async throws {
        if !(try await self.server.operations().listTokens(json: self.output == "json")) { throw ExitCode.failure }
    }
}

struct TokenDelete: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "delete", abstract: "Delete join tokens by id.")

    @OptionGroup var server: ServerOptions

    @Argument(help: "Token ids (or whole tokens).")
    var ids: [String]

    func run() async throws {
        guard !self.ids.isEmpty else { throw ValidationError("give at least one token id") }
        if !(try await self.server.operations().deleteTokens(self.ids)) { throw ExitCode.failure }
    }
}

struct Revoke: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract:
            "Revoke node or relay certificates (the control plane refuses them; links, agents and relays fetch the list).",
        discussion: """
            `meshctl revoke node NAME` revokes every certificate NAME was issued by its join and renewals. \
            Its Node stays, so a token cannot take the name over; to let the node back in, delete the Node \
            (meshctl delete node NAME) and join it again, or join it with a token bound to the name \
            (meshctl token create --node NAME). `meshctl revoke relay NAME` does the same for a relay: agents \
            refuse its certificate once they fetched the list; it joins again with a new relay token \
            (meshctl token create --relay NAME).
            """,
        subcommands: [RevokeNode.self, RevokeRelay.self, RevokeList.self]
    )
}

struct RevokeNode: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "node", abstract: "Revoke nodes' certificates.")

    @OptionGroup var server: ServerOptions

    @Argument(help: "Node names.")
    var names: [String]

    @Option(name: .long, help: "Revoke only the certificate with this serial (hex, as `meshctl revoke list` shows).")
    var serial: String?

    @Option(name: .shortAndLong, help: "text or json.")
    var output: String = "text"

    func run() async throws {
        guard !self.names.isEmpty else { throw ValidationError("give at least one node name") }
        let ops = try self.server.operations()
        if !(await ops.revokeNodes(self.names, serial: self.serial, json: self.output == "json")) {
            throw ExitCode.failure
        }
    }
}

struct RevokeRelay: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "relay", abstract: "Revoke relays' certificates.")

    @OptionGroup var server: ServerOptions

    @Argument(help: "Relay names.")
    var names: [String]

    @Option(name: .long, help: "Revoke only the certificate with this serial (hex, as `meshctl revoke list` shows).")
    var serial: String?

    @Option(name: .shortAndLong, help: "text or json.")
    var output: String = "text"

    func run() async throws {
        guard !self.names.isEmpty else { throw ValidationError("give at least one relay name") }
        let ops = try self.server.operations()
        if !(await ops.revokeRelays(self.names, serial: self.serial, json: self.output == "json")) {
            throw ExitCode.failure
        }
    }
}

struct RevokeList: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "list", abstract: "Show the revocation list.")

    @OptionGroup var server: ServerOptions

    @Option(name: .shortAndLong, help: "table or json.")
    var output: String = "table"

    func run() async throws {
        if !(try await self.server.operations().listRevoked(json: self.output == "json")) { throw ExitCode.failure }
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

// MARK: edge: twins and workload logs

struct Twin: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Device twins: desired values (the cloud's) against reported ones (the device's).",
        subcommands: [TwinGet.self, TwinSet.self]
    )
}

struct TwinGet: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "get",
        abstract: "Show a device's twins: desired against reported, with versions, and whether they converged."
    )

    @OptionGroup var server: ServerOptions

    @Argument(help: "The device's name.")
    var device: String

    @Option(name: .shortAndLong, help: "Namespace (default: default).")
    var namespace: String?

    @Option(name: .shortAndLong, help: "table, json or yaml.")
    var output: OutputFormat = .table

    func run() async throws {
        let ok = try await self.server.operations().twinGet(
            device: self.device,
            namespace: self.namespace,
            format: self.output
        )
        if !ok { throw ExitCode.failure }
    }
}

struct TwinSet: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "set",
        abstract: "Set desired values: meshctl twin set thermo-1 target=22.5 mode=heat (checked against the model)."
    )

    @OptionGroup var server: ServerOptions

    @Argument(help: "The device's name.")
    var device: String

    @Argument(help: "PROPERTY=VALUE, one or more.")
    var values: [String]

    @Option(name: .shortAndLong, help: "Namespace (default: default).")
    var namespace: String?

    func run() async throws {
        let ok = try await self.server.operations().twinSet(
            device: self.device,
            namespace: self.namespace,
            assignments: self.values
        )
        if !ok { throw ExitCode.failure }
    }
}

struct Logs: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Print a workload's log from the agent of the node that runs it (its admin API)."
    )

    @Argument(help: "The workload's name.")
    var workload: String

    @Option(name: .shortAndLong, help: "Namespace (default: default).")
    var namespace: String?

    @Option(name: .long, help: "The node whose log to show; the agent at --agent must be that node's.")
    var node: String?

    @Option(name: .long, help: "Only the last N lines.")
    var tail: Int?

    @Option(name: .long, help: "The agent's admin API (default: $MESHCTL_AGENT or http://127.0.0.1:7780).")
    var agent: String?

    func run() async throws {
        let url = self.agent ?? ProcessInfo.processInfo.environment["MESHCTL_AGENT"] ?? "http://127.0.0.1:7780"
        guard let endpoint = HTTPEndpoint(url: url) else { throw ValidationError("--agent \"\(url)\" is not a URL") }
        let ok = await AgentView(agent: endpoint).logs(
            workload: self.workload,
            namespace: self.namespace,
            node: self.node,
            tail: self.tail
        )
        if !ok { throw ExitCode.failure }
    }
}
