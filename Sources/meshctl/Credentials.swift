import ArgumentParser
import Foundation
import MeshClient
import MeshCore
import MeshCtl
import MeshHTTP

// meshctl token and revoke: join tokens and certificate revocation.

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

/// What `revoke node` and `revoke relay` take besides the names.
struct RevokeOptions: ParsableArguments {
    @OptionGroup var server: ServerOptions

    @Option(name: .long, help: "Revoke only the certificate with this serial (hex, as `meshctl revoke list` shows).")
    var serial: String?

    @Option(name: .shortAndLong, help: "text or json.")
    var output: String = "text"

    /// Runs `revoke` (one of `Operations`' revocations) for `names`; a failure exits non-zero.
    func run(
        _ names: [String],
        kind: String,
        _ revoke: (Operations, [String], String?, Bool) async -> Bool
    ) async throws {
        guard !names.isEmpty else { throw ValidationError("give at least one \(kind) name") }
        if !(await revoke(try self.server.operations(), names, self.serial, self.output == "json")) {
            throw ExitCode.failure
        }
    }
}

struct RevokeNode: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "node", abstract: "Revoke nodes' certificates.")

    @OptionGroup var options: RevokeOptions

    @Argument(help: "Node names.")
    var names: [String]

    func run() async throws {
        try await self.options.run(self.names, kind: "node") { await $0.revokeNodes($1, serial: $2, json: $3) }
    }
}

struct RevokeRelay: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "relay", abstract: "Revoke relays' certificates.")

    @OptionGroup var options: RevokeOptions

    @Argument(help: "Relay names.")
    var names: [String]

    func run() async throws {
        try await self.options.run(self.names, kind: "relay") { await $0.revokeRelays($1, serial: $2, json: $3) }
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
