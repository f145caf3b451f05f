import CLinux
import MeshCore
import MeshWire
import NIOCore
import NIOPosix

#if canImport(Glibc)
import Glibc
#endif

/// Streams to backends at other sites: the agent's peer links (`Relay.LinkManager`), behind a protocol so the
/// data plane does not know how a link is made (dialed, relayed, punched).
public protocol PeerStreams: Sendable {
    /// Splices a connected socket to a new TCP stream to `target` at `node`. Returns once the peer accepted
    /// the stream and the splice is in place (the socket then belongs to the link). On a refusal or any
    /// failure it throws, and the socket stays the caller's.
    ///
    /// `ended`, when given, is called once when a splice that was put in place ends, with the bytes it carried
    /// (read from the socket, written to it); never when this throws.
    func splice(
        socket: NIOBSDSocket.Handle,
        to node: String,
        open target: StreamTarget,
        ended: (@Sendable (_ fromSocket: Int, _ toSocket: Int) -> Void)?
    ) async throws

    /// Opens a stream to `target` at `node` (a UDP flow: `target.transport == .udp`). Returns once the peer
    /// accepted; the stream's pipeline then holds what `initializer` added.
    func stream(
        to node: String,
        open target: StreamTarget,
        initializer: @escaping @Sendable (any Channel) -> EventLoopFuture<Void>
    ) async throws -> any Channel
}

/// Why a backend behind a peer link could not be reached.
public struct PeerUnavailable: Error, CustomStringConvertible, Sendable {
    public var description: String
}

/// The one way the data plane reaches a backend, for the TCP splice, the HTTP pool and UDP flows alike: a
/// socket to its address (`Reach.direct`), or a stream over the link to its node (`Reach.peer`).
///
/// - The TCP splice hands its accepted client socket to the link (`splice(client:)`), which registers it with
///   NIO on the link's event loop: the bytes then flow socket to stream with no hop through the splice loop.
/// - The HTTP pool needs its upstream channel on the client connection's own event loop (its handlers call
///   each other directly), and a link's streams live on the link's loop. So a peer upstream is one end of a
///   `socketpair(2)` registered on the client's loop, the other end spliced to the stream by the link.
/// - A UDP flow's datagrams go to the stream framed (`DatagramFraming`); answers come back to the flow's
///   loop.
struct Upstreams: Sendable {
    let peers: (any PeerStreams)?

    /// The stream header for `pick` of a route (service and port of the VIP listener).
    static func target(
        service: ServiceKey,
        servicePort: Int,
        pick: Pick,
        transport: StreamProtocol
    ) -> StreamTarget? {
        let endpoint = WireIPAddress(pick.id.ip)
        guard let port = UInt16(exactly: pick.id.port),
            let servicePort = UInt16(exactly: servicePort)
        else { return nil }
        return StreamTarget(
            namespace: service.namespace,
            service: service.name,
            servicePort: servicePort,
            endpoint: endpoint,
            endpointPort: port,
            transport: transport
        )
    }

    /// The peer streams and the stream header for a peer pick, or why there are none.
    private func peerRoute(
        _ node: String,
        service: ServiceKey,
        servicePort: Int,
        pick: Pick,
        transport: StreamProtocol
    ) throws -> (peers: any PeerStreams, target: StreamTarget) {
        let peers = try self.peerStreams(for: node)
        guard let target = Self.target(service: service, servicePort: servicePort, pick: pick, transport: transport)
        else {
            throw PeerUnavailable(description: "backend \(pick.id) has no address a stream header can name")
        }
        return (peers, target)
    }

    private func peerStreams(for node: String) throws -> any PeerStreams {
        guard let peers = self.peers else {
            throw PeerUnavailable(
                description: "backend is at node \(node) of another site, and this agent has no peer links"
            )
        }
        return peers
    }

