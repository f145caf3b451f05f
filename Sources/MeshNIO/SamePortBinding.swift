import NIOCore

/// Binds a UDP channel and then a TCP listener on the same port (DNS and STUN serve both). With port 0 the
/// UDP socket picks the port and TCP may find it taken: then both are closed and tried again, up to
/// `attempts` times; with a fixed port the first failure is thrown.
///
/// No SO_REUSEADDR belongs on the UDP socket: on Linux it would let a second server bind the same UDP port
/// and share (steal) its datagrams.
public func bindUDPAndTCP(
    port: Int,
    attempts: Int = 20,
    udp: (_ port: Int) async throws -> any Channel,
    tcp: (_ port: Int) async throws -> any Channel
) async throws -> (udp: any Channel, tcp: any Channel) {
    var lastError: (any Error)? = nil
    for _ in 0..<max(1, attempts) {
        let datagrams = try await udp(port)
        let chosen = datagrams.localAddress?.port ?? port
        do {
            return (datagrams, try await tcp(chosen))
        } catch {
            lastError = error
            try? await datagrams.close()
            if port != 0 { throw error }
        }
    }
    throw lastError ?? ChannelError.inappropriateOperationForState
}
