import Logging
import MeshCore
import MeshHTTP
import MeshIdentity
import NIOCore

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// A node's credentials: reused from its state directory, or obtained once by joining with a token
/// (`kubeadm join` style): a fresh P-256 key, a CSR sent with the token over TLS to a control plane
/// whose CA is pinned by its hash, and the key (0600), certificate and CA stored for later starts.
public enum NodeEnrolment {
    /// `<stateDir>/pki/node.key`, `node.crt`, `ca.crt` (`relay.key`, `relay.crt` for a relay).
    public static func files(stateDir: String, role: JoinRole = .node) -> CredentialFiles {
        CredentialFiles(directory: stateDir + "/pki", name: role.rawValue)
    }

    /// The node's credentials from `stateDir`, or, when it has none yet, from a join with `token`,
    /// trusting the control plane only if its CA has `caHash`. With `role` relay, the same for a
    /// relay (`mesh://relay/NAME`, a relay token).
    public static func credentials(
        stateDir: String,
        server: HTTPEndpoint,
        nodeName: String,
        token: String?,
        caHash: String?,
        role: JoinRole = .node,
        logger: Logger
    ) async throws -> LoadedCredentials {
        let files = Self.files(stateDir: stateDir, role: role)
        let wanted: MeshPrincipal = role == .relay ? .relay(nodeName) : .node(nodeName)
        if files.allExist || PEMFiles.exists(files.key) {
            let loaded = try files.load()
            guard loaded.identity == wanted else {
                throw IdentityError(
                    "the certificate \(files.certificate) is for \(loaded.identity?.uri ?? "no mesh identity"), not \(role.rawValue) \(nodeName): use that name, or remove \(stateDir)/pki and join again"
                )
            }
            return loaded
        }
        guard let token, let caHash else {
            let create = role == .relay ? "meshctl token create --relay \(nodeName)" : "meshctl token create"
            throw IdentityError(
                "this \(role.rawValue) has no credentials yet (\(files.certificate)): join the mesh with --join-token TOKEN --ca-cert-hash sha256:HEX (\(create) prints both)"
            )
        }
        let (key, answer) = try await Self.join(
            server: server,
            nodeName: nodeName,
            token: token,
            caHash: caHash,
            role: role
        )
        try files.write(keyPEM: key, certificatePEM: answer.certificate, caPEM: answer.caCertificate)
        logger.notice("joined the mesh as \(wanted); credentials in \(stateDir)/pki")
        return try files.load()
    }

    /// Sends a CSR with the token; returns the new key (PEM) and the control plane's answer.
    public static func join(
        server: HTTPEndpoint,
        nodeName: String,
        token: String,
        caHash: String,
        role: JoinRole = .node
    ) async throws -> (keyPEM: String, answer: JoinResponse) {
        guard MeshTLS.isValidCAHash(caHash) else {
            throw IdentityError("--ca-cert-hash: \"\(caHash)\" is not sha256: followed by 64 hex digits")
        }
        guard JoinTokens.parse(token) != nil else {
            throw IdentityError("--join-token: must look like abcdef.0123456789abcdef (6 and 16 of a-z, 0-9)")
        }
        if let e = Names.dns1123SubdomainError(nodeName) {
            throw IdentityError("\(role.rawValue) name \"\(nodeName)\": \(e)")
        }
        guard server.tls else { throw IdentityError("joining needs an https:// control plane URL, not \(server)") }
        let key = NodeKey()
        let request = JoinRequest(
            token: token,
            csr: try key.csrPEM(nodeName: nodeName),
            role: role == .relay ? .relay : nil
        )
        // The token goes only to a server whose chain holds the pinned CA *and* whose certificate
        // is the control plane's: a node's certificate from the same CA does not qualify.
        let tls = try MeshTLS.join(caHash: caHash, expect: .controlPlane)
        let client = ControlClient(endpoint: server, mesh: tls)
        let body: ByteBuffer
        do {
            let json = ByteBuffer(bytes: try MeshJSON.encode(request))
            body = try await client.raw(.POST, "/apis/\(meshAPIVersion)/join", body: json).body
        } catch let e as HTTPClientError where e.message.contains("TLS handshake failed") {
            if let refusal = tls.verifier.lastRefusal, refusal.kind != .untrusted {
                throw IdentityError(
                    "cannot join via \(server): it is not the mesh control plane: \(refusal.message); the join token was not sent"
                )
            }
            throw IdentityError(
                "cannot join via \(server): its CA does not match --ca-cert-hash \(caHash) (or it is not the mesh control plane): \(e.message); the join token was not sent"
            )
        } catch let status as Status {
            throw IdentityError("the control plane refused the join: \(status.message)")
        }
        let answer = try ControlClient.decode(JoinResponse.self, body)
        // The answer's CA must be the one we pinned: it is what later connections trust.
        guard try MeshTLS.caHash(pem: answer.caCertificate) == caHash.lowercased() else {
            throw IdentityError("the control plane sent a CA whose hash is not \(caHash)")
        }
        return (try key.keyPEM(), answer)
    }
}
