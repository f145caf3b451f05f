import MeshCore
import MeshIdentity

/// The admin API's defence against DNS rebinding: a web page that got a browser to send requests to
/// 127.0.0.1:7780 under its own name (`evil.example` resolving to 127.0.0.1) still sends
/// `Host: evil.example`, so only requests naming a loopback host are answered. A request without
/// `Host` (HTTP/1.0 tools; browsers always send one) is answered. With `adminAllowRemote` the API is
/// served over mutual TLS instead, to admin certificates of the mesh CA only.
enum AdminHostCheck {
    /// `localhost` (any case, trailing dot allowed) or a loopback IP address (127.0.0.0/8, ::1).
    static func isLoopback(host: String) -> Bool {
        var h = host.lowercased()
        if h.hasSuffix(".") { h.removeLast() }
        if h == "localhost" { return true }
        return IPAddress(h)?.isLoopback == true
    }

    /// The host part of a `Host` header value (`127.0.0.1:7780`, `[::1]:7780`, `localhost`), or nil
    /// when it is not one.
    static func hostPart(_ value: String) -> String? {
        let v = value
        if v.hasPrefix("[") {
            guard let close = v.firstIndex(of: "]") else { return nil }
            let rest = v[v.index(after: close)...]
            guard rest.isEmpty || (rest.hasPrefix(":") && Int(rest.dropFirst()) != nil) else { return nil }
            return String(v[v.index(after: v.startIndex)..<close])
        }
        let parts = v.split(separator: ":", omittingEmptySubsequences: false)
        switch parts.count {
        case 1: return v.isEmpty ? nil : v
        case 2: return Int(parts[1]) != nil && !parts[0].isEmpty ? String(parts[0]) : nil
        default: return nil
        }
    }

    /// Nil when the request may be answered, else why not (for the 403 body).
    static func refusal(hostHeaders: [String]) -> String? {
        guard let value = hostHeaders.first else { return nil }
        guard hostHeaders.count == 1 else { return "more than one Host header" }
        guard let host = hostPart(value), isLoopback(host: host) else {
            return
                "Host \"\(value.prefix(100))\" is not a loopback name or address: the agent's admin API answers only requests for 127.0.0.1, [::1] or localhost (a defence against DNS rebinding)"
        }
        return nil
    }

    /// Over mutual TLS: nil when the client's verified certificate is an admin's, else why not.
    static func refusal(peerIdentity: String?) -> String? {
        guard let peerIdentity else {
            return "the agent's admin API needs a client certificate of the mesh CA (an admin's, mesh://admin/NAME)"
        }
        guard case .admin = MeshPrincipal(uri: peerIdentity) else {
            return "\(peerIdentity) may not use the agent's admin API: admin certificates (mesh://admin/NAME) only"
        }
        return nil
    }
}
