import Foundation
import MeshTestSupport
import Testing

@testable import MeshCore

/// `JSONParser`: JSON text to a value tree, byte for byte, every malformed case refused with where it broke.
@Suite struct JSONParserTests {
    func parse(_ text: String) throws -> JSONValue { try JSONParser.parse(Data(text.utf8)) }

    @Test("RFC 8259 section 13's two examples")
    func rfcExamples() throws {
        let image = """
            {
              "Image": {
                  "Width":  800,
                  "Height": 600,
                  "Title":  "View from 15th Floor",
                  "Thumbnail": {
                      "Url":    "http://www.example.com/image/481989943",
                      "Height": 125,
                      "Width":  100
                  },
                  "Animated" : false,
                  "IDs": [116, 943, 234, 38793]
                }
            }
            """
        #expect(
            try self.parse(image)
                == .object([
                    (
                        "Image",
                        .object([
                            ("Animated", .bool(false)), ("Height", .int(600)),
                            ("IDs", .array([.int(116), .int(943), .int(234), .int(38793)])),
                            (
                                "Thumbnail",
                                .object([
                                    ("Height", .int(125)), ("Url", .string("http://www.example.com/image/481989943")),
                                    ("Width", .int(100)),
                                ])
                            ),
                            ("Title", .string("View from 15th Floor")), ("Width", .int(800)),
                        ])
                    )
                ])
        )
        let places = """
            [
              {
                 "precision": "zip",
                 "Latitude":  37.7668,
                 "Longitude": -122.3959,
                 "Address":   "",
                 "City":      "SAN FRANCISCO",
                 "State":     "CA",
                 "Zip":       "94107",
                 "Country":   "US"
              },
              {
                 "precision": "zip",
                 "Latitude":  37.371991,
                 "Longitude": -122.026020,
                 "Address":   "",
                 "City":      "SUNNYVALE",
                 "State":     "CA",
                 "Zip":       "94085",
                 "Country":   "US"
              }
            ]
            """
        guard case .array(let items) = try self.parse(places) else {
            Issue.record("not an array")
            return
        }
        #expect(items.count == 2)
        #expect(items[1]["Longitude"] == .double(-122.026020))
        #expect(items[0]["Address"] == .string(""))
        // Members sorted by name, as the mesh writes them.
        if case .object(let members) = items[0] {
            #expect(
                members.map(\.0) == [
                    "Address", "City", "Country", "Latitude", "Longitude", "State", "Zip", "precision",
                ]
            )
        }
        // The same tree as Foundation's JSONSerialization reads.
        let reference = try JSONSerialization.jsonObject(with: Data(places.utf8)) as? [[String: Any]]
        #expect(reference?[1]["Latitude"] as? Double == 37.371991)
    }

    @Test("scalars: at the top too; whole numbers are integers, others doubles")
    func scalars() throws {
        #expect(try self.parse(" true ") == .bool(true))
        #expect(try self.parse("false") == .bool(false))
        #expect(try self.parse("null") == .null)
        #expect(try self.parse("\t\r\n12\n") == .int(12))
        #expect(try self.parse("-0") == .int(0))
        #expect(try self.parse("-9223372036854775808") == .int(Int64.min))
        #expect(try self.parse("9223372036854775808") == .double(9_223_372_036_854_775_808))
        #expect(try self.parse("1.5") == .double(1.5))
        #expect(try self.parse("-2.5E-3") == .double(-0.0025))
        #expect(try self.parse("1.0") == .int(1))
        #expect(try self.parse("1e3") == .int(1000))
        #expect(try self.parse("\"\"") == .string(""))
    }

    @Test("strings: every escape, \\u with surrogate pairs, raw UTF-8")
    func strings() throws {
        #expect(try self.parse(#""a\"b\\c\/d\be\ff\ng\rh\ti""#) == .string("a\"b\\c/d\u{08}e\u{0C}f\ng\rh\ti"))
        #expect(try self.parse(#""caf\u00e9 \u00E9""#) == .string("café é"))
        #expect(try self.parse(#""\ud83d\ude00!""#) == .string("😀!"))
        #expect(try self.parse("\"héllo wörld 😀\"") == .string("héllo wörld 😀"))
        #expect(try self.parse(#""\u0000""#) == .string("\u{0}"))
    }

    @Test("a repeated member name: the first is kept; one trailing comma is taken (as Foundation's decoder does)")
    func repeatedNamesAndTrailingCommas() throws {
        #expect(try self.parse(#"{"b": 1, "a": 2, "b": 3}"#) == .object([("a", .int(2)), ("b", .int(1))]))
        #expect(try self.parse(#"{"a": [1, 2, ], }"#) == .object([("a", .array([.int(1), .int(2)]))]))
        #expect(try self.parse("{}") == .object([]))
        #expect(try self.parse("[ ]") == .array([]))
    }

    @Test("every malformed case is refused, naming what broke and where")
    func malformed() {
        let cases: [(String, String, Int)] = [
            ("", "unexpected end of input", 0),
            ("   ", "unexpected end of input", 3),
            ("{", "expected a member name", 1),
            (#"{"a""#, "expected ':'", 4),
            (#"{"a":"#, "unexpected end of input", 5),
            (#"{"a":1"#, "unexpected end of input", 6),
            (#"{"a":1,,}"#, "expected a member name", 7),
            (#"{"a" 1}"#, "expected ':'", 5),
            (#"{'a':1}"#, "expected a member name", 1),
            (#"{"a":1 "b":2}"#, "expected ',' or '}'", 7),
            ("[1,,2]", "unexpected character", 3),
            ("[,]", "unexpected character", 1),
            ("{,}", "expected a member name", 1),
            ("[1 2]", "expected ',' or ']'", 3),
            ("[", "unexpected end of input", 1),
            ("01", "leading zero in a number", 1),
            ("1.", "expected a digit after '.'", 2),
            ("1e", "expected a digit in the exponent", 2),
            ("-", "expected a digit", 1),
            ("+1", "unexpected character", 0),
            ("1e400", "number out of range", 0),
            ("NaN", "unexpected character", 0),
            ("tru", "unexpected end of input", 0),
            ("trUe", "unexpected character", 0),
            ("1 2", "unexpected text after the value", 2),
            (#""abc"#, "unterminated string", 4),
            (#""a\"#, "unterminated string", 3),
            (#""\x""#, "invalid escape", 2),
            (#""\u12G4""#, "invalid \\u escape", 5),
            (#""\u12""#, "invalid \\u escape", 5),
            (#""\ud800""#, "unpaired surrogate in \\u escape", 7),
            (#""\ud800\u0041""#, "unpaired surrogate in \\u escape", 13),
            (#""\udc00""#, "unpaired surrogate in \\u escape", 7),
            ("\"a\u{01}b\"", "control character in a string", 2),
            ("\"a\nb\"", "control character in a string", 2),
            ("/* c */ 1", "unexpected character", 0),
        ]
        for (text, message, offset) in cases {
            #expect(throws: JSONParser.Failure(message: message, offset: offset), "\(text)") {
                try self.parse(text)
            }
        }
        // Invalid UTF-8 inside a string, with and without an escape before it.
        for bytes in [[0x22, 0xFF, 0x22], [0x22, 0x5C, 0x6E, 0xC3, 0x28, 0x22]] as [[UInt8]] {
            #expect(throws: JSONParser.Failure.self) { try JSONParser.parse(Data(bytes)) }
        }
    }

    @Test("nesting: 100 levels parse, 101 are refused before going deeper")
    func depth() throws {
        let ok = String(repeating: "[", count: Strict.maxDepth) + String(repeating: "]", count: Strict.maxDepth)
        #expect(throws: Never.self) { try self.parse(ok) }
        let deep = String(repeating: "[", count: 100_000)
        #expect(throws: JSONParser.Failure(message: "nested too deeply", offset: Strict.maxDepth, tooDeep: true)) {
            try self.parse(deep)
        }
        #expect(throws: ManifestError("malformed JSON: lists and objects nest deeper than 100 levels")) {
            try JSONValue.parse(
                json: Data((String(repeating: "{\"a\":", count: 101) + "1" + String(repeating: "}", count: 101)).utf8)
            )
        }
    }

    /// One to three bytes of `seed` replaced, removed or inserted from `alphabet`.
    static func mutate(_ seed: [UInt8], alphabet: [UInt8], _ rng: inout SplitMix) -> [UInt8] {
        var bytes = seed
        for _ in 0...(rng.next() % 3) {
            let at = Int(rng.next() % UInt64(bytes.count))
            switch rng.next() % 3 {
            case 0: bytes[at] = alphabet[Int(rng.next() % UInt64(alphabet.count))]
            case 1: bytes.remove(at: at)
            default: bytes.insert(alphabet[Int(rng.next() % UInt64(alphabet.count))], at: at)
            }
        }
        return bytes
    }

    @Test("2,000 mutations of a document: never a crash, and accepted exactly when JSONSerialization accepts")
    func mutationsAgreeWithFoundation() throws {
        let seed = Array(
            #"{"a": [1, -2.5e3, true, null, "x\"\u00e9"], "b": {"c": "", "d": [{}, []]}, "e": 0.5}"#.utf8
        )
        let alphabet = Array(#"{}[]:,"\ -+.0123456789eEtrufalsn/\#u{01}"#.utf8) + [0xC3, 0xFF]
        var rng = SplitMix(seed: 0x5EED)
        var accepted = 0
        for _ in 0..<2000 {
            let bytes = Self.mutate(seed, alphabet: alphabet, &rng)
            let ours = try? JSONParser.parse(Data(bytes))
            let theirs = try? JSONSerialization.jsonObject(with: Data(bytes), options: [.fragmentsAllowed])
            #expect((ours != nil) == (theirs != nil), "\(String(decoding: bytes, as: UTF8.self))")
            if ours != nil { accepted += 1 }
        }
        #expect(accepted > 100)  // the mutations reach valid documents too, not only errors
    }

    /// `JSONParser.strings` against a lookup in `parse`'s tree: the same strings, or the same failure.
    func expectSkimAgrees(_ bytes: [UInt8], _ paths: [[String]], sourceLocation: SourceLocation = #_sourceLocation) {
        let skimmed: Result<[String?], JSONParser.Failure>
        do {
            skimmed = .success(try bytes.withUnsafeBytes { try JSONParser.strings(at: paths, in: $0) })
        } catch {
            skimmed = .failure(error as! JSONParser.Failure)
        }
        let looked = Result { () throws(JSONParser.Failure) -> [String?] in
            let tree = try JSONParser.parse(Data(bytes))
            return paths.map { path in path.reduce(tree as JSONValue?) { $0?[$1] }?.stringValue }
        }
        switch (skimmed, looked) {
        case (.success(let a), .success(let b)):
            #expect(a == b, "\(String(decoding: bytes, as: UTF8.self))", sourceLocation: sourceLocation)
        case (.failure(let a), .failure(let b)):
            #expect(a == b, "\(String(decoding: bytes, as: UTF8.self))", sourceLocation: sourceLocation)
        default:
            Issue.record(
                "skim \(skimmed), parse \(looked): \(String(decoding: bytes, as: UTF8.self))",
                sourceLocation: sourceLocation
            )
        }
    }

    static let watchPaths = [["type"], ["object", "kind"], ["object", "metadata", "resourceVersion"]]

    @Test("a few strings read without building the rest: a watch line's type, kind and version")
    func skimAWatchLine() throws {
        let line = #"""
            {"type":"MODIFIED","object":{"apiVersion":"mesh.edge/v1","kind":"Service","metadata":{"name":"web","namespace":"default","resourceVersion":"4217","labels":{"app":"web"},"creationTimestamp":"2026-12-07T10:00:00Z"},"spec":{"ports":[{"port":80,"protocol":"TCP"}],"selector":{"app":"web"},"vip":"10.96.0.12"}}}
            """#
        let got = try Array(line.utf8).withUnsafeBytes { try JSONValue.strings(at: Self.watchPaths, in: $0) }
        #expect(got == ["MODIFIED", "Service", "4217"])
        // Missing paths, and paths that end on something else than a string, are nil.
        let bookmark = Array(#"{"type":"BOOKMARK","object":{"metadata":{"resourceVersion":"9"}}}"#.utf8)
        #expect(
            try bookmark.withUnsafeBytes { try JSONValue.strings(at: Self.watchPaths, in: $0) } == [
                "BOOKMARK", nil, "9",
            ]
        )
        let odd = Array(#"{"type":1,"object":{"kind":{"a":"b"},"metadata":[]}}"#.utf8)
        #expect(try odd.withUnsafeBytes { try JSONValue.strings(at: Self.watchPaths, in: $0) } == [nil, nil, nil])
        #expect(throws: ManifestError("malformed JSON: expected ',' or '}' at byte 16")) {
            try Array(#"{"type":"ADDED" "object":{}}"#.utf8).withUnsafeBytes {
                try JSONValue.strings(at: Self.watchPaths, in: $0)
            }
        }
        // The first of a repeated name, escaped names, a name and a path through it, and other documents.
        for text in [
            #"{"type":"A","type":"B","object":{"kind":"K","kind":"L"}}"#,
            #"{"object":{"kind":"K"},"object":{"kind":"L","metadata":{"resourceVersion":"2"}}}"#,
            #"{"t\u0079pe":"A","object":{"\u006bind":"K\n","metadata":{"resourceVersion":"\u0032"}}}"#,
            #"{"type":"é\u00e9","object":{"\u212Aind":"kelvin","metadata":{"resourceVersion":"1"}}}"#,
            #"{"type":null,"object":"x"}"#, #"[{"type":"A"}]"#, #""type""#, "{}", "[]", "12",
            #"{"a":[1,2,{"type":"X"}],"type":"Y", }"#,
        ] {
            self.expectSkimAgrees(Array(text.utf8), Self.watchPaths)
        }
        self.expectSkimAgrees(Array(#"{"a":"x","a":{"b":"y"}}"#.utf8), [["a"], ["a", "b"]])
        self.expectSkimAgrees(Array(#"{"a":{"b":"y"}}"#.utf8), [["a"], ["a", "b"]])
        let deep = String(repeating: #"{"object":"#, count: 101) + "1" + String(repeating: "}", count: 101)
        self.expectSkimAgrees(Array(deep.utf8), [["object", "object", "kind"]])
        self.expectSkimAgrees(Array(String(repeating: "[", count: 200).utf8), Self.watchPaths)
    }

    @Test("3,000 mutations of a watch line: the skim reads what parse's tree holds, or fails as parse does")
    func skimAgreesWithParse() {
        let seed = Array(
            #"{"type": "ADDED", "object": {"kind": "Service", "metadata": {"name": "a\"b\u00e9", "resourceVersion": "17", "labels": {"x": "y"}}, "spec": {"ports": [80, -2.5e3, true, null], "selector": {}}}}"#
                .utf8
        )
        let alphabet = Array(#"{}[]:,"\ -+.0123456789eEtrufalsnkdyp/\#u{01}"#.utf8) + [0xC3, 0xFF]
        var rng = SplitMix(seed: 0x5C1A)
        for _ in 0..<3000 {
            let bytes = Self.mutate(seed, alphabet: alphabet, &rng)
            self.expectSkimAgrees(bytes, Self.watchPaths)
        }
    }

    @Test("what the mesh writes parses back to the same tree")
    func roundTrip() throws {
        let values: [JSONValue] = [
            .object([
                ("a", .array([.int(1), .double(2.5), .string("x\"y\n\u{01}"), .null, .bool(true)])),
                ("b", .object([("c", .string("é😀/"))])),
            ]),
            .array([]), .string(""), .int(-42),
        ]
        for v in values { #expect(try JSONParser.parse(v.jsonData()) == v) }
    }
}

extension JSONParser.Failure: Equatable {
    public static func == (a: Self, b: Self) -> Bool {
        a.message == b.message && a.offset == b.offset && a.tooDeep == b.tooDeep
    }
}
