import Logging
import MeshCore
import MeshHTTP

/// What a reflector hands its consumer.
public enum ReflectorUpdate<T: MeshObject>: Sendable {
    /// A full list: the consumer's copy becomes exactly these objects, at this version.
    case replaced([T], resourceVersion: Int64)
    /// One change (or a bookmark) after the last update.
    case changed(WatchEvent<T>)

    public var resourceVersion: Int64? {
        switch self {
        case .replaced(_, let rv): return rv
        case .changed(let e): return e.resourceVersion
        }
    }
}

/// How long a reflector waits between attempts while the control plane is unreachable (doubling, jittered).
public struct ReflectorBackoff: Sendable {
    public var initial: Duration = .milliseconds(200)
    public var maximum: Duration = .seconds(30)

    public init() {}
}

/// Keeps a consumer in sync with one kind on the control plane, Kubernetes-reflector style:
/// list, then watch from the list's version; on a dropped stream resume from the last version
/// seen; on 410 Gone list again; while the control plane is unreachable retry with jittered
/// exponential backoff. Runs until its task is cancelled. A `MultiReflector` of one kind; a component
/// that follows several kinds uses one `MultiReflector` for all (one connection).
public struct Reflector<T: MeshObject>: Sendable {
    public typealias Backoff = ReflectorBackoff

    public var client: ControlClient
    public var namespace: String?
    public var labelSelector: String?
    public var backoff = Backoff()
    /// How long a watch request lasts before it is renewed (server-side timeout).
    public var watchTimeoutSeconds = 300
    let logger: Logger

    public init(client: ControlClient, namespace: String? = nil, labelSelector: String? = nil, logger: Logger) {
        self.client = client
        self.namespace = namespace
        self.labelSelector = labelSelector
        self.logger = logger
    }

    /// Syncs until cancelled. `resourceVersion` resumes a watch from a version persisted earlier
    /// (nil: start with a list). `handle` is called in order; when it throws, the reflector lists again.
    public func run(
        from resourceVersion: Int64?,
        handle: @escaping @Sendable (ReflectorUpdate<T>) async throws -> Void
    ) async {
        var one = MultiReflector(
            client: self.client,
            kinds: [
                .of(
                    T.self,
                    from: resourceVersion,
                    namespace: self.namespace,
                    labelSelector: self.labelSelector,
                    handle: handle
                )
            ],
            logger: self.logger
        )
        one.backoff = self.backoff
        one.watchTimeoutSeconds = self.watchTimeoutSeconds
        await one.run()
    }
}

extension Duration {
    var nanoseconds: Int64 {
        let (s, atto) = self.components
        return s * 1_000_000_000 + atto / 1_000_000_000
    }
}
