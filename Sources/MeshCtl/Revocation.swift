import MeshClient
import MeshCore
import MeshHTTP
import NIOCore

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

extension Operations {
    static let revokedPath = "/apis/\(meshAPIVersion)/revokedcertificates"

    /// `meshctl revoke node NAME... [--serial HEX]`: revokes every certificate the nodes were
    /// issued (or only the one with that serial); the control
    /// plane refuses them from then on (and links and relays, which fetch the list).
    public func revokeNodes(_ names: [String], serial: String? = nil, json: Bool) async -> Bool {
        await self.revoke(Node.resource, names, serial: serial, json: json)
    }

    /// `meshctl revoke relay NAME...`: every certificate issued to each relay (or one serial).
    public func revokeRelays(_ names: [String], serial: String? = nil, json: Bool) async -> Bool {
        await self.revoke(Relay.resource, names, serial: serial, json: json)
    }

    private func revoke(_ type: ResourceType, _ names: [String], serial: String?, json: Bool) async -> Bool {
        let kind = type.singular
        var ok = true
        for name in names {
            do {
                var path = ControlClient.path(type, namespace: nil, name: name) + "/revoke"
                if let serial { path += "?serial=" + HTTPRequest.percentEncode(serial) }
                let body = try await self.client.raw(.POST, path).body
                let list = try JSONDecoder().decode(RevokedCertificateList.self, from: Data(body.readableBytesView))
                if json {
                    self.out(String(decoding: try MeshJSON.encode(list), as: UTF8.self) + "\n")
                } else if list.items.isEmpty {
                    self.out("\(kind)/\(name): no certificate left to revoke (all were revoked or expired)\n")
                } else {
                    let serials = list.items.map(\.serial).joined(separator: ", ")
                    self.out("\(kind)/\(name) revoked: \(list.items.count) certificate(s), serial \(serials)\n")
                }
            } catch {
                self.err("error: \(self.explain(error))\n")
                ok = false
            }
        }
        return ok
    }

    /// `meshctl revoke list`: the revocation list.
    public func listRevoked(json: Bool) async -> Bool {
        await self.showList(Self.revokedPath, RevokedCertificateList.self, json: json) { list in
            [["SERIAL", "IDENTITY", "REVOKED", "EXPIRES", "REASON"]]
                + list.items.map { r in [r.serial, r.identity, r.revokedAt, r.notAfter, r.reason ?? ""] }
        }
    }
}
