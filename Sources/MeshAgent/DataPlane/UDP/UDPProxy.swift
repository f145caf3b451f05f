import NIOCore

final class UDPProxyHandler: ChannelInboundHandler {
    typealias InboundIn = AddressedEnvelope<ByteBuffer>
    init(handle: RouteHandle, environment: ProxyEnvironment) {}
}
