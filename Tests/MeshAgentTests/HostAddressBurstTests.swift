import MeshCore
import MeshTestSupport
import Synchronization
import Testing

@testable import MeshAgent

private final class Count: Sendable {
    let value = Atomic<Int>(0)
}

/// `DirectPaths.followBursts`: how netlink address events become comparisons of the host's addresses.
@Suite(.rationed) struct HostAddressBurstTests {
    static func event(_ i: Int, interface: Int32) -> HostAddressEvent {
        HostAddressEvent(
            kind: .added,
            address: .v4(0xC612_0000 | UInt32(i)),
            prefixLength: 32,
            interfaceIndex: interface
        )
    }

    /// Feeds `events` (all queued before the follower starts), its settle step waiting until every event was
    /// seen; returns how often `changed` ran.
    static func changes(for events: [HostAddressEvent], ignoringInterface ignored: Int32) async -> Int {
        let (stream, continuation) = AsyncStream.makeStream(of: HostAddressEvent.self)
        for e in events { continuation.yield(e) }
        continuation.finish()
        let seen = Count()
        let changes = Count()
        let total = events.count
        await DirectPaths.followBursts(
            of: stream,
            ignoring: { e in
                seen.value.add(1, ordering: .sequentiallyConsistent)
                return e.interfaceIndex == ignored
            },
            settle: {
                // The rest of the burst is read meanwhile (a condition, not a time).
                while seen.value.load(ordering: .sequentiallyConsistent) < total { await Task.yield() }
            },
            changed: { changes.value.add(1, ordering: .sequentiallyConsistent) }
        )
        return changes.value.load(ordering: .sequentiallyConsistent)
    }

    @Test func theMeshInterfacesVIPsCauseNoComparison() async {
        // 10,000 VIPs put on the mesh interface (index 7) at start-up.
        let vips = (0..<10_000).map { Self.event($0, interface: 7) }
        #expect(await Self.changes(for: vips, ignoringInterface: 7) == 0)
    }

    @Test func aBurstIsOneComparison() async {
        // An interface coming up with 100 addresses, among 10,000 VIP events: one comparison, not 100.
        var events = (0..<10_000).map { Self.event($0, interface: 7) }
        events.insert(contentsOf: (0..<100).map { Self.event($0, interface: 2) }, at: 5_000)
        #expect(await Self.changes(for: events, ignoringInterface: 7) == 1)
    }

    @Test func anEventAfterTheLastComparisonIsCovered() async {
        // One event, the stream ends at once: still compared (by the settle step or at the end, once).
        #expect(await Self.changes(for: [Self.event(1, interface: 2)], ignoringInterface: 7) == 1)
    }
}
