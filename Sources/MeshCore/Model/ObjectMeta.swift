/// The group/version every object of the mesh carries.
public let meshAPIVersion = "mesh.edge/v1"

/// Metadata of every object, as in Kubernetes.
public struct ObjectMeta: Codable, Sendable, Equatable, Hashable {
    public var name: String
    /// Absent for cluster-scoped kinds (nodes); defaults to `default` for namespaced ones.
    public var namespace: String?
    /// A decimal number, global and strictly increasing across all writes; set by the server.
    public var resourceVersion: String?
    public var uid: String?
    public var creationTimestamp: String?
    public var labels: [String: String]?
    public var annotations: [String: String]?

    public init(
        name: String,
        namespace: String? = nil,
        labels: [String: String]? = nil,
        annotations: [String: String]? = nil
    ) {
        self.name = name
        self.namespace = namespace
        self.labels = labels
        self.annotations = annotations
    }

    /// The resourceVersion as a number, when set and well formed.
    public var version: Int64? { self.resourceVersion.flatMap { Int64($0) } }

    func errors(for type: ResourceType) -> [FieldError] {
        var errs: [FieldError] = []
        let nameError =
            type.nameIsSubdomain ? Names.dns1123SubdomainError(self.name) : Names.dns1123LabelError(self.name)
        if let e = nameError { errs.append(FieldError("metadata.name", e)) }
        if type.namespaced {
            if let ns = self.namespace, let e = Names.dns1123LabelError(ns) {
                errs.append(FieldError("metadata.namespace", e))
            }
        } else if let ns = self.namespace, !ns.isEmpty {
            errs.append(FieldError("metadata.namespace", "must be empty: \(type.plural) are not namespaced"))
        }
        if let rv = self.resourceVersion, !rv.isEmpty, Int64(rv) == nil || Int64(rv)! < 0 {
            errs.append(FieldError("metadata.resourceVersion", "must be a decimal number"))
        }
        errs += MetadataLimits.errors(labels: self.labels, annotations: self.annotations)
        return errs
    }
}

/// The kinds the API serves, with their names in URLs and on the command line.
public struct ResourceType: Sendable, Hashable, CustomStringConvertible {
    /// `Service`
    public let kind: String
    /// `services`, the URL segment.
    public let plural: String
    /// `service`
    public let singular: String
    /// Short names accepted by meshctl (`svc`).
    public let shortNames: [String]
    public let namespaced: Bool
    /// Node names may be DNS subdomains (host names); others are DNS labels.
    public let nameIsSubdomain: Bool

    public var listKind: String { self.kind + "List" }
    public var description: String { self.plural }

    /// Every name a user may type for this kind, lowercased.
    public var aliases: Set<String> {
        Set([self.kind.lowercased(), self.plural, self.singular] + self.shortNames)
    }
}

/// An object the control plane stores: kind, metadata, and its own validation.
public protocol MeshObject: Codable, Sendable, Equatable {
    static var resource: ResourceType { get }
    var apiVersion: String { get set }
    var kind: String { get set }
    var metadata: ObjectMeta { get set }
    /// Rules beyond the shape of the fields; paths are relative to the object (`spec.ports[0].port`).
    func specErrors() -> [FieldError]
}

extension MeshObject {
    /// Every problem with the object: apiVersion, kind, metadata and spec.
    public func validationErrors() -> [FieldError] {
        var errs: [FieldError] = []
        if self.apiVersion != meshAPIVersion {
            errs.append(FieldError("apiVersion", "must be \(meshAPIVersion) (is \"\(self.apiVersion)\")"))
        }
        if self.kind != Self.resource.kind {
            errs.append(FieldError("kind", "must be \(Self.resource.kind) (is \"\(self.kind)\")"))
        }
        return errs + self.metadata.errors(for: Self.resource) + self.specErrors()
    }

    /// Throws a `ValidationError` naming every invalid field.
    public func validate() throws {
        let errs = self.validationErrors()
        if !errs.isEmpty {
            throw ValidationError(kind: Self.resource.kind, name: self.metadata.name, fields: errs)
        }
    }

    /// The namespace the object lives in: its own, `default` when absent, "" for cluster-scoped kinds.
    public var effectiveNamespace: String {
        Self.resource.namespaced ? (self.metadata.namespace ?? "default") : ""
    }
}
