import NIOCore

/// One side of two NIO channels spliced together on the same event loop: an HTTP connection after an upgrade
/// (`HTTPUpgradeTunnel.swift`; plain TCP routes use the splice loops, TCP/). What one side reads is written to the
/// other and flushed at the end of each read burst; while the other side is not writable (its write buffer
/// is above the high water mark) this side stops reading, and it resumes when the other side becomes
/// writable again, so the bytes held per connection stay bounded by the water marks. An EOF on one side
/// becomes a half-close (`shutdown(SHUT_WR)`, after the pending writes) on the other; NIO closes a channel
/// fully once both of its directions are shut. Any error or close tears both down.
final class GlueHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    enum Side {
        case client
        case upstream
    }

    let side: Side
    private let meter: GlueMeter
    private var partner: GlueHandler?
    private var context: ChannelHandlerContext?
    /// The channel asked to read while the partner could not take more (or was not there yet).
    private var pendingRead = false
    private(set) var closed = false
    private var unreportedBytes = 0

    init(side: Side, meter: GlueMeter) {
        self.side = side
        self.meter = meter
    }

    /// Joins the pair; reads held while the partner was missing start now.
    static func join(_ a: GlueHandler, _ b: GlueHandler) {
        a.partner = b
        b.partner = a
        a.partnerBecameWritable()
        b.partnerBecameWritable()
    }

    // MARK: called by the partner

    private func partnerWrite(_ data: NIOAny) {
        self.context?.write(data, promise: nil)
    }

    private func partnerFlush() {
        guard let context = self.context else { return }
        context.flush()
        // The backlog matters (and is recorded for the tests' bound) once it is over the high water mark; an
        // option lookup after every flush cost more than the flush's own bookkeeping. NIO reports the crossing
        // (channelWritabilityChanged) from inside the write, so `writable` is current here.
        if !self.writable,
            let buffered = try? context.channel.syncOptions?.getOption(.bufferedWritableBytes)
        {
            self.meter.counters.noteBuffered(buffered)
        }
    }

    private func partnerWriteEOF() {
        self.context?.close(mode: .output, promise: nil)
    }

    private func partnerClosed() {
        self.partner = nil
        self.context?.close(promise: nil)
    }

    private func partnerBecameWritable() {
        if self.pendingRead, let context = self.context {
            self.pendingRead = false
            context.read()
        }
    }

    /// The channel's writability as NIO last reported it (channelWritabilityChanged), kept here so the read
    /// path does not ask the channel (an existential call and an atomic load) for every read.
    private var writable = true
    private var isWritable: Bool { self.writable && self.context != nil }

    /// Closes this side (and, through channelInactive, the partner).
    func close() {
        self.context?.close(promise: nil)
    }

    // MARK: ChannelDuplexHandler

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        self.writable = context.channel.isWritable
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.closed = true
        self.context = nil
        self.partner = nil
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        self.unreportedBytes &+= self.unwrapInboundIn(data).readableBytes
        self.partner?.partnerWrite(data)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        self.partner?.partnerFlush()
        self.meter.reads &+= 1
        self.reportBytes()
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.closed = true
        self.reportBytes()
        if let partner = self.partner {
            self.partner = nil
            partner.partnerClosed()
        }
        context.fireChannelInactive()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let event = event as? ChannelEvent, event == .inputClosed {
            self.partner?.partnerWriteEOF()
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        self.meter.error(error, side: self.side)
        context.close(promise: nil)
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        self.writable = context.channel.isWritable
        if self.writable {
            self.partner?.partnerBecameWritable()
        }
        context.fireChannelWritabilityChanged()
    }

    func read(context: ChannelHandlerContext) {
        if let partner = self.partner, partner.isWritable {
            context.read()
        } else {
            self.pendingRead = true
        }
    }

    private func reportBytes() {
        guard self.unreportedBytes > 0 else { return }
        switch self.side {
        case .client: self.meter.countBytes(fromClient: self.unreportedBytes, toClient: 0)
        case .upstream: self.meter.countBytes(fromClient: 0, toClient: self.unreportedBytes)
        }
        self.unreportedBytes = 0
    }
}

/// What the two glue handlers of one connection share: the route's counters and instruments, and a count of
/// read bursts (activity, for the idle timer: a counter, so a read costs no clock read). Lives on the
/// connection's event loop.
final class GlueMeter {
    let handle: RouteHandle
    let counters: DataPlaneCounters
    /// Read bursts on either side so far.
    var reads: UInt64 = 0
    private var errorReported = false
    /// The route's instruments, fetched once per connection (not under the route's lock per read).
    private lazy var metrics: RouteMetrics = self.handle.metrics

    init(handle: RouteHandle, counters: DataPlaneCounters) {
        self.handle = handle
        self.counters = counters
    }

    func countBytes(fromClient: Int, toClient: Int) {
        self.handle.countStats(fromClient: fromClient, toClient: toClient)
        self.metrics.countBytes(fromClient: fromClient, toClient: toClient)
    }

    func error(_ error: any Error, side: GlueHandler.Side) {
        guard !self.errorReported else { return }
        self.errorReported = true
        if let e = error as? IOError, e.errnoCode == ECONNRESET || e.errnoCode == EPIPE {
            self.handle.metrics.error(.reset)
        }
    }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
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
