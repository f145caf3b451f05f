import Synchronization
import Testing

@testable import Relay

/// The order of claims in a dial race (`LinkManager.dial`): the direct link may upgrade a relayed one from the
/// moment the relayed one is offered. Values stand in for links; `discarded` is what the race closed.
@Suite("A dial race's claims: direct and relayed")
struct DirectDialTests {
    private final class Discarded: Sendable {
        let values = Mutex<[Int]>([])
        var all: [Int] { self.values.withLock { $0 } }
    }

    /// A race of two with its direct side: `offers` run before the race's waiter resumes (as the dial's claims do
    /// on the links' event loops); returns the winner, the dial (for claims after it) and what the race closed.
    private func decide(
        _ offers: (Race<Int>, DirectDial<Int>) -> Void
    ) async -> (winner: Int?, dial: DirectDial<Int>, discarded: Discarded) {
        let discarded = Discarded()
        let race = Race<Int>(count: 2) { value in discarded.values.withLock { $0.append(value) } }
        let dial = DirectDial(race: race)
        let winner = await withCheckedContinuation { continuation in
            race.start(continuation)
            offers(race, dial)
        }
        return (winner, dial, discarded)
    }

    @Test("the relayed link wins; a direct link up the moment after is the upgrade, not a loser")
    func directAfterRelayedUpgrades() async {
        let (winner, _, discarded) = await self.decide { _, dial in
            #expect(dial.relayedClaim(1))
            // Before the dial's continuation has run (it used to allow the upgrade only then).
            #expect(dial.claim(2))
        }
        #expect(winner == 1)
        #expect(discarded.all.isEmpty)
    }

    @Test("the direct link wins; the relayed one that comes up after is closed")
    func relayedAfterDirectIsDiscarded() async {
        let (winner, _, discarded) = await self.decide { _, dial in
            #expect(dial.claim(1))
            #expect(!dial.relayedClaim(2))
        }
        #expect(winner == 1)
        #expect(discarded.all == [2])
    }

    @Test("with no relayed link offered, a direct link after the race ended (both failed first) is closed")
    func directAfterAFailedRaceIsDiscarded() async {
        let (winner, dial, discarded) = await self.decide { race, _ in
            race.offer(nil)
            race.offer(nil)
        }
        #expect(winner == nil)
        #expect(!dial.claim(3))
        #expect(discarded.all == [3])
    }
}
