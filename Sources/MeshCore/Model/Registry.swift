#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// The kinds the control plane serves, and how to read and check each from a request body.
public enum Registry {
    /// A kind with its decoder: strict decoding into the typed object.
    public struct Entry: Sendable {
        public let type: ResourceType
        public let decode: @Sendable (JSONValue) throws -> any MeshObject
    }

    public static let entries: [Entry] = [
        entry(MeshService.self),
        entry(Endpoints.self),
        entry(Node.self),
        entry(Relay.self),
        entry(Workload.self),
        entry(DeviceModel.self),
        entry(Device.self),
    ]

    static func entry<T: MeshObject>(_ t: T.Type) -> Entry {
        Entry(type: T.resource) {
            // Counts first: an oversized label or annotation map is refused before it is decoded.
            try MetadataLimits.precheck($0, kind: T.resource.kind)
            return try Strict.decode(T.self, from: $0)
        }
    }

    public static var types: [ResourceType] { entries.map(\.type) }

    /// The kind a user means by `name`: kind, plural, singular or short name, any case.
    public static func lookup(_ name: String) -> Entry? {
        let n = name.lowercased()
        return entries.first { $0.type.aliases.contains(n) }
    }

    /// The kind served under the URL segment `plural`.
    public static func byPlural(_ plural: String) -> Entry? {
        entries.first { $0.type.plural == plural }
    }

    /// The kind named by a document's `kind` field.
    public static func byKind(_ kind: String) -> Entry? {
        entries.first { $0.type.kind == kind }
    }

    /// Reads one manifest document: finds its kind, decodes strictly and validates it.
    public static func object(from document: JSONValue) throws -> any MeshObject {
        guard case .object = document else {
            throw ManifestError(
                "a manifest must be an object with apiVersion, kind and metadata, not a \(document.typeName)"
            )
        }
        guard let kind = document["kind"]?.stringValue else {
            throw ManifestError("kind: required field is missing")
        }
        guard let entry = byKind(kind) else {
            let known = entries.map(\.type.kind).joined(separator: ", ")
            throw ManifestError("kind: unknown kind \"\(kind)\" (known: \(known))")
        }
        let object = try entry.decode(document)
        try object.validate()
        return object
    }
}
