import ArgumentParser
import Foundation
import Logging
import MeshCore
import MeshIdentity
import MeshRecords
import MeshWire
import NIOCore
import NIOPosix
import Relay
import ServiceLifecycle

#if canImport(Glibc)
import Glibc
#endif

/// The peer-link path without a lab: two link nodes in one process on loopback. Clients connect to
/// `--listen` (node a, as an agent's L4 listener takes them); each connection is spliced to a stream over
/// one direct link (TLS 1.3 with mutual certificates of a CA made in memory, the yamux mux) to node b,
/// which dials `--backend` and splices the stream to it, as an agent does for an endpoint it serves. Both
/// nodes share one event loop. For callgrind (`perf/proxy/profile --system link`): instructions per request
/// through both ends of a link, repeatable where timings on this VM are not.
struct LinkPairCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "link-pair",
        abstract: "Run two link nodes on loopback: clients at --listen reach --backend through a stream of one link."
    )

    @Option(help: "127.0.0.1:port where node a takes clients.") var listen: HostPort
    @Option(help: "The backend's 127.0.0.1:port, dialed by node b.") var backend: HostPort
    @Option(
        help:
            "nio: the link as Link builds it (NIO channels, the record handler, the mux session); loop: both ends' data path on a LinkLoop (one epoll thread; the link is a loopback TCP connection with fixed record secrets: no handshake)."
    )
    var engine: String = "nio"

    func run() async throws {
        guard case .v4(let endpoint)? = IPAddress(self.backend.host) else {
            throw ValidationError("--backend: an IPv4 address and port, e.g. 127.0.0.1:8080")
        }
        var logger = Logger(label: "bench.link-pair")
        logger.logLevel = .warning
        if self.engine == "loop" { return try await self.runLoop(endpoint: endpoint, logger: logger) }
        guard self.engine == "nio" else { throw ValidationError("--engine: nio or loop") }
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let ca = try CertificateAuthority.create()
        func tls(_ node: String) throws -> MeshLinkTLS { try MeshLinkTLS(node: node, issuedBy: ca) }
        let b = LinkManager(
            tls: try tls("b"),
            group: group,
            logger: logger,
            resolve: { _ in [] },
            check: { _, _ in nil }
        )
        let listener = LinkListener(manager: b, address: try SocketAddress(ipAddress: "127.0.0.1", port: 0))
        let bAddress = try await listener.bind()
        let a = LinkManager(
            tls: try tls("a"),
            group: group,
            logger: logger,
            resolve: { $0 == "b" ? [bAddress] : [] },
            check: { _, _ in StreamRefusal(.notLocalEndpoint, "node a serves nothing") }
        )
        let target = self.target(endpoint)
        let server = try ClientSockets.listen(on: self.listen)
        let log = logger
        // Each client's socket goes to node a's link, as the data plane hands one over.
        ClientSockets.acceptEach(server) { client in
            Task {
                do {
                    try await a.splice(socket: client, to: "b", open: target)
                } catch {
                    log.warning("splice failed: \(error)")
                    close(client)
                }
            }
        }
        try await self.serve(until: server, logger: logger)
        await a.shutdown()
        await b.shutdown()
        try? await listener.close()
        try await group.shutdownGracefully()
    }

    private func target(_ endpoint: UInt32) -> StreamTarget {
        StreamTarget(
            namespace: "bench",
            service: "bench",
            servicePort: UInt16(self.listen.port),
            endpoint: .v4(endpoint),
            endpointPort: UInt16(self.backend.port),
            transport: .tcp
        )
    }

    /// Both ends of the link on one ``LinkLoop``: node a's session opens a stream per client socket, node b's
    /// dials the backend.
    private func runLoop(endpoint: UInt32, logger: Logger) async throws {
        let loop = try LinkLoop.start(name: "bench-link-loop", logger: logger)
        let (x, y) = try ClientSockets.loopbackPair()
        let secrets = LinkRecordSecrets(exporterSecret: [UInt8](repeating: 0x42, count: 32))!
        let a = LinkLoopSession.adopt(
            socket: x,
            on: loop,
            peer: "b",
            dialer: true,
            secrets: secrets,
            check: nil,
            logger: logger
        )
        _ = LinkLoopSession.adopt(
            socket: y,
            on: loop,
            peer: "a",
            dialer: false,
            secrets: secrets,
            check: { _, _ in nil },
            logger: logger
        )
        let target = self.target(endpoint)
        let server = try ClientSockets.listen(on: self.listen)
        let log = logger
        ClientSockets.acceptEach(server) { client in
            a.open(socket: client, target: target) { result in
                if case .failure(let error) = result {
                    log.warning("stream failed: \(error)")
                    close(client)
                }
            }
        }
        try await self.serve(until: server, logger: logger)
        loop.stop()
    }

    /// Says it is ready, runs until SIGTERM or SIGINT, then closes the listening socket.
    private func serve(until server: Int32, logger: Logger) async throws {
        print("ready \(self.listen) pid \(getpid())")
        let services = ServiceGroup(
            configuration: .init(services: [Idle()], gracefulShutdownSignals: [.sigterm, .sigint], logger: logger)
        )
        try await services.run()
        close(server)
    }

    /// Runs until the group's graceful shutdown (SIGTERM, SIGINT).
    struct Idle: Service {
        func run() async throws { try? await gracefulShutdown() }
    }
}

