import Logging
import MeshClient
import MeshCore
import MeshIdentity
import ServiceLifecycle

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Keeps the agent's list of revoked certificate serials (`GET /apis/mesh.edge/v1/revokedcertificates`)
/// current, so that a node revoked with `meshctl revoke node` cannot open or accept peer links with this
/// agent. The list is kept in `<dataDir>/revoked.json` and loaded at start: a revoked peer stays refused
/// while the control plane is away. Fetched at start and every `interval` (jittered ±10%); failures retry
/// quietly with backoff.
struct RevocationSync: ServiceLifecycle.Service {
    let client: ControlClient
    let revoked: RevokedSerials
    let path: String
    var interval: Duration = .seconds(60)
    let logger: Logger

    /// Loads the kept list (a missing or unreadable file is an empty list, logged).
    func loadKept() {
        guard let data = FileManager.default.contents(atPath: self.path) else { return }
        do {
            let list = try JSONDecoder().decode(RevokedCertificateList.self, from: data)
            self.revoked.replace(with: Set(list.items.map(\.serial)))
        } catch {
            self.logger.warning("revocation list \(self.path) is unreadable, starting with none: \(error)")
        }
    }

    func run() async {
        await cancelWhenGracefulShutdown {
            var failing = false
            var delay = Duration.seconds(1)
            while !Task.isCancelled {
                do {
                    let body = try await self.client.raw(.GET, "/apis/\(meshAPIVersion)/revokedcertificates").body
                    let data = Data(body.readableBytesView)
                    let list = try JSONDecoder().decode(RevokedCertificateList.self, from: data)
                    let serials = Set(list.items.map(\.serial))
                    if serials != self.revoked.all {
                        self.revoked.replace(with: serials)
                        try? data.write(to: URL(fileURLWithPath: self.path), options: .atomic)
                        self.logger.info("revocation list: \(serials.count) revoked certificates")
                    }
                    failing = false
                    delay = .seconds(1)
                    let ms = Int64(self.interval / .milliseconds(1))
                    try await Task.sleep(for: .milliseconds(ms + Int64.random(in: -(ms / 10)...(ms / 10))))
                } catch is CancellationError {
                    return
                } catch {
                    if Task.isCancelled { return }
                    if !failing {
                        self.logger.debug("revocation list: cannot fetch it yet (\(error)); retrying quietly")
                    }
                    failing = true
                    try? await Task.sleep(for: delay)
                    delay = min(delay * 2, self.interval)
                }
            }
        }
    }
}
