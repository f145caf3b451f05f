import DNS
import Logging
import MeshClient
import MeshCore
import MeshHTTP
import MeshIdentity
import NIOCore
import NIOPosix
import NodeAgent
import Relay
import ServiceLifecycle
import Synchronization

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Applies each new service table to the DNS zone and the data plane, one at a time, in order.
actor SnapshotApplier {
    let zones: DNSZoneStore
    let dataPlane: DataPlane
    let domain: String
    let site: String?
    let node: String
    let logger: Logger
    /// The table last applied, for the peer links.
    nonisolated let current: CurrentTable
    private(set) var applied: ServiceSnapshot?
    private(set) var lastError: String?
    nonisolated let state = Mutex<(source: String, services: Int, routes: Int, versions: String, error: String?)?>(nil)

    init(
        zones: DNSZoneStore,
        dataPlane: DataPlane,
        domain: String,
        site: String?,
        node: String,
        logger: Logger,
        current: CurrentTable = CurrentTable()
    ) {
        self.current = current
        self.zones = zones
        self.dataPlane = dataPlane
        self.domain = domain
        self.site = site
        self.node = node
        self.logger = logger
    }

    func apply(_ snapshot: ServiceSnapshot) async {
        // Nothing the zone or the routes are made of changed (a relay): keep both, rather than rebuild a
        // 10,000-service table (and trim the heap) for nothing.
        if let previous = self.applied, previous.services == snapshot.services,
            previous.endpoints == snapshot.endpoints
        {
            self.applied = snapshot
            self.current.set(snapshot)
            let versions =
                "services@\(snapshot.servicesVersion.map(String.init) ?? "-") endpoints@\(snapshot.endpointsVersion.map(String.init) ?? "-")"
            self.state.withLock {
                $0?.source = snapshot.source.rawValue
                $0?.versions = versions
            }
            return
        }
        var error: String?
        let clock = ContinuousClock()
        let start = clock.now
        do {
            let zone = try self.zones.update(AgentMapping.zoneInput(snapshot, domain: self.domain))
            for problem in zone.problems { self.logger.warning("dns: \(problem)") }
        } catch {
            self.logger.error("dns: the new zone could not be built, the previous one stays: \(error)")
        }
        let zoneDone = clock.now
        let table = AgentMapping.routeTable(snapshot, localSite: self.site, localNode: self.node)
        let mapped = clock.now
        do {
            try await self.dataPlane.apply(table)
        } catch let e {
            // Every other route is in place; the failed ones show in /routes with their error.
            error = "\(e)"
            self.logger.warning("proxy: \(e)")
        }
        let end = clock.now
        self.logger.debug(
            "applied in \(end - start): zone \(zoneDone - start), routes \(mapped - zoneDone), proxy \(end - mapped)"
        )
        // Rebuilding a large table frees the old one; hand that memory back to the system instead of
        // keeping it in the allocator's arenas (RSS otherwise stays at the rebuild's peak).
        #if canImport(Glibc)
        _ = glibcMallocTrim(0)
        #endif
        self.applied = snapshot
        self.current.set(snapshot)
        let versions =
            "services@\(snapshot.servicesVersion.map(String.init) ?? "-") endpoints@\(snapshot.endpointsVersion.map(String.init) ?? "-")"
        self.state.withLock {
            $0 = (snapshot.source.rawValue, snapshot.services.count, table.routes.count, versions, error)
        }
        self.logger.debug(
            "applied \(snapshot.services.count) services, \(table.routes.count) routes (\(versions), from \(snapshot.source.rawValue))"
        )
    }
}

/// `mesh-agent` as one `Service`: the service table (cache + sync), the DNS responder, the data
/// plane and the admin API, started together and stopped together.
public final class AgentServer: Service, Sendable {
    public let config: AgentConfig
    let logger: Logger
    private let admin = AsyncOnce<HTTPServer>()
    private let dns = AsyncOnce<DNSServer>()
    private let nodeAgent = AsyncOnce<NodeAgent>()
    private let edge = AsyncOnce<EdgeServices>()

    public init(config: AgentConfig, logger: Logger) {
        self.config = config
        self.logger = logger
    }

    /// The admin API's address once it listens.
    public func adminAddress() async throws -> SocketAddress { try await self.admin.value().localAddress() }

    /// The DNS responder's UDP address once it listens.
    public func dnsAddress() async throws -> SocketAddress { try await self.dns.value().listeningAddresses().udp }

    /// The node agent (registration and heartbeats) once the agent runs.
    public func node() async throws -> NodeAgent { try await self.nodeAgent.value() }

    /// The node agent's edge part (workloads, twins, the mapper API) once the agent runs.
    public func edgeServices() async throws -> EdgeServices { try await self.edge.value() }