    /// The TCP path: the client's socket, accepted by the splice loop and not yet read, goes to a stream to
    /// the pick's node. Throws (the socket stays the caller's) when the node refused or cannot be reached.
    func splice(
        client fd: Int32,
        service: ServiceKey,
        servicePort: Int,
        pick: Pick,
        ended: @escaping @Sendable (_ fromSocket: Int, _ toSocket: Int) -> Void
    ) async throws {
        guard let node = pick.id.via else { throw PeerUnavailable(description: "not a peer backend") }
        let (peers, target) = try self.peerRoute(
            node,
            service: service,
            servicePort: servicePort,
            pick: pick,
            transport: .tcp
        )
        try await peers.splice(socket: fd, to: node, open: target, ended: ended)
    }

    /// A stream channel on `loop` to `pick` (the HTTP pool): connected directly, or one end of a socket pair
    /// whose other end the link splices to a stream. `initializer` sets up the channel's pipeline.
    func connectStream(
        to pick: Pick,
        service: ServiceKey,
        servicePort: Int,
        on loop: any EventLoop,
        configuration: DataPlaneConfiguration,
        initializer: @escaping @Sendable (any Channel) -> EventLoopFuture<Void>
    ) -> EventLoopFuture<any Channel> {
        let watermark = ChannelOptions.Types.WriteBufferWaterMark(
            low: configuration.writeBufferLowWaterMark,
            high: configuration.writeBufferHighWaterMark
        )
        guard let node = pick.id.via else {
            return ClientBootstrap(group: loop)
                .connectTimeout(configuration.connectTimeout)
                .channelOption(.writeBufferWaterMark, value: watermark)
                .channelInitializer(initializer)
                .connect(to: pick.address)
        }
        let promise = loop.makePromise(of: (any Channel).self)
        let route: (peers: any PeerStreams, target: StreamTarget)
        let pair: (Int32, Int32)
        do {
            route = try self.peerRoute(node, service: service, servicePort: servicePort, pick: pick, transport: .tcp)
            pair = try Self.socketPair()
        } catch {
            promise.fail(error)
            return promise.futureResult
        }
        let (peers, target) = route
        Task {
            do {
                try await peers.splice(socket: pair.1, to: node, open: target, ended: nil)
            } catch {
                Glibc.close(pair.0)
                Glibc.close(pair.1)
                promise.fail(error)
                return
            }
            ClientBootstrap(group: loop)
                .channelOption(.writeBufferWaterMark, value: watermark)
                .channelInitializer(initializer)
                .withConnectedSocket(pair.0)
                .cascade(to: promise)
        }
        return promise.futureResult
    }

    /// A UDP flow's upstream for `pick`: a connected UDP socket on `loop` (direct), or a stream over the
    /// link. Either way the returned channel takes `ByteBuffer` datagrams to write, and `received` gets the
    /// backend's datagrams on `loop`; `failed` is called once if the upstream fails.
    func openFlow(
        to pick: Pick,
        service: ServiceKey,
        servicePort: Int,
        on loop: any EventLoop,
        received: @escaping @Sendable (ByteBuffer) -> Void,
        failed: @escaping @Sendable (any Error) -> Void
    ) -> EventLoopFuture<any Channel> {
        guard let node = pick.id.via else {
            return DatagramBootstrap(group: loop)
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(
                            FlowUpstreamHandler<AddressedEnvelope<ByteBuffer>>(
                                payload: { $0.data },
                                received: received,
                                failed: failed
                            )
                        )
                    }
                }
                .connect(to: pick.address)
        }
        let promise = loop.makePromise(of: (any Channel).self)
        let peers: any PeerStreams
        let target: StreamTarget
        do {
            (peers, target) = try self.peerRoute(
                node,
                service: service,
                servicePort: servicePort,
                pick: pick,
                transport: .udp
            )
        } catch {
            promise.fail(error)
            return promise.futureResult
        }
        Task {
            do {
                let stream = try await peers.stream(to: node, open: target) { stream in
                    stream.eventLoop.makeCompletedFuture {
                        let sync = stream.pipeline.syncOperations
                        try sync.addHandler(DatagramFlowCodec())
                        try sync.addHandler(
                            FlowUpstreamHandler<ByteBuffer>(
                                payload: { $0 },
                                received: { datagram in loop.execute { received(datagram) } },
                                failed: { error in loop.execute { failed(error) } }
                            )
                        )
                    }
                }
                promise.succeed(stream)
            } catch {
                promise.fail(error)
            }
        }
        return promise.futureResult
    }

    /// A connected pair of non-blocking Unix stream sockets.
    static func socketPair() throws -> (Int32, Int32) {
        var fds: [Int32] = [-1, -1]
        let kind = Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue)
        guard socketpair(AF_UNIX, kind, 0, &fds) == 0 else {
            throw PeerUnavailable(description: "socketpair: \(String(cString: strerror(errno)))")
        }
        return (fds[0], fds[1])
    }
}

