import MeshCore
import NIOCore

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Node liveness shared by replicas over one etcd (README "Replicas on etcd").
///
/// Any replica may take a node's beat. Each replica batches the beats it took into one key of its own
/// (`beats/<replica>`, one put every `shareInterval`), and every replica applies the others' batches
/// from its etcd watch: all of them know every node's last beat within about a second, and so agree
/// on which nodes are silent. Phases are followed from the nodes' watch, so a replica does not write
/// Ready again for a node another one already marked. Status writes stay conditional on the object's
/// version: when several replicas mark the same node NotReady at once, one write wins and the others
/// find nothing left to change.
extension NodeLifecycle {
    /// Shares local beats every `shareInterval` and follows node phases, until cancelled.
    func share(_ store: EtcdStore) async {
        store.onSharedBeats { [weak self] beats in self?.sharedBeats(beats) }
        let follow = Task { await self.followPhases(store) }
        defer { follow.cancel() }
        while !Task.isCancelled {
            try? await self.clock.sleep(for: self.configuration.shareInterval)
            await self.shareOnce(store)
        }
        await Task { await self.shareOnce(store) }.value
    }

    func shareOnce(_ store: EtcdStore) async {
        let beats = self.state.withLock { s -> [String: Int64] in
            defer { s.toShare.removeAll(keepingCapacity: true) }
            return s.toShare
        }
        guard !beats.isEmpty else { return }
        do {
            try await store.shareBeats(beats)
        } catch {
            self.state.withLock { s in s.toShare.merge(beats) { max($0, $1) } }
            self.logger.warning("could not share \(beats.count) heartbeats with the other replicas: \(error)")
        }
    }

    /// Beats another replica took: each counts from when it was taken.
    func sharedBeats(_ beats: [String: Int64]) {
        let now = self.clock.now
        let nowMillis = self.nowMillis()
        self.state.withLock { s in
            for (name, millis) in beats {
                guard var e = s.nodes[name], millis > (e.lastBeatMillis ?? .min) else { continue }
                let at = now - .milliseconds(max(0, min(nowMillis - millis, 3_600_000)))
                if at > e.watchFrom || e.allowance != self.configuration.gracePeriod {
                    e.watchFrom = max(at, e.watchFrom)
                    e.allowance = self.configuration.gracePeriod
                }
                e.lastBeatMillis = millis
                s.nodes[name] = e
            }
        }
    }

    /// Follows every Node's phase as written by any replica (creations and deletions too).
    func followPhases(_ store: EtcdStore) async {
        var after = self.state.withLock { $0.listedAt }
        let filter = WatchFilter(resource: Node.resource.plural)
        while !Task.isCancelled {
            let subscription: WatchSubscription
            do {
                subscription = try await store.watch(after: after, filter: filter)
            } catch StoreError.gone {
                after = (try? await store.currentResourceVersion()) ?? after
                continue
            } catch {
                try? await Task.sleep(for: .milliseconds(200))
                continue
            }
            await withTaskCancellationHandler {
                let decoder = JSONDecoder()
                while let lines = await subscription.nextLines(kind: Node.resource.kind) {
                    for line in lines {
                        guard let event = try? decoder.decode(NodeWatchLine.self, from: line) else { continue }
                        if let rv = Int64(event.object.metadata.resourceVersion ?? "") { after = max(after, rv) }
                        guard let name = event.object.metadata.name else { continue }
                        self.followed(name, type: event.type, phase: event.object.status?.phase)
                    }
                }
            } onCancel: {
                subscription.cancel()
            }
            if !Task.isCancelled { try? await Task.sleep(for: .milliseconds(100)) }
        }
    }

    func followed(_ name: String, type: String, phase: NodeStatus.Phase?) {
        let now = self.clock.now
        self.state.withLock { s in
            switch type {
            case "DELETED":
                s.nodes[name] = nil
            case "ADDED", "MODIFIED":
                var e = s.nodes[name] ?? Entry(phase: nil, watchFrom: now, allowance: self.configuration.gracePeriod)
                if !e.writing { e.phase = phase }
                s.nodes[name] = e
            default:
                break
            }
        }
    }
}

/// A watch line of the nodes' watch: type, and of the object only what the lifecycle needs.
struct NodeWatchLine: Decodable {
    struct Object: Decodable {
        struct Metadata: Decodable {
            var name: String?
            var resourceVersion: String?
        }
        var metadata: Metadata
        var status: NodeStatus?
    }
    var type: String
    var object: Object
}
