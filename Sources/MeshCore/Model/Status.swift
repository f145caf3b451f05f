/// The error (and occasional success) object of the API, as Kubernetes returns it.
public struct Status: Codable, Sendable, Equatable, Error, CustomStringConvertible {
    public var kind: String = "Status"
    public var apiVersion: String = "v1"
    /// `Failure` or `Success`.
    public var status: String
    public var message: String
    public var reason: Reason
    public var code: Int
    public var details: Details?

    public init(code: Int, reason: Reason, message: String, details: Details? = nil) {
        self.status = code < 400 ? "Success" : "Failure"
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details
    }

    public var description: String { "\(self.message) (\(self.reason.rawValue), HTTP \(self.code))" }

    public enum Reason: String, Codable, Sendable {
        case notFound = "NotFound"
        case alreadyExists = "AlreadyExists"
        case conflict = "Conflict"
        case invalid = "Invalid"
        case badRequest = "BadRequest"
        case gone = "Gone"
        case requestEntityTooLarge = "RequestEntityTooLarge"
        case requestHeaderFieldsTooLarge = "RequestHeaderFieldsTooLarge"
        case requestTimeout = "Timeout"
        case unauthorized = "Unauthorized"
        case forbidden = "Forbidden"
        case methodNotAllowed = "MethodNotAllowed"
        case unsupportedMediaType = "UnsupportedMediaType"
        case tooManyRequests = "TooManyRequests"
        case internalError = "InternalError"
        case serviceUnavailable = "ServiceUnavailable"
        case success = ""

        public init(from decoder: any Decoder) throws {
            let raw = try decoder.singleValueContainer().decode(String.self)
            self = Reason(rawValue: raw) ?? .internalError
        }
    }

    public struct Details: Codable, Sendable, Equatable {
        public var name: String?
        public var kind: String?
        public var causes: [Cause]?
        /// With 429: when to try again (the response's `Retry-After` says the same).
        public var retryAfterSeconds: Int?

        public init(name: String? = nil, kind: String? = nil, causes: [Cause]? = nil, retryAfterSeconds: Int? = nil) {
            self.name = name
            self.kind = kind
            self.causes = causes
            self.retryAfterSeconds = retryAfterSeconds
        }
    }

    public struct Cause: Codable, Sendable, Equatable {
        public var field: String
        public var message: String

        public init(field: String, message: String) {
            self.field = field
            self.message = message
        }
    }
}

extension Status {
    public static func notFound(_ type: ResourceType, _ name: String, namespace: String = "") -> Status {
        let where_ = namespace.isEmpty ? "" : " in namespace \"\(namespace)\""
        return Status(
            code: 404,
            reason: .notFound,
            message: "\(type.singular) \"\(name)\" not found\(where_)",
            details: Details(name: name, kind: type.plural)
        )
    }

    public static func badRequest(_ message: String) -> Status {
        Status(code: 400, reason: .badRequest, message: message)
    }

    public static func invalid(_ error: ValidationError) -> Status {
        Status(
            code: 422,
            reason: .invalid,
            message: error.description,
            details: Details(
                name: error.name,
                kind: error.kind,
                causes: error.fields.map { Cause(field: $0.path, message: $0.message) }
            )
        )
    }

    public static func conflict(_ message: String) -> Status {
        Status(code: 409, reason: .conflict, message: message)
    }

    public static func gone(_ message: String) -> Status {
        Status(code: 410, reason: .gone, message: message)
    }
}
