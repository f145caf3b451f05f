import MeshCore
import Testing

@Suite struct TimestampTests {
    @Test func formatsAndParses() {
        #expect(Timestamp.format(secondsSinceEpoch: 0) == "1970-01-01T00:00:00Z")
        #expect(Timestamp.format(secondsSinceEpoch: 1_795_636_656) == "2026-11-25T19:57:36Z")
        #expect(Timestamp.parse("2026-11-25T19:57:36Z") == 1_795_636_656)
        #expect(Timestamp.parse("2026-11-25T20:57:36+01:00") == 1_795_636_656)
        #expect(Timestamp.parse("2026-11-25T19:57:36.123Z") == 1_795_636_656)
        #expect(Timestamp.parse("2024-02-29T00:00:00Z") == 1_709_164_800)
    }

    @Test(arguments: [
        "", "2026-11-25", "2026-13-01T00:00:00Z", "2026-11-25T19:57:36", "2026-11-25T19:57:36Zjunk",
        "x026-11-25T19:57:36Z",
    ])
    func rejects(_ s: String) {
        #expect(Timestamp.parse(s) == nil)
    }
}

@Suite struct ConfigFileTests {
    struct Sample: Codable, DefaultConstructible, Equatable {
        var listen = "127.0.0.1:1"
        var limits = Limits()
        var names: [String] = ["a"]

        struct Limits: Codable, Equatable {
            var body = 10
            var header = 20
        }
    }

    @Test func defaultsFillWhatTheFileOmits() throws {
        let s = try ConfigFile.decode(Sample.self, yaml: "limits:\n  body: 99\n")
        #expect(s.limits == .init(body: 99, header: 20))
        #expect(s.listen == "127.0.0.1:1")
        #expect(try ConfigFile.decode(Sample.self, yaml: "") == Sample())
        #expect(try ConfigFile.decode(Sample.self, yaml: "# only a comment\n") == Sample())
    }

    @Test func unknownAndMistypedFieldsAreErrors() {
        #expect(throws: ManifestError("limits.bodyy: unknown field")) {
            try ConfigFile.decode(Sample.self, yaml: "limits: {bodyy: 1}")
        }
        #expect(throws: ManifestError("names: expected a list")) {
            try ConfigFile.decode(Sample.self, yaml: "names: x")
        }
        #expect(throws: ManifestError.self) { try ConfigFile.decode(Sample.self, yaml: "- a\n- b\n") }
    }

    @Test func missingFileIsAClearError() {
        #expect {
            try ConfigFile.load(Sample.self, path: "/nonexistent/mesh.yaml")
        } throws: { e in
            (e as? ManifestError)?.message.hasPrefix("/nonexistent/mesh.yaml: cannot read") == true
        }
    }

    @Test func listenAddresses() throws {
        #expect(try ListenAddress("[::1]:7700", field: "listen") == ListenAddress(host: "::1", port: 7700))
        #expect(try ListenAddress("127.0.0.1:0", field: "listen").port == 0)
        #expect(throws: ManifestError.self) { try ListenAddress("127.0.0.1", field: "listen") }
        #expect(throws: ManifestError.self) { try ListenAddress("127.0.0.1:99999", field: "listen") }
    }
}
