import MeshNIO
import MeshWire
import NIOCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// One stream of a ``LinkLoopSession`` and the local socket it is spliced to (a proxied client's connection
/// at the opening end, the endpoint's at the other). Used on its loop's thread only.
final class LinkLoopStream: EpollPollable {
    enum State {
        /// Opened by us: the target header went out, the peer's ``StreamOpenReply`` has not come yet. The
        /// socket is the caller's until it is accepted (not registered, not read).
        case awaitingReply
        /// Opened by the peer: its ``StreamTarget`` header has not all come yet.
        case awaitingTarget
        /// Dialing the local endpoint (non-blocking connect) until the deadline.
        case dialing(deadline: UInt64)
        /// Spliced.
        case open
        /// Gone from the session.
        case closed
    }

    let id: UInt32
    weak var session: LinkLoopSession?
    var fd: Int32
    var state: State
    var registered = false
    /// Bytes this side may still send (the peer's window).
    var sendWindow: UInt32 = YamuxDefaults.initialWindow
    /// Bytes the peer may still send.
    var receiveWindow: UInt32
    /// Bytes taken from the peer (written to the socket, or read as a header) since the last window update.
    var consumed: UInt32 = 0
    /// The socket's edge said there is input not read yet; `closing`: an end of input or an error came.
    var readable = false
    var closing = false
    /// Our FIN went out (the socket's input ended).
    var finSent = false
    /// The peer's FIN came.
    var peerFinished = false
    /// The socket's write side was shut (after the peer's FIN and what was held for it).
    var shut = false
    /// In the session's list of streams waiting for the link's output to drain.
    var waitingForLink = false
    /// Bytes from the peer that the socket has not taken yet (or that wait for the dial).
    var pending: ByteBuffer?
    /// The start of the peer's reply or target header.
    var header: ByteBuffer?
    /// Bytes read from the socket and written to it (`/peers`, the route's counters).
    var fromSocket = 0
    var toSocket = 0
    var replied: (@Sendable (Result<Void, any Error>) -> Void)?
    var ended: (@Sendable (_ fromSocket: Int, _ toSocket: Int) -> Void)?
    var target: StreamTarget?

    init(id: UInt32, session: LinkLoopSession, fd: Int32, state: State, receiveWindow: UInt32) {
        self.id = id
        self.session = session
        self.fd = fd
        self.state = state
        self.receiveWindow = receiveWindow
    }

    override func ready(_ events: UInt32) {
        self.session?.streamReady(self, events)
    }

    var isOpen: Bool {
        if case .open = self.state { return true }
        return false
    }

    /// Appends `bytes` to what waits for the socket (a copy: the bytes may be a slice of the session's buffer).
    func hold(_ bytes: ByteBuffer) {
        guard bytes.readableBytes > 0 else { return }
        if self.pending == nil {
            var copy = ByteBuffer()
            copy.reserveCapacity(bytes.readableBytes)
            copy.writeImmutableBuffer(bytes)
            self.pending = copy
        } else {
            self.pending!.writeImmutableBuffer(bytes)
        }
    }

    /// Writes `bytes` to the socket, holding what it does not take: the bytes written, or the error code.
    func write(_ bytes: ByteBuffer) -> (written: Int, error: Int32?) {
        guard self.pending == nil else {
            self.hold(bytes)
            return (0, nil)
        }
        let (written, failure) = bytes.withUnsafeReadableBytes { LinkLoopIO.send(self.fd, $0) }
        if failure == nil, written < bytes.readableBytes {
            self.hold(bytes.getSlice(at: bytes.readerIndex + written, length: bytes.readableBytes - written)!)
        }
        self.toSocket += written
        return (written, failure)
    }

    /// Writes what is held: the bytes written, whether all went, or the error code.
    func flushPending() -> (written: Int, done: Bool, error: Int32?) {
        guard var pending = self.pending else { return (0, true, nil) }
        let (written, failure) = pending.withUnsafeReadableBytes { LinkLoopIO.send(self.fd, $0) }
        pending.moveReaderIndex(forwardBy: written)
        self.toSocket += written
        if pending.readableBytes == 0 {
            self.pending = nil
            return (written, failure == nil, failure)
        }
        self.pending = pending
        return (written, false, failure)
    }

    /// Passes the peer's end of input on (`shutdown(SHUT_WR)`), once.
    func shutWrite() {
        guard !self.shut, self.fd >= 0 else { return }
        self.shut = true
        _ = shutdown(self.fd, Int32(SHUT_WR))
    }
}

/// Socket writes of a link loop.
enum LinkLoopIO {
    /// Sends as much of `bytes` as the socket takes: how much, and the error code of a failure (not EAGAIN).
    static func send(_ fd: Int32, _ bytes: UnsafeRawBufferPointer) -> (written: Int, error: Int32?) {
        var written = 0
        while written < bytes.count {
            let n = Glibc.send(fd, bytes.baseAddress! + written, bytes.count - written, Int32(MSG_NOSIGNAL))
            if n >= 0 {
                written += n
                continue
            }
            let code = errno
            if code == EINTR { continue }
            return (written, code == EAGAIN || code == EWOULDBLOCK ? nil : code)
        }
        return (written, nil)
    }
}

/// A non-blocking TCP connect to a stream's endpoint.
enum LinkLoopDial {
    /// A socket connecting (or connected) to `address`:`port`, or the error code.
    static func connect(_ address: WireIPAddress, port: UInt16) -> Result<Int32, DialError> {
        let family: Int32
        if case .v4 = address { family = AF_INET } else { family = AF_INET6 }
        let fd = socket(family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue | SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return .failure(DialError(call: "socket", code: errno)) }
        var one: Int32 = 1
        _ = setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        let rc: Int32
        switch address {
        case .v4(let a):
            var sin = sockaddr_in()
            sin.sin_family = sa_family_t(AF_INET)
            sin.sin_port = port.bigEndian
            sin.sin_addr.s_addr = a.bigEndian
            rc = withUnsafePointer(to: &sin) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
                }
            }
        case .v6(let hi, let lo):
            var sin6 = sockaddr_in6()
            sin6.sin6_family = sa_family_t(AF_INET6)
            sin6.sin6_port = port.bigEndian
            withUnsafeMutableBytes(of: &sin6.sin6_addr) { raw in
                raw.storeBytes(of: hi.bigEndian, toByteOffset: 0, as: UInt64.self)
                raw.storeBytes(of: lo.bigEndian, toByteOffset: 8, as: UInt64.self)
            }
            rc = withUnsafePointer(to: &sin6) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in6>.size))
                }
            }
        }
        if rc != 0 && errno != EINPROGRESS {
            let code = errno
            close(fd)
            return .failure(DialError(call: "connect", code: code))
        }
        return .success(fd)
    }

    /// The outcome of a connect that signalled: nil when connected, else the error.
    static func outcome(_ fd: Int32) -> DialError? {
        var code: Int32 = 0
        var length = socklen_t(MemoryLayout<Int32>.size)
        guard getsockopt(fd, SOL_SOCKET, SO_ERROR, &code, &length) == 0 else {
            return DialError(call: "getsockopt(SO_ERROR)", code: errno)
        }
        return code == 0 ? nil : DialError(call: "connect", code: code)
    }

    struct DialError: Error, CustomStringConvertible {
        let call: String
        let code: Int32
        var description: String { "\(self.call): \(String(cString: strerror(self.code)))" }
    }
}
