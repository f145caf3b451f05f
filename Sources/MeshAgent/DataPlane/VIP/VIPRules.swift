import MeshCore

/// The netfilter rules that send every TCP connection to a VIP to the one VIP listener (pure: text in, text
/// out; `VIPFirewall` runs them).
///
/// One chain of our own in the `nat` table (`MESH-VIP` by default), jumped to first from `OUTPUT` (local apps)
/// and `PREROUTING` (traffic routed in, e.g. from containers). It holds one `REDIRECT` rule per prefix of the
/// exact prefix cover of the VIPs (`cover(_:)`): VIPs handed out one after another from a service CIDR collapse
/// into a handful of prefixes, so 10,000 services cost a few rules, and never an address that is not a VIP.
/// The whole chain is replaced in one `iptables-restore --noflush` transaction when the cover changes.
enum VIPRules {
    /// The smallest list of prefixes whose union is exactly `addresses` (IPv4), as `a.b.c.d/len`.
    static func cover(_ addresses: some Sequence<UInt32>) -> [String] {
        let sorted = Array(Set(addresses)).sorted()
        var prefixes: [String] = []
        var i = 0
        while i < sorted.count {
            let start = sorted[i]
            // The largest aligned block starting at `start` that the run from i fills completely.
            var bits = 0
            while bits < 32 {
                let size = 1 << (bits + 1)
                let mask = UInt32(truncatingIfNeeded: size - 1)
                guard start & mask == 0, i + size - 1 < sorted.count,
                    UInt64(sorted[i + size - 1]) == UInt64(start) + UInt64(size) - 1
                else { break }
                bits += 1
            }
            prefixes.append("\(IPAddress.v4(start))/\(32 - bits)")
            i += 1 << bits
        }
        return prefixes
    }

    /// The prefixes of `vips` of one family: the IPv4 cover, or one /128 per IPv6 VIP.
    static func prefixes(_ vips: some Sequence<IPAddress>, v6: Bool) -> [String] {
        if v6 {
            return vips.filter { !$0.isIPv4 }.map { "\($0)/128" }.sorted()
        }
        return Self.cover(
            vips.compactMap {
                if case .v4(let value) = $0 { return value }
                return nil
            }
        )
    }

    /// `iptables-restore --noflush` input that creates `chain` (or empties it) and fills it with one
    /// `REDIRECT` per prefix to `port`; with `hook`, also jumps to it first from OUTPUT and PREROUTING.
    static func restoreInput(chain: String, prefixes: [String], port: Int, hook: Bool) -> String {
        var lines = ["*nat", ":\(chain) - [0:0]"]
        for prefix in prefixes {
            lines.append("-A \(chain) -d \(prefix) -p tcp -j REDIRECT --to-ports \(port)")
        }
        if hook {
            lines.append("-I OUTPUT 1 -j \(chain)")
            lines.append("-I PREROUTING 1 -j \(chain)")
        }
        lines.append("COMMIT")
        return lines.joined(separator: "\n") + "\n"
    }
}
