import Logging
import MeshCore
import MeshIdentity
import Metrics
import NIOCore
import NIOPosix
import NIOSSL
import NIOTLS
import ServiceLifecycle
import Synchronization
import X509

/// Who is connected and which circuits wait for their second half: shared by every connection.
final class RelayHub: Sendable {
    struct Pending {
        let requester: any Channel
        let from: String
        let to: String
    }

    struct State {
        var sessions: [String: any Channel] = [:]
        var pending: [UInt64: Pending] = [:]
        var circuits: [String: Int] = [:]
        var nextID: UInt64 = 1
    }

    let state = Mutex(State())
    let maxCircuitsPerNode: Int

    init(maxCircuitsPerNode: Int) {
        self.maxCircuitsPerNode = maxCircuitsPerNode
    }

    /// Registers `node`'s control session; returns the session it replaces (to close).
    func register(_ node: String, _ channel: any Channel) -> (any Channel)? {
        self.state.withLock { s in
            let old = s.sessions[node]
            s.sessions[node] = channel
            return old.map { $0 === channel ? nil : $0 } ?? nil
        }
    }

    func unregister(_ node: String, _ channel: any Channel) {
        self.state.withLock { s in
            if let c = s.sessions[node], c === channel { s.sessions[node] = nil }
        }
    }

    var sessionCount: Int { self.state.withLock { $0.sessions.count } }

    enum Request {
        case open(circuit: UInt64, session: any Channel)
        case refused(RelayRefusal, String)
    }

    /// A circuit from `from` to `to`: its id and `to`'s session, or why not.
    func request(from: String, to: String, requester: any Channel) -> Request {
        self.state.withLock { s in
            if to == from { return .refused(.unknownNode, "a circuit from \(from) to itself") }
            guard let session = s.sessions[to] else {
                return .refused(.nodeOffline, "node \(to) has no session at this relay")
            }
            for n in [from, to] where s.circuits[n, default: 0] >= self.maxCircuitsPerNode {
                return .refused(.limit, "node \(n) is at its limit of \(self.maxCircuitsPerNode) circuits here")
            }
            let id = s.nextID
            s.nextID += 1
            s.pending[id] = Pending(requester: requester, from: from, to: to)
            s.circuits[from, default: 0] += 1
            s.circuits[to, default: 0] += 1
            return .open(circuit: id, session: session)
        }
    }

    /// Counts a forwarded circuit against both nodes' limits; the refusal text when one is at it.
    func reserve(from: String, to: String) -> String? {
        self.state.withLock { s in
            for n in [from, to] where s.circuits[n, default: 0] >= self.maxCircuitsPerNode {
                return "node \(n) is at its limit of \(self.maxCircuitsPerNode) circuits here"
            }
            s.circuits[from, default: 0] += 1
            s.circuits[to, default: 0] += 1
            return nil
        }
    }

    /// The pending circuit `id` for its target `node`, taken (nil: none such for that node).
    func take(_ id: UInt64, by node: String) -> Pending? {
        self.state.withLock { s in
            guard let p = s.pending[id], p.to == node else { return nil }
            s.pending[id] = nil
            return p
        }
    }

    /// Drops a pending circuit (timeout, requester gone); true when it was still pending.
    func cancel(_ id: UInt64) -> Bool {
        self.state.withLock { s in
            guard let p = s.pending.removeValue(forKey: id) else { return false }
            Self.release(&s, p.from, p.to)
            return true
        }
    }

    /// A spliced circuit ended.
    func ended(from: String, to: String) {
        self.state.withLock { Self.release(&$0, from, to) }
    }

    private static func release(_ s: inout State, _ from: String, _ to: String) {
        for n in [from, to] {
            let left = s.circuits[n, default: 1] - 1
            s.circuits[n] = left > 0 ? left : nil
        }
    }
}
