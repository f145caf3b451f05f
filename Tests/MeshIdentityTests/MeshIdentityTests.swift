import Crypto
import Foundation
import MeshCore
import MeshTestSupport
import NIOCore
import Testing
import X509

@testable import MeshIdentity

@Suite("MeshIdentity: mesh:// identities, the CA, CSRs and credential files", .rationed)
struct MeshIdentityTests {
    @Test("mesh://<role>/<name>: every role round-trips through its URI")
    func identityURIRoundTrip() {
        let all: [MeshPrincipal] = [.admin("ops"), .node("edge-1"), .control("cp-0"), .relay("r1.site-a")]
        for identity in all {
            #expect(MeshPrincipal(uri: identity.uri) == identity)
            #expect(identity.description == identity.uri)
            #expect(identity.uri.hasPrefix("mesh://"))
        }
        #expect(MeshPrincipal.node("edge-1").uri == "mesh://node/edge-1")
        #expect(MeshPrincipal.relay("r1").name == "r1")
    }

    @Test(
        "anything else is no identity: other scheme, unknown role, empty or bad name, extra path",
        arguments: [
            "spiffe://node/edge-1", "mesh://", "mesh://node", "mesh://node/", "mesh://pod/edge-1",
            "mesh://node/Edge_1", "mesh://node/edge-1/extra", "mesh:///edge-1", "MESH://node/edge-1",
            "mesh://node/-edge", "mesh://admin/" + String(repeating: "a", count: 254),
        ]
    )
    func badURIs(_ uri: String) {
        #expect(MeshPrincipal(uri: uri) == nil)
    }

    @Test("an issued certificate carries the identity, the names asked for, its usages, and the CA's limits")
    func issuedCertificate() throws {
        let ca = try CertificateAuthority.create()
        let key = Certificate.PrivateKey(P256.Signing.PrivateKey())
        let now = Date()
        let certificate = try ca.issue(
            identity: .control("cp-0"),
            publicKey: key.publicKey,
            dnsNames: ["control.mesh.test"],
            ipAddresses: [IPAddress("127.0.0.1")!, IPAddress("::1")!],
            serverAuth: true,
            clientAuth: false,
            now: now,
            validity: 3600
        )
        #expect(meshIdentity(of: certificate) == .control("cp-0"))
        let sans = try #require(try certificate.extensions.subjectAlternativeNames)
        #expect(sans.contains(.dnsName("control.mesh.test")))
        #expect(sans.contains(.uniformResourceIdentifier("mesh://control/cp-0")))
        #expect(sans.filter { if case .ipAddress = $0 { true } else { false } }.count == 2)
        let eku = try #require(try certificate.extensions.extendedKeyUsage)
        #expect(eku.contains(.serverAuth) && !eku.contains(.clientAuth))
        #expect(try certificate.extensions.basicConstraints == .notCertificateAuthority)
        #expect(abs(certificate.notValidAfter.timeIntervalSince(now) - 3600) < 2)
        #expect(certificate.notValidBefore < now)
        // Verified by its CA, now and within its validity; not past it, not by another CA.
        #expect(ca.issued(certificate))
        #expect(ca.issued(certificate, margin: 3000))
        #expect(!ca.issued(certificate, margin: 3700))
        #expect(!ca.issued(certificate, now: now + 7200))
        #expect(!(try CertificateAuthority.create()).issued(certificate))
        // Never valid beyond the CA itself.
        let long = try ca.issue(
            identity: .node("n"),
            publicKey: key.publicKey,
            serverAuth: false,
            clientAuth: true,
            validity: CertificateAuthority.caValidity * 2
        )
        #expect(long.notValidAfter == ca.certificate.notValidAfter)
    }

    @Test("a node CSR yields only mesh://node/<its common name>; a relay's only mesh://relay/<name>")
    func csrSigning() throws {
        let ca = try CertificateAuthority.create()
        let csr = try NodeKey().csrPEM(nodeName: "edge-7")
        let (name, certificate) = try ca.signNodeCSR(pem: csr, validity: 600)
        #expect(name == "edge-7")
        #expect(meshIdentity(of: certificate) == .node("edge-7"))
        let eku = try #require(try certificate.extensions.extendedKeyUsage)
        #expect(eku.contains(.serverAuth) && eku.contains(.clientAuth))
        let relay = try ca.signCSR(pem: try NodeKey().csrPEM(nodeName: "r1"), role: .relay)
        #expect(meshIdentity(of: relay.certificate) == .relay("r1"))
    }