/// A UDP flow carried by a stream: datagrams written are framed (`DatagramFraming`), bytes read are cut back
/// into datagrams. A malformed frame ends the stream.
final class DatagramFlowCodec: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private var buffer = ByteBuffer()

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = self.unwrapInboundIn(data)
        self.buffer.writeBuffer(&bytes)
        do {
            while let datagram = try DatagramFraming.decode(from: &self.buffer) {
                context.fireChannelRead(self.wrapInboundOut(datagram))
            }
            self.buffer.discardReadBytes()
        } catch {
            context.fireErrorCaught(error)
            context.close(promise: nil)
        }
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        let datagram = self.unwrapOutboundIn(data)
        var framed = context.channel.allocator.buffer(capacity: datagram.readableBytes + 2)
        do {
            try DatagramFraming.encode(datagram, into: &framed)
        } catch {
            promise?.fail(error)
            return
        }
        context.write(self.wrapOutboundOut(framed), promise: promise)
    }
}

/// The last handler of a flow's upstream: a direct UDP socket's envelopes or a stream's datagrams go to
/// `received`; the first error (an ICMP port unreachable shows up as ECONNREFUSED) or the stream's end goes
/// to `failed`, once.
final class FlowUpstreamHandler<Message>: ChannelInboundHandler {
    typealias InboundIn = Message

    private let payload: (Message) -> ByteBuffer
    private let received: @Sendable (ByteBuffer) -> Void
    private let failed: @Sendable (any Error) -> Void
    private var done = false

    init(
        payload: @escaping (Message) -> ByteBuffer,
        received: @escaping @Sendable (ByteBuffer) -> Void,
        failed: @escaping @Sendable (any Error) -> Void
    ) {
        self.payload = payload
        self.received = received
        self.failed = failed
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        self.received(self.payload(self.unwrapInboundIn(data)))
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        self.fail(error)
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.fail(ChannelError.eof)
        context.fireChannelInactive()
    }

    private func fail(_ error: any Error) {
        guard !self.done else { return }
        self.done = true
        self.failed(error)
    }
}

extension WireIPAddress {
    /// The wire form of an address.
    init(_ ip: IPAddress) {
        let b = ip.bytes
        if b.count == 4 {
            self = .v4(b.reduce(0) { $0 << 8 | UInt32($1) })
        } else {
            self = .v6(b[0..<8].reduce(0) { $0 << 8 | UInt64($1) }, b[8..<16].reduce(0) { $0 << 8 | UInt64($1) })
        }
    }

    /// The address as the rest of the agent keeps it.
    var ipAddress: IPAddress {
        switch self {
        case .v4(let a): return IPAddress(bytes: (0..<4).map { UInt8(truncatingIfNeeded: a >> (24 - 8 * $0)) })!
        case .v6(let hi, let lo):
            let bytes =
                (0..<8).map { UInt8(truncatingIfNeeded: hi >> (56 - 8 * UInt64($0))) }
                + (0..<8).map { UInt8(truncatingIfNeeded: lo >> (56 - 8 * UInt64($0))) }
            return IPAddress(bytes: bytes)!
        }
    }
}
