import NIOCore

enum HTTPProxy {
    static func initialize(channel: any Channel, handle: RouteHandle, environment: ProxyEnvironment) throws {
        throw ProxyError.noHealthyBackend
    }
}

final class HTTPUpstreamPools: Sendable {
    init(group: any EventLoopGroup, configuration: DataPlaneConfiguration, counters: DataPlaneCounters) {}
    func closeAll() {}
}
