import Foundation
import Testing

@testable import MeshCore

/// Labels and annotations as Kubernetes limits them, and checks that stay linear in their size.
@Suite struct MetadataLimitsTests {
    func node(labels: [String: String]? = nil, annotations: [String: String]? = nil) -> Node {
        Node(metadata: ObjectMeta(name: "n1", labels: labels, annotations: annotations), spec: NodeSpec(site: "a"))
    }

    func document(_ node: Node) throws -> JSONValue {
        try JSONValue.parse(json: try MeshJSON.encode(node))
    }

    @Test func twentyThousandLabelsAreRefusedAfterCountingThem() throws {
        let labels = Dictionary(uniqueKeysWithValues: (0..<20_000).map { ("k\($0)", "v") })
        let doc = try self.document(self.node(labels: labels))
        let error = #expect(throws: ValidationError.self) { _ = try Registry.object(from: doc) }
        #expect(error?.fields == [FieldError("metadata.labels", "must have at most 64 labels (has 20000)")])
        // Validating the typed object gives the same single error, without a line per label.
        #expect(self.node(labels: labels).validationErrors().map(\.path) == ["metadata.labels"])
    }

    @Test func unknownFieldCheckingIsLinear() throws {
        // The strict decoder's check for unknown fields, over a map of 20,000 members: one lookup
        // per member (it was a scan of all members per member: 200 million compares).
        let labels = Dictionary(uniqueKeysWithValues: (0..<20_000).map { ("k\($0)", "v") })
        let doc = try self.document(self.node(labels: labels))
        var probes = 0
        let unknown = Strict.unknownFields(in: doc, knownBy: doc, path: "", probes: &probes)
        #expect(unknown.isEmpty)
        #expect(probes >= 20_000 && probes <= 20_000 + 16, "\(probes) lookups")
        // And it still finds an unknown member among many.
        guard case .object(var members) = doc else {
            Issue.record("not an object")
            return
        }
        members.append(("extra", .string("x")))
        #expect(Strict.unknownFields(in: .object(members), knownBy: doc, path: "") == ["extra"])
    }

    /// A DNS subdomain of `length` characters (labels of 63 joined by dots).
    func prefix(_ length: Int) -> String {
        var out = ""
        while out.count < length {
            if !out.isEmpty { out += "." }
            out += String(repeating: "p", count: min(63, length - out.count))
        }
        return out
    }

    @Test func labelKeysAndValuesFollowKubernetes() {
        #expect(self.prefix(253).count == 253 && self.prefix(254).count == 254)
        let ok = [
            "app": "web", "mesh.edge/site": "a", "a.b-c_d": "", String(repeating: "k", count: 63): "v",
            self.prefix(253) + "/n": String(repeating: "v", count: 63),
        ]
        #expect(self.node(labels: ok).validationErrors().isEmpty)
        let bad: [(String, String, String)] = [
            (String(repeating: "k", count: 64), "v", "key must be at most 63 characters"),
            (self.prefix(254) + "/n", "v", "key prefix must be at most 253 characters"),
            ("Mesh.Edge/site", "v", "key prefix"),
            ("a/b/c", "v", "key must be a name"),
            ("-app", "v", "key must start and end"),
            ("app", String(repeating: "v", count: 64), "value must be at most 63 characters"),
            ("app", "a b", "value may hold only"),
        ]
        for (k, v, message) in bad {
            let errors = self.node(labels: [k: v]).validationErrors()
            #expect(errors.count == 1 && errors[0].message.hasPrefix(message), "\(k)=\(v): \(errors)")
        }
    }

    @Test func labelCountAndAnnotationSizeLimits() {
        let sixtyFour = Dictionary(uniqueKeysWithValues: (0..<64).map { ("k\($0)", "v") })
        #expect(self.node(labels: sixtyFour).validationErrors().isEmpty)
        var sixtyFive = sixtyFour
        sixtyFive["k64"] = "v"
        #expect(
            self.node(labels: sixtyFive).validationErrors() == [
                FieldError("metadata.labels", "must have at most 64 labels (has 65)")
            ]
        )
        let key = "mesh.edge/blob"
        let full = [key: String(repeating: "x", count: 256 * 1024 - key.utf8.count)]
        #expect(self.node(annotations: full).validationErrors().isEmpty)
        let over = [key: String(repeating: "x", count: 256 * 1024 - key.utf8.count + 1)]
        #expect(self.node(annotations: over).validationErrors().map(\.path) == ["metadata.annotations"])
        #expect(throws: ValidationError.self) {
            _ = try Registry.object(from: try self.document(self.node(annotations: over)))
        }
        // Annotation keys are qualified names too.
        #expect(
            self.node(annotations: ["bad key": "v"]).validationErrors().map(\.path) == ["metadata.annotations[bad key]"]
        )
    }

    @Test func manyBadLabelsAreSummedUpNotListed() {
        let bad = Dictionary(uniqueKeysWithValues: (0..<40).map { ("-k\($0)", "v") })
        let errors = self.node(labels: bad).validationErrors()
        #expect(errors.count == MetadataLimits.maxReportedErrors + 1)
        #expect(errors.last == FieldError("metadata.labels", "24 more invalid entries not listed"))
    }
}
