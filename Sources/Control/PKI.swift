import Logging
import MeshCore
import MeshIdentity
import X509

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// The control plane's certificates in `<dataDir>/pki`, made on first start and reused after:
/// - `ca.key` (0600) / `ca.crt`: the mesh CA (ECDSA P-256);
/// - `server.key` / `server.crt`: the API's serving certificate, SANs 127.0.0.1, ::1, localhost, the
///   listen address and `certSANs`; issued again when the SANs change or it nears expiry;
/// - `admin.key` / `admin.crt`: an admin client certificate (`mesh://admin/admin`) for meshctl;
/// and `<dataDir>/admin.meshconfig`, the file meshctl reads to use them.
public struct ControlPKI: Sendable {
    public let directory: String
    public let ca: CertificateAuthority
    public let caPEM: String
    public let serving: LoadedCredentials
    public let admin: CredentialFiles
    /// The client configuration file for meshctl with the admin credentials.
    public let adminConfigPath: String

    /// Certificates are renewed when less than this is left of them.
    static let renewBefore: TimeInterval = 30 * 86400

    public static func bootstrap(
        dataDir: String,
        listen: ListenAddress,
        extraSANs: [String],
        logger: Logger
    ) throws -> ControlPKI {
        let dir = dataDir + "/pki"
        try StatePaths.ensureDirectory(dir)
        let (ca, created) = try CertificateAuthority.loadOrCreate(directory: dir)
        if created { logger.notice("created the mesh CA in \(dir) (hash \(ca.hash))") }
        let caPEM = try PEMFiles.read(dir + "/ca.crt", what: "CA certificate")

        var dnsNames = ["localhost"]
        var ips = [IPAddress("127.0.0.1")!, IPAddress("::1")!]
        for name in extraSANs + [listen.host] {
            if let ip = IPAddress(name) {
                if !ip.isUnspecified, !ips.contains(ip) { ips.append(ip) }
            } else if !dnsNames.contains(name) {
                dnsNames.append(name)
            }
        }
        let serving = CredentialFiles(directory: dir, name: "server")
        if !Self.usable(serving, ca: ca, identity: .control("mesh-control"), dnsNames: dnsNames, ips: ips) {
            let issued = try ca.issueCredential(
                identity: .control("mesh-control"),
                dnsNames: dnsNames,
                ipAddresses: ips,
                serverAuth: true,
                clientAuth: false
            )
            try serving.write(keyPEM: issued.keyPEM, certificatePEM: issued.certificatePEM, caPEM: caPEM)
            logger.info(
                "issued the API's serving certificate for \((dnsNames + ips.map(\.description)).joined(separator: ", "))"
            )
        }
        let admin = CredentialFiles(directory: dir, name: "admin")
        if !Self.usable(admin, ca: ca, identity: .admin("admin"), dnsNames: nil, ips: nil) {
            let issued = try ca.issueCredential(identity: .admin("admin"), serverAuth: false, clientAuth: true)
            try admin.write(keyPEM: issued.keyPEM, certificatePEM: issued.certificatePEM, caPEM: caPEM)
            logger.info("issued the admin client certificate \(admin.certificate)")
        }
        let configPath = dataDir + "/admin.meshconfig"
        let server = HTTPSURL.make(host: Self.clientHost(listen.host), port: listen.port)
        try ClientConfig(server: server, files: admin).write(to: configPath)
        return ControlPKI(
            directory: dir,
            ca: ca,
            caPEM: caPEM,
            serving: try serving.load(),
            admin: admin,
            adminConfigPath: configPath
        )
    }

    /// The host a local client dials for a listen address (a wildcard means loopback).
    public static func clientHost(_ host: String) -> String {
        guard let ip = IPAddress(host), ip.isUnspecified else { return host }
        return ip.isIPv4 ? "127.0.0.1" : "::1"
    }

    /// Can these files be used as they are: readable, issued by this CA, valid for a while yet, with
    /// the wanted identity and (when given) exactly these SANs?
    static func usable(
        _ files: CredentialFiles,
        ca: CertificateAuthority,
        identity: MeshPrincipal,
        dnsNames: [String]?,
        ips: [IPAddress]?
    ) -> Bool {
        guard files.allExist, let loaded = try? files.load() else { return false }
        guard loaded.caCertificate == ca.certificate,
            ca.issued(loaded.certificate, margin: Self.renewBefore),
            loaded.identity == identity
        else { return false }
        guard let dnsNames, let ips else { return true }
        guard let sans = try? loaded.certificate.extensions.subjectAlternativeNames else { return false }
        var haveDNS = Set<String>()
        var haveIPs = Set<[UInt8]>()
        for name in sans {
            switch name {
            case .dnsName(let n): haveDNS.insert(n)
            case .ipAddress(let bytes): haveIPs.insert(Array(bytes.bytes))
            default: continue
            }
        }
        return haveDNS == Set(dnsNames) && haveIPs == Set(ips.map(\.bytes))
    }
}

/// `https://host:port` with brackets for IPv6.
public enum HTTPSURL {
    public static func make(host: String, port: Int) -> String {
        host.contains(":") ? "https://[\(host)]:\(port)" : "https://\(host):\(port)"
    }
}
