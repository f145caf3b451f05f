/// A manifest, request body or config file that cannot be read: the message says what and where.
public struct ManifestError: Error, Sendable, Equatable, CustomStringConvertible {
    public var message: String

    public init(_ message: String) {
        self.message = message
    }

    public var description: String { self.message }
}

/// One invalid field: its path (`spec.ports[0].port`) and what is wrong with it.
public struct FieldError: Sendable, Equatable, CustomStringConvertible {
    public var path: String
    public var message: String

    public init(_ path: String, _ message: String) {
        self.path = path
        self.message = message
    }

    public var description: String { "\(self.path): \(self.message)" }
}

/// An object that failed validation, with every invalid field.
public struct ValidationError: Error, Sendable, Equatable, CustomStringConvertible {
    public var kind: String
    public var name: String
    public var fields: [FieldError]

    public init(kind: String, name: String, fields: [FieldError]) {
        self.kind = kind
        self.name = name
        self.fields = fields
    }

    public var description: String {
        let subject = self.name.isEmpty ? self.kind : "\(self.kind) \"\(self.name)\""
        return "\(subject) is invalid: " + self.fields.map(\.description).joined(separator: "; ")
    }
}
