import Logging
import MeshClient
import MeshCore
import MeshTestSupport
import Synchronization
import Testing

func service(_ name: String) -> MeshService {
    MeshService(
        metadata: ObjectMeta(name: name, namespace: "shop"),
        spec: ServiceSpec(ports: [ServicePort(name: "http", port: 80, protocol: .http)])
    )
}

/// The list + watch reflector every component syncs with, against a real control plane: list then watch,
/// resume from a persisted version without a list, 410 Gone lists again, a consumer's failure lists again,
/// and a control-plane restart is bridged by resuming from the last version seen.
@Suite(.rationed) struct ReflectorTests {
    let logger = Logger(label: "reflector-test")

    func start(_ cp: RunningControl, from rv: Int64?, into delivered: KindLog) -> Task<Void, Never> {
        var reflector = Reflector<MeshService>(client: cp.client, namespace: "shop", logger: self.logger)
        reflector.backoff.initial = .milliseconds(20)
        reflector.backoff.maximum = .milliseconds(200)
        return Task { await reflector.run(from: rv) { try delivered.record($0) } }
    }

    @Test func listsThenWatchesEveryChangeInOrder() async throws {
        let cp = try await RunningControl()
        _ = try await cp.client.apply(service("a"))
        let rv = try await cp.rv()
        let delivered = KindLog(namingKinds: false)
        let task = self.start(cp, from: nil, into: delivered)
        #expect(await eventually { delivered.changes == ["list[a]@\(rv)"] }, "\(delivered.all)")
        _ = try await cp.client.apply(service("b"))
        _ = try await cp.client.delete(MeshService.self, namespace: "shop", name: "a")
        #expect(
            await eventually { delivered.changes == ["list[a]@\(rv)", "added:b", "deleted:a"] },
            "\(delivered.all)"
        )
        task.cancel()
        await task.value
        try await cp.stop()
    }

    @Test func resumesFromAPersistedVersionWithoutAList() async throws {
        let cp = try await RunningControl()
        _ = try await cp.client.apply(service("a"))
        let rv = try await cp.rv()
        _ = try await cp.client.apply(service("b"))
        let delivered = KindLog(namingKinds: false)
        let task = self.start(cp, from: rv, into: delivered)
        #expect(await eventually { delivered.changes == ["added:b"] }, "\(delivered.all)")
        task.cancel()
        await task.value
        try await cp.stop()
    }

    @Test func aCompactedVersionListsAgain() async throws {
        let cp = try await RunningControl { $0.historyLimit = 3 }
        _ = try await cp.client.apply(service("first"))
        // (Version 0 would mean "no version": the current objects as ADDED events.)
        let first = try await cp.rv()
        let names = ["first"] + (0..<12).map { "s\($0)" }
        for name in names { _ = try await cp.client.apply(service(name)) }
        let rv = try await cp.rv()
        let delivered = KindLog(namingKinds: false)
        let task = self.start(cp, from: first, into: delivered)
        #expect(
            await eventually { delivered.changes == ["list[\(names.sorted().joined(separator: ","))]@\(rv)"] },
            "\(delivered.all)"
        )
        task.cancel()
        await task.value
        try await cp.stop()
    }

    @Test func aConsumerFailureListsAgainAndLosesNothing() async throws {
        let cp = try await RunningControl()
        let delivered = KindLog(namingKinds: false)
        delivered.failOnce(at: "added:b")
        let task = self.start(cp, from: nil, into: delivered)
        #expect(await eventually { delivered.changes.count == 1 }, "\(delivered.all)")
        _ = try await cp.client.apply(service("b"))
        let rv = try await cp.rv()
        #expect(
            await eventually { delivered.changes.last == "list[b]@\(rv)" },
            "after the consumer refused b, the reflector lists again: \(delivered.all)"
        )
        #expect(delivered.changes.contains("refused:added:b"))
        task.cancel()
        await task.value
        try await cp.stop()
    }

    @Test func aRestartedControlPlaneIsResumedWithoutAList() async throws {
        let dir = TempDir()
        let cp = try await RunningControl(dir: dir)
        let port = cp.port
        _ = try await cp.client.apply(service("a"))
        let rv = try await cp.rv()
        let delivered = KindLog(namingKinds: false)
        // The reflector's client keeps pointing at the first instance's port, which the second takes over.
        let task = self.start(cp, from: nil, into: delivered)
        #expect(await eventually { delivered.changes == ["list[a]@\(rv)"] }, "\(delivered.all)")
        try await cp.stop()
        let again = try await RunningControl(dir: dir) { $0.listen = "127.0.0.1:\(port)" }
        _ = try await again.client.apply(service("b"))
        #expect(
            await eventually(timeout: .seconds(30)) { delivered.changes == ["list[a]@\(rv)", "added:b"] },
            "resumed from \(rv) after the restart, no second list: \(delivered.all)"
        )
        task.cancel()
        await task.value
        try await again.stop()
    }
}
