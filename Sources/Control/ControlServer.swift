import Logging
import MeshCore
import MeshHTTP
import MeshIdentity
import Metrics
import NIOCore
import NIOSSL
import ServiceLifecycle
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// `mesh-control` as one `Service`: locks the data directory, opens the store, serves the API
/// and sends watch bookmarks until graceful shutdown, then drains and closes the store.
public final class ControlServer: ServiceLifecycle.Service, Sendable {
    public let config: ControlConfig
    let logger: Logger
    private let http: AsyncOnce<HTTPServer>
    private let pkiReady: AsyncOnce<ControlPKI>
    private let openHub = Mutex<WatchHub?>(nil)
    /// What node grace periods and join-token expiries are counted on (tests advance one by hand).
    let clock: any MeshClock

    public init(config: ControlConfig, logger: Logger, clock: any MeshClock = .system) {
        self.config = config
        self.logger = logger
        self.clock = clock
        self.http = AsyncOnce()
        self.pkiReady = AsyncOnce()
    }

    /// The CA and credentials, once the server has made or loaded them.
    public func pki() async throws -> ControlPKI {
        try await self.pkiReady.value()
    }

    /// Watches open on this replica now (a watch over several kinds counts once).
    public var watcherCount: Int { self.openHub.withLock { $0?.subscriberCount ?? 0 } }
    /// The open watches that see `resource`'s changes (its own and multi-kind watches naming it).
    public func watcherCount(of resource: String) -> Int {
        self.openHub.withLock { $0?.subscriberCount(of: resource) ?? 0 }
    }

    /// The watches of a placed kind (devices, workloads) scoped to `node` (`?node=`).
    public func watcherCount(of resource: String, node: String) -> Int {
        self.openHub.withLock { $0?.subscriberCount(of: resource, node: node) ?? 0 }
    }

    /// The API's address once it listens (useful with port 0).
    public func localAddress() async throws -> SocketAddress {
        try await self.http.value().localAddress()
    }

    public func run() async throws {
        do {
            try await self.serve()
        } catch {
            self.http.fail(error)
            self.pkiReady.fail(error)
            throw error
        }
    }

    private func serve() async throws {
        let config = self.config
        try config.validate()
        let listen = try ListenAddress(config.listen, field: "listen")
        MeshMetrics.bootstrap()
        try StatePaths.ensureDirectory(config.dataDir)
        let lock = try DirectoryLock(directory: config.dataDir, name: "mesh-control")
        defer { withExtendedLifetime(lock) {} }
        let (store, hub) = try await Self.openStore(config, logger: self.logger)
        self.openHub.withLock { $0 = hub }
        do {
            try await self.serve(store: store, hub: hub, listen: listen)
        } catch {
            // Whatever failed (the PKI, the first loads, the server), the store is closed before the error goes up.
            try? await store.close()
            throw error
        }
        try await store.close()
        self.logger.info("stopped; store closed at resourceVersion \(hub.currentResourceVersion)")
    }

