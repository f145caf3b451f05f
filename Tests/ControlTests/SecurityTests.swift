import Control
import Foundation
import MeshClient
import MeshCore
import MeshHTTP
import MeshIdentity
import MeshTestSupport
import NIOCore
import NIOHTTP1
import NIOSSL
import Testing

/// The control API over TLS 1.3 with client certificates: authentication, authorisation by the
/// identity in the certificate, join tokens and the CA's life across restarts. Real sockets, real files.
@Suite(.rationed) struct SecurityTests {
    func node(_ name: String) -> Node {
        Node(metadata: ObjectMeta(name: name), spec: NodeSpec(site: "a"))
    }

    /// The HTTP status and Status of a request made with `client`.
    func attempt(
        _ client: ControlClient,
        _ method: HTTPMethod,
        _ path: String,
        _ body: String? = nil
    ) async throws -> (code: Int, status: Status?) {
        var headers = HTTPHeaders([("Accept", "application/json")])
        if body != nil { headers.add(name: "Content-Type", value: "application/json") }
        let r = try await client.http.send(method, path, headers: headers, body: body.map { ByteBuffer(string: $0) })
        let status = try? JSONDecoder().decode(Status.self, from: Data(r.body.readableBytesView))
        return (Int(r.status.code), (200..<300).contains(Int(r.status.code)) ? nil : status)
    }

