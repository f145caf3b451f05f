import MeshRecords
import NIOCore
import NIOSSL
import NIOTLS

/// What an HTTPS server learned of its client when the handshake ended: the identity of its verified
/// certificate and the certificate's serial (nil, nil: no certificate). Kept instead of the certificate, so that
/// an idle connection holds no parsed certificate.
public struct TLSPeer: Sendable, Hashable {
    public var identity: String?
    /// The certificate's serial number, as its DER integer's bytes.
    public var serial: [UInt8]?

    public init(identity: String?, serial: [UInt8]?) {
        self.identity = identity
        self.serial = serial
    }
}

/// Why an HTTPS connection could not move to the mesh record layer after its handshake.
public struct HTTPRecordError: Error, CustomStringConvertible, Sendable {
    public var description: String
}

/// On an HTTPS connection, behind NIOSSL's handler (with a ``ClientRandomReader`` below it): when the handshake
/// ends with both ends offering the mesh record layer (ALPN ``HTTPRecords/recordsProtocol``), takes the
/// handshake's exporter secret from the key log, puts a ``SealedRecordHandler`` behind NIOSSL and has NIOSSL
/// leave (`stopTLS`: close_notify both ways; what the peer sent after its close_notify goes to the record
/// handler, which opens it once NIOSSL is gone). Otherwise TLS records go on. Either way the server's end keeps
/// what the handshake said of the client (``peer``).
///
/// Writes wait here until the connection has settled (TLS records, or NIOSSL gone and the record handler in
/// place): a request written while NIOSSL is still in the pipeline would go out as TLS records the peer's
/// record layer cannot open. A client whose certificate the server refuses learns it here: TLS 1.3 ends the
/// client's handshake before the server checks the certificate, and the server answers the client's
/// close_notify with an alert. The waiting writes then fail with that reason, and the channel closes.
public final class HTTPRecordSwitch: ChannelDuplexHandler, RemovableChannelHandler {
    public typealias InboundIn = ByteBuffer
    public typealias InboundOut = ByteBuffer
    public typealias OutboundIn = Any
    public typealias OutboundOut = Any

    public enum Role: Sendable {
        case client
        /// `identify`: the identity of a verified client certificate (nil: anonymous).
        case server(identify: @Sendable (NIOSSLCertificate) -> String?)

        var isClient: Bool {
            if case .client = self { return true }
            return false
        }
    }

    private enum State {
        case handshaking
        case unwrapping
        case settled
        case failed(any Error)
    }

    private let role: Role
    private let secrets: TLSExporterSecrets
    private var state = State.handshaking
    private var held: [(NIOAny, EventLoopPromise<Void>?)] = []
    private var flushHeld = false
    /// The server's end: the client's identity and serial, once the handshake has ended.
    public private(set) var peer: TLSPeer?
    /// Whether the mesh record layer seals this connection's records (false: TLS records, or not settled yet).
    public private(set) var sealed = false

    private let onSealed: (@Sendable () -> Void)?

    /// `secrets`: where the context's key log puts exporter secrets (``HTTPRecords/clientSecrets`` or
    /// ``HTTPRecords/serverSecrets``); `onSealed` runs when the record layer has taken over.
    public init(role: Role, secrets: TLSExporterSecrets, onSealed: (@Sendable () -> Void)? = nil) {
        self.role = role
        self.secrets = secrets
        self.onSealed = onSealed
    }

    /// The pipeline of an HTTPS connection up to the HTTP codec: ``ClientRandomReader``, `tls` (NIOSSL's client
    /// or server handler), then this switch. `between` runs after NIOSSL's handler is added (the server's
    /// buffer tracking, the client's error recorder).
    public static func addHandlers(
        _ tls: NIOSSLHandler,
        role: Role,
        to pipeline: ChannelPipeline.SynchronousOperations,
        onSealed: (@Sendable () -> Void)? = nil,
        between: () throws -> Void = {}
    ) throws {
        let isClient = role.isClient
        try pipeline.addHandler(ClientRandomReader(isClient ? .writing : .reading))
        try pipeline.addHandler(tls)
        try between()
        try pipeline.addHandler(
            HTTPRecordSwitch(
                role: role,
                secrets: isClient ? HTTPRecords.clientSecrets : HTTPRecords.serverSecrets,
                onSealed: onSealed
            )
        )
    }