    /// Everything on an open store: PKI, VIPs, node lifecycle, the API, until graceful shutdown.
    private func serve(store: any Store, hub: WatchHub, listen: ListenAddress) async throws {
        let config = self.config
        let pki: ControlPKI
        do {
            if let etcd = store as? EtcdStore {
                let dir = config.dataDir + "/pki"
                try StatePaths.ensureDirectory(dir)
                try await etcd.shareCA(directory: dir)
            }
            pki = try ControlPKI.bootstrap(
                dataDir: config.dataDir,
                listen: listen,
                extraSANs: config.certSANs,
                logger: self.logger
            )
        } catch let e as IdentityError {
            throw ManifestError(e.message)
        }
        self.pkiReady.set(pki)
        self.logger.info(
            "CA hash \(pki.ca.hash); admin credentials for meshctl in \(pki.adminConfigPath)"
        )

        let cidrs = try config.parsedCIDRs()
        let taken = try await store.reservations(prefix: "vip/").keys.compactMap { IPAddress($0.dropFirst(4)) }
        let vips = VIPAllocator(
            cidrs: cidrs,
            used: taken,
            start: config.store == "etcd" ? VIPAllocator.start(replica: config.replicaName) : 0
        )
        self.logger.info(
            "service VIPs from \(cidrs.map(\.description).joined(separator: ", ")): \(taken.count) allocated"
        )

        var lifecycleConfig = NodeLifecycle.Configuration()
        lifecycleConfig.gracePeriod = .milliseconds(Int64(config.nodeGracePeriodSeconds * 1000))
        lifecycleConfig.startupGracePeriod = .milliseconds(Int64(config.nodeStartupGracePeriodSeconds * 1000))
        let lifecycle = NodeLifecycle(
            store: store,
            configuration: lifecycleConfig,
            logger: self.logger,
            clock: self.clock
        )
        try await lifecycle.load()
        let api = ControlAPI(
            store: store,
            vips: vips,
            logger: self.logger,
            ca: pki.ca,
            caPEM: pki.caPEM,
            lifecycle: lifecycle,
            nodeCertificateValidity: config.nodeCertificateValiditySeconds,
            limiter: WriteRateLimiter(
                node: .init(perSecond: config.writesPerSecond, burst: config.writeBurst),
                admin: .init(perSecond: config.adminWritesPerSecond, burst: config.adminWriteBurst)
            ),
            clock: self.clock,
            hub: hub
        )
        try await api.loadRevocations()
        var httpConfig = HTTPServerConfiguration()
        httpConfig.host = listen.host
        httpConfig.port = listen.port
        httpConfig.maxBodyBytes = config.maxBodyBytes
        httpConfig.maxConnections = config.maxConnections
        httpConfig.leanBuffers = config.leanConnectionBuffers
        httpConfig.releaseIdleBuffersAfter =
            config.idleBufferReleaseMilliseconds > 0 ? .milliseconds(Int64(config.idleBufferReleaseMilliseconds)) : nil
        httpConfig.renderError = ControlAPI.renderError
        httpConfig.drainTimeout = .seconds(2)
        httpConfig.requestTimeout = .seconds(Int64(config.requestTimeoutSeconds))
        httpConfig.idleTimeout = .seconds(Int64(config.idleTimeoutSeconds))
        httpConfig.handshakeTimeout = .milliseconds(Int64(config.tlsHandshakeTimeoutSeconds * 1000))
        let tlsContext = try MeshTLS.serverContext(pki.serving, httpRecords: config.httpRecords)
        httpConfig.tls = HTTPServerTLS(context: tlsContext) { certificate in
            MeshTLS.identity(of: certificate)?.uri
        }
        let server = HTTPServer(configuration: httpConfig, responder: api, logger: self.logger)
        self.http.set(server)

        let interval = Duration.seconds(config.bookmarkIntervalSeconds)
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await server.run() }
            group.addTask {
                while !Task.isCancelled {
                    try? await Task.sleep(for: interval)
                    hub.sendBookmarks()
                    Gauge(label: "mesh_control_watchers").record(hub.subscriberCount)
                    Gauge(label: "mesh_control_resource_version").record(hub.currentResourceVersion)
                }
            }
            if config.heapTrimIntervalSeconds > 0 {
                let logger = self.logger
                group.addTask {
                    await ProcessResources.trimWhenFragmented(
                        every: .seconds(config.heapTrimIntervalSeconds),
                        report: { free, used in
                            logger.debug("heap trimmed: \(free >> 20) MiB free given back, \(used >> 20) MiB in use")
                        }
                    )
                }
            }
            let lifecycleTask = Task { await lifecycle.run() }
            // Workloads: assignment to nodes and their services' endpoints (WorkloadController).
            let workloads = WorkloadController(writer: api.writer, logger: self.logger)
            group.addTask { await workloads.run() }
            // Endpoints carry their nodes' sites, so agents need not follow every Node (EndpointSites).
            let sites = EndpointSites(writer: api.writer, logger: self.logger)
            group.addTask { await sites.run() }
            // The server returns after graceful shutdown (or fails); then stop the ticker, and
            // the lifecycle loop, which saves the heartbeat times a last time.
            do {
                try await group.next()
            } catch {
                lifecycleTask.cancel()
                await lifecycleTask.value
                throw error
            }
            group.cancelAll()
            lifecycleTask.cancel()
            await lifecycleTask.value
        }
    }

    /// The store the configuration names, and the hub its watchers use.
    static func openStore(_ config: ControlConfig, logger: Logger) async throws -> (any Store, WatchHub) {
        var hubConfig = WatchHub.Configuration()
        hubConfig.historyLimit = config.historyLimit
        hubConfig.historyMaxBytes = config.historyMaxBytes
        hubConfig.maxPendingBytes = config.historyMaxBytes
        if config.store == "etcd" {
            var c = EtcdStore.Configuration(
                endpoints: config.etcdEndpoints,
                replica: config.replicaName.isEmpty ? Self.defaultReplicaName(config.listen) : config.replicaName
            )
            c.prefix = config.etcdPrefix
            c.hub = hubConfig
            c.client.tls = try Self.etcdTLS(config)
            let store = try await EtcdStore(configuration: c, logger: logger)
            return (store, store.hub)
        }
        var storeConfig = SQLiteStore.Configuration(path: config.dataDir + "/control.db")
        storeConfig.durability = config.durability
        storeConfig.hub = hubConfig
        let store = try await SQLiteStore(configuration: storeConfig, logger: logger)
        return (store, store.hub)
    }

    /// TLS to etcd when a CA file is configured: etcd's CA, and the client certificate when given.
    static func etcdTLS(_ config: ControlConfig) throws -> HTTPClientTLS? {
        guard !config.etcdCAFile.isEmpty else { return nil }
        var tls = TLSConfiguration.makeClientConfiguration()
        do {
            tls.trustRoots = .certificates(try NIOSSLCertificate.fromPEMFile(config.etcdCAFile))
            if !config.etcdCertFile.isEmpty {
                tls.certificateChain = try NIOSSLCertificate.fromPEMFile(config.etcdCertFile).map { .certificate($0) }
                tls.privateKey = .privateKey(try NIOSSLPrivateKey(file: config.etcdKeyFile, format: .pem))
            }
            return HTTPClientTLS(context: try NIOSSLContext(configuration: tls))
        } catch {
            throw ManifestError("etcd TLS (etcdCAFile, etcdCertFile, etcdKeyFile): \(error)")
        }
    }

    static func defaultReplicaName(_ listen: String) -> String {
        var buffer = [CChar](repeating: 0, count: 256)
        let host =
            gethostname(&buffer, buffer.count) == 0
            ? String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self) : "control"
        return "\(host)-\(listen)"
    }
}
