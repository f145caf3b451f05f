/// `{apiVersion, kind: ServiceList, metadata: {resourceVersion}, items}`.
public struct ObjectList<Item: MeshObject>: Codable, Sendable {
    public var apiVersion: String = meshAPIVersion
    public var kind: String
    public var metadata: ListMeta
    public var items: [Item]

    public init(resourceVersion: Int64, items: [Item]) {
        self.kind = Item.resource.listKind
        self.metadata = ListMeta(resourceVersion: String(resourceVersion))
        self.items = items
    }
}

public struct ListMeta: Codable, Sendable, Equatable {
    public var resourceVersion: String

    public init(resourceVersion: String) {
        self.resourceVersion = resourceVersion
    }
}

/// What a watch line says happened.
public enum WatchEventType: String, Codable, Sendable {
    case added = "ADDED"
    case modified = "MODIFIED"
    case deleted = "DELETED"
    case bookmark = "BOOKMARK"
    case error = "ERROR"
}

/// One decoded line of a watch stream: an object change, a bookmark, or an error Status.
public enum WatchEvent<Item: MeshObject>: Sendable {
    case added(Item)
    case modified(Item)
    case deleted(Item)
    /// Everything up to this resourceVersion has been delivered.
    case bookmark(resourceVersion: Int64)
    case error(Status)

    /// The resourceVersion a client resumes from after this event.
    public var resourceVersion: Int64? {
        switch self {
        case .added(let o), .modified(let o), .deleted(let o): return o.metadata.version
        case .bookmark(let rv): return rv
        case .error: return nil
        }
    }
}

extension WatchEvent: Decodable {
    enum CodingKeys: String, CodingKey { case type, object }

    struct BookmarkObject: Decodable {
        struct Meta: Decodable { var resourceVersion: String }
        var metadata: Meta
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        switch try c.decode(WatchEventType.self, forKey: .type) {
        case .added: self = .added(try c.decode(Item.self, forKey: .object))
        case .modified: self = .modified(try c.decode(Item.self, forKey: .object))
        case .deleted: self = .deleted(try c.decode(Item.self, forKey: .object))
        case .error: self = .error(try c.decode(Status.self, forKey: .object))
        case .bookmark:
            let b = try c.decode(BookmarkObject.self, forKey: .object)
            guard let rv = Int64(b.metadata.resourceVersion) else {
                throw DecodingError.dataCorruptedError(
                    forKey: .object,
                    in: c,
                    debugDescription: "bookmark resourceVersion is not a number"
                )
            }
            self = .bookmark(resourceVersion: rv)
        }
    }
}
