import MeshTestSupport
import Relay
import Testing

/// STUN's and the relay session's codec errors are equal (and hash alike) by code and offset only.
@Suite(.rationed) struct OffsetWireErrorTests {
    @Test func equalityIsCodeAndOffsetNotDetail() {
        #expect(STUNWireError(.notSTUN, at: 3, "one") == STUNWireError(.notSTUN, at: 3, "other"))
        #expect(STUNWireError(.notSTUN, at: 3, "same") != STUNWireError(.notSTUN, at: 4, "same"))
        #expect(STUNWireError(.notSTUN, at: 3, "same") != STUNWireError(.badText, at: 3, "same"))
        #expect(Set([STUNWireError(.badText, at: 1, "a"), STUNWireError(.badText, at: 1, "b")]).count == 1)

        #expect(RelaySessionWireError(.truncated, at: 9, "one") == RelaySessionWireError(.truncated, at: 9, "two"))
        #expect(RelaySessionWireError(.truncated, at: 9, "x") != RelaySessionWireError(.tooLong, at: 9, "x"))
        #expect(RelaySessionWireError(.truncated, at: 9, "x") != RelaySessionWireError(.truncated, at: 0, "x"))
        #expect(
            Set([RelaySessionWireError(.badName, at: 2, "a"), RelaySessionWireError(.badName, at: 2, "b")]).count == 1
        )
    }
}
