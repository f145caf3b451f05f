import ArgumentParser
import Foundation
import MeshClient
import MeshCore
import MeshCtl
import MeshHTTP

// meshctl status, route, dashboard, trace, dns, routes, peers and ping: the local agent's view.

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
