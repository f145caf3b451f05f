import MeshCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// The addresses a node advertises in its Node's `spec.addresses`: the host's.
public enum HostAddresses {
    /// At most this many are advertised (a host with dozens of container bridges stays readable).
    public static let limit = 16

    /// Every address of an interface that is up, except loopback and link-local ones and those of
    /// `excludedInterfaces` (the mesh interface, which holds VIPs). Private ranges (RFC 1918,
    /// 100.64/10, fc00::/7) are `InternalIP`, others `ExternalIP`. IPv4 first, sorted, deduplicated.
    ///
    /// On Linux the addresses are read over rtnetlink one interface at a time (``LinkAddressDump``), so the
    /// excluded interfaces' addresses are never read; elsewhere, or when that fails, from getifaddrs(3).
    public static func current(excludingInterfaces excludedInterfaces: Set<String> = []) -> [NodeAddress] {
        #if canImport(Glibc)
        if let list = LinkAddressDump.addresses(excluding: excludedInterfaces) {
            return Self.classify(Set(list.filter(Self.isAdvertisable)))
        }
        #endif
        return Self.classify(Self.fromGetifaddrs(excludingInterfaces: excludedInterfaces))
    }

    /// The same list from getifaddrs(3), which reads every address of every interface.
    static func fromGetifaddrs(excludingInterfaces excludedInterfaces: Set<String>) -> Set<IPAddress> {
        var found = Set<IPAddress>()
        var list: UnsafeMutablePointer<ifaddrs>?
        guard getifaddrs(&list) == 0, let first = list else { return found }
        defer { freeifaddrs(list) }
        var cursor: UnsafeMutablePointer<ifaddrs>? = first
        while let entry = cursor {
            defer { cursor = entry.pointee.ifa_next }
            let flags = Int32(bitPattern: entry.pointee.ifa_flags)
            guard flags & Int32(IFF_UP) != 0, flags & Int32(IFF_LOOPBACK) == 0,
                let sa = entry.pointee.ifa_addr
            else { continue }
            let name = String(cString: entry.pointee.ifa_name)
            if excludedInterfaces.contains(name) { continue }
            let address: IPAddress?
            switch Int32(sa.pointee.sa_family) {
            case AF_INET:
                address = sa.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { sin in
                    withUnsafeBytes(of: sin.pointee.sin_addr) { IPAddress(bytes: $0) }
                }
            case AF_INET6:
                address = sa.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { sin6 in
                    withUnsafeBytes(of: sin6.pointee.sin6_addr) { IPAddress(bytes: $0) }
                }
            default:
                address = nil
            }
            if let a = address, Self.isAdvertisable(a) { found.insert(a) }
        }
        return found
    }

    /// Addresses given as text (config), classified the same way; nil when one is not an address.
    public static func fixed(_ texts: [String]) -> [NodeAddress]? {
        var found = Set<IPAddress>()
        for t in texts {
            guard let a = IPAddress(t) else { return nil }
            found.insert(a)
        }
        return Self.classify(found)
    }

    static let linkLocal = [CIDR("169.254.0.0/16")!, CIDR("fe80::/10")!]
    static let internalRanges = [
        CIDR("10.0.0.0/8")!, CIDR("172.16.0.0/12")!, CIDR("192.168.0.0/16")!, CIDR("100.64.0.0/10")!,
        CIDR("127.0.0.0/8")!, CIDR("fc00::/7")!, CIDR("::1/128")!,
    ]

    static func isAdvertisable(_ a: IPAddress) -> Bool {
        !a.isLoopback && !a.isUnspecified && !Self.linkLocal.contains { $0.contains(a) }
    }

    static func classify(_ addresses: Set<IPAddress>) -> [NodeAddress] {
        let sorted = addresses.sorted { l, r in
            l.isIPv4 != r.isIPv4 ? l.isIPv4 : l < r
        }
        return sorted.prefix(Self.limit).map { a in
            NodeAddress(
                type: Self.internalRanges.contains { $0.contains(a) } ? .internalIP : .externalIP,
                address: a.description
            )
        }
    }
}
