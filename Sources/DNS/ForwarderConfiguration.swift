import Logging
import MeshCore
import NIOCore
import NIOPosix

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// The `nameserver` lines (and `options timeout:`/`attempts:`) of a resolv.conf file.
public struct ResolvConf: Hashable, Sendable {
    public var nameservers: [String] = []
    public var timeoutSeconds: Int?
    public var attempts: Int?

    public init(nameservers: [String] = [], timeoutSeconds: Int? = nil, attempts: Int? = nil) {
        self.nameservers = nameservers
        self.timeoutSeconds = timeoutSeconds
        self.attempts = attempts
    }

    /// Parses resolv.conf text; unknown lines and malformed addresses are skipped.
    public init(parsing text: String) {
        for rawLine in text.split(whereSeparator: { $0 == "\n" || $0 == "\r" }) {
            let line = rawLine.prefix { $0 != "#" && $0 != ";" }
            let fields = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            guard let keyword = fields.first else { continue }
            switch keyword {
            case "nameserver":
                guard fields.count >= 2 else { continue }
                // A link-local IPv6 server may carry a zone (`fe80::1%eth0`): not usable by address alone.
                let addr = String(fields[1])
                if !addr.contains("%"), IPAddress(addr) != nil { self.nameservers.append(addr) }
            case "options":
                for option in fields.dropFirst() {
                    if option.hasPrefix("timeout:") { self.timeoutSeconds = Int(option.dropFirst(8)) }
                    if option.hasPrefix("attempts:") { self.attempts = Int(option.dropFirst(9)) }
                }
            default:
                continue
            }
        }
    }

    /// Reads and parses a file; a missing file gives no nameservers.
    public static func load(path: String) -> ResolvConf {
        guard let text = readSmallFile(path) else { return ResolvConf() }
        return ResolvConf(parsing: text)
    }
}

/// Parses `host`, `host:port`, `[v6]:port` or a bare IPv6 address into a socket address (port 53 default).
func parseUpstream(_ text: String) -> SocketAddress? {
    var host = text
    var port = 53
    if text.hasPrefix("[") {
        guard let close = text.firstIndex(of: "]") else { return nil }
        host = String(text[text.index(after: text.startIndex)..<close])
        let rest = text[text.index(after: close)...]
        if rest.hasPrefix(":") {
            guard let p = Int(rest.dropFirst()) else { return nil }
            port = p
        } else if !rest.isEmpty {
            return nil
        }
    } else if text.filter({ $0 == ":" }).count == 1, let colon = text.firstIndex(of: ":") {
        host = String(text[..<colon])
        guard let p = Int(text[text.index(after: colon)...]) else { return nil }
        port = p
    }
    guard IPAddress(host) != nil, (0...65535).contains(port) else { return nil }
    return try? SocketAddress(ipAddress: host, port: port)
}

private func readSmallFile(_ path: String) -> String? {
    guard let f = fopen(path, "r") else { return nil }
    defer { fclose(f) }
    var out: [UInt8] = []
    var buf = [UInt8](repeating: 0, count: 4096)
    while true {
        let n = fread(&buf, 1, buf.count, f)
        if n <= 0 { break }
        out.append(contentsOf: buf[0..<n])
        if out.count > 1 << 20 { break }
    }
    return String(decoding: out, as: UTF8.self)
}

/// Upstream resolver settings.
public struct DNSForwardingConfiguration: Sendable {
    /// Upstreams as `host`, `host:port` or `[v6]:port`; empty means the `nameserver` lines of
    /// ``resolvConfPath``.
    public var upstreams: [String]
    public var resolvConfPath: String
    /// How long to wait for one upstream before trying the next.
    public var timeout: TimeAmount
    /// Rounds over the upstream list before answering SERVFAIL.
    public var attempts: Int
    /// Cached answers kept at most (least recently used go first).
    public var cacheCapacity: Int
    /// Upper bound for any cached TTL (seconds), and for the TTLs handed out from the cache: a
    /// forged answer that got in anyway lives at most this long.
    public var maxCacheTTL: UInt32
    /// Randomise the case of question names sent upstream (DNS 0x20) and require it echoed.
    /// Turn off only for an upstream that does not keep the case of questions.
    public var caseRandomization: Bool
    /// Upstream queries (each one a socket) in flight at most; further questions get SERVFAIL.
    public var maxUpstreamQueries: Int
    /// What cached answers age on (`NIODeadline.now` by default; tests pass a clock they move by hand).
    public var now: @Sendable () -> NIODeadline = { .now() }

    public init(
        upstreams: [String] = [],
        resolvConfPath: String = "/etc/resolv.conf",
        timeout: TimeAmount = .seconds(2),
        attempts: Int = 2,
        cacheCapacity: Int = 10_000,
        maxCacheTTL: UInt32 = 300,
        caseRandomization: Bool = true,
        maxUpstreamQueries: Int = 1024
    ) {
        self.upstreams = upstreams
        self.resolvConfPath = resolvConfPath
        self.timeout = timeout
        self.attempts = attempts
        self.cacheCapacity = cacheCapacity
        self.maxCacheTTL = maxCacheTTL
        self.caseRandomization = caseRandomization
        self.maxUpstreamQueries = maxUpstreamQueries
    }

    /// The upstream addresses this configuration names (from the list or from resolv.conf).
    public func resolveUpstreams() -> [SocketAddress] {
        let names = self.upstreams.isEmpty ? ResolvConf.load(path: self.resolvConfPath).nameservers : self.upstreams
        return names.compactMap(parseUpstream)
    }
}
