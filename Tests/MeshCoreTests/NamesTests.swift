import MeshCore
import Testing

@Suite struct NamesTests {
    @Test(arguments: ["web", "a", "web-1", "0day", String(repeating: "a", count: 63)])
    func acceptsLabels(_ s: String) {
        #expect(Names.dns1123LabelError(s) == nil)
    }

    @Test(arguments: [
        ("", "must not be empty"), ("Web", "invalid character \"W\""), ("web_1", "invalid character \"_\""),
        ("-web", "must start and end"), ("web-", "must start and end"), ("a.b", "invalid character \".\""),
        (String(repeating: "a", count: 64), "at most 63"),
    ])
    func rejectsLabels(_ s: String, _ why: String) throws {
        let e = try #require(Names.dns1123LabelError(s))
        #expect(e.contains(why))
    }

    @Test func subdomains() {
        #expect(Names.dns1123SubdomainError("edge-a1.site-b.example") == nil)
        #expect(Names.dns1123SubdomainError("edge..a")?.contains("label") == true)
        #expect(Names.dns1123SubdomainError(String(repeating: "a.", count: 127) + "a")?.contains("253") == true)
    }

    @Test func labelsAndHeaders() {
        #expect(Names.labelKeyError("app") == nil)
        #expect(Names.labelKeyError("mesh.edge/site") == nil)
        #expect(Names.labelKeyError("a/b/c") != nil)
        #expect(Names.labelValueError("") == nil)
        #expect(Names.labelValueError("v1.2_x") == nil)
        #expect(Names.labelValueError("-x") != nil)
        #expect(Names.headerNameError("x-user") == nil)
        #expect(Names.headerNameError("x user") != nil)
    }
}
