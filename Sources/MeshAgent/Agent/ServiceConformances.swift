// Kept apart: this file sees swift-service-lifecycle's `Service`, the others MeshCore's.
import ServiceLifecycle

extension ServiceTableSync: ServiceLifecycle.Service {}
extension AgentServer: ServiceLifecycle.Service {}