    @Test("a bad CSR is refused with a message saying why")
    func badCSRs() throws {
        let ca = try CertificateAuthority.create()
        let garbage = #expect(throws: IdentityError.self) {
            _ = try ca.signNodeCSR(
                pem: "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
            )
        }
        #expect(garbage?.message.hasPrefix("csr: not a PEM certificate signing request") == true)
        let badName = #expect(throws: IdentityError.self) {
            _ = try ca.signNodeCSR(pem: try NodeKey().csrPEM(nodeName: "Bad_Name"))
        }
        #expect(badName?.message.contains("\"Bad_Name\" is invalid") == true)
    }

    @Test("the CA hash is sha256 of the DER public key, as openssl computes it")
    func caHashMatchesOpenSSL() async throws {
        let ca = try CertificateAuthority.create()
        #expect(ca.hash.hasPrefix("sha256:") && ca.hash.count == 7 + 64)
        #expect(CertificateAuthority.hash(of: ca.certificate) == ca.hash)
        #expect(try CertificateAuthority.create().hash != ca.hash)
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/openssl") else { return }
        let dir = TempDir()
        let path = dir.path + "/ca.crt"
        try ca.certificatePEM().write(toFile: path, atomically: true, encoding: .utf8)
        let pub = try await run("/usr/bin/openssl", ["x509", "-in", path, "-pubkey", "-noout"])
        try pub.stdout.write(toFile: dir.path + "/ca.pub", atomically: true, encoding: .utf8)
        let der = try await run(
            "/usr/bin/openssl",
            ["pkey", "-pubin", "-in", dir.path + "/ca.pub", "-outform", "der", "-out", dir.path + "/ca.der"]
        )
        #expect(der.status == 0, "\(der.stderr)")
        let bytes = try Data(contentsOf: URL(fileURLWithPath: dir.path + "/ca.der"))
        let expected = "sha256:" + SHA256.hash(data: bytes).map { String(format: "%02x", $0) }.joined()
        #expect(ca.hash == expected)
    }

    @Test("credential files: written with a private key file, loaded back; a foreign key or CA is named")
    func credentialFiles() throws {
        let dir = TempDir()
        let ca = try CertificateAuthority.create()
        let issued = try ca.issueCredential(identity: .node("edge-2"), serverAuth: true, clientAuth: true)
        let files = CredentialFiles(directory: dir.path, name: "node")
        #expect(!files.allExist)
        try files.write(keyPEM: issued.keyPEM, certificatePEM: issued.certificatePEM, caPEM: try ca.certificatePEM())
        #expect(files.allExist)
        let mode = try FileManager.default.attributesOfItem(atPath: files.key)[.posixPermissions] as? Int
        #expect(mode == 0o600)
        let loaded = try files.load()
        #expect(loaded.identity == .node("edge-2"))
        #expect(loaded.caCertificate == ca.certificate)

        // Another key beside the certificate.
        let other = try ca.issueCredential(identity: .node("edge-2"), serverAuth: true, clientAuth: true)
        try files.write(keyPEM: other.keyPEM, certificatePEM: issued.certificatePEM, caPEM: try ca.certificatePEM())
        let wrongKey = #expect(throws: IdentityError.self) { _ = try files.load() }
        #expect(wrongKey?.message.contains("does not belong to the key") == true)
        // Another CA beside the certificate.
        let stranger = try CertificateAuthority.create()
        try files.write(
            keyPEM: issued.keyPEM,
            certificatePEM: issued.certificatePEM,
            caPEM: try stranger.certificatePEM()
        )
        let wrongCA = #expect(throws: IdentityError.self) { _ = try files.load() }
        #expect(wrongCA?.message.contains("was not issued by the CA") == true)
    }

    @Test("loadOrCreate makes a CA once and loads the same one after")
    func caLoadOrCreate() throws {
        let dir = TempDir()
        let first = try CertificateAuthority.loadOrCreate(directory: dir.path)
        #expect(first.created)
        let second = try CertificateAuthority.loadOrCreate(directory: dir.path)
        #expect(!second.created)
        #expect(second.ca.hash == first.ca.hash)
        #expect(second.ca.certificate == first.ca.certificate)
    }
}
