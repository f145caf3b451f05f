import MeshClient
import MeshCore
import MeshHTTP
import MeshIdentity

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Where meshctl finds the control plane and its credentials, kubectl style:
/// flags, then environment (`MESHCTL_SERVER`, `MESHCONFIG`), then the meshconfig file
/// (`--meshconfig`, `$MESHCONFIG`, `~/.config/edge-mesh/meshconfig.yaml`, else the admin file a
/// control plane in the default data directory wrote), then `https://127.0.0.1:7700`.
public struct ClientSettings: Sendable {
    public var server: String?
    public var meshconfig: String?
    public var certificateAuthority: String?
    public var clientCertificate: String?
    public var clientKey: String?
    public var environment: [String: String]

    public init(
        server: String? = nil,
        meshconfig: String? = nil,
        certificateAuthority: String? = nil,
        clientCertificate: String? = nil,
        clientKey: String? = nil,
        environment: [String: String] = ProcessInfo.processInfo.environment
    ) {
        self.server = server
        self.meshconfig = meshconfig
        self.certificateAuthority = certificateAuthority
        self.clientCertificate = clientCertificate
        self.clientKey = clientKey
        self.environment = environment
    }

    /// The meshconfig file in use, if any: an explicit one must exist; the defaults may not.
    public func configFile() throws -> (path: String, config: ClientConfig)? {
        if let explicit = self.meshconfig ?? self.environment["MESHCONFIG"].flatMap({ $0.isEmpty ? nil : $0 }) {
            return (explicit, try ClientConfig.load(explicit))
        }
        for candidate in [ClientConfig.defaultPath(), StatePaths.defaultDataDir() + "/control/admin.meshconfig"]
        where FileManager.default.fileExists(atPath: candidate) {
            return (candidate, try ClientConfig.load(candidate))
        }
        return nil
    }

    /// The client to use, with TLS settings built from the CA, certificate and key.
    public func client() throws -> ControlClient {
        let file = try self.configFile()
        let url =
            self.server ?? self.environment["MESHCTL_SERVER"].flatMap { $0.isEmpty ? nil : $0 } ?? file?.config.server
            ?? "https://127.0.0.1:7700"
        guard let endpoint = HTTPEndpoint(url: url, defaultTLS: true) else {
            throw ManifestError("--server \"\(url)\" is not a URL like https://127.0.0.1:7700")
        }
        guard endpoint.tls else { return ControlClient(endpoint: endpoint) }
        let ca = self.certificateAuthority ?? file?.config.certificateAuthority
        let cert = self.clientCertificate ?? file?.config.clientCertificate
        let key = self.clientKey ?? file?.config.clientKey
        guard let ca else {
            throw ManifestError(
                "no CA certificate to check \(endpoint) with: pass --certificate-authority FILE, or a meshconfig (--meshconfig, $MESHCONFIG, \(ClientConfig.defaultPath())); `meshctl up` writes one"
            )
        }
        if (cert == nil) != (key == nil) {
            throw ManifestError("--client-certificate and --client-key go together")
        }
        do {
            let caPEM = try PEMFiles.read(ca, what: "CA certificate")
            let keyPEM = try key.map { try PEMFiles.read($0, what: "client key") }
            let certPEM = try cert.map { try PEMFiles.read($0, what: "client certificate") }
            // The server must be the control plane (mesh://control/...), not any holder of a mesh certificate.
            let tls = try MeshTLS.client(caPEM: caPEM, expect: .controlPlane, key: keyPEM, certificate: certPEM)
            return ControlClient(endpoint: endpoint, mesh: tls)
        } catch let e as IdentityError {
            throw ManifestError(e.message)
        } catch {
            throw ManifestError("cannot use the credentials (\(ca), \(cert ?? "-"), \(key ?? "-")): \(error)")
        }
    }
}

/// Durations as people type them: `90s`, `30m`, `24h`, `7d`, `1h30m`.
public enum Durations {
    public static func seconds(_ text: String) -> Int? {
        var total = 0
        var number = ""
        var sawUnit = false
        for c in text {
            if c.isASCII, c.isNumber {
                number.append(c)
                continue
            }
            guard let n = Int(number) else { return nil }
            let unit: Int
            switch c {
            case "s": unit = 1
            case "m": unit = 60
            case "h": unit = 3600
            case "d": unit = 86400
            default: return nil
            }
            let (product, overflow) = n.multipliedReportingOverflow(by: unit)
            guard !overflow else { return nil }
            total += product
            number = ""
            sawUnit = true
        }
        guard number.isEmpty, sawUnit else { return nil }
        return total
    }
}
