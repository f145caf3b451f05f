import MeshCore
import MeshIdentity
import MeshTestSupport
import Testing

/// The identity scheme and what the CA is willing to sign.
@Suite(.rationed) struct IdentityTests {
    @Test func identityURIsParseOnlyWhenWellFormed() {
        #expect(MeshPrincipal(uri: "mesh://node/edge-a1") == .node("edge-a1"))
        #expect(MeshPrincipal(uri: "mesh://admin/admin") == .admin("admin"))
        #expect(MeshPrincipal.node("edge-a1").uri == "mesh://node/edge-a1")
        #expect(MeshPrincipal(uri: "mesh://relay/r1") == .relay("r1"))
        #expect(MeshPrincipal.relay("r1").uri == "mesh://relay/r1")
        for bad in [
            "mesh://node/", "mesh://node/Edge_A", "mesh://root/x", "spiffe://node/x", "mesh://node/a/b", "mesh://node",
        ] {
            #expect(MeshPrincipal(uri: bad) == nil, "\(bad)")
        }
    }

    @Test func whatEachExpectedPeerAccepts() {
        #expect(ExpectedPeer.controlPlane.accepts(.control("mesh-control")))
        for other: MeshPrincipal? in [.node("control"), .admin("admin"), .relay("r"), nil] {
            #expect(!ExpectedPeer.controlPlane.accepts(other), "\(String(describing: other))")
        }
        #expect(ExpectedPeer.exactly(.node("b")).accepts(.node("b")))
        #expect(!ExpectedPeer.exactly(.node("b")).accepts(.node("a")))
        #expect(!ExpectedPeer.exactly(.relay("b")).accepts(.node("b")))
        // Serials as the revocation list writes them: lowercase hex, no DER sign byte.
        #expect(MeshTLS.serialHex(bytes: [0x00, 0x8f, 0x0a]) == "8f0a")
        #expect(MeshTLS.serialHex(bytes: [0x7f]) == "7f")
    }

    @Test func aCSRYieldsOnlyANodeIdentity() throws {
        let ca = try CertificateAuthority.create()
        let (name, certificate) = try ca.signNodeCSR(pem: try NodeKey().csrPEM(nodeName: "edge-a1"))
        #expect(name == "edge-a1")
        #expect(meshIdentity(of: certificate) == .node("edge-a1"))
        #expect(ca.issued(certificate))
        // A CSR whose name would read as another identity is refused, not signed.
        #expect(throws: IdentityError.self) {
            _ = try ca.signNodeCSR(pem: try NodeKey().csrPEM(nodeName: "mesh://admin/x"))
        }
        #expect(throws: IdentityError.self) { _ = try ca.signNodeCSR(pem: "not a csr") }
        // Another CA's certificates are not ours.
        #expect(!(try CertificateAuthority.create()).issued(certificate))
    }

    @Test func caHashesAreRecognised() throws {
        let ca = try CertificateAuthority.create()
        #expect(MeshTLS.isValidCAHash(ca.hash))
        #expect(try MeshTLS.caHash(pem: ca.certificatePEM()) == ca.hash)
        #expect(!MeshTLS.isValidCAHash("sha256:abc"))
        #expect(!MeshTLS.isValidCAHash("md5:" + String(repeating: "a", count: 64)))
        #expect(JoinTokens.parse("abcdef.0123456789abcdef")! == ("abcdef", "0123456789abcdef"))
        #expect(JoinTokens.parse("ABCDEF.0123456789abcdef") == nil)
        #expect(JoinTokens.parse("abcdef0123456789abcdef") == nil)
    }
}