    public func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        guard case .handshaking = self.state, case TLSUserEvent.handshakeCompleted(let negotiated) = event else {
            context.fireUserInboundEventTriggered(event)
            return
        }
        let ops = context.pipeline.syncOperations
        let reader = try? ops.handler(type: ClientRandomReader.self)
        if let reader { ops.removeHandler(reader, promise: nil) }
        let tlsHandler: NIOSSLHandler?
        switch self.role {
        case .client:
            tlsHandler = try? ops.handler(type: NIOSSLClientHandler.self)
        case .server(let identify):
            let server = try? ops.handler(type: NIOSSLServerHandler.self)
            tlsHandler = server
            let certificate = server?.peerCertificate
            self.peer = TLSPeer(identity: certificate.flatMap(identify), serial: certificate?.serialNumber)
        }
        // Taken whichever way the connection goes: the key log keeps no secret nobody needs.
        let exporter = reader?.random.flatMap { self.secrets.take(clientRandom: $0) }
        context.fireUserInboundEventTriggered(event)
        guard let tlsHandler, negotiated == HTTPRecords.recordsProtocol else {
            return self.settle(context)
        }
        guard let exporter, let secrets = LinkRecordSecrets(exporterSecret: exporter, labels: .http) else {
            return self.fail(
                context,
                HTTPRecordError(
                    description: "no exporter secret for this handshake in the key log: cannot seal records"
                )
            )
        }
        // Idle most of its life (a watch, a kept-alive beat connection): no read buffer, no key schedules kept.
        let sealed = SealedRecordHandler(
            secrets: secrets,
            dialer: self.role.isClient,
            keepsReadBuffer: false,
            keepsKeys: false
        )
        do {
            try ops.addHandler(sealed, position: .after(tlsHandler))
            // NIOSSL's buffers, which IdleBuffers gave back when idle, go with NIOSSL.
            if let idle = try? ops.handler(type: IdleBuffers.self) { ops.removeHandler(idle, promise: nil) }
        } catch {
            return self.fail(context, error)
        }
        self.state = .unwrapping
        // NIOSSL (2.37) on a channel that allows half-closure takes the peer's close_notify during `stopTLS` for
        // the end of its input, not of the unwrapping, which then never completes (the HTTP server allows it):
        // off while NIOSSL leaves, back after.
        let options = context.channel.syncOptions
        let halfClosure = (try? options?.getOption(.allowRemoteHalfClosure)) ?? false
        if halfClosure { try? options?.setOption(.allowRemoteHalfClosure, value: false) }
        let unwrapped = context.eventLoop.makePromise(of: Void.self)
        tlsHandler.stopTLS(promise: unwrapped)
        unwrapped.futureResult.assumeIsolated().whenComplete { result in
            if halfClosure { try? options?.setOption(.allowRemoteHalfClosure, value: true) }
            guard case .unwrapping = self.state else { return }
            switch result {
            case .success:
                guard context.channel.isActive, let sealedContext = try? ops.context(handler: sealed) else {
                    return self.fail(context, ChannelError.ioOnClosedChannel)
                }
                self.sealed = true
                self.onSealed?()
                sealed.start(context: sealedContext)
                self.settle(context)
            case .failure(let error):
                self.fail(context, self.unwrapFailure(error))
            }
        }
    }

    /// Why leaving TLS failed: for the client, most likely the server refusing its certificate.
    private func unwrapFailure(_ error: any Error) -> HTTPRecordError {
        switch self.role {
        case .client:
            HTTPRecordError(
                description:
                    "the server refused this client's certificate, or closed the connection after the TLS handshake (\(HTTPClient.describe(error)))"
            )
        case .server:
            HTTPRecordError(description: "the client closed the connection after the TLS handshake: \(error)")
        }
    }

    private func settle(_ context: ChannelHandlerContext) {
        self.state = .settled
        let held = self.held
        self.held = []
        for (data, promise) in held { context.write(data, promise: promise) }
        if self.flushHeld {
            self.flushHeld = false
            context.flush()
        }
        // The client's end has nothing more to do; the server's keeps `peer` for the requests.
        if self.role.isClient { context.pipeline.syncOperations.removeHandler(context: context, promise: nil) }
    }

    private func fail(_ context: ChannelHandlerContext, _ error: any Error) {
        self.state = .failed(error)
        self.failHeld(error)
        context.fireErrorCaught(error)
        context.close(promise: nil)
    }

    private func failHeld(_ error: any Error) {
        let held = self.held
        self.held = []
        for (_, promise) in held { promise?.fail(error) }
    }

    public func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        switch self.state {
        case .settled: context.write(data, promise: promise)
        case .handshaking, .unwrapping: self.held.append((data, promise))
        case .failed(let error): promise?.fail(error)
        }
    }

    public func flush(context: ChannelHandlerContext) {
        switch self.state {
        case .settled: context.flush()
        case .handshaking, .unwrapping: self.flushHeld = true
        case .failed: break
        }
    }

    public func channelInactive(context: ChannelHandlerContext) {
        switch self.state {
        case .handshaking, .unwrapping:
            self.state = .failed(ChannelError.ioOnClosedChannel)
            self.failHeld(ChannelError.ioOnClosedChannel)
        case .settled, .failed:
            break
        }
        context.fireChannelInactive()
    }

    public func handlerRemoved(context: ChannelHandlerContext) {
        self.failHeld(ChannelError.ioOnClosedChannel)
    }
}
