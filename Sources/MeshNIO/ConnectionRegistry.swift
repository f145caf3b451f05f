import NIOCore
import Synchronization

/// Counts and remembers a server's open TCP connections so a limit holds and shutdown can close them.
/// Sendable: its state sits in a Mutex.
public final class ConnectionRegistry: Sendable {
    private let state: Mutex<(open: [ObjectIdentifier: any Channel], closed: Bool)>
    private let limit: Int

    public init(limit: Int) {
        self.limit = max(1, limit)
        self.state = Mutex(([:], false))
    }

    /// The number of connections admitted and not closed yet.
    public var count: Int { self.state.withLock { $0.open.count } }

    /// Admits `channel` when under the limit and not shut down (the caller closes it otherwise); it is
    /// forgotten when it closes.
    public func admit(_ channel: any Channel) -> Bool {
        let id = ObjectIdentifier(channel)
        let ok = self.state.withLock { s -> Bool in
            guard !s.closed, s.open.count < self.limit else { return false }
            s.open[id] = channel
            return true
        }
        if ok {
            channel.closeFuture.whenComplete { _ in
                self.state.withLock { _ = $0.open.removeValue(forKey: id) }
            }
        }
        return ok
    }

    /// Refuses every later connection and closes the open ones.
    public func closeAll() async {
        let channels = self.state.withLock { s -> [any Channel] in
            s.closed = true
            return Array(s.open.values)
        }
        for c in channels { try? await c.close() }
    }
}
