import Control
import Logging
import MeshClient
import MeshCore
import MeshHTTP
import MeshIdentity
import MeshRecords
import NIOCore
import NIOSSL
import Synchronization

import class ServiceLifecycle.ServiceGroup

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

let quietLogger: Logger = {
    var l = Logger(label: "test")
    l.logLevel = .warning
    return l
}()

/// A control plane on a free loopback port with its own data directory, for one test.
public final class RunningControl: Sendable {
    public let dir: TempDir
    public let server: ControlServer
    public let group: ServiceGroup
    public let task: Task<Void, any Error>
    /// A client with the admin certificate.
    public let client: ControlClient
    public let port: Int
    public let pki: ControlPKI

    /// `clock`: what node grace periods and join-token expiries are counted on (a `ManualClock` to
    /// move them by hand).
    public init(
        dir: TempDir = TempDir(),
        clock: any MeshClock = .system,
        configure: (inout ControlConfig) -> Void = { _ in }
    ) async throws {
        var config = ControlConfig()
        config.listen = "127.0.0.1:0"
        config.dataDir = dir.path
        config.durability = .normal
        // Every in-process server and client of the test process shares NIO's two event loop threads; under
        // load (CI's, a parallel suite) a handshake can wait past the default 5 s, and a server that gives up
        // on a TLS 1.3 handshake fails the client's request it already sent. The timeout's own behaviour is
        // tested on a mesh-control process (ControlLimitsTests).
        config.tlsHandshakeTimeoutSeconds = 60
        configure(&config)
        let server = ControlServer(config: config, logger: quietLogger, clock: clock)
        let group = ServiceGroup(configuration: .init(services: [.init(service: server)], logger: quietLogger))
        self.dir = dir
        self.server = server
        self.group = group
        self.task = Task { try await group.run() }
        let address = try await server.localAddress()
        self.port = address.port!
        self.pki = try await server.pki()
        self.client = try ControlClient(
            endpoint: HTTPEndpoint(host: "127.0.0.1", port: address.port!, tls: true),
            credentials: self.pki.admin.load()
        )
    }

    public var endpoint: HTTPEndpoint { HTTPEndpoint(host: "127.0.0.1", port: self.port, tls: true) }
    public var url: String { "https://127.0.0.1:\(self.port)" }

    /// A client presenting `credentials` (nil: no client certificate), trusting the mesh CA and
    /// requiring the control plane's identity of the server.
    public func client(_ credentials: IssuedCredential?) throws -> ControlClient {
        let tls = try MeshTLS.client(
            caPEM: self.pki.caPEM,
            expect: .controlPlane,
            key: credentials?.keyPEM,
            certificate: credentials?.certificatePEM
        )
        return ControlClient(endpoint: self.endpoint, mesh: tls)
    }

    /// A TLS client context with the admin certificate (for raw-byte tests).
    public func adminTLS() throws -> NIOSSLContext {
        try MeshTLS.clientContext(self.pki.admin.load())
    }

    /// A fresh credential for `identity`, issued by this control plane's CA.
    public func issue(_ identity: MeshPrincipal) throws -> IssuedCredential {
        try self.pki.ca.issueCredential(identity: identity, serverAuth: false, clientAuth: true)
    }

    /// A join token made through the API as admin (bound to `node` when given).
    public func token(
        usages: Int? = nil,
        ttlSeconds: Int? = nil,
        node: String? = nil,
        relay: String? = nil
    ) async throws
        -> BootstrapTokenSecret
    {
        let request = BootstrapTokenRequest(ttlSeconds: ttlSeconds, usages: usages, nodeName: node, relayName: relay)
        let body = try await self.client.raw(
            .POST,
            "/apis/mesh.edge/v1/bootstraptokens",
            body: ByteBuffer(bytes: try MeshJSON.encode(request))
        ).body
        return try JSONDecoder().decode(BootstrapTokenSecret.self, from: Data(body.readableBytesView))
    }

    public func stop() async throws {
        await self.group.triggerGracefulShutdown()
        try await self.task.value
    }

    public func rv() async throws -> Int64 {
        Int64(try await self.client.list(MeshService.self).metadata.resourceVersion)!
    }
}

