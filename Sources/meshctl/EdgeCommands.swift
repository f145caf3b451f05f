import ArgumentParser
import Foundation
import MeshClient
import MeshCore
import MeshCtl
import MeshHTTP

// meshctl twin and logs: device twins and workload logs on edge nodes.

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
