import Synchronization
import Testing

@testable import Relay

/// The order of claims in a dial race (`LinkManager.dial`): the direct link may upgrade a relayed one from the
/// moment the relayed one is offered. Values stand in for links; `discarded` is what the race closed.
@Suite("A dial race's claims: direct and relayed")
struct DirectDialTests {
    private final class Outcome: Sendable {
        let discarded = Mutex<[Int]>([])
    }

    private func race() -> (Race<Int>, DirectDial<Int>, Outcome) {
        let outcome = Outcome()
        let race = Race<Int>(count: 2) { value in outcome.discarded.withLock { $0.append(value) } }
        return (race, DirectDial(race: race), outcome)
    }

    @Test("the relayed link wins; a direct link up the moment after is the upgrade, not a loser")
    func directAfterRelayedUpgrades() async {
        let (race, dial, outcome) = self.race()
        let winner = await withCheckedContinuation { continuation in
            race.start(continuation)
            #expect(dial.relayedClaim(1))
            // Before the dial's continuation has run (it used to allow the upgrade only then).
            #expect(dial.claim(2))
        }
        #expect(winner == 1)
        #expect(outcome.discarded.withLock { $0 }.isEmpty)
    }

    @Test("the direct link wins; the relayed one that comes up after is closed")
    func relayedAfterDirectIsDiscarded() async {
        let (race, dial, outcome) = self.race()
        let winner = await withCheckedContinuation { continuation in
            race.start(continuation)
            #expect(dial.claim(1))
            #expect(!dial.relayedClaim(2))
        }
        #expect(winner == 1)
        #expect(outcome.discarded.withLock { $0 } == [2])
    }

    @Test("with no relayed link offered, a direct link after the race ended (both failed first) is closed")
    func directAfterAFailedRaceIsDiscarded() async {
        let (race, dial, outcome) = self.race()
        let winner = await withCheckedContinuation { continuation in
            race.start(continuation)
            race.offer(nil)
            race.offer(nil)
        }
        #expect(winner == nil)
        #expect(!dial.claim(3))
        #expect(outcome.discarded.withLock { $0 } == [3])
    }
}
