import MeshHTTP
import MeshIdentity

extension HTTPClientTLS {
    /// HTTP client settings from the mesh's TLS settings (`MeshTLS.client`, `MeshTLS.join`): every
    /// connection runs `PeerVerifier` (mesh CA, expected identity, revocation) and uses the
    /// client certificate current at connect time (renewals included).
    public init(mesh: MeshClientTLS) {
        self.init(
            provider: { mesh.current },
            verify: mesh.verifier.callback,
            verificationFailure: { mesh.verifier.lastRefusal?.message }
        )
    }
}

extension ControlClient {
    /// A client of the control plane that requires `mesh://control/...` of the server.
    public init(endpoint: HTTPEndpoint, mesh: MeshClientTLS) {
        self.init(endpoint: endpoint, tls: HTTPClientTLS(mesh: mesh))
    }

    /// A client of the control plane with these credentials, requiring `mesh://control/...`.
    public init(endpoint: HTTPEndpoint, credentials: LoadedCredentials) throws {
        self.init(endpoint: endpoint, mesh: try MeshTLS.client(credentials, expect: .controlPlane))
    }
}
