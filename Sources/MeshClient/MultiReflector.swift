import Logging
import MeshCore
import MeshHTTP
import NIOCore

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// One kind a `MultiReflector` keeps in sync: how to list it, decode its watch lines and hand them to its
/// consumer. Made by `of(_:from:handle:)`, where the kind's type is known.
public struct ReflectedKind: Sendable {
    public let type: ResourceType
    /// The version the consumer holds already (a cache): the watch resumes from it. Nil: list first.
    public var from: Int64?
    let namespace: String?
    let labelSelector: String?
    /// For devices and workloads: only those placed on this node (other kinds ignore it).
    let node: String?
    /// Lists the kind, hands the list on, returns its version.
    let list: @Sendable (ControlClient) async throws -> Int64
    /// Decodes one watch line of this kind and hands it on; returns its version.
    let change: @Sendable (ByteBuffer) async throws -> Int64?
    /// Hands on a bookmark: everything up to the version has been delivered.
    let bookmark: @Sendable (Int64) async throws -> Void

    /// `handle` is called in order, never concurrently; when it throws, the reflector lists again.
    public static func of<T: MeshObject>(
        _ type: T.Type,
        from rv: Int64?,
        namespace: String? = nil,
        labelSelector: String? = nil,
        node: String? = nil,
        handle: @escaping @Sendable (ReflectorUpdate<T>) async throws -> Void
    ) -> ReflectedKind {
        ReflectedKind(
            type: T.resource,
            from: rv,
            namespace: namespace,
            labelSelector: labelSelector,
            node: node,
            list: { client in
                let list = try await client.list(
                    T.self,
                    namespace: namespace,
                    labelSelector: labelSelector,
                    node: node
                )
                guard let listRV = Int64(list.metadata.resourceVersion) else {
                    throw HTTPClientError("list of \(T.resource.plural) has no resourceVersion")
                }
                try await ConsumerFailure.wrap { try await handle(.replaced(list.items, resourceVersion: listRV)) }
                return listRV
            },
            change: { line in
                let event = try ControlClient.event(T.self, line)
                if case .error(let status) = event { throw status }
                try await ConsumerFailure.wrap { try await handle(.changed(event)) }
                return event.resourceVersion
            },
            bookmark: { rv in
                try await ConsumerFailure.wrap { try await handle(.changed(.bookmark(resourceVersion: rv))) }
            }
        )
    }
}

/// The consumer's handler threw: list again (a broken connection only resumes).
struct ConsumerFailure: Error {
    var error: any Error

    static func wrap(_ body: () async throws -> Void) async throws {
        do {
            try await body()
        } catch let e as CancellationError {
            throw e
        } catch {
            throw ConsumerFailure(error: error)
        }
    }
}

/// Keeps consumers in sync with several kinds over **one** watch (`GET /apis/mesh.edge/v1/watch?resources=`),
/// Kubernetes-reflector style: list each kind (unless its consumer holds a version already), watch every
/// kind from the smallest version, skip a kind's changes at or below its own version, resume a dropped
/// stream from the last version it carried, list every kind again on 410 Gone or when a consumer fails,
/// and retry with jittered exponential backoff while the control plane is unreachable. With several
/// replicas a failure moves to the next and resumes there (no relist). One kind, or a namespace or label
/// selector, uses that kind's own watch path; a control plane without the multi-kind path (404) gets one
/// watch per kind. Runs until its task is cancelled.
///
/// An agent follows seven kinds; one stream instead of seven is six fewer TLS connections for the
/// control plane to hold per node (perf/RESULTS.md, "connections per agent").
public struct MultiReflector: Sendable {
    public var client: ControlClient
    public var kinds: [ReflectedKind]
    public var backoff = ReflectorBackoff()
    /// How long a watch request lasts before it is renewed (server-side timeout).
    public var watchTimeoutSeconds = 300
    /// Called with the stream's version when a watch stream delivers its first line (after a list, a
    /// renewal, a dropped connection or a fail-over): the consumer is caught up to there.
    public var onStream: (@Sendable (Int64) -> Void)?
    let logger: Logger

