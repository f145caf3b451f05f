import NIOCore
import NIOPosix
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Settings of a punch's connection attempts.
public struct SimultaneousOpenConfiguration: Sendable {
    /// When each attempt starts, from the side's start time: several over a few seconds.
    public var attempts: [TimeAmount] = [.zero, .milliseconds(250), .milliseconds(750), .milliseconds(1750)]
    /// How long one attempt's connect may take (its SYN retransmitted by the kernel meanwhile).
    public var connectTimeout: TimeAmount = .seconds(3)
    /// The TTL of the first attempt's SYN on the side that goes first: enough to leave this host's own
    /// NAT and (on a path of a few hops) not reach the peer's, which might answer it with a RST; then
    /// `normalTTL`. Never on the side that goes second: its SYN must reach the peer (a low-TTL SYN that
    /// dies at the peer's gateway comes back as an ICMP time-exceeded, which aborts the connect). 0: off.
    public var lowTTL: Int = 2
    public var normalTTL: Int = 64

    public init() {}
}

/// TCP simultaneous open: connections from this host's link port (SO_REUSEADDR + SO_REUSEPORT, beside
/// the link listener) to the peer's candidate addresses, several attempts over a few seconds. The first
/// connection that completes wins; the others are closed. The caller sets up the link on it (TLS and the
/// peer's identity are checked as on any link).
public enum SimultaneousOpen {
    static let reusePort = ChannelOptions.Types.SocketOption(level: .socket, name: .init(rawValue: SO_REUSEPORT))
    static let ttl = ChannelOptions.Types.SocketOption(level: .ip, name: .init(rawValue: IP_TTL))

    /// What an attempt saw, for the reason of a failed punch.
    public struct Outcome: Sendable {
        public var channel: (any Channel)?
        /// Attempts answered with a RST (the peer's NAT refuses unsolicited SYNs).
        public var refused: Int
        /// Attempts that timed out (SYNs dropped).
        public var timedOut: Int
        public var errors: [String]
        /// The low-TTL SYN drew an ICMP error (time exceeded: EHOSTUNREACH), which aborts a Linux
        /// connect: on this host's path the low TTL cannot work, and the punch must go without it.
        public var lowTTLUnreachable: Bool = false
    }

    /// Connects from `localPort` to each of `targets` at each of the configured attempt times, starting
    /// at `start`. `initializer` runs on each attempt's channel before it connects (it must not read
    /// until the winner is known: the caller sets up the link on the winner only).
    public static func connect(
        group: any EventLoopGroup,
        localPort: Int,
        targets: [SocketAddress],
        start: NIODeadline,
        goesFirst: Bool = false,
        configuration: SimultaneousOpenConfiguration = SimultaneousOpenConfiguration()
    ) async -> Outcome {
        let loop = group.next()
        let result = loop.makePromise(of: (any Channel)?.self)
        let tally = Mutex<(refused: Int, timedOut: Int, errors: [String], pending: Int, done: Bool, icmp: Bool)>(
            (0, 0, [], 0, false, false)
        )
        let total = configuration.attempts.count * targets.count
        guard total > 0 else { return Outcome(channel: nil, refused: 0, timedOut: 0, errors: ["no target"]) }
        tally.withLock { $0.pending = total }
        let finishOne: @Sendable ((any Channel)?, String?) -> Void = { channel, error in
            let (win, last) = tally.withLock { t -> (Bool, Bool) in
                t.pending -= 1
                if let error { t.errors.append(error) }
                if let channel, !t.done {
                    t.done = true
                    _ = channel
                    return (true, false)
                }
                return (false, t.pending == 0 && !t.done)
            }
            if win {
                result.succeed(channel)
            } else if let channel {
                channel.close(promise: nil)  // another attempt won
            } else if last {
                tally.withLock { $0.done = true }
                result.succeed(nil)
            }
        }
        for (index, offset) in configuration.attempts.enumerated() {
            var adjusted = configuration
            if !goesFirst || index > 0 { adjusted.lowTTL = 0 }
            let settings = adjusted
            for target in targets {
                loop.scheduleTask(deadline: start + offset) {
                    if tally.withLock({ $0.done }) {
                        finishOne(nil, nil)
                        return
                    }
                    Self.attempt(
                        group: loop,
                        localPort: localPort,
                        target: target,
                        configuration: settings
                    ).whenComplete { r in
                        switch r {
                        case .success(let channel):
                            finishOne(channel, nil)
                        case .failure(let error):
                            let refused = Self.isRefused(error)
                            let icmp = settings.lowTTL > 0 && Self.isUnreachable(error)
                            tally.withLock {
                                if refused { $0.refused += 1 } else { $0.timedOut += 1 }
                                if icmp { $0.icmp = true }
                            }
                            finishOne(nil, "\(target): \(error)")
                        }
                    }
                }
            }
        }
        let channel = try? await result.futureResult.get()
        let t = tally.withLock { $0 }
        return Outcome(
            channel: channel ?? nil,
            refused: t.refused,
            timedOut: t.timedOut,
            errors: t.errors,
            lowTTLUnreachable: t.icmp
        )
    }

    /// One connection attempt from the link port; the first SYN with `lowTTL`.
    static func attempt(
        group: any EventLoopGroup,
        localPort: Int,
        target: SocketAddress,
        configuration: SimultaneousOpenConfiguration
    ) -> EventLoopFuture<any Channel> {
        let any = target.protocol == .inet6 ? "::" : "0.0.0.0"
        let local: SocketAddress
        do {
            local = try SocketAddress(ipAddress: any, port: localPort)
        } catch {
            return group.next().makeFailedFuture(error)
        }
        var bootstrap = ClientBootstrap(group: group)
            .connectTimeout(configuration.connectTimeout)
            .channelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .channelOption(Self.reusePort, value: 1)
            .channelOption(ChannelOptions.socketOption(.tcp_nodelay), value: 1)
            .channelOption(ChannelOptions.autoRead, value: false)
            .bind(to: local)
        let low = configuration.lowTTL > 0 && target.protocol == .inet
        if low {
            bootstrap = bootstrap.channelOption(Self.ttl, value: SocketOptionValue(configuration.lowTTL))
                .channelInitializer { channel in
                    // The first SYN has gone with the low TTL once connect() returned: the rest
                    // (retransmissions, the handshake's ACK, the link) with the normal one.
                    channel.eventLoop.scheduleTask(in: .milliseconds(20)) {
                        channel.setOption(Self.ttl, value: SocketOptionValue(configuration.normalTTL))
                            .whenComplete { _ in }
                    }
                    return channel.eventLoop.makeSucceededVoidFuture()
                }
        }
        return bootstrap.connect(to: target).flatMap { channel in
            guard low else { return channel.eventLoop.makeSucceededFuture(channel) }
            return channel.setOption(Self.ttl, value: SocketOptionValue(configuration.normalTTL)).map { channel }
        }
    }

    static func isUnreachable(_ error: any Error) -> Bool {
        if let e = error as? NIOConnectionError {
            return e.connectionErrors.contains { Self.isUnreachable($0.error) }
        }
        if let e = error as? IOError { return e.errnoCode == EHOSTUNREACH || e.errnoCode == ENETUNREACH }
        return "\(error)".contains("No route to host")
    }

    static func isRefused(_ error: any Error) -> Bool {
        if let e = error as? NIOConnectionError {
            return e.connectionErrors.contains { Self.isRefused($0.error) }
        }
        if let e = error as? IOError { return e.errnoCode == ECONNREFUSED }
        return "\(error)".contains("refused")
    }
}
