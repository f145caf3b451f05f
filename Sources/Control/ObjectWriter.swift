import Logging
import MeshCore
import MeshHTTP
import MeshIdentity
import NIOCore

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// What the control plane owns in objects of a kind, applied on every write: a Service's VIP, a Node's
/// status. Each kind the API serves conforms (`ObjectWriter.served`); the defaults own nothing.
protocol ControlManaged: MeshObject {
    /// Sets the fields the control plane owns in `object`, which is about to replace `existing`.
    static func prepare(
        _ object: inout Self,
        existing: Self?,
        writer: String?,
        in w: ObjectWriter
    ) async throws
        -> WritePlan
    /// After the write was committed, or found to change nothing.
    static func written(_ object: Self, plan: WritePlan, in w: ObjectWriter)
    /// The write's reservation `token` is held by `owner`: throw to refuse the write, return to retry it.
    static func reservationTaken(_ input: Self, plan: WritePlan, owner: String, in w: ObjectWriter) throws
    /// After the object was deleted.
    static func deleted(_ object: Self, in w: ObjectWriter)
}

/// What a kind's policy adds to one write.
struct WritePlan: Sendable {
    /// Reservation tokens the write takes with it (a VIP).
    var reserve: [String] = []
    /// The VIP the write reserves, if any.
    var vip: IPAddress?
    /// A node writing itself: counts as a heartbeat.
    var beat = false
}

extension ControlManaged {
    static func prepare(
        _ object: inout Self,
        existing: Self?,
        writer: String?,
        in w: ObjectWriter
    ) throws
        -> WritePlan
    { WritePlan() }
    static func written(_ object: Self, plan: WritePlan, in w: ObjectWriter) {}
    static func reservationTaken(_ input: Self, plan: WritePlan, owner: String, in w: ObjectWriter) throws {}
    static func deleted(_ object: Self, in w: ObjectWriter) {}
}

extension Endpoints: ControlManaged {
    /// An address naming a registered node that has a site gets that site (`EndpointSites`): agents route by
    /// the endpoints alone and need not follow every Node.
    static func prepare(
        _ object: inout Endpoints,
        existing: Endpoints?,
        writer: String?,
        in w: ObjectWriter
    ) async throws -> WritePlan {
        var sites: [String: String?] = [:]
        for name in Set(object.spec.addresses.compactMap(\.node)) {
            let key = ObjectKey(resource: Node.resource.plural, namespace: "", name: name)
            guard let stored = try await w.store.get(key) else { continue }
            sites[name] = try stored.decode(Node.self).spec.site
        }
        EndpointSites.stamp(&object) { sites[$0] }
        return WritePlan()
    }
}

extension Relay: ControlManaged {}

extension MeshService: ControlManaged {
    static func prepare(
        _ object: inout MeshService,
        existing: MeshService?,
        writer: String?,
        in w: ObjectWriter
    ) throws
        -> WritePlan
    {
        var plan = WritePlan()
        plan.vip = try w.assignVIP(&object, existing: existing)
        if let ip = plan.vip { plan.reserve.append(VIPAllocator.token(ip)) }
        return plan
    }

    static func written(_ object: MeshService, plan: WritePlan, in w: ObjectWriter) {
        if let ip = plan.vip { w.vips.markUsed(ip) }
    }

    static func reservationTaken(_ input: MeshService, plan: WritePlan, owner: String, in w: ObjectWriter) throws {
        guard let vip = plan.vip else { return }
        if input.spec.clusterIP != nil {
            throw Status.invalid(
                ValidationError(
                    kind: MeshService.resource.kind,
                    name: input.metadata.name,
                    fields: [FieldError("spec.clusterIP", "\(vip) is already allocated to \(owner)")]
                )
            )
        }
        // Another writer took the address we proposed: note it, and propose the next one.
        w.vips.markUsed(vip)
    }

    static func deleted(_ object: MeshService, in w: ObjectWriter) {
        if let ip = object.spec.vip { w.vips.markFree(ip) }
    }
}

extension Node: ControlManaged {
    static func prepare(
        _ object: inout Node,
        existing: Node?,
        writer: String?,
        in w: ObjectWriter
    ) throws
        -> WritePlan
    {
        var plan = WritePlan()
        (object.status, plan.beat) = w.nodeStatus(object, existing: existing, writer: writer)
        return plan
    }

    static func written(_ object: Node, plan: WritePlan, in w: ObjectWriter) {
        w.lifecycle?.observed(object.metadata.name, phase: object.status?.phase, beat: plan.beat)
    }

