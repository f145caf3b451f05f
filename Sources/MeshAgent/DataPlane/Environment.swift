import Logging
import NIOCore
import Synchronization

/// Data-plane-wide counters: channels open (to prove nothing leaks) and the largest write backlog seen on a
/// proxied channel (to prove back-pressure bounds memory).
final class DataPlaneCounters: Sendable {
    let downstreamChannels = Atomic<Int>(0)
    let upstreamChannels = Atomic<Int>(0)
    /// Largest backlog seen: bytes the TCP splice held back for a side that could not take them, or NIO's
    /// `bufferedWritableBytes` right after a flush that left a glued channel over the high water mark.
    let bufferedHighWater = Atomic<Int>(0)
    /// Times an HTTP connection of the epoll engine gave its splice loop up at the per-turn read bound
    /// (`HTTPLoopState.readsPerTurn`) for the loop's other ready sockets.
    let httpLoopYields = Atomic<Int>(0)

    /// Counts `channel` until it closes.
    func track(_ channel: any Channel, upstream: Bool) {
        if upstream {
            self.upstreamChannels.add(1, ordering: .relaxed)
        } else {
            self.downstreamChannels.add(1, ordering: .relaxed)
        }
        channel.closeFuture.whenComplete { _ in
            if upstream {
                self.upstreamChannels.subtract(1, ordering: .relaxed)
            } else {
                self.downstreamChannels.subtract(1, ordering: .relaxed)
            }
        }
    }

    func noteBuffered(_ bytes: Int) {
        var current = self.bufferedHighWater.load(ordering: .relaxed)
        while bytes > current {
            let (exchanged, original) = self.bufferedHighWater.compareExchange(
                expected: current,
                desired: bytes,
                ordering: .relaxed
            )
            if exchanged { return }
            current = original
        }
    }
}

/// The open client-side channels of one listener, so a removed route or a shutdown can close what is left
/// after the drain time.
final class ChannelSet: Sendable {
    private let channels = Mutex<[ObjectIdentifier: any Channel]>([:])

    func insert(_ channel: any Channel) {
        let id = ObjectIdentifier(channel)
        self.channels.withLock { $0[id] = channel }
        channel.closeFuture.whenComplete { _ in
            _ = self.channels.withLock { $0.removeValue(forKey: id) }
        }
    }

    var count: Int { self.channels.withLock { $0.count } }

    var all: [any Channel] { self.channels.withLock { Array($0.values) } }

    func closeAll() {
        let all = self.channels.withLock { Array($0.values) }
        for channel in all { channel.close(promise: nil) }
    }
}

/// What every listener of one data plane shares.
struct ProxyEnvironment: Sendable {
    let configuration: DataPlaneConfiguration
    let counters: DataPlaneCounters
    let logger: Logger
    let pools: HTTPUpstreamPools
    let splice: SpliceEngine
    /// How backends are reached: sockets, or streams over peer links.
    let upstreams: Upstreams
    /// Requests traced with `x-mesh-trace` (`meshctl trace`).
    let traces: TraceLog
}
