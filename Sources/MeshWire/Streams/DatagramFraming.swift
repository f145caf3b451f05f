import NIOCore

/// UDP datagrams inside a stream: each one is a 16-bit big-endian length followed by that many bytes.
/// Datagram boundaries survive the stream; an empty datagram is a 2-byte frame of length 0.
public enum DatagramFraming {
    /// The largest datagram a frame can hold (a UDP payload's limit over IPv4 is lower, 65,507).
    public static let maxDatagram = Int(UInt16.max)

    /// Appends one framed datagram. Throws `datagramTooLarge` above `maxDatagram`.
    public static func encode(_ datagram: ByteBuffer, into buffer: inout ByteBuffer) throws(MeshWireError) {
        guard datagram.readableBytes <= Self.maxDatagram else {
            throw .datagramTooLarge(datagram.readableBytes, limit: Self.maxDatagram)
        }
        buffer.writeInteger(UInt16(datagram.readableBytes))
        buffer.writeImmutableBuffer(datagram)
    }

    /// Reads one datagram from the front of `buffer`: nil (nothing consumed) until it is whole. A receiver
    /// may set a lower `limit` (say, its UDP socket's): a longer frame throws `datagramTooLarge` as soon as
    /// its length is there.
    public static func decode(
        from buffer: inout ByteBuffer,
        limit: Int = maxDatagram
    ) throws(MeshWireError) -> ByteBuffer? {
        guard let n = buffer.getInteger(at: buffer.readerIndex, as: UInt16.self) else { return nil }
        guard Int(n) <= limit else { throw .datagramTooLarge(Int(n), limit: limit) }
        guard let datagram = buffer.getSlice(at: buffer.readerIndex + 2, length: Int(n)) else { return nil }
        buffer.moveReaderIndex(forwardBy: 2 + Int(n))
        return datagram
    }
}