    static func deleted(_ object: Node, in w: ObjectWriter) {
        w.lifecycle?.deleted(object.metadata.name)
    }
}

/// Writes objects to the store with the control plane's policies: optimistic concurrency (a
/// conditional write on `metadata.resourceVersion`, unconditional ones retried on conflict), VIP
/// allocation and Node status (through each kind's `ControlManaged` conformance), no new version for a
/// write that changes nothing.
struct ObjectWriter: Sendable {
    let store: any Store
    let vips: VIPAllocator
    let lifecycle: NodeLifecycle?
    let logger: Logger

    /// The kinds the API serves, by plural: each with its policy.
    static let served: [String: any ControlManaged.Type] = [
        MeshService.resource.plural: MeshService.self,
        Endpoints.resource.plural: Endpoints.self,
        Node.resource.plural: Node.self,
        Relay.resource.plural: Relay.self,
        Workload.resource.plural: Workload.self,
        DeviceModel.resource.plural: DeviceModel.self,
        Device.resource.plural: Device.self,
    ]

    /// Decodes a document as `T` (metadata limits counted first, strictly, then validated).
    static func decode<T: ControlManaged>(_ type: T.Type, _ value: JSONValue) throws -> T {
        try MetadataLimits.precheck(value, kind: T.resource.kind)
        let object = try Strict.decode(T.self, from: value)
        try object.validate()
        return object
    }

    func save<T: ControlManaged>(
        _ input: T,
        namespace: String?,
        urlName: String?,
        createOnly: Bool,
        writer: String?
    ) async throws -> HTTPResponse {
        var object = input
        let type = T.resource
        if let n = urlName, n != object.metadata.name {
            throw Status.badRequest(
                "metadata.name \"\(object.metadata.name)\" does not match the name in the URL (\"\(n)\")"
            )
        }
        if type.namespaced {
            let ns = namespace ?? object.metadata.namespace ?? "default"
            if let bodyNS = object.metadata.namespace, bodyNS != ns {
                throw Status.badRequest(
                    "metadata.namespace \"\(bodyNS)\" does not match the namespace in the URL (\"\(ns)\")"
                )
            }
            object.metadata.namespace = ns
        } else {
            object.metadata.namespace = nil
        }
        let key = ObjectKey(resource: type.plural, namespace: object.effectiveNamespace, name: object.metadata.name)
        let wanted = object.metadata.version
        for _ in 0..<16 {
            let existingStored = try await self.store.get(key)
            if createOnly, existingStored != nil { throw StoreError.alreadyExists(key) }
            let expect: Precondition
            if let w = wanted {
                guard let e = existingStored else { throw StoreError.conflict(key, current: nil) }
                guard e.resourceVersion == w else { throw StoreError.conflict(key, current: e.resourceVersion) }
                expect = .version(w)
            } else {
                expect = existingStored.map { .version($0.resourceVersion) } ?? .absent
            }
            let existing = try existingStored.map {
                try $0.decode(T.self)
            }
            var prepared = object
            prepared.metadata.uid = existing?.metadata.uid ?? UUID().uuidString.lowercased()
            prepared.metadata.creationTimestamp = existing?.metadata.creationTimestamp ?? Timestamp.now()
            let plan = try await T.prepare(&prepared, existing: existing, writer: writer, in: self)
            if let e = existing, let stored = existingStored {
                // Writing what is already there changes nothing: no new version, no watch event.
                var same = prepared
                same.metadata.resourceVersion = e.metadata.resourceVersion
                if same == e {
                    var unchanged = plan
                    unchanged.vip = nil
                    T.written(same, plan: unchanged, in: self)
                    var r = HTTPResponse.json(.ok, stored.json)
                    r.headers.add(name: "X-Mesh-Result", value: "unchanged")
                    return r
                }
            }
            let final = prepared
            let write = Write(
                key: key,
                expect: expect,
                operation: .put { rv in
                    var o = final
                    o.metadata.resourceVersion = String(rv)
                    return (ControlAPI.encode(o), o.metadata.labels ?? [:])
                },
                reserve: plan.reserve
            )
            do {
                let stored = try await self.store.commit(write)
                T.written(final, plan: plan, in: self)
                return .json(existingStored == nil ? .created : .ok, stored.json)
            } catch StoreError.conflict(_, let current) where wanted == nil {
                self.logger.debug(
                    "\(key) changed under an unconditional write (now \(current.map(String.init) ?? "gone")); retrying"
                )
                continue
            } catch StoreError.reserved(let token, let owner) where plan.reserve.contains(token) {
                try T.reservationTaken(input, plan: plan, owner: owner, in: self)
                continue
            }
        }
        throw Status(code: 409, reason: .conflict, message: "\(key) is changing too fast to write; retry")
    }