enum ClientSockets {
    /// Accepts on a thread of its own (blocking accept, never on the cooperative pool) until `server` fails;
    /// each client's socket, prepared, goes to `body`.
    static func acceptEach(_ server: Int32, _ body: @escaping @Sendable (Int32) -> Void) {
        Thread {
            while true {
                let client = accept(server, nil, nil)
                guard client >= 0 else {
                    if errno == EINTR || errno == ECONNABORTED { continue }
                    return
                }
                Self.prepare(client)
                body(client)
            }
        }.start()
    }

    /// Non-blocking, close-on-exec, TCP_NODELAY.
    static func prepare(_ fd: Int32) {
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        var one: Int32 = 1
        _ = setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
    }

    /// Two ends of one TCP connection on 127.0.0.1, prepared.
    static func loopbackPair() throws -> (Int32, Int32) {
        let server = try Self.listen(on: HostPort(argument: "127.0.0.1:0")!)
        defer { close(server) }
        var sin = sockaddr_in()
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &sin) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(server, $0, &length) }
        }
        let client = socket(AF_INET, Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue), 0)
        let connected = withUnsafePointer(to: &sin) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(client, $0, length) }
        }
        guard client >= 0, connected == 0 else { throw ValidationError("loopback connect: errno \(errno)") }
        let accepted = accept(server, nil, nil)
        guard accepted >= 0 else { throw ValidationError("loopback accept: errno \(errno)") }
        Self.prepare(client)
        Self.prepare(accepted)
        return (client, accepted)
    }

    /// A blocking listening TCP socket on an IPv4 host:port.
    static func listen(on address: HostPort) throws -> Int32 {
        guard case .v4(let ip)? = IPAddress(address.host) else { throw ValidationError("--listen: IPv4 host:port") }
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw ValidationError("socket: errno \(errno)") }
        var one: Int32 = 1
        _ = setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var sin = sockaddr_in()
        sin.sin_family = sa_family_t(AF_INET)
        sin.sin_port = in_port_t(UInt16(address.port)).bigEndian
        sin.sin_addr = in_addr(s_addr: ip.bigEndian)
        let bound = withUnsafePointer(to: &sin) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
        guard bound == 0, Glibc.listen(fd, 1024) == 0 else {
            let code = errno
            close(fd)
            throw ValidationError("bind/listen on \(address): errno \(code)")
        }
        return fd
    }
}
