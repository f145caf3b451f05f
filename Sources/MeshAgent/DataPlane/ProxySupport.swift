import MeshCore
import NIOCore

enum ProxyError: Error {
    case tooManyConnections
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
