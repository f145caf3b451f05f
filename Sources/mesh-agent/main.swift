import ArgumentParser
import Dispatch
import Logging
import MeshAgent
import MeshCore
import MeshHTTP
import MeshNIO

/// The entry point: runs `MeshAgentCommand` on the concurrency pool and parks the main thread until it
/// returns (errors exit from inside, with ArgumentParser's message and code).
///
/// Not `@main` on the `AsyncParsableCommand`: an async `main` ends the main thread in `dispatch_main()`,
/// whose `pthread_exit` unwinds that thread's stack, and looking up its frames binary-searches the
/// binary's 3 MB unwind tables: ~0.6 MB of page-cache pages the agent maps for nothing (nothing else
/// unwinds). Nothing in the agent runs on the main actor, so nothing needs the main queue drained.
@main
enum MeshAgentMain {
    static func main() {
        // One event loop (and splice loop) per CPU the agent may run on, set before any NIO singleton is used.
        EventLoopThreads.fitToAffinity()
        // glibc's malloc arena limit counts only for threads that have not allocated yet: set before the
        // first task runs (AgentConfig.mallocArenas and idleTrimSeconds, Footprint.swift). A bad file is
        // reported by `run`.
        let memory = Self.memorySettings(CommandLine.arguments)
        AgentProcessMemory.limitMallocArenas(memory.mallocArenas)
        if memory.idleTrimSeconds > 0 {
            Task.detached { await AgentProcessMemory.trimWhenIdle(every: .seconds(memory.idleTrimSeconds)) }
        }
        let done = DispatchSemaphore(value: 0)
        // Detached: `main` is on the main actor, whose queue nothing drains here.
        Task.detached {
            await MeshAgentCommand.main()
            done.signal()
        }
        done.wait()
    }
}

extension MeshAgentMain {
    /// The settings of the file named by `--config` (`--config FILE` or `--config=FILE`), else the defaults.
    static func memorySettings(_ arguments: [String]) -> AgentConfig {
        var path: String?
        for (i, a) in arguments.enumerated() {
            if a == "--config", i + 1 < arguments.count { path = arguments[i + 1] }
            if a.hasPrefix("--config=") { path = String(a.dropFirst("--config=".count)) }
        }
        guard let path, let settings = try? ConfigFile.load(AgentConfig.self, path: path) else {
            return AgentConfig()
        }
        return settings
    }
}

struct MeshAgentCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mesh-agent",
        abstract: "The per-host mesh agent: answers service names, proxies to endpoints, keeps working offline.",
        discussion: """
            On first start, enrols with --join-token and --ca-cert-hash (both from `meshctl token create`): a key \
            and certificate are kept in <data-dir>/pki and reused after. \
            Syncs services and endpoints from the control plane (cached in <data-dir>/agent.db, served from \
            there while the control plane is away), answers <service>.<namespace>.svc.<domain> on DNS and \
            proxies each service VIP:port to its endpoints (L4 TCP/UDP, L7 HTTP); endpoints at other sites are \
            reached over peer links (mutual TLS, --link-listen, or through a relay). Admin API: /routes, /peers, \
            /metrics, /healthz, /readyz. Settings come from --config (YAML); flags override them.
            """,
        version: "0.1.0"
    )

    @Option(name: .long, help: "YAML config file (fields: controlServer, joinToken, caCertHash, nodeName, site, ...).")
    var config: String?

    @Option(name: .long, help: "Control plane URL (https://host:port).")
    var server: String?

    @Option(name: .long, help: "Join token (meshctl token create), used once when this node has no certificate.")
    var joinToken: String?

    @Option(name: .long, help: "sha256:<hex> of the control plane's CA public key; the join trusts only that CA.")
    var caCertHash: String?

    @Option(name: .long, help: "This node's name.")
    var nodeName: String?

    @Option(name: .long, help: "This node's site (its endpoints are preferred).")
    var site: String?

    @Option(name: .long, help: "Directory of the agent's cache.")
    var dataDir: String?

    @Option(name: .long, help: "DNS address, host:port.")
    var dnsListen: String?

    @Option(name: .long, help: "Admin API address, host:port.")
    var adminListen: String?

    @Option(name: .long, help: "Peer-link address, host:port (default 0.0.0.0:7900), or off.")
    var linkListen: String?

    @Option(
        name: .long,
        help: "A relay this agent may home on (repeat, in order of preference); default: any Ready relay."
    )
    var relay: [String] = []

    @Flag(name: .long, help: "No hole punching: links to other sites stay as dialed (direct or relayed).")
    var noPunch = false

    @Option(name: .long, help: "Seconds between keepalives on punched links (0.1-600, default 25).")
    var punchKeepaliveSeconds: Double?

    @Option(
        name: .long,
        help: "Seconds to wait before punching again after a failure (repeat for a backoff; the last repeats)."
    )
    var punchRetrySeconds: [Double] = []

    @Option(name: .long, help: "loopback, meshInterface or auto.")
    var interfaceMode: String?

    @Option(name: .long, help: "What carries peer links after their handshake: loop (default: an epoll thread) or nio.")
    var linkDataPath: String?

    @Option(name: .long, help: "trace, debug, info, notice, warning, error or critical.")
    var logLevel: String?

    func run() async throws {
        // A bad setting (a malformed --join-token or --ca-cert-hash included) is an error of the run,
        // exit 1 as README says, not a usage error (64): ArgumentParser prints an error that is not
        // its own as "Error: <description>" and exits with EXIT_FAILURE.
        var settings = try ConfigFile.load(AgentConfig.self, path: self.config)
        if let v = self.server { settings.controlServer = v }
        if let v = self.joinToken { settings.joinToken = v }
        if let v = self.caCertHash { settings.caCertHash = v }
        if let v = self.nodeName { settings.nodeName = v }
        if let v = self.site { settings.site = v }
        if let v = self.dataDir { settings.dataDir = v }
        if let v = self.dnsListen { settings.dnsListen = v }
        if let v = self.adminListen { settings.adminListen = v }
        if let v = self.linkListen { settings.linkListen = v }
        if !self.relay.isEmpty { settings.relays = self.relay }
        if self.noPunch { settings.punch = false }
        if let v = self.punchKeepaliveSeconds { settings.punchKeepaliveSeconds = v }
        if !self.punchRetrySeconds.isEmpty { settings.punchRetrySeconds = self.punchRetrySeconds }
        if let v = self.linkDataPath { settings.linkDataPath = v }
        if let v = self.interfaceMode {
            guard let mode = AgentConfig.InterfaceMode(rawValue: v) else {
                throw ManifestError("--interface-mode: \"\(v)\" is not one of loopback, meshInterface, auto")
            }
            settings.interfaceMode = mode
        }
        if let v = self.logLevel { settings.logLevel = v }
        try settings.validate()
        MeshLogging.bootstrap(level: try LogLevels.parse(settings.logLevel))
        let logger = Logger(label: "mesh-agent")
        let agent = AgentServer(config: settings, logger: logger)
        if !(await Daemon.run([agent], name: "mesh-agent", logger: logger)) { throw ExitCode.failure }
    }
}
