import Logging
import MeshCore
import NIOCore
import NIOPosix

/// The L4 UDP proxy, as the handler of the datagram channel bound to VIP:port. Each client address gets a
/// flow: a connected UDP socket towards one backend (chosen when the flow starts), created on this channel's
/// event loop, or a stream over the peer link for a backend at another site (`Upstreams.openFlow`). Datagrams from the client go out on the flow's socket; datagrams the backend sends back go to
/// the client from the VIP:port socket, so the client sees the address it talked to. Flows end after
/// `flowIdleTimeout` without traffic; beyond `maxFlowsPerListener`, datagrams of new clients are dropped.
final class UDPProxyHandler: ChannelInboundHandler {
    typealias InboundIn = AddressedEnvelope<ByteBuffer>
    typealias OutboundOut = AddressedEnvelope<ByteBuffer>

    private let handle: RouteHandle
    private let environment: ProxyEnvironment
    private var flows: [SocketAddress: Flow] = [:]
    private var context: ChannelHandlerContext?
    private var sweeper: RepeatedTask?

    final class Flow {
        let client: SocketAddress
        let pick: Pick
        var channel: (any Channel)?
        var pending: [ByteBuffer] = []
        var lastActivity: NIODeadline = .now()
        var closed = false
        var answered = false

        init(client: SocketAddress, pick: Pick) {
            self.client = client
            self.pick = pick
        }
    }

    init(handle: RouteHandle, environment: ProxyEnvironment) {
        self.handle = handle
        self.environment = environment
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        let idle = self.environment.configuration.udp.flowIdleTimeout
        let period = TimeAmount.nanoseconds(max(idle.nanoseconds / 4, TimeAmount.milliseconds(5).nanoseconds))
        let loop = context.eventLoop
        let bound = NIOLoopBound(self, eventLoop: loop)
        self.sweeper = loop.scheduleRepeatedTask(initialDelay: period, delay: period) { _ in
            bound.value.expireIdleFlows()
        }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.shutdown()
        self.context = nil
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.shutdown()
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // Errors on the listening socket (ICMP for a gone client, say) do not end the listener.
        self.environment.logger.debug("udp listener error", metadata: ["error": "\(error)"])
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let envelope = self.unwrapInboundIn(data)
        let now = NIODeadline.now()
        self.handle.countBytes(fromClient: envelope.data.readableBytes, toClient: 0)
        if let flow = self.flows[envelope.remoteAddress] {
            flow.lastActivity = now
            self.send(envelope.data, on: flow)
            return
        }
        let configuration = self.environment.configuration
        guard self.flows.count < configuration.udp.maxFlowsPerListener else {
            self.handle.metrics.error(.overflow)
            return
        }
        var hash: UInt64 = 0
        if case .consistentHash = self.handle.policy, let ip = IPAddress(socketAddress: envelope.remoteAddress) {
            hash = StableHash.hash(ip)
        }
        guard let pick = self.handle.pick(hash: hash) else {
            self.handle.metrics.error(.noBackend)
            return
        }
        let flow = Flow(client: envelope.remoteAddress, pick: pick)
        flow.pending.append(envelope.data)
        self.flows[envelope.remoteAddress] = flow
        self.handle.connectionOpened()
        self.handle.stats.requests.add(1, ordering: .relaxed)
        self.handle.metrics.requests.increment()

        let loop = context.eventLoop
        let bound = NIOLoopBound((proxy: self, flow: flow), eventLoop: loop)
        self.environment.upstreams.openFlow(
            to: pick,
            service: self.handle.service,
            servicePort: self.handle.key.port,
            on: loop,
            received: { datagram in bound.value.proxy.reply(datagram, flow: bound.value.flow) },
            failed: { error in bound.value.proxy.upstreamFailed(bound.value.flow, error: error) }
        )
        .assumeIsolated()
        .whenComplete { result in
            switch result {
            case .success(let channel):
                self.environment.counters.track(channel, upstream: true)
                if flow.closed {
                    channel.close(promise: nil)
                    return
                }
                flow.channel = channel
                let pending = flow.pending
                flow.pending = []
                for datagram in pending { channel.write(datagram, promise: nil) }
                channel.flush()
            case .failure(let error):
                self.environment.logger.debug(
                    "udp upstream failed",
                    metadata: ["backend": "\(pick.id)", "error": "\(error)"]
                )
                self.handle.metrics.error(.connectFailure)
                self.end(flow, outcome: .failure)
            }
        }
    }

    private func send(_ datagram: ByteBuffer, on flow: Flow) {
        if let channel = flow.channel {
            if channel.isWritable {
                channel.writeAndFlush(datagram, promise: nil)
            } else {
                self.handle.metrics.error(.overflow)
            }
        } else if flow.pending.count < self.environment.configuration.udp.maxPendingDatagramsPerFlow {
            flow.pending.append(datagram)
        }
    }

    /// A datagram from the flow's backend: back to the client, from VIP:port.
    fileprivate func reply(_ datagram: ByteBuffer, flow: Flow) {
        guard !flow.closed, let context = self.context else { return }
        flow.lastActivity = .now()
        if !flow.answered {
            flow.answered = true
            self.handle.report(flow.pick, outcome: .success)
        }
        self.handle.countBytes(fromClient: 0, toClient: datagram.readableBytes)
        guard context.channel.isWritable else {
            self.handle.metrics.error(.overflow)
            return
        }
        context.writeAndFlush(
            self.wrapOutboundOut(AddressedEnvelope(remoteAddress: flow.client, data: datagram)),
            promise: nil
        )
    }

    /// The backend's socket failed (an ICMP port unreachable shows up as ECONNREFUSED), or its stream ended.
    fileprivate func upstreamFailed(_ flow: Flow, error: any Error) {
        guard !flow.closed else { return }
        self.handle.metrics.error(.connectFailure)
        self.end(flow, outcome: .failure)
    }

    fileprivate func end(_ flow: Flow, outcome: LoadBalancer.Outcome) {
        guard !flow.closed else { return }
        flow.closed = true
        if self.flows[flow.client] === flow { self.flows[flow.client] = nil }
        flow.channel?.close(promise: nil)
        flow.channel = nil
        flow.pending = []
        self.handle.finish(flow.pick, outcome: outcome)
        self.handle.connectionClosed()
    }

    private func expireIdleFlows() {
        let idle = self.environment.configuration.udp.flowIdleTimeout
        let now = NIODeadline.now()
        for flow in self.flows.values where now - flow.lastActivity >= idle {
            self.end(flow, outcome: .neutral)
        }
    }

    private func shutdown() {
        self.sweeper?.cancel()
        self.sweeper = nil
        for flow in Array(self.flows.values) { self.end(flow, outcome: .neutral) }
    }

    /// Flows open now (tests).
    var flowCount: Int { self.flows.count }
}
