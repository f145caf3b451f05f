import MeshCore

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// `mesh-agent`'s configuration file (YAML); every field has a default, flags override it.
public struct AgentConfig: Codable, Sendable, DefaultConstructible {
    /// The control plane's API (HTTPS, mutual TLS with the node's certificate).
    public var controlServer: String = "https://127.0.0.1:7700"
    /// Other replicas of the control plane (URLs): watches fail over to them and resume from their
    /// last resourceVersion, requests try them when `controlServer` cannot be reached.
    public var controlServerAlternates: [String] = []
    /// A join token (`meshctl token create`), used once when the node has no certificate yet.
    public var joinToken: String?
    /// `sha256:<hex>` of the control plane CA's public key: the join trusts only that CA.
    public var caCertHash: String?
    /// This node's name (default: the host name).
    public var nodeName: String = AgentConfig.hostName()
    /// This node's site: endpoints of the same site are preferred.
    public var site: String?
    /// Labels the node agent sets on this node's Node (others' labels are kept).
    public var nodeLabels: [String: String] = [:]
    /// Addresses advertised in the Node (default: the host's non-loopback, non-link-local ones).
    public var nodeAddresses: [String]?
    /// Seconds between the node agent's heartbeats (20: 100,000 nodes send 5,000 beats/s).
    public var heartbeatIntervalSeconds: Double = 20
    /// Where the agent keeps its cache of the service table (`agent.db`).
    public var dataDir: String = StatePaths.defaultDataDir() + "/agent"
    /// The cluster domain answered by the DNS responder.
    public var domain: String = "cluster.local"
    /// Where DNS listens; `auto`: 169.254.96.16:53 on the mesh interface when the agent has one,
    /// else 127.0.0.1:5353.
    public var dnsListen: String = "auto"
    /// Upstream resolvers for other names (`host`, `host:port`); empty: /etc/resolv.conf.
    public var upstreams: [String] = []
    /// Longest time (seconds, 1-86400) a forwarded answer is cached, and the largest TTL handed
    /// to clients for one: a forged answer that got in anyway is gone after this long.
    public var dnsMaxCacheTTLSeconds: Int = 300
    /// Randomise the case of names sent upstream (DNS 0x20) and require it echoed; turn off only
    /// for an upstream that does not keep the case of questions.
    public var dnsCaseRandomization: Bool = true
    /// The admin API (`/routes`, `/metrics`, `/healthz`, `/readyz`): loopback only, plain HTTP, and
    /// it answers only requests whose `Host` is a loopback name or address; see ``adminAllowRemote``.
    public var adminListen: String = "127.0.0.1:7780"
    /// Serve the admin API on any address, but only over TLS (the node's certificate) and only to
    /// clients presenting an admin certificate of the mesh CA (`mesh://admin/...`).
    public var adminAllowRemote: Bool = false
    /// Where this agent accepts peer links from agents of other sites (mutual TLS 1.3, node certificates of
    /// the mesh CA only), host:port; the port is advertised in its Node (`spec.linkPort`). `off`: none, so
    /// other sites reach this node through a relay only.
    public var linkListen: String = "0.0.0.0:7900"
    /// The relays this agent may open its relay session with, by name, in order of preference; nil or empty:
    /// every Ready relay, the home being the first whose session comes up.
    public var relays: [String]?
    /// The receive window (KiB) each stream on a peer link grants its sender: the most a stream buffers
    /// unread, and how far a bulk transfer runs ahead of its window updates. 256 (yamux's default) to 16384;
    /// see LinkWindow.swift.
    public var linkStreamWindowKiB: Int = AgentConfig.defaultLinkStreamWindowKiB
    /// What carries peer links once their TLS 1.3 handshake is done: `loop` (an epoll thread of the agent's
    /// own, `mesh-link-0`: records, mux and TCP streams without NIO; UDP flows and the control stream through a
    /// socket pair to NIO; Relay/LinkLoop) or `nio` (the NIO channel and the mux session on it). A peer that does
    /// not offer the mesh record layer keeps its link on NIO either way.
    public var linkDataPath: String = "loop"
    /// Hole punching (Relay/Punch): a relayed link to another site is upgraded to a direct TCP connection where
    /// the two NATs allow it. false: links stay as dialed (direct or relayed). See PunchSettings.swift.
    public var punch: Bool = true
    /// How often a punched link is pinged (seconds, 0.1-600), below common NAT TCP timeouts so its mapping
    /// stays; an answer missing for 5 s closes it and new streams go back to the relay.
    public var punchKeepaliveSeconds: Double = 25
    /// The waits before punching again after a failed punch or a fallback (seconds; the last one repeats).
    public var punchRetrySeconds: [Double] = [1, 10, 30, 60, 120]
    /// `loopback` (VIPs bound in 127.0.0.0/8, touches no interface), `meshInterface` (a dummy link
    /// holding the VIPs, needs CAP_NET_ADMIN), or `auto` (the interface when allowed, else loopback).
    public var interfaceMode: InterfaceMode = .loopback
    /// The mesh interface's name.
    public var interfaceName: String = "mesh0"
    /// trace, debug, info, notice, warning, error, critical.
    public var logLevel: String = "info"
    /// The MQTT broker device mappers use (KubeEdge's twin topics), `host:port`; nil: no mapper API.
    public var mqttBroker: String?
    /// Start mosquitto on `mqttBroker` (a loopback address) as the agent's child.
    public var mqttStartBroker: Bool = false
    /// The agent's memory footprint (Footprint.swift): SQLite's page cache of agent.db and edge.db, KiB
    /// (16-1048576), and glibc's malloc arenas (0: glibc's default, 8 per core; 1-64).
    public var storeCacheKiB: Int = AgentConfig.defaultStoreCacheKiB
    public var mallocArenas: Int = AgentConfig.defaultMallocArenas
    /// Seconds between checks whether the agent is idle, when it drops its mappings of code and read-only
    /// data it has not touched since (Footprint.swift); 0: never. 1-3600, default 5.
    public var idleTrimSeconds: Int = AgentConfig.defaultIdleTrimSeconds
    /// What carries HTTP routes: `epoll` (the default: the epoll loops that carry TCP routes;
    /// DataPlane/HTTPLoop/README.md) or `nio` (NIO channels).
    public var httpEngine: HTTPEngine = .epoll

