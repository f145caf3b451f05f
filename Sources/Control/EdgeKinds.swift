import MeshCore

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// The control plane's policies for the edge kinds (Workload, DeviceModel, Device): it owns their
/// `status`. A write through the API keeps the stored status; the control plane's own writers
/// (`WorkloadController`, `NodeReports`) pass `ObjectWriter.internalWriter` and set it.
extension DeviceModel: ControlManaged {}

extension Workload: ControlManaged {
    static func prepare(
        _ object: inout Workload,
        existing: Workload?,
        writer: String?,
        in w: ObjectWriter
    ) throws
        -> WritePlan
    {
        if writer != ObjectWriter.internalWriter { object.status = existing?.status }
        return WritePlan()
    }
}

extension Device: ControlManaged {
    /// Keeps the stored status, and bumps a property's `desiredVersion` when its desired value
    /// changes (the cloud owns desired: versions only grow).
    static func prepare(
        _ object: inout Device,
        existing: Device?,
        writer: String?,
        in w: ObjectWriter
    ) throws
        -> WritePlan
    {
        guard writer != ObjectWriter.internalWriter else { return WritePlan() }
        var status = existing?.status ?? DeviceStatus()
        var twins = status.twins ?? []
        for d in object.spec.properties ?? [] {
            let before = existing?.desired(d.name)
            guard before != d.desired else { continue }
            if let i = twins.firstIndex(where: { $0.name == d.name }) {
                twins[i].desiredVersion = (twins[i].desiredVersion ?? 0) + 1
            } else {
                twins.append(DeviceTwinStatus(name: d.name, desiredVersion: 1))
            }
        }
        status.twins = twins.isEmpty ? nil : twins.sorted { $0.name < $1.name }
        object.status = status == DeviceStatus() ? nil : status
        return WritePlan()
    }
}

extension ObjectWriter {
    /// The writer name of the control plane's own status writes.
    static let internalWriter = "control-plane"

    /// Reads the object at `key`, changes it with `mutate` (nil: nothing to change) and writes it
    /// back conditionally as the control plane, again from a fresh read on a conflict.
    @discardableResult
    func update<T: ControlManaged>(
        _ type: T.Type,
        namespace: String,
        name: String,
        _ mutate: (inout T) throws -> Bool
    ) async throws -> T? {
        let key = ObjectKey(resource: T.resource.plural, namespace: namespace, name: name)
        for _ in 0..<32 {
            guard let stored = try await self.store.get(key) else { return nil }
            var object = try stored.decode(T.self)
            object.metadata.resourceVersion = String(stored.resourceVersion)
            guard try mutate(&object) else { return object }
            do {
                _ = try await self.save(
                    object,
                    namespace: T.resource.namespaced ? namespace : nil,
                    urlName: name,
                    createOnly: false,
                    writer: Self.internalWriter
                )
                return object
            } catch StoreError.conflict {
                continue
            }
        }
        throw Status.conflict("\(key) is changing too fast to update; retry")
    }

    /// Every desired value of `device` checked against its model: 422 naming each field that breaks it.
    func checkAgainstModel(_ device: Device, namespace: String) async throws {
        let ns = device.metadata.namespace ?? namespace
        let key = ObjectKey(resource: DeviceModel.resource.plural, namespace: ns, name: device.spec.model)
        guard let stored = try await self.store.get(key) else {
            throw Status.invalid(
                ValidationError(
                    kind: Device.resource.kind,
                    name: device.metadata.name,
                    fields: [
                        FieldError(
                            "spec.model",
                            "no DeviceModel \"\(device.spec.model)\" in namespace \(ns): create the model first"
                        )
                    ]
                )
            )
        }
        let model = try stored.decode(DeviceModel.self)
        let errors = device.errors(against: model)
        if !errors.isEmpty {
            throw Status.invalid(
                ValidationError(kind: Device.resource.kind, name: device.metadata.name, fields: errors)
            )
        }
    }
}
