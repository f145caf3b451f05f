/// A device type: its properties, each typed (int, float, bool, string) with a range or an enum and
/// a unit. Namespaced.
public struct DeviceModel: MeshObject {
    public static let resource = ResourceType(
        kind: "DeviceModel",
        plural: "devicemodels",
        singular: "devicemodel",
        shortNames: ["dm"],
        namespaced: true,
        nameIsSubdomain: false
    )

    public var apiVersion: String = meshAPIVersion
    public var kind: String = "DeviceModel"
    public var metadata: ObjectMeta
    public var spec: DeviceModelSpec

    public init(metadata: ObjectMeta, spec: DeviceModelSpec) {
        self.metadata = metadata
        self.spec = spec
    }

    public static let maxProperties = 128

    public func specErrors() -> [FieldError] {
        var errs: [FieldError] = []
        if self.spec.properties.isEmpty {
            errs.append(FieldError("spec.properties", "must have at least one property"))
        }
        if self.spec.properties.count > Self.maxProperties {
            errs.append(FieldError("spec.properties", "must hold at most \(Self.maxProperties) properties"))
        }
        var names = Set<String>()
        for (i, p) in self.spec.properties.enumerated() {
            let path = "spec.properties[\(i)]"
            if let e = DeviceProperty.nameError(p.name) { errs.append(FieldError("\(path).name", e)) }
            if !names.insert(p.name).inserted {
                errs.append(FieldError("\(path).name", "duplicate property \"\(p.name)\""))
            }
            let numeric = p.type == .int || p.type == .float
            if !numeric && (p.minimum != nil || p.maximum != nil) {
                errs.append(FieldError("\(path).minimum", "applies only to int and float properties"))
            }
            if let lo = p.minimum, let hi = p.maximum, lo > hi {
                errs.append(FieldError("\(path).maximum", "must not be below minimum"))
            }
            if let values = p.enum {
                if p.type == .bool { errs.append(FieldError("\(path).enum", "does not apply to bool properties")) }
                if values.isEmpty { errs.append(FieldError("\(path).enum", "must list at least one value")) }
                for (j, v) in values.enumerated() {
                    if let e = DeviceProperty(name: p.name, type: p.type).error(v) {
                        errs.append(FieldError("\(path).enum[\(j)]", e))
                    }
                }
            }
            if let u = p.unit, u.utf8.count > 32 { errs.append(FieldError("\(path).unit", "must be at most 32 bytes")) }
        }
        return errs
    }

    public func property(_ name: String) -> DeviceProperty? { self.spec.properties.first { $0.name == name } }
}

public struct DeviceModelSpec: Codable, Sendable, Equatable, Hashable {
    public var properties: [DeviceProperty]

    public init(properties: [DeviceProperty]) {
        self.properties = properties
    }
}

public struct DeviceProperty: Codable, Sendable, Equatable, Hashable {
    public var name: String
    public var type: ValueType
    public var minimum: Double?
    public var maximum: Double?
    /// The only values allowed (int, float, string).
    public var `enum`: [String]?
    public var unit: String?
    /// ReadWrite (default: the cloud may set a desired value) or ReadOnly (reported only).
    public var accessMode: AccessMode?

    public init(
        name: String,
        type: ValueType,
        minimum: Double? = nil,
        maximum: Double? = nil,
        enum values: [String]? = nil,
        unit: String? = nil,
        accessMode: AccessMode? = nil
    ) {
        self.name = name
        self.type = type
        self.minimum = minimum
        self.maximum = maximum
        self.enum = values
        self.unit = unit
        self.accessMode = accessMode
    }

    public enum ValueType: String, StrictEnum {
        case int
        case float
        case bool
        case string
    }

    public enum AccessMode: String, StrictEnum {
        case readWrite = "ReadWrite"
        case readOnly = "ReadOnly"
    }