    public enum InterfaceMode: String, StrictEnum {
        case loopback
        case meshInterface
        case auto
    }

    public init() {}

    /// The DNS address on the mesh interface (the anchor's too), and the fallback on loopback.
    public static let meshDNSAddress = ListenAddress(host: "169.254.96.16", port: 53)
    public static let loopbackDNSAddress = ListenAddress(host: "127.0.0.1", port: 5353)

    static func hostName() -> String {
        let name = ProcessInfo.processInfo.hostName.lowercased()
        return Names.dns1123SubdomainError(name) == nil ? name : "node"
    }

    /// Checks every field; the error names the first bad one.
    public func validate() throws {
        for (i, url) in self.controlServerAlternates.enumerated() where !HTTPEndpointText.isValid(url) {
            throw ManifestError("controlServerAlternates[\(i)]: \"\(url)\" is not a URL like https://127.0.0.1:7700")
        }
        guard HTTPEndpointText.isValid(self.controlServer) else {
            throw ManifestError("controlServer: \"\(self.controlServer)\" is not a URL like https://127.0.0.1:7700")
        }
        if let t = self.joinToken, JoinTokens.parse(t) == nil {
            throw ManifestError("joinToken: must look like abcdef.0123456789abcdef (6 and 16 of a-z, 0-9)")
        }
        if let h = self.caCertHash {
            let hex = h.lowercased().hasPrefix("sha256:") ? h.dropFirst(7) : ""
            guard hex.count == 64, hex.allSatisfy(\.isHexDigit) else {
                throw ManifestError("caCertHash: must be sha256: followed by 64 hex digits")
            }
        }
        if (self.joinToken == nil) != (self.caCertHash == nil) {
            throw ManifestError(
                "joinToken and caCertHash go together: the hash is how the node knows it joins the right control plane"
            )
        }
        if let e = Names.dns1123SubdomainError(self.nodeName) { throw ManifestError("nodeName: \(e)") }
        if let s = self.site, let e = Names.dns1123LabelError(s) { throw ManifestError("site: \(e)") }
        let node = Node(metadata: ObjectMeta(name: self.nodeName, labels: self.nodeLabels), spec: NodeSpec())
        if let e = node.validationErrors().first(where: { $0.path.hasPrefix("metadata.labels") }) {
            throw ManifestError("nodeLabels\(e.path.dropFirst("metadata.labels".count)): \(e.message)")
        }
        for (i, a) in (self.nodeAddresses ?? []).enumerated() where IPAddress(a) == nil {
            throw ManifestError("nodeAddresses[\(i)]: \"\(a)\" is not an IP address")
        }
        if !(self.heartbeatIntervalSeconds >= 0.05 && self.heartbeatIntervalSeconds <= 3600) {
            throw ManifestError("heartbeatIntervalSeconds: must be between 0.05 and 3600")
        }
        if let e = Names.dns1123SubdomainError(self.domain) { throw ManifestError("domain: \(e)") }
        if self.dnsListen != "auto" { _ = try ListenAddress(self.dnsListen, field: "dnsListen") }
        if !(1...86400).contains(self.dnsMaxCacheTTLSeconds) {
            throw ManifestError("dnsMaxCacheTTLSeconds: must be between 1 and 86400 (default 300)")
        }
        let admin = try ListenAddress(self.adminListen, field: "adminListen")
        guard AdminHostCheck.isLoopback(host: admin.host) || self.adminAllowRemote else {
            throw ManifestError(
                "adminListen: \"\(self.adminListen)\" is not a loopback address; the admin API listens on 127.0.0.1, ::1 or localhost only, unless adminAllowRemote: true, which serves it over mutual TLS to admin certificates of the mesh CA only"
            )
        }
        if self.linkListen != "off" { _ = try ListenAddress(self.linkListen, field: "linkListen") }
        try self.validateLinkStreamWindow()
        try self.validateLinkDataPath()
        try self.validatePunch()
        for (i, r) in (self.relays ?? []).enumerated() {
            if let e = Names.dns1123SubdomainError(r) { throw ManifestError("relays[\(i)]: \(e)") }
        }
        if self.interfaceName.isEmpty || self.interfaceName.utf8.count > 15 {
            throw ManifestError("interfaceName: must be 1-15 characters")
        }
        _ = try LogLevels.parse(self.logLevel)
        if let b = self.mqttBroker {
            guard let colon = b.lastIndex(of: ":"), let port = Int(b[b.index(after: colon)...]),
                (1...65535).contains(port)
            else {
                throw ManifestError("mqttBroker: \"\(b)\" must be host:port, like 127.0.0.1:1883")
            }
        }
        if self.mqttStartBroker && self.mqttBroker == nil {
            throw ManifestError("mqttStartBroker: needs mqttBroker (the loopback address to start it on)")
        }
        try self.validateFootprint()
    }
}

/// URL checks without depending on the HTTP module here.
enum HTTPEndpointText {
    static func isValid(_ url: String) -> Bool {
        let rest =
            url.hasPrefix("http://")
            ? String(url.dropFirst(7)) : url.hasPrefix("https://") ? String(url.dropFirst(8)) : url
        guard let colon = rest.lastIndex(of: ":"),
            let port = Int(rest[rest.index(after: colon)...].prefix { $0 != "/" })
        else { return false }
        return (1...65535).contains(port) && colon > rest.startIndex
    }
}
