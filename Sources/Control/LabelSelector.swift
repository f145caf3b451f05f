import Foundation

/// Equality-based label selectors as Kubernetes writes them: `app=web,tier!=db,canary,!legacy`.
public struct LabelSelector: Sendable, Equatable, CustomStringConvertible {
    public enum Requirement: Sendable, Equatable {
        case equals(String, String)
        case notEquals(String, String)
        case exists(String)
        case notExists(String)
    }

    public var requirements: [Requirement]

    /// Parses a selector; the error says which term is wrong.
    public init(parsing text: String) throws(SelectorError) {
        var reqs: [Requirement] = []
        for raw in text.split(separator: ",", omittingEmptySubsequences: false) {
            let term = String(raw).trimmingCharacters(in: " ")
            if term.isEmpty { throw SelectorError("empty term in label selector \"\(text)\"") }
            if let r = term.range(of: "!=") {
                reqs.append(.notEquals(try Self.key(term[..<r.lowerBound], text), String(term[r.upperBound...])))
            } else if let r = term.range(of: "==") {
                reqs.append(.equals(try Self.key(term[..<r.lowerBound], text), String(term[r.upperBound...])))
            } else if let r = term.range(of: "=") {
                reqs.append(.equals(try Self.key(term[..<r.lowerBound], text), String(term[r.upperBound...])))
            } else if term.hasPrefix("!") {
                reqs.append(.notExists(try Self.key(term.dropFirst(), text)))
            } else {
                reqs.append(.exists(try Self.key(Substring(term), text)))
            }
        }
        self.requirements = reqs
    }

    private static func key(_ s: Substring, _ whole: String) throws(SelectorError) -> String {
        let k = String(s).trimmingCharacters(in: " ")
        if k.isEmpty || k.contains(where: { "!=(), ".contains($0) }) {
            throw SelectorError("invalid label key \"\(k)\" in selector \"\(whole)\"")
        }
        return k
    }

    public func matches(_ labels: [String: String]) -> Bool {
        self.requirements.allSatisfy { r in
            switch r {
            case .equals(let k, let v): return labels[k] == v
            case .notEquals(let k, let v): return labels[k] != v
            case .exists(let k): return labels[k] != nil
            case .notExists(let k): return labels[k] == nil
            }
        }
    }

    public var description: String {
        self.requirements.map { r in
            switch r {
            case .equals(let k, let v): return "\(k)=\(v)"
            case .notEquals(let k, let v): return "\(k)!=\(v)"
            case .exists(let k): return k
            case .notExists(let k): return "!\(k)"
            }
        }.joined(separator: ",")
    }
}

public struct SelectorError: Error, Sendable, CustomStringConvertible {
    public var description: String

    init(_ message: String) {
        self.description = message
    }
}

extension String {
    func trimmingCharacters(in set: String) -> String {
        var s = Substring(self)
        while let f = s.first, set.contains(f) { s = s.dropFirst() }
        while let l = s.last, set.contains(l) { s = s.dropLast() }
        return String(s)
    }
}
