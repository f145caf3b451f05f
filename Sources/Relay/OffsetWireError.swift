/// A codec error that is a code and the byte offset where the problem was found: two are equal when
/// their code and offset are, whatever their human `detail` says (tests compare against an error
/// made with an empty detail). STUN's and the relay session's errors share this rule here.
public protocol OffsetWireError: Error, Hashable, Sendable, CustomStringConvertible {
    associatedtype Code: Hashable & Sendable
    var code: Code { get }
    /// Byte offset in the message where the problem was found (0 for encoding errors).
    var offset: Int { get }
    /// A human explanation (not part of equality).
    var detail: String { get }
}

extension OffsetWireError {
    public static func == (a: Self, b: Self) -> Bool { a.code == b.code && a.offset == b.offset }

    public func hash(into hasher: inout Hasher) {
        hasher.combine(self.code)
        hasher.combine(self.offset)
    }
}