/// Writes node credentials from a throwaway CA into `<stateDir>/pki`, for agents that must start
/// without a control plane (they never reach one in such tests).
/// Returns the CA, for tests that need other identities of the same mesh.
@discardableResult
public func seedNodeCredentials(stateDir: String, nodeName: String) throws -> CertificateAuthority {
    let ca = try CertificateAuthority.create()
    let issued = try ca.issueCredential(identity: .node(nodeName), serverAuth: true, clientAuth: true)
    try NodeEnrolment.files(stateDir: stateDir).write(
        keyPEM: issued.keyPEM,
        certificatePEM: issued.certificatePEM,
        caPEM: try ca.certificatePEM()
    )
    return ca
}

/// The server side of `meshClientContext`: `MeshTLS.serverContext` with a fresh certificate of `identity`
/// from `ca` (written to credential files, as a component keeps them, and loaded back).
public func meshServerContext(
    _ ca: CertificateAuthority,
    identity: MeshPrincipal,
    httpRecords: Bool = true
) throws -> NIOSSLContext {
    let issued = try ca.issueCredential(identity: identity, serverAuth: true, clientAuth: false)
    let dir = TempDir()
    let files = CredentialFiles(directory: dir.path, name: "server")
    try files.write(keyPEM: issued.keyPEM, certificatePEM: issued.certificatePEM, caPEM: try ca.certificatePEM())
    return try MeshTLS.serverContext(try files.load(), httpRecords: httpRecords)
}

/// A TLS 1.3 client context that trusts `ca` and presents a fresh certificate of `identity` from it
/// (none when nil), without checking the server's name or address: a node's certificate names
/// neither, only `mesh://node/NAME`.
///
/// `httpRecords`: offer the mesh record layer (as `MeshTLS.client` contexts do) for `HTTPClient`.
public func meshClientContext(
    _ ca: CertificateAuthority,
    identity: MeshPrincipal?,
    httpRecords: Bool = false
) throws -> NIOSSLContext {
    var config = TLSConfiguration.makeClientConfiguration()
    if httpRecords { MeshTLS.offerHTTPRecords(&config) }
    config.minimumTLSVersion = .tlsv13
    config.certificateVerification = .noHostnameVerification
    config.trustRoots = .certificates(try NIOSSLCertificate.fromPEMBytes(Array(try ca.certificatePEM().utf8)))
    if let identity {
        let issued = try ca.issueCredential(identity: identity, serverAuth: false, clientAuth: true)
        config.certificateChain = try NIOSSLCertificate.fromPEMBytes(Array(issued.certificatePEM.utf8)).map {
            .certificate($0)
        }
        config.privateKey = .privateKey(try NIOSSLPrivateKey(bytes: Array(issued.keyPEM.utf8), format: .pem))
    }
    return try NIOSSLContext(configuration: config)
}

/// A TLS server that is *not* the control plane but holds a certificate of the mesh CA (a node's,
/// say): it counts every request it receives, to show a client never sent one.
public final class FakeControlPlane: Sendable {
    public let server: HTTPServer
    public let group: ServiceGroup
    public let task: Task<Void, any Error>
    public let port: Int
    private let seen = Seen()

    final class Seen: Sendable {
        let list = Mutex<[String]>([])
    }

    /// `credential` is the certificate and key it serves with; `caPEM` is sent along as its chain.
    public init(credential: IssuedCredential, caPEM: String, dir: TempDir = TempDir()) async throws {
        let files = CredentialFiles(directory: dir.path, name: "fake")
        try files.write(keyPEM: credential.keyPEM, certificatePEM: credential.certificatePEM, caPEM: caPEM)
        var config = HTTPServerConfiguration()
        config.host = "127.0.0.1"
        config.port = 0
        config.drainTimeout = .milliseconds(200)
        config.tls = HTTPServerTLS(context: try MeshTLS.serverContext(try files.load())) { _ in nil }
        let seen = self.seen
        let responder = ClosureResponder { request in
            seen.list.withLock { $0.append("\(request.method) \(request.uri) \(String(buffer: request.body))") }
            return .text(.ok, "{}")
        }
        let server = HTTPServer(configuration: config, responder: responder, logger: quietLogger)
        let group = ServiceGroup(configuration: .init(services: [.init(service: server)], logger: quietLogger))
        self.server = server
        self.group = group
        self.task = Task { try await group.run() }
        self.port = try await server.localAddress().port!
    }

    public var endpoint: HTTPEndpoint { HTTPEndpoint(host: "127.0.0.1", port: self.port, tls: true) }
    /// Every request received: method, target and body.
    public var requests: [String] { self.seen.list.withLock { $0 } }

    public func stop() async throws {
        await self.group.triggerGracefulShutdown()
        try await self.task.value
    }
}
