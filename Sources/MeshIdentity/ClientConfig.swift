import MeshCore

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// meshctl's client configuration (a kubeconfig reduced to one cluster and one user): where the
/// control plane is and which files prove who we are. YAML, strict like every config file.
///
/// ```yaml
/// server: https://127.0.0.1:7700
/// certificateAuthority: /home/me/.local/state/edge-mesh/control/pki/ca.crt
/// clientCertificate: /home/me/.local/state/edge-mesh/control/pki/admin.crt
/// clientKey: /home/me/.local/state/edge-mesh/control/pki/admin.key
/// ```
public struct ClientConfig: Codable, Sendable, Equatable, DefaultConstructible {
    public var server: String = "https://127.0.0.1:7700"
    public var certificateAuthority: String?
    public var clientCertificate: String?
    public var clientKey: String?

    public init() {}

    public init(server: String, files: CredentialFiles) {
        self.server = server
        self.certificateAuthority = files.ca
        self.clientCertificate = files.certificate
        self.clientKey = files.key
    }

    /// `$XDG_CONFIG_HOME/edge-mesh/meshconfig.yaml`, else `~/.config/edge-mesh/meshconfig.yaml`.
    public static func defaultPath() -> String {
        let env = ProcessInfo.processInfo.environment
        if let x = env["XDG_CONFIG_HOME"], !x.isEmpty { return x + "/edge-mesh/meshconfig.yaml" }
        if let home = env["HOME"], !home.isEmpty, home != "/" { return home + "/.config/edge-mesh/meshconfig.yaml" }
        return "/etc/edge-mesh/meshconfig.yaml"
    }

    public static func load(_ path: String) throws -> ClientConfig {
        try ConfigFile.load(ClientConfig.self, path: path)
    }

    /// Writes the file (0600: it names a private key), paths made absolute.
    public func write(to path: String) throws {
        func absolute(_ p: String?) -> String? {
            guard let p else { return nil }
            return p.hasPrefix("/") ? p : FileManager.default.currentDirectoryPath + "/" + p
        }
        func quoted(_ s: String) -> String {
            // JSON string syntax is valid YAML.
            String(decoding: (try? MeshJSON.encode(s)) ?? Data("\"\"".utf8), as: UTF8.self)
        }
        var text = "# meshctl's client configuration (written by the control plane)\n"
        text += "server: \(quoted(self.server))\n"
        if let v = absolute(self.certificateAuthority) { text += "certificateAuthority: \(quoted(v))\n" }
        if let v = absolute(self.clientCertificate) { text += "clientCertificate: \(quoted(v))\n" }
        if let v = absolute(self.clientKey) { text += "clientKey: \(quoted(v))\n" }
        try PEMFiles.write(text, to: path, mode: 0o600)
    }
}
