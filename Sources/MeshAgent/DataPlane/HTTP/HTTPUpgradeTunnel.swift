import NIOCore

/// The switch from HTTP to a tunnel after an upgrade the route allows (`HTTPRequestPolicy`): the backend's
/// 101 goes to the client as it came (its Connection and Upgrade fields are the point of it), then both
/// connections leave HTTP behind and become a byte tunnel of two NIO channels joined by the glue
/// (`HTTPTunnelGlue.swift`), closed after `tcpIdleTimeout` without traffic.
extension HTTPProxyHandler {
    func upgrade(context: ChannelHandlerContext) {
        guard let upstream = self.exchange!.upstream, let response = self.exchange!.upgradeResponse else { return }
        self.endAccounting()
        context.writeAndFlush(NIOAny(response.bytes), promise: nil)
        self.state = .upgraded
        if self.readingPaused {
            // The tunnel reads as it likes (autoRead on, as the glue expects).
            self.readingPaused = false
            try? context.channel.syncOptions?.setOption(.autoRead, value: true)
        }
        let pick = self.exchange!.pickInFlight ? self.exchange!.pick : nil
        self.exchange = nil
        upstream.handler.owner = nil
        self.pool?.detach(upstream)

        let meter = GlueMeter(handle: self.handle, counters: self.environment.counters)
        let clientGlue = GlueHandler(side: .client, meter: meter)
        let upstreamGlue = GlueHandler(side: .upstream, meter: meter)
        let clientChannel = context.channel
        let upstreamChannel = upstream.channel
        if let pick {
            // The tunnel keeps the backend busy until it closes.
            let handle = self.handle
            upstreamChannel.closeFuture.whenComplete { _ in handle.finish(pick, outcome: .neutral) }
        }
        do {
            try clientChannel.pipeline.syncOperations.addHandler(clientGlue)
            try upstreamChannel.pipeline.syncOperations.addHandler(upstreamGlue)
            GlueHandler.join(clientGlue, upstreamGlue)
            // The decoders go last: bytes behind the upgrade they hold go to the glue.
            let upstreamSync = upstreamChannel.pipeline.syncOperations
            upstreamSync.removeHandler(upstream.handler, promise: nil)
            upstreamSync.removeHandler(upstream.handler.decoder, promise: nil)
            let clientSync = clientChannel.pipeline.syncOperations
            clientSync.removeHandler(context: context, promise: nil)
            clientSync.removeHandler(self.decoder, promise: nil)
        } catch {
            self.environment.logger.debug("upgrade failed", metadata: ["error": "\(error)"])
            clientChannel.close(promise: nil)
            upstreamChannel.close(promise: nil)
            return
        }
        IdleTimer.start(
            on: clientChannel,
            meter: meter,
            timeout: self.environment.configuration.tcpIdleTimeout,
            close: { clientGlue.close() }
        )
        clientChannel.read()
        upstreamChannel.read()
    }
}