    private func linkLogger() -> Logger {
        var logger = Logger(label: "mesh.link")
        logger.logLevel = self.logger.logLevel
        return logger
    }

    private func relayLogger() -> Logger {
        var logger = Logger(label: "mesh.relay-client")
        logger.logLevel = self.logger.logLevel
        return logger
    }

    public func run() async throws {
        do {
            try await self.serve()
        } catch {
            self.admin.fail(error)
            self.dns.fail(error)
            self.nodeAgent.fail(error)
            self.edge.fail(error)
            throw error
        }
    }

    private func serve() async throws {
        let config = self.config
        try config.validate()
        MeshMetrics.bootstrap()
        try StatePaths.ensureDirectory(config.dataDir)
        let lock = try DirectoryLock(directory: config.dataDir, name: "mesh-agent")
        defer { withExtendedLifetime(lock) {} }
        guard let endpoint = HTTPEndpoint(url: config.controlServer, defaultTLS: true) else {
            throw ManifestError("controlServer: \"\(config.controlServer)\" is not a URL like https://127.0.0.1:7700")
        }
        guard endpoint.tls else {
            throw ManifestError(
                "controlServer: \(config.controlServer): the control API is HTTPS only (mutual TLS); use https://"
            )
        }
        let credentials: LoadedCredentials
        do {
            credentials = try await NodeEnrolment.credentials(
                stateDir: config.dataDir,
                server: endpoint,
                nodeName: config.nodeName,
                token: config.joinToken,
                caHash: config.caCertHash,
                logger: self.logger
            )
        } catch let e as IdentityError {
            throw ManifestError(e.message)
        }
        // Every connection to the control plane requires mesh://control/... of the server, and
        // presents the node's current certificate, which the renewer replaces before it expires.
        let controlMesh = try MeshTLS.client(credentials, expect: .controlPlane)
        let controlTLS = HTTPClientTLS(mesh: controlMesh)
        let controlEndpoints =
            [endpoint] + config.controlServerAlternates.compactMap { HTTPEndpoint(url: $0, defaultTLS: true) }
        // A renewed certificate also goes to the peer links (set below, once they exist).
        let linksForRenewal = LinkManagerSlot()
        let renewer = CertificateRenewer(
            credentials: credentials,
            files: NodeEnrolment.files(stateDir: config.dataDir),
            nodeName: config.nodeName,
            tls: controlMesh,
            endpoint: endpoint,
            logger: self.logger,
            onRenew: { renewed in linksForRenewal.renewed(renewed) }
        )
        let fixedDNS = config.dnsListen == "auto" ? nil : try ListenAddress(config.dnsListen, field: "dnsListen")
        let adminListen = try ListenAddress(config.adminListen, field: "adminListen")

        var dpConfig = DataPlaneConfiguration()
        dpConfig.http.engine = config.httpEngine
        switch config.interfaceMode {
        case .loopback: dpConfig.bindMode = .loopback
        case .meshInterface: dpConfig.bindMode = .meshInterface(name: config.interfaceName)
        case .auto: dpConfig.bindMode = .automatic(name: config.interfaceName)
        }
        // The DNS address lives on the mesh interface (when there is one), beside the VIPs.
        let dnsOnInterface =
            fixedDNS.flatMap { IPAddress($0.host) }.map { $0.isLoopback ? nil : $0 }
            ?? IPAddress(AgentConfig.meshDNSAddress.host)
        dpConfig.extraInterfaceAddresses = dnsOnInterface.map { [$0.description] } ?? []

        // Peer links: endpoints of nodes at other sites are reached over them (`Reach.peer`), and this
        // node's own endpoints are offered to other sites through them.
        let current = CurrentTable()
        let nodeName = config.nodeName
        let revocations = RevocationSync(
            client: ControlClient(endpoints: controlEndpoints, tls: controlTLS),
            revoked: RevokedSerials(),
            path: config.dataDir + "/revoked.json",
            logger: self.logger
        )
        revocations.loadKept()
        var linkConfiguration = config.linkConfiguration()
        if config.linkDataPath == "loop" {
            linkConfiguration.loop = try LinkLoop.start(name: "mesh-link-0", logger: self.linkLogger())
        }
        let cache = try AgentCache(path: config.dataDir + "/agent.db", cacheKiB: config.storeCacheKiB)
        // One watch carries every kind the agent follows (the table's three and the edge's three), on the one
        // kept-alive connection that carries every request too (heartbeats, reports, peer nodes' lookups): a
        // request ends the watch for a moment and the watch resumes from its last version. One connection per
        // node for the control plane to hold, not nine (perf/RESULTS.md, "connections per agent").
        let control = ControlClient(endpoints: controlEndpoints, tls: controlTLS)
        let requests = control.carryingWatches()
        // A peer's link addresses are looked up when its link is dialed, not followed for every node.
        let peers = NodeDirectory(client: requests, cache: cache, logger: self.logger)
        let links = LinkManager(
            tls: try MeshLinkTLS(credentials, revoked: revocations.revoked),
            group: MultiThreadedEventLoopGroup.singleton,
            configuration: linkConfiguration,
            logger: self.linkLogger(),
            resolve: { node in try await peers.linkAddresses(of: node) },
            check: { target, peer in PeerDirectory.check(target, from: peer, localNode: nodeName, in: current.value) }
        )
        linksForRenewal.set(links)
        let linkListener: LinkListener?
        var linkPort: Int?
        if config.linkListen != "off" {
            let address = try ListenAddress(config.linkListen, field: "linkListen")
            let listener = LinkListener(
                manager: links,
                address: try SocketAddress.makeAddressResolvingHost(address.host, port: address.port)
            )
            do {
                linkPort = try await listener.bind().port
            } catch {
                throw ManifestError(
                    "linkListen: cannot listen for peer links on \(config.linkListen): \(error) (choose another with --link-listen, or off)"
                )
            }
            linkListener = listener
        } else {
            linkListener = nil
        }
        // The relay session: circuits to nodes that cannot be dialed, and from nodes that cannot dial here.
        let preferred = config.relays
        let relayClient = RelaySessionClient(
            node: config.nodeName,
            links: links,
            relays: { PeerDirectory.relays(in: current.value, preferred: preferred) },
            logger: self.relayLogger()
        )
        links.setCircuitDialer { node in try await relayClient.circuit(to: node) }
        // Relay first, then upgrade: NAT discovery from the link port and hole punching (Relay/Punch).
        let direct = linkPort.map {
            DirectPaths(
                links: links,
                linkPort: $0,
                nodeName: nodeName,
                current: current,
                configuration: self.config.punchConfiguration(linkPort: $0),
                hostAddresses: self.config.punchHostAddresses(),
                ignoredInterface: self.config.interfaceName,
                logger: self.relayLogger()
            )
        }
        let dataPlane = DataPlane(configuration: dpConfig, logger: self.logger, peers: LinkPeerStreams(links: links))
        let zones = DNSZoneStore()
        let applier = SnapshotApplier(
            zones: zones,
            dataPlane: dataPlane,
            domain: config.domain,
            site: config.site,
            node: config.nodeName,
            logger: self.logger,
            current: current
        )
        var syncConfig = ServiceTableSync.Configuration()
        syncConfig.followsControlPlane = false
        let sync = ServiceTableSync(
            client: control,
            cache: cache,
            configuration: syncConfig,
            logger: self.logger
        ) {
            await applier.apply($0)
        }
        // Serve what the cache holds before anything listens: the agent answers at once, offline too.
        // This also brings up the mesh interface, where the DNS address lives in that mode.
        _ = try await sync.loadCache()
        let onInterface: Bool
        if case .meshInterface = dataPlane.snapshot().mode { onInterface = true } else { onInterface = false }
        let dnsListen = fixedDNS ?? (onInterface ? AgentConfig.meshDNSAddress : AgentConfig.loopbackDNSAddress)

        let dns = DNSServer(
            configuration: DNSServerConfiguration(
                host: dnsListen.host,
                port: dnsListen.port,
                forwarding: DNSForwardingConfiguration(
                    upstreams: config.upstreams,
                    maxCacheTTL: UInt32(config.dnsMaxCacheTTLSeconds),
                    caseRandomization: config.dnsCaseRandomization
                )
            ),
            zones: zones,
            logger: self.logger
        )
        self.dns.set(dns)
        var adminConfig = HTTPServerConfiguration()
        adminConfig.host = adminListen.host
        adminConfig.port = adminListen.port
        adminConfig.drainTimeout = .seconds(1)
        if config.adminAllowRemote {
            // Mutual TLS with the node's certificate; AdminAPI admits admin identities only.
            adminConfig.tls = HTTPServerTLS(context: try MeshTLS.serverContext(credentials)) { certificate in
                MeshTLS.identity(of: certificate)?.uri
            }
        }

        var nodeConfig = NodeAgentConfiguration(nodeName: config.nodeName, site: config.site)
        nodeConfig.labels = config.nodeLabels
        nodeConfig.addresses = config.nodeAddresses
        nodeConfig.excludedInterfaces = [config.interfaceName]
        nodeConfig.linkPort = linkPort
        nodeConfig.relay = { relayClient.home }
        nodeConfig.candidates = { direct?.candidates }
        nodeConfig.links = {
            await links.stats().map {
                NodeLink(
                    peer: $0.node,
                    path: $0.path,
                    relay: $0.relay,
                    rttMillis: NodeLink.roundedRTT(micros: $0.rttMicros)
                )
            }.sorted { $0.peer < $1.peer }
        }
        nodeConfig.heartbeatInterval = .milliseconds(Int64(config.heartbeatIntervalSeconds * 1000))
        let nodeAgent = NodeAgent(configuration: nodeConfig, client: requests, logger: self.logger)
        self.nodeAgent.set(nodeAgent)
        // EdgeServices: workloads, device twins and the mapper API (NodeAgent README).
        var edgeConfig = EdgeConfiguration(nodeName: config.nodeName, dataDir: config.dataDir)
        edgeConfig.mqttBroker = config.mqttBroker
        edgeConfig.mqttStartBroker = config.mqttStartBroker
        edgeConfig.storeCacheKiB = config.storeCacheKiB
        edgeConfig.followsControlPlane = false
        let edge = try EdgeServices(configuration: edgeConfig, client: requests, logger: self.logger)
        self.edge.set(edge)
        var reflector = MultiReflector(
            client: requests,
            kinds: sync.reflectedKinds() + edge.reflectedKinds(),
            logger: self.logger
        )
        reflector.backoff.maximum = edgeConfig.maxBackoff
        let watch = RunUntilShutdown { [reflector] in await reflector.run() }
        let inspection = AgentInspection(
            config: config,
            started: Date(),
            dns: dns,
            node: nodeAgent,
            certificate: {
                let c = renewer.certificate
                return (meshIdentity(of: c)?.uri ?? "\(c.subject)", c.notValidAfter)
            },
            renewals: { renewer.renewalCount }
        )
        let adminAPI = AdminAPI(
            config: config,
            applier: applier,
            dataPlane: dataPlane,
            sync: sync,
            links: links,
            relay: relayClient,
            inspection: inspection,
            direct: direct,
            edge: edge,
            peers: peers
        )
        let admin = HTTPServer(configuration: adminConfig, responder: adminAPI, logger: self.logger)
        self.admin.set(admin)

        self.logger.info(
            "agent \(config.nodeName)\(config.site.map { " (site \($0))" } ?? ""): control plane \(endpoint), DNS on \(dnsListen), admin on \(config.adminAllowRemote ? "https" : "http")://\(adminListen), links on \(linkPort.map { "port \($0)" } ?? "none (relay only)"), \(config.interfaceMode.rawValue) mode"
        )
        // One group; graceful shutdown runs in reverse order: the admin API and the node agent first, then
        // the table sync and DNS, then the data plane (which drains its connections, some of them streams
        // over links), and the links last. The first failure stops the rest.
        var services: [any ServiceLifecycle.Service] = []
        if let linkListener { services.append(linkListener) }
        if let direct { services.append(direct) }
        services += [
            dataPlane, dns, sync, watch, relayClient, nodeAgent, edge, revocations,
            RunUntilShutdown { await renewer.run() },
            admin,
        ]
        let group = ServiceGroup(
            configuration: .init(
                services: services.map { .init(service: $0) },
                gracefulShutdownSignals: [],
                logger: self.logger
            )
        )
        try await withTaskCancellationOrGracefulShutdownHandler {
            try await group.run()
        } onCancelOrGracefulShutdown: {
            Task { await group.triggerGracefulShutdown() }
        }
        if linkListener == nil { await links.shutdown() }
        linkConfiguration.loop?.stop()  // its links are closed by now: the thread ends
        self.logger.info("agent stopped")
    }
}

