import MeshCore
import Testing

@Suite struct YAMLTests {
    @Test func coreSchemaResolvesPlainScalarsOnly() throws {
        let doc = try #require(
            YAML.parse(
                """
                a: 80
                b: "80"
                c: no
                d: true
                e: ~
                f: 1.5e3
                g: 0x1f
                h: -.inf
                i: 1.2.3
                j: !!str 42
                k: |
                  block
                l: ''
                m:
                """
            ).first
        )
        #expect(doc["a"] == .int(80))
        #expect(doc["b"] == .string("80"))
        #expect(doc["c"] == .string("no"))  // YAML 1.2: the Norway problem does not exist
        #expect(doc["d"] == .bool(true))
        #expect(doc["e"] == .null)
        #expect(doc["f"] == .double(1500))
        #expect(doc["g"] == .int(31))
        #expect(doc["h"] == .double(-.infinity))
        #expect(doc["i"] == .string("1.2.3"))
        #expect(doc["j"] == .string("42"))
        #expect(doc["k"] == .string("block\n"))
        #expect(doc["l"] == .string(""))
        #expect(doc["m"] == .null)
    }

    @Test func documentsAndFlowStyle() throws {
        let docs = try YAML.parse("---\n{a: [1, {b: x}]}\n---\n---\n- 1\n")
        #expect(docs.count == 3)
        #expect(docs[0]["a"] == .array([.int(1), .object([("b", .string("x"))])]))
        #expect(docs[1] == .null)
        #expect(docs[2] == .array([.int(1)]))
        #expect(try YAML.parse("").isEmpty)
    }

    @Test(arguments: [
        ("a: [1, 2\nb: 3\n", "malformed YAML: line"),
        ("a: 1\na: 2\n", "duplicate key \"a\""),
        ("a: &x 1\nb: *x\n", "aliases are not supported"),
        ("? [1]\n: 2\n", "mapping keys must be plain strings"),
        ("a: 99999999999999999999\n", "out of range"),
        ("a: !!int x\n", "is not an integer"),
        ("a: !custom 1\n", "unsupported tag"),
        ("\t- x\n", "malformed YAML"),
    ])
    func errorsSayWhatAndWhere(_ text: String, _ message: String) {
        #expect {
            try YAML.parse(text)
        } throws: { e in
            (e as? ManifestError)?.message.contains(message) == true
        }
    }

    @Test func emitReadsBackToTheSameValue() throws {
        let value = JSONValue.object([
            ("apiVersion", .string("mesh.edge/v1")),
            (
                "metadata",
                .object([
                    ("name", .string("web")), ("labels", .object([("a", .string("true")), ("b", .string("80"))])),
                ])
            ),
            (
                "spec",
                .object([
                    (
                        "ports",
                        .array([
                            .object([("name", .string("http")), ("port", .int(80))]), .object([("port", .int(81))]),
                        ])
                    ),
                    ("empty", .array([])), ("none", .object([])), ("nested", .array([.array([.int(1)]), .null])),
                    ("text", .string("a: b # c\nline two")), ("ratio", .double(0.5)), ("dash", .string("-x")),
                ])
            ),
        ])
        let text = YAML.emit(value)
        #expect(text.contains("  labels:\n    a: \"true\"\n    b: \"80\"\n"))
        #expect(text.contains("  ports:\n  - name: http\n    port: 80\n  - port: 81\n"))
        #expect(try YAML.parse(text) == [value])
    }
}
