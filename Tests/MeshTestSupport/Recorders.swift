import Logging
import MeshClient
import MeshCore
import Synchronization

/// Keeps every log message of the loggers it makes, for tests that check what was logged (and how
/// often).
public final class LogRecorder: Sendable {
    public struct Entry: Sendable {
        public var level: Logger.Level
        public var message: String
    }

    private let entries = Mutex<[Entry]>([])

    public init() {}

    /// A logger that records messages at `level` and above.
    public func logger(_ label: String = "test", level: Logger.Level = .debug) -> Logger {
        var l = Logger(label: label) { _ in Handler(recorder: self) }
        l.logLevel = level
        return l
    }

    public var all: [Entry] { self.entries.withLock { $0 } }

    /// Messages at exactly `level` containing `text`.
    public func messages(_ level: Logger.Level, containing text: String) -> [String] {
        self.all.filter { $0.level == level && $0.message.contains(text) }.map(\.message)
    }

    func append(_ e: Entry) { self.entries.withLock { $0.append(e) } }

    struct Handler: LogHandler {
        let recorder: LogRecorder
        var metadata: Logger.Metadata = [:]
        var logLevel: Logger.Level = .trace

        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { self.metadata[key] }
            set { self.metadata[key] = newValue }
        }

        func log(event: LogEvent) {
            self.recorder.append(Entry(level: event.level, message: "\(event.message)"))
        }
    }
}

/// Every event of a watch on nodes, collected in the background from `after` on (admin client).
public final class NodeWatch: Sendable {
    private let events = Mutex<[WatchEvent<Node>]>([])
    private let task = Mutex<Task<Void, Never>?>(nil)

    public init(_ client: ControlClient, after rv: Int64) {
        let t = Task<Void, Never> {
            do {
                try await client.watch(Node.self, after: rv) { event in
                    self.events.withLock { $0.append(event) }
                    return true
                }
            } catch {}
        }
        self.task.withLock { $0 = t }
    }

    /// Object events (no bookmarks) as (type, name, phase).
    public var changes: [(type: String, name: String, phase: NodeStatus.Phase?)] {
        self.events.withLock { events in
            events.compactMap { e in
                switch e {
                case .added(let n): return ("ADDED", n.metadata.name, n.status?.phase)
                case .modified(let n): return ("MODIFIED", n.metadata.name, n.status?.phase)
                case .deleted(let n): return ("DELETED", n.metadata.name, n.status?.phase)
                default: return nil
                }
            }
        }
    }

    public var bookmarks: Int {
        self.events.withLock { $0.filter { if case .bookmark = $0 { true } else { false } }.count }
    }

    public func stop() { self.task.withLock { $0?.cancel() } }

    deinit { self.task.withLock { $0?.cancel() } }
}
