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

/// Keeps a consumer in sync with one kind on the control plane, Kubernetes-reflector style:
/// list, then watch from the list's version; on a dropped stream resume from the last version
/// seen; on 410 Gone list again; while the control plane is unreachable retry with jittered
/// exponential backoff. Runs until its task is cancelled.
public struct Reflector<T: MeshObject>: Sendable {
    public struct Backoff: Sendable {
        public var initial: Duration = .milliseconds(200)
        public var maximum: Duration = .seconds(30)

        public init() {}
    }

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
    public func run(from resourceVersion: Int64?, handle: (ReflectorUpdate<T>) async throws -> Void) async {
        var rv = resourceVersion
        var delay = self.backoff.initial
        var failures = 0
        // Several replicas: a failure moves to the next one and resumes there from `rv` (no relist).
        var client = self.client
        // Only the consumer failing, or a version that is gone, lists again; a broken connection resumes.
        var handlerFailed = false
        let kind = T.resource.plural
        while !Task.isCancelled {
            do {
                if rv == nil {
                    let list = try await client.list(
                        T.self,
                        namespace: self.namespace,
                        labelSelector: self.labelSelector
                    )
                    guard let listRV = Int64(list.metadata.resourceVersion) else {
                        throw HTTPClientError("list of \(kind) has no resourceVersion")
                    }
                    do {
                        try await handle(.replaced(list.items, resourceVersion: listRV))
                    } catch {
                        handlerFailed = true
                        throw error
                    }
                    if failures > 0 {
                        self.logger.info("\(kind): connected to the control plane at \(client.endpoint) again")
                        failures = 0
                        delay = self.backoff.initial
                    }
                    rv = listRV
                }
                try await client.watch(
                    T.self,
                    namespace: self.namespace,
                    after: rv,
                    labelSelector: self.labelSelector,
                    timeoutSeconds: self.watchTimeoutSeconds
                ) { event in
                    // The stream works: the next failure starts a fresh backoff.
                    if failures > 0 {
                        self.logger.info("\(kind): connected to the control plane at \(client.endpoint) again")
                        failures = 0
                        delay = self.backoff.initial
                    }
                    if case .error(let status) = event { throw status }
                    do {
                        try await handle(.changed(event))
                    } catch {
                        handlerFailed = true
                        throw error
                    }
                    if let v = event.resourceVersion { rv = v }
                    return true
                }
            } catch let status as Status where status.code == 410 {
                self.logger.info("\(kind): resourceVersion \(rv.map(String.init) ?? "-") is gone; listing again")
                rv = nil
            } catch is CancellationError {
                return
            } catch {
                if Task.isCancelled { return }
                failures += 1
                if handlerFailed {
                    handlerFailed = false
                    rv = nil
                }
                if let next = client.failingOver(), (error as? Status).map({ $0.code >= 500 }) ?? true {
                    // Another replica: try it at once the first time round, then back off as usual.
                    self.logger.log(
                        level: failures == 1 ? .notice : .debug,
                        "\(kind): \(error); resuming on \(next.endpoint) after resourceVersion \(rv.map(String.init) ?? "-")"
                    )
                    client = next
                    if failures <= client.alternates.count { continue }
                }
                let level: Logger.Level = failures == 1 ? .warning : .debug
                self.logger.log(level: level, "\(kind): \(error); retrying in \(delay) (attempt \(failures))")
                // Full jitter: sleep a random part of the current delay, then double it.
                let jittered = Duration.nanoseconds(Int64.random(in: 0...max(1, delay.nanoseconds)))
                try? await Task.sleep(for: jittered)
                delay = min(delay * 2, self.backoff.maximum)
            }
        }
    }
}

extension Duration {
    var nanoseconds: Int64 {
        let (s, atto) = self.components
        return s * 1_000_000_000 + atto / 1_000_000_000
    }
}
