import MeshCore
import Synchronization

/// Hands out service VIPs from the configured CIDRs without collisions.
///
/// The store is the authority: every VIP is a reservation (`vip/<ip>`) taken in the same
/// transaction as the service write, so two writers can never hold one address. This allocator
/// only remembers which addresses are taken to propose a free one quickly, scanning from a cursor
/// that moves on (a freed address is not reused at once, which keeps stale DNS answers harmless).
public final class VIPAllocator: Sendable {
    public let cidrs: [CIDR]
    private let state: Mutex<(used: Set<IPAddress>, cursor: [CIDR: UInt64])>

    /// - Parameter start: where the cursors begin, as an offset into each CIDR (modulo its size). Replicas of
    ///   one control plane start at different places, so that writers racing on different replicas rarely
    ///   propose the same address (each such collision costs the loser a retry).
    public init(cidrs: [CIDR], used: some Sequence<IPAddress> = [], start: UInt64 = 0) {
        self.cidrs = cidrs
        let cursors =
            start == 0 ? [:] : Dictionary(cidrs.map { ($0, start % Self.size($0)) }, uniquingKeysWith: { a, _ in a })
        self.state = Mutex((Set(used), cursors))
    }

    /// A replica's starting offset: FNV-1a of its name (0, the first address on, for a single control plane).
    public static func start(replica name: String) -> UInt64 {
        guard !name.isEmpty else { return 0 }
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for b in name.utf8 { h = (h ^ UInt64(b)) &* 0x0000_0100_0000_01b3 }
        return h
    }

    public static func token(_ ip: IPAddress) -> String { "vip/\(ip)" }

    /// The CIDR that hands out addresses of `family`.
    public func cidr(for family: IPFamily) -> CIDR? {
        self.cidrs.first { $0.network.isIPv4 == (family == .ipv4) }
    }

    /// Why `ip` cannot be a VIP, or nil when it can (inside a CIDR, not its network/broadcast address).
    public func rejection(of ip: IPAddress) -> String? {
        guard let cidr = self.cidrs.first(where: { $0.contains(ip) }), let offset = cidr.offset(of: ip) else {
            return "\(ip) is outside the service CIDRs (\(self.cidrs.map(\.description).joined(separator: ", ")))"
        }
        if !Self.usable(offset, in: cidr) { return "\(ip) is the network or broadcast address of \(cidr)" }
        return nil
    }

    static func usable(_ offset: UInt64, in cidr: CIDR) -> Bool {
        let size = Self.size(cidr)
        return offset >= 1 && offset < size - (cidr.network.isIPv4 ? 1 : 0)
    }

    static func size(_ cidr: CIDR) -> UInt64 { cidr.hostBits >= 63 ? UInt64(1) << 63 : UInt64(1) << cidr.hostBits }

    /// A free address of `family` not yet known to be taken, or nil when the range is full.
    public func propose(family: IPFamily) -> IPAddress? {
        guard let cidr = self.cidr(for: family) else { return nil }
        return self.state.withLock { s -> IPAddress? in
            let size = Self.size(cidr)
            let usable = size - (cidr.network.isIPv4 ? 2 : 1)
            guard usable > 0 else { return nil }
            var offset = s.cursor[cidr] ?? 0
            // Bounded scan: at most every usable address once.
            for _ in 0..<min(usable, 1 << 24) {
                offset = offset + 1 >= size - (cidr.network.isIPv4 ? 1 : 0) ? 1 : offset + 1
                let ip = cidr.address(at: offset)
                if !s.used.contains(ip) {
                    s.cursor[cidr] = offset
                    return ip
                }
            }
            return nil
        }
    }

    public func markUsed(_ ip: IPAddress) { _ = self.state.withLock { $0.used.insert(ip) } }

    public func markFree(_ ip: IPAddress) { _ = self.state.withLock { $0.used.remove(ip) } }

    public var usedCount: Int { self.state.withLock { $0.used.count } }
}
