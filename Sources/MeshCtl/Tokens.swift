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
    static let tokensPath = "/apis/\(meshAPIVersion)/bootstraptokens"

    /// Creates a join token; returns it (nil on failure, explained on stderr).
    public func createToken(
        ttlSeconds: Int?,
        usages: Int?,
        description: String?,
        nodeName: String? = nil,
        relayName: String? = nil
    ) async -> BootstrapTokenSecret? {
        do {
            let request = BootstrapTokenRequest(
                ttlSeconds: ttlSeconds,
                usages: usages,
                description: description,
                nodeName: nodeName,
                relayName: relayName
            )
            let body = try await self.client.raw(
                .POST,
                Self.tokensPath,
                body: ByteBuffer(bytes: try MeshJSON.encode(request))
            ).body
            return try JSONDecoder().decode(BootstrapTokenSecret.self, from: Data(body.readableBytesView))
        } catch {
            self.err("error: \(self.explain(error))\n")
            return nil
        }
    }

    /// `meshctl token create`: the token, the CA hash, and the command that joins a node.
    public func printToken(_ token: BootstrapTokenSecret, json: Bool) {
        if json {
            self.out(String(decoding: (try? MeshJSON.encode(token)) ?? Data(), as: UTF8.self) + "\n")
            return
        }
        let uses = token.usagesLeft.map { "\($0)" } ?? "unlimited"
        if let relay = token.relayName {
            self.out(
                """
                token:         \(token.token)
                ca-cert-hash:  \(token.caCertHash)
                expires:       \(token.expires)
                usages:        \(uses)
                relay:         \(relay) (this token enrols only this relay, and no node)
                join a relay:  mesh-relay --server \(self.client.endpoint) --join-token \(token.token) --ca-cert-hash \(token.caCertHash) --name \(relay) --listen IP:7800

                """
            )
            return
        }
        let node =
            token.nodeName.map { "node:          \($0) (this token joins only this name, also when its Node exists)\n" }
            ?? ""
        let nameFlag = token.nodeName.map { " --node-name \($0)" } ?? ""
        self.out(
            """
            token:         \(token.token)
            ca-cert-hash:  \(token.caCertHash)
            expires:       \(token.expires)
            usages:        \(uses)
            \(node)join a node:   mesh-agent --server \(self.client.endpoint) --join-token \(token.token) --ca-cert-hash \(token.caCertHash)\(nameFlag)

            """
        )
    }

    /// `meshctl token list`.
    public func listTokens(json: Bool) async -> Bool {
        await self.showList(Self.tokensPath, BootstrapTokenList.self, json: json) { list in
            var rows = [["ID", "EXPIRES", "USAGES LEFT", "NODE", "DESCRIPTION"]]
            for t in list.items {
                let bound = t.relayName.map { "relay/\($0)" } ?? t.nodeName ?? "<any>"
                rows.append([
                    t.id, t.expires, t.usagesLeft.map { "\($0)" } ?? "unlimited", bound, t.description ?? "",
                ])
            }
            return rows
        }
    }

    /// A list document at `path`, written as JSON or as the table `rows` makes of it (`token list`,
    /// `revoke list`).
    func showList<List: Codable>(
        _ path: String,
        _ type: List.Type,
        json: Bool,
        rows: (List) -> [[String]]
    ) async -> Bool {
        do {
            let body = try await self.client.raw(.GET, path).body
            let list = try JSONDecoder().decode(List.self, from: Data(body.readableBytesView))
            if json {
                self.out(String(decoding: try MeshJSON.encode(list), as: UTF8.self) + "\n")
            } else {
                self.out(Self.align(rows(list)))
            }
            return true
        } catch {
            self.err("error: \(self.explain(error))\n")
            return false
        }
    }

    /// `meshctl token delete ID...` (a whole token is accepted too; only its id is sent).
    public func deleteTokens(_ ids: [String]) async -> Bool {
        var ok = true
        for given in ids {
            let id = String(given.split(separator: ".").first ?? "")
            do {
                _ = try await self.client.raw(.DELETE, Self.tokensPath + "/" + HTTPRequest.percentEncode(id))
                self.out("bootstraptoken \(id) deleted\n")
            } catch {
                self.err("error: \(self.explain(error))\n")
                ok = false
            }
        }
        return ok
    }

    static func align(_ rows: [[String]]) -> String {
        guard let first = rows.first else { return "" }
        var widths = first.map(\.count)
        for row in rows { for (i, cell) in row.enumerated() { widths[i] = max(widths[i], cell.count) } }
        return rows.map { row in
            row.enumerated().map { i, cell in
                i == row.count - 1 ? cell : cell + String(repeating: " ", count: widths[i] - cell.count + 3)
            }.joined().trimmingTrailingSpaces()
        }.joined(separator: "\n") + "\n"
    }
}

extension String {
    fileprivate func trimmingTrailingSpaces() -> String {
        var s = self
        while s.last == " " { s.removeLast() }
        return s
    }
}