    /// Property names: 1-63 of letters, digits, '-', '_' and '.' (they are JSON keys in MQTT payloads).
    static func nameError(_ name: String) -> String? {
        let ok =
            !name.isEmpty && name.utf8.count <= 63
            && name.utf8.allSatisfy { b in
                (b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x5A) || (b >= 0x61 && b <= 0x7A) || b == 0x2D
                    || b == 0x5F || b == 0x2E
            }
        return ok ? nil : "must be 1-63 letters, digits, '-', '_' or '.'"
    }

    public static let maxStringBytes = 1024

    /// Why `value` (as text, the way twins carry values) breaks this property (nil: it fits).
    public func error(_ value: String) -> String? {
        switch self.type {
        case .bool:
            if value != "true" && value != "false" { return "\"\(value)\" is not a bool (true or false)" }
            return nil
        case .string:
            if value.utf8.count > Self.maxStringBytes { return "is longer than \(Self.maxStringBytes) bytes" }
        case .int:
            guard let n = Int64(value) else { return "\"\(value.prefix(40))\" is not an int" }
            if let e = self.rangeError(Double(n), value) { return e }
        case .float:
            guard let x = Double(value), x.isFinite else { return "\"\(value.prefix(40))\" is not a finite float" }
            if let e = self.rangeError(x, value) { return e }
        }
        if let values = self.enum, !values.contains(value) {
            return "\"\(value.prefix(40))\" is not one of \(values.joined(separator: ", "))"
        }
        return nil
    }

    func rangeError(_ x: Double, _ text: String) -> String? {
        let unit = self.unit.map { " \($0)" } ?? ""
        if let lo = self.minimum, x < lo { return "\(text) is below the minimum \(Self.format(lo))\(unit)" }
        if let hi = self.maximum, x > hi { return "\(text) is above the maximum \(Self.format(hi))\(unit)" }
        return nil
    }

    static func format(_ x: Double) -> String {
        x == x.rounded() && abs(x) < 1e15 ? String(Int64(x)) : String(x)
    }
}

/// A device: its model, the node whose agent serves its mapper, protocol settings for the mapper,
/// and the desired values the cloud sets. Namespaced.
public struct Device: MeshObject {
    public static let resource = ResourceType(
        kind: "Device",
        plural: "devices",
        singular: "device",
        shortNames: ["dev"],
        namespaced: true,
        nameIsSubdomain: false
    )

    public var apiVersion: String = meshAPIVersion
    public var kind: String = "Device"
    public var metadata: ObjectMeta
    public var spec: DeviceSpec
    /// The control plane's: each property's twin (desired version, reported value and version).
    public var status: DeviceStatus?

    public init(metadata: ObjectMeta, spec: DeviceSpec, status: DeviceStatus? = nil) {
        self.metadata = metadata
        self.spec = spec
        self.status = status
    }

    /// The device's id in MQTT topics: its name in namespace default, `<namespace>.<name>` elsewhere.
    public var twinID: String {
        let ns = self.metadata.namespace ?? "default"
        return ns == "default" ? self.metadata.name : "\(ns).\(self.metadata.name)"
    }

    public func specErrors() -> [FieldError] {
        var errs: [FieldError] = []
        if let e = Names.dns1123LabelError(self.spec.model) { errs.append(FieldError("spec.model", e)) }
        if let e = Names.dns1123SubdomainError(self.spec.node) { errs.append(FieldError("spec.node", e)) }
        if let p = self.spec.protocol {
            if p.name.isEmpty || p.name.utf8.count > 63 {
                errs.append(FieldError("spec.protocol.name", "must be 1-63 bytes (mqtt, modbus, ...)"))
            }
            if (p.settings ?? [:]).count > 64 {
                errs.append(FieldError("spec.protocol.settings", "must hold at most 64 settings"))
            }
        }
        var names = Set<String>()
        for (i, d) in (self.spec.properties ?? []).enumerated() {
            if let e = DeviceProperty.nameError(d.name) { errs.append(FieldError("spec.properties[\(i)].name", e)) }
            if !names.insert(d.name).inserted {
                errs.append(FieldError("spec.properties[\(i)].name", "duplicate property \"\(d.name)\""))
            }
            if d.desired.utf8.count > DeviceProperty.maxStringBytes {
                errs.append(FieldError("spec.properties[\(i)].desired", "is too long"))
            }
        }
        return errs
    }

