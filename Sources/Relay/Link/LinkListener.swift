import Logging
import NIOCore
import NIOPosix
import ServiceLifecycle
import Synchronization

/// Accepts links on the link port (7900 by default): each TCP connection becomes an acceptor link of the
/// manager. A swift-service-lifecycle `Service`: `run()` binds (unless `bind()` was called) and serves
/// until graceful shutdown, then shuts the manager down.
public final class LinkListener: Service, Sendable {
    public let manager: LinkManager
    public let address: SocketAddress
    private let bound = Mutex<(any Channel)?>(nil)

    public init(manager: LinkManager, address: SocketAddress) {
        self.manager = manager
        self.address = address
    }

    /// Binds the listening socket; the address it got (port 0 gives a free port).
    @discardableResult
    public func bind() async throws -> SocketAddress {
        if let channel = self.bound.withLock({ $0 }), let a = channel.localAddress { return a }
        let manager = self.manager
        // SO_REUSEPORT (below) would let a second agent share the port without a word: first make sure
        // nothing else listens there.
        if self.address.port != 0 {
            let probe = try await ServerBootstrap(group: manager.group)
                .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
                .bind(to: self.address).get()
            try await probe.close()
        }
        let channel = try await ServerBootstrap(group: manager.group)
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            // Punches and STUN requests leave from the link port too (Relay/Punch).
            .serverChannelOption(SimultaneousOpen.reusePort, value: 1)
            .childChannelOption(ChannelOptions.socketOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { channel in
                _ = manager.establish(over: channel, role: .acceptor, path: .direct)
                return channel.eventLoop.makeSucceededVoidFuture()
            }
            .bind(to: self.address).get()
        self.bound.withLock { $0 = channel }
        manager.logger.info(
            "listening for links",
            metadata: ["address": "\(channel.localAddress.map { "\($0)" } ?? "?")"]
        )
        guard let local = channel.localAddress else { throw LinkError.shutDown }
        return local
    }

    /// Serves until graceful shutdown, then stops accepting and closes the manager's links (Go Away,
    /// then the transports), so a ServiceGroup ends links with the agent.
    public func run() async throws {
        try await self.bind()
        try? await gracefulShutdown()
        try await self.close()
        await self.manager.shutdown()
    }

    /// Stops accepting (established links stay: `manager.shutdown()` ends them).
    public func close() async throws {
        guard let channel = self.bound.withLock({ $0 }) else { return }
        try? await channel.close()
    }
}
