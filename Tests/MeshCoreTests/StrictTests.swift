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