    @Test func adminCertificateWorksAndEveryFileIsInPlace() async throws {
        let cp = try await RunningControl()
        try await cp.client.apply(service("web"))
        #expect(try await cp.client.list(MeshService.self).items.map(\.metadata.name) == ["web"])
        let pki = cp.dir.path + "/pki"
        for key in ["ca.key", "server.key", "admin.key"] { #expect(PEMFiles.mode("\(pki)/\(key)") == 0o600) }
        // The CA hash is SHA-256 over the CA's SubjectPublicKeyInfo, as openssl computes it.
        let openssl = try await run(
            "/bin/sh",
            ["-c", "openssl x509 -in \(pki)/ca.crt -pubkey -noout | openssl pkey -pubin -outform der | sha256sum"]
        )
        #expect("sha256:" + (openssl.stdout.split(separator: " ").first ?? "") == cp.pki.ca.hash)
        // The admin meshconfig names the files and the server.
        let config = try ClientConfig.load(cp.dir.path + "/admin.meshconfig")
        #expect(config.clientKey == "\(pki)/admin.key" && config.certificateAuthority == "\(pki)/ca.crt")
        try await cp.stop()
    }

    @Test func withoutAClientCertificateOnlyProbesAndJoinAnswer() async throws {
        let cp = try await RunningControl()
        let anonymous = try cp.client(nil)
        for path in [
            "/apis/mesh.edge/v1/services", "/apis/mesh.edge/v1/namespaces/shop/services/web", "/version", "/metrics",
        ] {
            let (code, status) = try await self.attempt(anonymous, .GET, path)
            #expect(code == 401, "\(path)")
            #expect(status?.reason == .unauthorized && status?.message.contains("client certificate") == true)
        }
        let (code, status) = try await self.attempt(
            anonymous,
            .PUT,
            "/apis/mesh.edge/v1/namespaces/shop/services/web",
            #"{"apiVersion":"mesh.edge/v1","kind":"Service","metadata":{"name":"web"},"spec":{"ports":[{"port":80}]}}"#
        )
        #expect(code == 401 && status?.kind == "Status")
        #expect(try await self.attempt(anonymous, .GET, "/healthz").code == 200)
        #expect(try await self.attempt(anonymous, .GET, "/readyz").code == 200)
        // The join path answers (here: a bad request), without a certificate.
        #expect(try await self.attempt(anonymous, .POST, ControlAPI.joinPath, "{}").code == 400)
        #expect(try await cp.client.list(MeshService.self).items.isEmpty)
        try await cp.stop()
    }

    @Test func certificatesOfAnotherCAFailTheHandshake() async throws {
        let cp = try await RunningControl()
        let other = try CertificateAuthority.create()
        let stranger = try other.issueCredential(identity: .admin("admin"), serverAuth: false, clientAuth: true)
        // A client certificate from another CA: the server refuses the handshake.
        let context = try MeshTLS.clientContext(
            caPEM: cp.pki.caPEM,
            key: stranger.keyPEM,
            certificate: stranger.certificatePEM
        )
        let client = ControlClient(endpoint: cp.endpoint, tls: HTTPClientTLS(context: context))
        await #expect(throws: HTTPClientError.self) { _ = try await client.list(MeshService.self) }
        // A client that trusts another CA refuses the server.
        let trustsOther = try MeshTLS.clientContext(caPEM: try other.certificatePEM())
        let wary = ControlClient(endpoint: cp.endpoint, tls: HTTPClientTLS(context: trustsOther))
        let error = await #expect(throws: HTTPClientError.self) { _ = try await wary.list(MeshService.self) }
        #expect(error?.message.contains("TLS handshake failed") == true, "\(String(describing: error))")
        try await cp.stop()
    }

    @Test func onlyTLS13IsSpoken() async throws {
        let cp = try await RunningControl()
        let pki = cp.dir.path + "/pki"
        let common = [
            "s_client", "-connect", "127.0.0.1:\(cp.port)", "-CAfile", "\(pki)/ca.crt",
            "-cert", "\(pki)/admin.crt", "-key", "\(pki)/admin.key", "-verify_return_error",
        ]
        let old = try await run("/usr/bin/openssl", common + ["-tls1_2"], stdin: "")
        #expect(old.status != 0)
        #expect(old.stdout.contains("Cipher is (NONE)") || old.stderr.contains("alert"))
        let current = try await run("/usr/bin/openssl", common + ["-tls1_3"], stdin: "")
        #expect(current.status == 0)
        #expect(current.stdout.contains("TLSv1.3"))
        try await cp.stop()
    }

    @Test func nodesReadAndUpdateOnlyTheirOwnNode() async throws {
        let cp = try await RunningControl()
        try await cp.client.apply(service("web"))
        try await cp.client.apply(self.node("edge-b"))
        let edgeA = try cp.client(try cp.issue(.node("edge-a")))
        // Reads of services, endpoints and nodes.
        #expect(try await edgeA.list(MeshService.self).items.map(\.metadata.name) == ["web"])
        #expect(try await edgeA.list(Endpoints.self).items.isEmpty)
        #expect(try await edgeA.get(MeshService.self, namespace: "shop", name: "web").metadata.name == "web")
        // Its own Node: yes; another's, a Service, a deletion, tokens: 403 with a Status.
        #expect(try await edgeA.apply(self.node("edge-a")).created)
        let denied: [() async throws -> Void] = [
            { _ = try await edgeA.apply(self.node("edge-b")) },
            { _ = try await edgeA.apply(service("web")) },
            { _ = try await edgeA.delete(Node.self, name: "edge-a") },
            { _ = try await edgeA.raw(.GET, ControlAPI.tokensPath) },
            { _ = try await edgeA.raw(.POST, ControlAPI.tokensPath, body: ByteBuffer(string: "{}")) },
        ]
        for attempt in denied {
            let status = await #expect(throws: Status.self) { try await attempt() }
            #expect(status?.code == 403 && status?.reason == .forbidden)
            #expect(status?.message.contains("mesh://node/edge-a may not") == true)
        }
        // A certificate of the mesh CA without a known identity may do nothing.
        let control = try cp.client(try cp.issue(.control("x")))
        let status = await #expect(throws: Status.self) { _ = try await control.list(MeshService.self) }
        #expect(status?.code == 403)
        #expect(try await cp.client.get(Node.self, name: "edge-b").spec.site == "a")
        try await cp.stop()
    }

    @Test func joinTokensAdmitAsManyNodesAsTheirUsages() async throws {
        let cp = try await RunningControl()
        let token = try await cp.token(usages: 2)
        #expect(token.caCertHash == cp.pki.ca.hash)
        #expect(JoinTokens.parse(token.token) != nil)
        for name in ["edge-1", "edge-2"] {
            let (key, answer) = try await NodeEnrolment.join(
                server: cp.endpoint,
                nodeName: name,
                token: token.token,
                caHash: token.caCertHash
            )
            #expect(answer.nodeName == name)
            // The join registered the Node; the new certificate is a node identity the API accepts.
            #expect(try await cp.client.get(Node.self, name: name).status?.phase == .unknown)
            let client = try cp.client(IssuedCredential(keyPEM: key, certificatePEM: answer.certificate))
            #expect(try await client.apply(self.node(name)).object.spec.site == "a")
        }
        let usedUp = await #expect(throws: IdentityError.self) {
            _ = try await NodeEnrolment.join(
                server: cp.endpoint,
                nodeName: "edge-3",
                token: token.token,
                caHash: token.caCertHash
            )
        }
        #expect(usedUp?.message.contains("used up") == true)
        // Listing shows no secrets; deleting makes the token unknown.
        let listed = try await cp.client.raw(.GET, ControlAPI.tokensPath).body
        let list = try JSONDecoder().decode(BootstrapTokenList.self, from: Data(listed.readableBytesView))
        #expect(list.items.map(\.usagesLeft) == [0])
        #expect(!String(buffer: listed).contains(token.token.split(separator: ".")[1]))
        let id = String(token.token.prefix(6))
        _ = try await cp.client.raw(.DELETE, ControlAPI.tokensPath + "/" + id)
        let unknown = await #expect(throws: IdentityError.self) {
            _ = try await NodeEnrolment.join(
                server: cp.endpoint,
                nodeName: "edge-3",
                token: token.token,
                caHash: token.caCertHash
            )
        }
        #expect(unknown?.message.contains("unknown") == true)
        try await cp.stop()
    }

    @Test func badJoinsAreRefusedWithAStatus() async throws {
        let clock = ManualClock()
        let cp = try await RunningControl(clock: clock)
        let anonymous = try cp.client(nil)
        let token = try await cp.token(usages: 1)
        let csr = try NodeKey().csrPEM(nodeName: "edge-1")
        func join(_ token: String, _ csr: String, extra: String = "") async throws -> (Int, Status?) {
            let body = try JSONSerialization.data(withJSONObject: [
                "apiVersion": "mesh.edge/v1", "kind": "JoinRequest", "token": token, "csr": csr,
            ])
            var text = String(decoding: body, as: UTF8.self)
            if !extra.isEmpty { text = String(text.dropLast()) + "," + extra + "}" }
            return try await self.attempt(anonymous, .POST, ControlAPI.joinPath, text)
        }
        // Unknown id, wrong secret: 401.
        var (code, status) = try await join("zzzzzz.0123456789abcdef", csr)
        #expect(code == 401 && status?.message.contains("unknown") == true)
        (code, status) = try await join(String(token.token.prefix(7)) + "0123456789abcdef", csr)
        #expect(code == 401 && status?.reason == .unauthorized)
        // Malformed token, unknown field, bad CSR, invalid node name: 400, and the usage is not spent.
        (code, status) = try await join("nope", csr)
        #expect(code == 400 && status?.message.contains("token") == true)
        (code, status) = try await join(token.token, csr, extra: #""admin":true"#)
        #expect(code == 400 && status?.message.contains("admin: unknown field") == true)
        (code, status) = try await join(
            token.token,
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
        )
        #expect(code == 400 && status?.message.contains("csr") == true)
        (code, status) = try await join(token.token, try NodeKey().csrPEM(nodeName: "Bad_Name"))
        #expect(code == 400 && status?.message.contains("Bad_Name") == true)
        // The one usage is still there, and the certificate is a node identity whatever the CSR asks.
        (code, status) = try await join(token.token, csr)
        #expect(code == 200)
        (code, status) = try await join(token.token, csr)
        #expect(code == 401 && status?.message.contains("used up") == true)
        // Expired: good within its time (expiries have whole seconds), refused once it is up.
        let brief = try await cp.token(ttlSeconds: 2)
        await clock.advance(by: .milliseconds(900))
        (code, status) = try await join(brief.token, try NodeKey().csrPEM(nodeName: "edge-2"))
        #expect(code == 200, "\(String(describing: status))")
        let expiring = try await cp.token(ttlSeconds: 2)
        await clock.advance(by: .seconds(2))
        (code, status) = try await join(expiring.token, csr)
        #expect(code == 401 && status?.message.contains("expired") == true)
        try await cp.stop()
    }

    @Test func aWrongCAHashAbortsTheJoin() async throws {
        let cp = try await RunningControl()
        let token = try await cp.token(usages: 1)
        let other = try CertificateAuthority.create()
        let error = await #expect(throws: IdentityError.self) {
            _ = try await NodeEnrolment.join(
                server: cp.endpoint,
                nodeName: "edge-1",
                token: token.token,
                caHash: other.hash
            )
        }
        #expect(error?.message.contains("does not match --ca-cert-hash") == true)
        // Nothing was spent: the right hash still joins.
        _ = try await NodeEnrolment.join(
            server: cp.endpoint,
            nodeName: "edge-1",
            token: token.token,
            caHash: token.caCertHash
        )
        try await cp.stop()
    }

    @Test func restartKeepsTheCAAndIssuedCertificatesValid() async throws {
        let dir = TempDir()
        var cp = try await RunningControl(dir: dir)
        let hash = cp.pki.ca.hash
        let nodeCredential = try cp.issue(.node("edge-a"))
        let caFile = try String(contentsOfFile: dir.path + "/pki/ca.crt", encoding: .utf8)
        let servingFile = try String(contentsOfFile: dir.path + "/pki/server.crt", encoding: .utf8)
        try await cp.stop()
        cp = try await RunningControl(dir: dir)
        #expect(cp.pki.ca.hash == hash)
        #expect(try String(contentsOfFile: dir.path + "/pki/ca.crt", encoding: .utf8) == caFile)
        #expect(try String(contentsOfFile: dir.path + "/pki/server.crt", encoding: .utf8) == servingFile)
        #expect(try await cp.client(nodeCredential).list(MeshService.self).items.isEmpty)
        try await cp.stop()
        // New SANs: a new serving certificate from the same CA.
        cp = try await RunningControl(dir: dir) { $0.certSANs = ["control.example", "198.18.0.7"] }
        #expect(cp.pki.ca.hash == hash)
        #expect(try String(contentsOfFile: dir.path + "/pki/server.crt", encoding: .utf8) != servingFile)
        #expect(try await cp.client(nodeCredential).list(MeshService.self).items.isEmpty)
        try await cp.stop()
    }

    @Test func unreadableOrCorruptKeysAreClearErrors() async throws {
        let dir = TempDir()
        let cp = try await RunningControl(dir: dir)
        try await cp.stop()
        try "-----BEGIN EC PRIVATE KEY-----\nnot a key\n-----END EC PRIVATE KEY-----\n".write(
            toFile: dir.path + "/pki/ca.key",
            atomically: true,
            encoding: .utf8
        )
        let corrupt = await #expect(throws: (any Error).self) { _ = try await RunningControl(dir: dir) }
        #expect("\(corrupt!)".contains("ca.key is corrupt"))
        try FileManager.default.removeItem(atPath: dir.path + "/pki/ca.key")
        let missing = await #expect(throws: (any Error).self) { _ = try await RunningControl(dir: dir) }
        #expect("\(missing!)".contains("ca.key is missing"))
    }
}
