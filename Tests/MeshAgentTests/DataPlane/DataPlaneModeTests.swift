import Foundation
import MeshTestSupport
import Testing

@testable import MeshAgent

/// `DataPlaneMode` in JSON is the text `/routes` and `/status` always showed, and reads back as the value.
@Suite("Data plane mode: a type, its text in JSON", .rationed)
struct DataPlaneModeTests {
    @Test(arguments: [
        (DataPlaneMode.pending, "pending"), (.loopback, "loopback"), (.meshInterface("mesh0"), "meshInterface(mesh0)"),
        (.stopped, "stopped"),
    ])
    func roundTrip(mode: DataPlaneMode, text: String) throws {
        let data = try JSONEncoder().encode([mode])
        #expect(String(decoding: data, as: UTF8.self) == "[\"\(text)\"]")
        #expect(try JSONDecoder().decode([DataPlaneMode].self, from: data) == [mode])
        #expect(mode.description == text)
    }

    @Test func unknownTextIsAnError() {
        for bad in ["\"interface\"", "\"meshInterface(mesh0\"", "\"\"", "3"] {
            #expect(throws: DecodingError.self) {
                try JSONDecoder().decode([DataPlaneMode].self, from: Data("[\(bad)]".utf8))
            }
        }
    }
}
