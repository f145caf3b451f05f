import MeshCore

/// Who a certificate speaks for: the identity is a URI in the certificate's subjectAltName.
///
/// Scheme: `mesh://<role>/<name>`, with role `admin` (operators, meshctl), `node` (an enrolled agent,
/// name = the node's DNS-1123 name), `control` (the control plane's serving certificate) or `relay`
/// (a relay's serving certificate).
public enum MeshPrincipal: Sendable, Hashable, CustomStringConvertible {
    case admin(String)
    case node(String)
    case control(String)
    case relay(String)

    public static let scheme = "mesh://"

    /// The URI written into the certificate.
    public var uri: String {
        switch self {
        case .admin(let n): return "\(Self.scheme)admin/\(n)"
        case .node(let n): return "\(Self.scheme)node/\(n)"
        case .control(let n): return "\(Self.scheme)control/\(n)"
        case .relay(let n): return "\(Self.scheme)relay/\(n)"
        }
    }

    public var name: String {
        switch self {
        case .admin(let n), .node(let n), .control(let n), .relay(let n): return n
        }
    }

    public var description: String { self.uri }

    /// Parses `mesh://<role>/<name>`; nil for anything else (unknown role, bad name, other scheme).
    public init?(uri: String) {
        guard uri.hasPrefix(Self.scheme) else { return nil }
        let rest = uri.dropFirst(Self.scheme.count)
        let parts = rest.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 2, !parts[1].isEmpty else { return nil }
        let name = String(parts[1])
        guard Names.dns1123SubdomainError(name) == nil else { return nil }
        switch parts[0] {
        case "admin": self = .admin(name)
        case "node": self = .node(name)
        case "control": self = .control(name)
        case "relay": self = .relay(name)
        default: return nil
        }
    }
}