    public init(client: ControlClient, kinds: [ReflectedKind], logger: Logger) {
        precondition(!kinds.isEmpty, "a reflector follows at least one kind")
        precondition(
            kinds.count == 1 || kinds.allSatisfy { $0.namespace == nil && $0.labelSelector == nil },
            "a watch over several kinds is cluster-wide, without a label selector"
        )
        precondition(
            kinds.count == 1 || Set(kinds.filter(\.type.placedOnNodes).map { $0.node ?? "" }).count <= 1,
            "a watch over several kinds scopes all its placed kinds (devices, workloads) to one node, or none"
        )
        self.client = client
        self.kinds = kinds
        self.logger = logger
    }

    /// The kinds' plurals, for messages.
    var label: String { self.kinds.map(\.type.plural).joined(separator: ",") }

    /// A line's type, kind and version, read before the kind's own decoder takes it: a step over the line's
    /// bytes (`JSONValue.strings(at:in:)`), not a second `JSONDecoder` pass over the whole line (perf/RESULTS.md,
    /// "Beats answered on the event loop, one decode per watch line").
    struct Peek: Equatable {
        var type: WatchEventType
        var kind: String?
        var resourceVersion: String?

        static let paths = [["type"], ["object", "kind"], ["object", "metadata", "resourceVersion"]]

        init(type: WatchEventType, kind: String?, resourceVersion: String?) {
            self.type = type
            self.kind = kind
            self.resourceVersion = resourceVersion
        }

        init(_ line: ByteBuffer) throws {
            let found: [String?]
            do {
                found = try line.withUnsafeReadableBytes { try JSONValue.strings(at: Self.paths, in: $0) }
            } catch {
                throw HTTPClientError("malformed watch event from the control plane: \(error)")
            }
            guard let text = found[0], let type = WatchEventType(rawValue: text) else {
                let what = found[0].map { "an unknown type \"\($0)\"" } ?? "no type"
                throw HTTPClientError("malformed watch event from the control plane: \(what)")
            }
            self.init(type: type, kind: found[1], resourceVersion: found[2])
        }
    }

    struct ErrorLine: Decodable { var object: Status }