/// The agent's link manager for the certificate renewer, which exists first: a renewed certificate
/// becomes the links' (new links and relay sessions use it; links that are up keep theirs).
final class LinkManagerSlot: Sendable {
    private let links = Mutex<LinkManager?>(nil)

    func set(_ links: LinkManager) { self.links.withLock { $0 = links } }

    func renewed(_ credentials: LoadedCredentials) {
        guard let links = self.links.withLock({ $0 }) else { return }
        do {
            links.replaceTLS(try MeshLinkTLS(credentials, revoked: links.tls.revoked))
        } catch {
            Logger(label: "mesh.link").error(
                "the renewed certificate cannot serve links (\(error)); links keep the previous one"
            )
        }
    }
}

/// A loop with no graceful shutdown of its own, as a `Service`: cancelled when the group shuts down.
struct RunUntilShutdown: ServiceLifecycle.Service {
    let body: @Sendable () async -> Void

    init(_ body: @escaping @Sendable () async -> Void) { self.body = body }

    func run() async { await cancelWhenGracefulShutdown { await self.body() } }
}

#if canImport(Glibc)
// glibc's malloc_trim(3) from <malloc.h>, which the Glibc module does not export. One integer in, one
// out: the Swift and C calling conventions agree on that on the platforms this builds for.
@_silgen_name("malloc_trim")
func glibcMallocTrim(_ pad: Int) -> Int32
#endif
