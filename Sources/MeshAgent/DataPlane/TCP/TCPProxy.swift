import Logging
import MeshCore
import NIOCore
import NIOPosix

enum ProxyError: Error {
    case noHealthyBackend
    case tooManyConnections
}

/// The L4 TCP proxy: every accepted connection gets one upstream connection, created on the accepted
/// channel's event loop, and the two are spliced by a `GlueHandler` pair.
enum TCPProxy {
    /// Sets up one accepted connection. Runs inside the child channel initialiser, on the child's loop.
    static func initialize(
        channel: any Channel,
        handle: RouteHandle,
        environment: ProxyEnvironment
    ) throws {
        let meter = GlueMeter(handle: handle, counters: environment.counters)
        let client = GlueHandler(side: .client, meter: meter)
        try channel.pipeline.syncOperations.addHandler(client)
        handle.connectionOpened()
        channel.closeFuture.whenComplete { _ in handle.connectionClosed() }

        let hash: UInt64
        if case .consistentHash = handle.policy, let ip = channel.remoteAddress.flatMap(IPAddress.init(socketAddress:))
        {
            hash = StableHash.hash(ip)
        } else {
            hash = 0
        }
        let connector = Connector(
            channel: channel,
            client: client,
            meter: meter,
            hash: hash,
            environment: environment
        )
        connector.attempt()
        IdleTimer.start(
            on: channel,
            meter: meter,
            timeout: environment.configuration.tcpIdleTimeout,
            close: { client.close() }
        )
    }

    /// Tries backends one after another (up to `connectAttempts`) until one accepts.
    private final class Connector {
        let channel: any Channel
        let client: GlueHandler
        let meter: GlueMeter
        let hash: UInt64
        let environment: ProxyEnvironment
        var tried: [BackendID] = []

        init(channel: any Channel, client: GlueHandler, meter: GlueMeter, hash: UInt64, environment: ProxyEnvironment) {
            self.channel = channel
            self.client = client
            self.meter = meter
            self.hash = hash
            self.environment = environment
        }

        func attempt() {
            let handle = self.meter.handle
            guard !self.client.closed else { return }
            guard let pick = handle.pick(hash: self.hash, excluding: self.tried) else {
                handle.metrics.error(self.tried.isEmpty ? .noBackend : .connectFailure)
                self.environment.logger.debug(
                    "no backend for connection",
                    metadata: ["service": "\(handle.service)", "tried": "\(self.tried.count)"]
                )
                self.channel.close(promise: nil)
                return
            }
            self.tried.append(pick.id)
            let configuration = self.environment.configuration
            let loop = self.channel.eventLoop
            let upstream = GlueHandler(side: .upstream, meter: self.meter)
            let boundUpstream = NIOLoopBound(upstream, eventLoop: loop)
            let started = NIODeadline.now()
            ClientBootstrap(group: loop)
                .connectTimeout(configuration.connectTimeout)
                .channelOption(.allowRemoteHalfClosure, value: true)
                .channelOption(
                    .writeBufferWaterMark,
                    value: .init(
                        low: configuration.writeBufferLowWaterMark,
                        high: configuration.writeBufferHighWaterMark
                    )
                )
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(boundUpstream.value)
                    }
                }
                .connect(to: pick.address)
                .assumeIsolated()
                .whenComplete { result in
                    switch result {
                    case .success(let upstreamChannel):
                        handle.metrics.upstreamLatency.recordNanoseconds((NIODeadline.now() - started).nanoseconds)
                        handle.report(pick.id, outcome: .success)
                        self.environment.counters.track(upstreamChannel, upstream: true)
                        upstreamChannel.closeFuture.whenComplete { _ in handle.finish(pick.id, outcome: .neutral) }
                        if self.client.closed {
                            upstreamChannel.close(promise: nil)
                        } else {
                            GlueHandler.join(self.client, upstream)
                        }
                    case .failure(let error):
                        handle.finish(pick.id, outcome: .failure)
                        handle.metrics.error(.connectFailure)
                        self.environment.logger.debug(
                            "upstream connect failed",
                            metadata: [
                                "service": "\(handle.service)", "backend": "\(pick.id)", "error": "\(error)",
                            ]
                        )
                        if self.tried.count < configuration.connectAttempts {
                            self.attempt()
                        } else {
                            self.channel.close(promise: nil)
                        }
                    }
                }
        }
    }
}

/// Closes a connection after `timeout` without activity. One timer per connection, ticking every eighth of
/// the timeout, compares the connection's read count with the last tick's: reads cost no clock read and no
/// timer, and a quiet connection closes between `timeout` and `timeout` plus a tick after its last read.
enum IdleTimer {
    static func start(on channel: any Channel, meter: GlueMeter, timeout: TimeAmount, close: @escaping () -> Void) {
        let loop = channel.eventLoop.assumeIsolated()
        let tick = TimeAmount.nanoseconds(max(timeout.nanoseconds / 8, TimeAmount.milliseconds(1).nanoseconds))
        let box = State(reads: meter.reads, quietSince: .now())
        func arm(at deadline: NIODeadline) -> Scheduled<Void> {
            loop.scheduleTask(deadline: deadline) {
                let now = NIODeadline.now()
                if meter.reads != box.reads {
                    // Active since the last tick: quiet from now on at the earliest.
                    box.reads = meter.reads
                    box.quietSince = now
                } else if now - box.quietSince >= timeout {
                    box.scheduled = nil
                    close()
                    return
                }
                box.scheduled = arm(at: min(now + tick, box.quietSince + timeout))
            }
        }
        box.scheduled = arm(at: box.quietSince + min(tick, timeout))
        channel.closeFuture.assumeIsolated().whenComplete { _ in
            box.scheduled?.cancel()
            box.scheduled = nil
        }
    }

    private final class State {
        var scheduled: Scheduled<Void>?
        var reads: UInt64
        var quietSince: NIODeadline

        init(reads: UInt64, quietSince: NIODeadline) {
            self.reads = reads
            self.quietSince = quietSince
        }
    }
}

extension IPAddress {
    /// The IP of a socket address (nil for Unix sockets).
    init?(socketAddress: SocketAddress) {
        switch socketAddress {
        case .v4(let a):
            self = .v4(UInt32(bigEndian: a.address.sin_addr.s_addr))
        case .v6(let a):
            var addr = a.address.sin6_addr
            let bytes = withUnsafeBytes(of: &addr) { Array($0) }
            guard let ip = IPAddress(bytes: bytes) else { return nil }
            self = ip
        case .unixDomainSocket:
            return nil
        }
    }
}