    public func run() async {
        // Each kind's version (nil: list it), and the stream's: where a dropped watch resumes.
        var versions = self.kinds.map(\.from)
        var position: Int64?
        var delay = self.backoff.initial
        var failures = 0
        var client = self.client
        let label = self.label
        while !Task.isCancelled {
            do {
                var listed = false
                if versions.contains(where: { $0 == nil }) {
                    // Every list over one kept-alive connection (one handshake for seven kinds, not seven),
                    // closed once they are in; the watch has its own.
                    let lister = client.session == nil ? client.keepingAlive() : client
                    defer { if client.session == nil { lister.session?.close() } }
                    for i in self.kinds.indices where versions[i] == nil {
                        versions[i] = try await self.kinds[i].list(lister)
                        position = nil
                        listed = true
                    }
                }
                // After failures: the control plane is back once a list or the stream's first line answers, and
                // the next failure starts a fresh backoff.
                func answered() {
                    guard failures > 0 else { return }
                    self.logger.info("\(label): connected to the control plane at \(client.endpoint) again")
                    failures = 0
                    delay = self.backoff.initial
                }
                if listed { answered() }
                let from = position ?? versions.compactMap { $0 }.min()!
                position = from
                var first = true
                let onLine: (ByteBuffer) async throws -> Bool = { line in
                    answered()
                    if let rv = try await self.dispatch(line, versions: &versions) {
                        position = max(position ?? rv, rv)
                        if first {
                            first = false
                            self.onStream?(rv)
                        }
                    }
                    return true
                }
                if self.kinds.count == 1 {
                    let kind = self.kinds[0]
                    try await client.watchLines(
                        kind.type,
                        namespace: kind.namespace,
                        after: from,
                        labelSelector: kind.labelSelector,
                        node: kind.node,
                        timeoutSeconds: self.watchTimeoutSeconds,
                        onLine: onLine
                    )
                } else {
                    try await client.watchLines(
                        self.kinds.map(\.type),
                        after: from,
                        node: self.kinds.first(where: \.type.placedOnNodes)?.node,
                        timeoutSeconds: self.watchTimeoutSeconds,
                        onLine: onLine
                    )
                }
            } catch let status as Status where status.code == 410 {
                self.logger.info(
                    "\(label): resourceVersion \(position.map(String.init) ?? "-") is gone; listing again"
                )
                versions = versions.map { _ in nil }
                position = nil
            } catch let status as Status where status.code == 404 && self.kinds.count > 1 {
                // A control plane from before the watch over several kinds: one watch per kind.
                self.logger.notice(
                    "\(label): the control plane at \(client.endpoint) has no watch over several kinds (\(status.message)); watching each kind on its own"
                )
                await self.runEachAlone(client, from: versions)
                return
            } catch is CancellationError {
                return
            } catch {
                if Task.isCancelled { return }
                failures += 1
                var why = error
                if let consumer = error as? ConsumerFailure {
                    why = consumer.error
                    versions = versions.map { _ in nil }
                    position = nil
                }
                if let next = client.failingOver(), (why as? Status).map({ $0.code >= 500 }) ?? true {
                    // Another replica: try it at once the first time round, then back off as usual.
                    self.logger.log(
                        level: failures == 1 ? .notice : .debug,
                        "\(label): \(why); resuming on \(next.endpoint) after resourceVersion \(position.map(String.init) ?? "-")"
                    )
                    client = next
                    if failures <= client.alternates.count { continue }
                }
                let level: Logger.Level = failures == 1 ? .warning : .debug
                self.logger.log(level: level, "\(label): \(why); retrying in \(delay) (attempt \(failures))")
                // Full jitter: sleep a random part of the current delay, then double it.
                let jittered = Duration.nanoseconds(Int64.random(in: 0...max(1, delay.nanoseconds)))
                try? await Task.sleep(for: jittered)
                delay = min(delay * 2, self.backoff.maximum)
            }
        }
    }

    /// Hands one line to its kind (a bookmark to every kind behind it); returns the stream's version after it.
    func dispatch(_ line: ByteBuffer, versions: inout [Int64?]) async throws -> Int64? {
        if self.kinds.count == 1 {
            let rv = try await self.kinds[0].change(line)
            if let rv { versions[0] = rv }
            return rv
        }
        let peek = try Peek(line)
        if peek.type == .error {
            throw (try? JSONDecoder().decode(ErrorLine.self, from: Data(line.readableBytesView)).object)
                ?? HTTPClientError("malformed error event from the control plane")
        }
        guard let text = peek.resourceVersion, let rv = Int64(text) else {
            throw HTTPClientError("a watch event from the control plane has no resourceVersion")
        }
        if peek.type == .bookmark {
            for i in self.kinds.indices where rv > versions[i] ?? Int64.max {
                try await self.kinds[i].bookmark(rv)
                versions[i] = rv
            }
            return rv
        }
        guard let i = self.kinds.firstIndex(where: { $0.type.kind == peek.kind }) else {
            throw HTTPClientError(
                "the control plane sent a \(peek.kind ?? "kindless") object on a watch of \(self.label)"
            )
        }
        // Changes the kind's own list (or cache) already holds.
        if rv > versions[i] ?? Int64.max {
            _ = try await self.kinds[i].change(line)
            versions[i] = rv
        }
        return rv
    }

    /// One reflector per kind, each from its version (an older control plane).
    private func runEachAlone(_ client: ControlClient, from versions: [Int64?]) async {
        await withTaskGroup(of: Void.self) { group in
            for (i, var kind) in self.kinds.enumerated() {
                kind.from = versions[i]
                var one = self
                one.client = client
                one.kinds = [kind]
                group.addTask { await one.run() }
            }
        }
    }
}