    func delete<T: ControlManaged>(_ type: T.Type, namespace: String, name: String) async throws -> HTTPResponse {
        let key = ObjectKey(resource: T.resource.plural, namespace: namespace, name: name)
        for _ in 0..<16 {
            guard let existing = try await self.store.get(key) else {
                throw Status.notFound(T.resource, name, namespace: namespace)
            }
            let object = try existing.decode(T.self)
            let write = Write(
                key: key,
                expect: .version(existing.resourceVersion),
                operation: .delete { rv in
                    var o = object
                    o.metadata.resourceVersion = String(rv)
                    return ControlAPI.encode(o)
                }
            )
            do {
                let final = try await self.store.commit(write)
                T.deleted(object, in: self)
                return .json(.ok, final.json)
            } catch StoreError.conflict {
                continue
            }
        }
        throw Status(code: 409, reason: .conflict, message: "\(key) is changing too fast to delete; retry")
    }

    /// Keeps, checks or allocates the service's VIP. Returns the VIP to reserve, if any.
    func assignVIP(_ service: inout MeshService, existing: MeshService?) throws -> IPAddress? {
        let name = service.metadata.name
        let invalid = { (message: String) -> Status in
            Status.invalid(
                ValidationError(kind: "Service", name: name, fields: [FieldError("spec.clusterIP", message)])
            )
        }
        if let old = existing {
            guard let requested = service.spec.clusterIP else {
                service.spec.clusterIP = old.spec.clusterIP
                service.spec.ipFamily = old.spec.ipFamily
                return old.spec.vip
            }
            if requested != old.spec.clusterIP {
                throw invalid(
                    "field is immutable: it is \(old.spec.clusterIP ?? "unset"); delete and recreate the service to change it"
                )
            }
            if service.spec.ipFamily == nil { service.spec.ipFamily = old.spec.ipFamily }
            return old.spec.vip
        }
        if service.spec.isHeadless { return nil }
        if let ip = service.spec.vip {
            if let why = self.vips.rejection(of: ip) { throw invalid(why) }
            service.spec.ipFamily = ip.isIPv4 ? .ipv4 : .ipv6
            return ip
        }
        let family = service.spec.ipFamily ?? .ipv4
        guard self.vips.cidr(for: family) != nil else {
            throw Status.invalid(
                ValidationError(
                    kind: "Service",
                    name: service.metadata.name,
                    fields: [FieldError("spec.ipFamily", "no service CIDR of family \(family.rawValue) is configured")]
                )
            )
        }
        guard let ip = self.vips.propose(family: family) else {
            throw Status(
                code: 500,
                reason: .internalError,
                message:
                    "no free VIP left in \(self.vips.cidr(for: family)!): delete unused services or widen serviceCIDRs"
            )
        }
        service.spec.clusterIP = ip.description
        service.spec.ipFamily = family
        return ip
    }

    /// The status a Node gets when written through the API: the control plane owns it, so the
    /// body's status is ignored; a node writing itself counts as a heartbeat (Ready).
    func nodeStatus(_ node: Node, existing: Node?, writer: String?) -> (NodeStatus?, beat: Bool) {
        let selfWrite: Bool
        if case .node(let n) = writer.flatMap({ MeshPrincipal(uri: $0) }), n == node.metadata.name {
            selfWrite = true
        } else {
            selfWrite = false
        }
        guard let lifecycle = self.lifecycle else { return (node.status, false) }
        if selfWrite {
            if let s = existing?.status, s.phase == .ready { return (s, true) }
            let now = Timestamp.format(secondsSinceEpoch: lifecycle.clock.epochSeconds)
            return (
                NodeStatus(
                    phase: .ready,
                    lastHeartbeatTime: now,
                    message: "heartbeating since \(now)",
                    relay: existing?.status?.relay,
                    candidates: existing?.status?.candidates,
                    workloads: existing?.status?.workloads
                ), true
            )
        }
        if let e = existing { return (e.status, false) }
        return (NodeStatus(phase: .unknown, message: "waiting for the node's first heartbeat"), false)
    }
}
