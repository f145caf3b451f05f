import MeshTestSupport
import Testing

@testable import MeshNIO

#if canImport(Glibc)
import Glibc
#endif

@Suite("MeshNIO: a splice's ends, moved between nonblocking socket pairs, and its idle count", .rationed)
struct SpliceEndTests {
    /// Two stream socket pairs, nonblocking: `source` is read by the splice (its peer `sourcePeer` writes),
    /// `target` is written by it (its peer `targetPeer` reads).
    private struct Pairs {
        let sourcePeer: Int32
        let source: SpliceEnd
        let target: SpliceEnd
        let targetPeer: Int32

        init() throws {
            var a: [Int32] = [0, 0]
            var b: [Int32] = [0, 0]
            try #require(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &a) == 0)
            try #require(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &b) == 0)
            for fd in [a[1], b[0]] { _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) }
            self.sourcePeer = a[0]
            self.source = SpliceEnd(fd: a[1])
            self.target = SpliceEnd(fd: b[0])
            self.targetPeer = b[1]
        }

        func close() {
            for fd in [self.sourcePeer, self.source.fd, self.target.fd, self.targetPeer] { Glibc.close(fd) }
            self.source.dropPending()
            self.target.dropPending()
        }
    }

    private func write(_ fd: Int32, _ bytes: [UInt8]) -> Int {
        bytes.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, 0) }
    }

    private func readAll(_ fd: Int32) -> [UInt8] {
        var out: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65_536)
        while true {
            let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
            if n <= 0 { return out }
            out += chunk[0..<n]
        }
    }

    @Test("bytes move in one step; an end of input is passed on as a shut write side")
    func movesAndPassesTheEnd() throws {
        let pairs = try Pairs()
        defer { pairs.close() }
        let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 16)
        defer { scratch.deallocate() }
        #expect(self.write(pairs.sourcePeer, Array("hello".utf8)) == 5)
        pairs.source.note(EpollCore.Events.input)
        let (moved, step) = SocketPump.move(from: pairs.source, to: pairs.target, through: scratch)
        #expect(moved == 5)
        guard case .done = step else {
            Issue.record("step \(step)")
            return
        }
        #expect(!pairs.source.readable)
        #expect(self.readAll(pairs.targetPeer) == Array("hello".utf8))

        shutdown(pairs.sourcePeer, Int32(SHUT_WR))
        pairs.source.note(EpollCore.Events.input | EpollCore.Events.closing)
        _ = SocketPump.move(from: pairs.source, to: pairs.target, through: scratch)
        #expect(pairs.source.eof)
        #expect(pairs.target.shut)
        // The target's peer reads its end of input.
        var byte: UInt8 = 0
        #expect(recv(pairs.targetPeer, &byte, 1, 0) == 0)
        // Nothing moves after the end.
        #expect(SocketPump.move(from: pairs.source, to: pairs.target, through: scratch).moved == 0)
    }

    @Test("what a full target cannot take is held, nothing more is read until it went, and the end waits for it")
    func holdsForAFullTarget() throws {
        let pairs = try Pairs()
        defer { pairs.close() }
        let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: 65_536, alignment: 16)
        defer { scratch.deallocate() }
        // Fill the target until it pushes back.
        let filler = [UInt8](repeating: 7, count: 65_536)
        var filled = 0
        while true {
            let n = filler.withUnsafeBytes { send(pairs.target.fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
            if n <= 0 { break }
            filled += n
        }
        let payload = (0..<1000).map { UInt8(truncatingIfNeeded: $0) }
        #expect(self.write(pairs.sourcePeer, payload) == payload.count)
        shutdown(pairs.sourcePeer, Int32(SHUT_WR))
        pairs.source.note(EpollCore.Events.input)
        let (moved, step) = SocketPump.move(from: pairs.source, to: pairs.target, through: scratch)
        #expect(moved == payload.count)
        guard case .held(let count) = step else {
            Issue.record("step \(step)")
            return
        }
        #expect(count == payload.count)
        #expect(pairs.target.pending?.count == payload.count)
        // Held: the source is not read (its end of input stays unread).
        #expect(SocketPump.move(from: pairs.source, to: pairs.target, through: scratch).moved == 0)
        #expect(!pairs.source.eof)

        guard case .blocked = pairs.target.flushHeld(peerEnded: false) else {
            Issue.record("a full socket took the held bytes")
            return
        }
        // The reader drains the filler; the held bytes then go, and the end of input follows them.
        var drained = 0
        while drained < filled { drained += self.readAll(pairs.targetPeer).count }
        guard case .done = pairs.target.flushHeld(peerEnded: false) else {
            Issue.record("the held bytes did not go")
            return
        }
        #expect(pairs.target.pending == nil)
        #expect(!pairs.target.shut)
        pairs.source.note(EpollCore.Events.input)
        _ = SocketPump.move(from: pairs.source, to: pairs.target, through: scratch)
        #expect(pairs.source.eof && pairs.target.shut)
        #expect(self.readAll(pairs.targetPeer) == payload)
    }

    @Test("idle only after a whole timeout without a burst, counted from the sweep that saw the last one")
    func idleTracker() {
        var idle = IdleTracker(now: 0)
        var sweeps: [Bool] = []
        for now: UInt64 in [50, 100] { sweeps.append(idle.isIdle(now: now, timeout: 100)) }
        idle.touch()
        // The sweep at 150 sees the burst: quiet from 150 on.
        for now: UInt64 in [150, 249, 250] { sweeps.append(idle.isIdle(now: now, timeout: 100)) }
        #expect(sweeps == [false, true, false, false, true])
    }
}
