import Foundation
import MeshCore
import Testing

@Suite struct StrictTests {
    struct Inner: Codable, Equatable {
        var port: Int
        var name: String?
    }

    struct Outer: Codable, Equatable {
        var items: [Inner]
        var flag: Bool?
    }

    @Test func unknownFieldsAreNamedWithTheirPath() throws {
        let doc = try #require(Strict.documents(yaml: "items:\n- {port: 1}\n- {port: 2, prot: 3}\n").first)
        #expect(throws: ManifestError("items[1].prot: unknown field")) { try Strict.decode(Outer.self, from: doc) }
    }

    @Test func nullMembersAreNotUnknown() throws {
        let doc = try #require(Strict.documents(yaml: "items: []\nflag: null\n").first)
        #expect(try Strict.decode(Outer.self, from: doc) == Outer(items: [], flag: nil))
    }

    @Test func typeErrorsNameTheField() throws {
        let doc = try #require(Strict.documents(yaml: "items:\n- {port: \"80\"}\n").first)
        #expect(throws: ManifestError("items[0].port: expected a number")) { try Strict.decode(Outer.self, from: doc) }
        let missing = try #require(Strict.documents(yaml: "items:\n- {name: x}\n").first)
        #expect(throws: ManifestError("items[0].port: required field is missing")) {
            try Strict.decode(Outer.self, from: missing)
        }
    }

    @Test func quotedScalarsStayStrings() throws {
        let doc = try #require(Strict.documents(yaml: "a: \"80\"\nb: 80\nc: true\nd: 'true'\ne: ~\nf: 1.5\n").first)
        #expect(doc["a"] == .string("80"))
        #expect(doc["b"] == .int(80))
        #expect(doc["c"] == .bool(true))
        #expect(doc["d"] == .string("true"))
        #expect(doc["e"] == .null)
        #expect(doc["f"] == .double(1.5))
    }

    @Test func multipleDocumentsAndEmptyOnes() throws {
        let docs = try Strict.documents(yaml: "---\na: 1\n---\n---\nb: 2\n")
        #expect(docs.filter { $0 != .null }.count == 2)
    }

    @Test func malformedYAMLSaysWhere() {
        #expect {
            try Strict.documents(yaml: "a: [1, 2\nb: 3\n")
        } throws: { e in
            (e as? ManifestError)?.message.hasPrefix("malformed YAML: line") == true
        }
    }

    @Test func malformedJSON() {
        #expect(throws: ManifestError.self) { try JSONValue.parse(json: Data("{\"a\": ".utf8)) }
    }

    @Test func jsonRoundTripKeepsValues() throws {
        let text = #"{"a":[1,2.5,"x\n\u0001",true,null],"b":{"c":"é"}}"#
        let v = try JSONValue.parse(json: Data(text.utf8))
        #expect(try JSONValue.parse(json: v.jsonData()) == v)
    }

    @Test func mergeOverlaysObjects() {
        let base = JSONValue.object([("a", .int(1)), ("b", .object([("c", .int(2)), ("d", .int(3))]))])
        let over = JSONValue.object([("b", .object([("d", .int(4))])), ("e", .bool(true))])
        let merged = Strict.merge(base, over)
        #expect(merged["a"] == .int(1))
        #expect(merged["b"]?["c"] == .int(2))
        #expect(merged["b"]?["d"] == .int(4))
        #expect(merged["e"] == .bool(true))
    }
}

/// YAML and JSON nested beyond `Strict.maxDepth` are refused with a clear error before any
/// recursion (meshctl crashed with exit 139 on 10,000 levels); up to the limit they work, on a
/// task's stack.
@Suite struct NestingDepthTests {
    static func flowYAML(_ depth: Int) -> String {
        String(repeating: "[", count: depth) + "1" + String(repeating: "]", count: depth)
    }
    static func blockYAML(_ depth: Int) -> String { String(repeating: "- ", count: depth) + "1\n" }
    static func objectsJSON(_ depth: Int) -> String {
        String(repeating: "{\"a\":", count: depth) + "1" + String(repeating: "}", count: depth)
    }

    @Test func deepYAMLIsRefusedWithAClearMessage() throws {
        for text in [Self.flowYAML(10_000), Self.blockYAML(10_000), Self.flowYAML(Strict.maxDepth + 1)] {
            #expect {
                _ = try Strict.documents(yaml: text)
            } throws: { e in
                (e as? ManifestError)?.message.contains("nest deeper than \(Strict.maxDepth) levels") == true
            }
        }
    }

    @Test func deepJSONIsRefusedWithAClearMessage() throws {
        let deep = [Self.objectsJSON(10_000), Self.flowYAML(10_000), Self.objectsJSON(Strict.maxDepth + 1)]
        for text in deep {
            #expect {
                _ = try JSONValue.parse(json: Data(text.utf8))
            } throws: { e in
                (e as? ManifestError)?.message == "malformed JSON: lists and objects nest deeper than 100 levels"
            }
        }
    }

    @Test func nestingUpToTheLimitWorks() throws {
        let n = Strict.maxDepth
        let yaml = try Strict.documents(yaml: Self.flowYAML(n))
        let block = try Strict.documents(yaml: Self.blockYAML(n))
        let json = try JSONValue.parse(json: Data(Self.objectsJSON(n).utf8))
        #expect(yaml == block)
        #expect(try JSONValue.parse(json: yaml[0].jsonData()) == yaml[0])
        #expect(json.jsonData() == Data(Self.objectsJSON(n).utf8))
        // Brackets inside strings do not nest.
        let text = "{\"s\":\"" + String(repeating: "[{", count: 500) + "\\\"]\"}"
        #expect(try JSONValue.parse(json: Data(text.utf8))["s"]?.stringValue?.count == 1002)
    }
}