    /// Every desired value that breaks `model`, with its field path.
    public func errors(against model: DeviceModel) -> [FieldError] {
        var errs: [FieldError] = []
        for (i, d) in (self.spec.properties ?? []).enumerated() {
            let path = "spec.properties[\(i)].desired"
            guard let p = model.property(d.name) else {
                let known = model.spec.properties.map(\.name).joined(separator: ", ")
                errs.append(
                    FieldError(
                        "spec.properties[\(i)].name",
                        "model \(model.metadata.name) has no property \"\(d.name)\" (it has \(known))"
                    )
                )
                continue
            }
            if p.accessMode == .readOnly {
                errs.append(FieldError(path, "\(d.name) is ReadOnly in model \(model.metadata.name): only reported"))
            }
            if let e = p.error(d.desired) { errs.append(FieldError(path, e)) }
        }
        return errs
    }

    public func desired(_ property: String) -> String? {
        self.spec.properties?.first { $0.name == property }?.desired
    }

    public func twin(_ property: String) -> DeviceTwinStatus? {
        self.status?.twins?.first { $0.name == property }
    }
}

public struct DeviceSpec: Codable, Sendable, Equatable, Hashable {
    /// The DeviceModel's name (same namespace).
    public var model: String
    /// The node whose agent serves this device's mapper.
    public var node: String
    public var `protocol`: DeviceProtocol?
    /// Desired values (the cloud's), by property.
    public var properties: [DeviceDesired]?

    public init(model: String, node: String, protocol: DeviceProtocol? = nil, properties: [DeviceDesired]? = nil) {
        self.model = model
        self.node = node
        self.protocol = `protocol`
        self.properties = properties
    }

    enum CodingKeys: String, CodingKey { case model, node, `protocol`, properties }
}

public struct DeviceProtocol: Codable, Sendable, Equatable, Hashable {
    public var name: String
    public var settings: [String: String]?

    public init(name: String, settings: [String: String]? = nil) {
        self.name = name
        self.settings = settings
    }
}

public struct DeviceDesired: Codable, Sendable, Equatable, Hashable {
    public var name: String
    /// The value as text (twins carry values as strings, as KubeEdge's do).
    public var desired: String

    public init(name: String, desired: String) {
        self.name = name
        self.desired = desired
    }
}

public struct DeviceStatus: Codable, Sendable, Equatable, Hashable {
    public var twins: [DeviceTwinStatus]?
    /// The last report applied: the node, its outbox's epoch and the message id.
    public var lastReport: ReportMark?

    public init(twins: [DeviceTwinStatus]? = nil, lastReport: ReportMark? = nil) {
        self.twins = twins
        self.lastReport = lastReport
    }
}

/// Where a node's outbox stood when a report was applied: ids grow within an epoch (one edge store).
public struct ReportMark: Codable, Sendable, Equatable, Hashable {
    public var node: String
    public var epoch: String
    public var id: Int64

    public init(node: String, epoch: String, id: Int64) {
        self.node = node
        self.epoch = epoch
        self.id = id
    }
}

/// One property's twin as the cloud holds it. Versions: the control plane bumps `desiredVersion` each
/// time the desired value changes; the edge bumps `reportedVersion` with each report it accepts.
public struct DeviceTwinStatus: Codable, Sendable, Equatable, Hashable {
    public var name: String
    public var desiredVersion: Int64?
    public var reported: String?
    public var reportedVersion: Int64?
    /// When the device reported it (RFC 3339).
    public var reportedTime: String?

    public init(
        name: String,
        desiredVersion: Int64? = nil,
        reported: String? = nil,
        reportedVersion: Int64? = nil,
        reportedTime: String? = nil
    ) {
        self.name = name
        self.desiredVersion = desiredVersion
        self.reported = reported
        self.reportedVersion = reportedVersion
        self.reportedTime = reportedTime
    }
}
