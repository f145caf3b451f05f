import NIOCore

/// `ip:port` of a socket address, with brackets around an IPv6 address (`[::1]:53`); the address's own
/// description when it has no IP (a Unix socket).
public func hostPort(_ address: SocketAddress) -> String {
    guard let ip = address.ipAddress, let port = address.port else { return "\(address)" }
    return ip.contains(":") ? "[\(ip)]:\(port)" : "\(ip):\(port)"
}
