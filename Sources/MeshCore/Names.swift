/// Name rules shared by every object: the DNS shapes Kubernetes uses, since names become DNS labels.
public enum Names {
    /// RFC 1123 label: 1-63 of `a-z 0-9 -`, starting and ending alphanumeric.
    public static func dns1123LabelError(_ s: String) -> String? {
        if s.isEmpty { return "must not be empty" }
        if s.utf8.count > 63 { return "must be at most 63 characters (is \(s.utf8.count))" }
        if let bad = s.unicodeScalars.first(where: { !isLowerAlnum($0) && $0 != "-" }) {
            return "invalid character \"\(bad)\": a DNS-1123 label has only lowercase letters, digits and '-'"
        }
        if s.hasPrefix("-") || s.hasSuffix("-") { return "must start and end with a letter or digit" }
        return nil
    }

    /// RFC 1123 subdomain: dot-separated labels, at most 253 characters.
    public static func dns1123SubdomainError(_ s: String) -> String? {
        if s.isEmpty { return "must not be empty" }
        if s.utf8.count > 253 { return "must be at most 253 characters (is \(s.utf8.count))" }
        for label in s.split(separator: ".", omittingEmptySubsequences: false) {
            if let e = dns1123LabelError(String(label)) { return "label \"\(label)\" \(e)" }
        }
        return nil
    }

    /// Label keys: `[prefix/]name`, name 1-63 of alphanumerics, `-_.`, starting and ending alphanumeric.
    public static func labelKeyError(_ s: String) -> String? {
        let parts = s.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count <= 2 else { return "must be a name with an optional DNS prefix and one '/'" }
        if parts.count == 2, let e = dns1123SubdomainError(String(parts[0])) { return "prefix \(e)" }
        let name = String(parts.last!)
        if name.isEmpty { return "name part must not be empty" }
        return labelValueError(name)
    }

    /// Label values: empty, or 1-63 of alphanumerics and `-_.`, starting and ending alphanumeric.
    public static func labelValueError(_ s: String) -> String? {
        if s.isEmpty { return nil }
        if s.utf8.count > 63 { return "must be at most 63 characters" }
        let ok = s.unicodeScalars.allSatisfy { isAlnum($0) || $0 == "-" || $0 == "_" || $0 == "." }
        if !ok { return "may hold only letters, digits, '-', '_' and '.'" }
        if !isAlnum(s.unicodeScalars.first!) || !isAlnum(s.unicodeScalars.last!) {
            return "must start and end with a letter or digit"
        }
        return nil
    }

    /// An HTTP header field name (RFC 9110 token).
    public static func headerNameError(_ s: String) -> String? {
        if s.isEmpty { return "must not be empty" }
        let ok = s.unicodeScalars.allSatisfy { isAlnum($0) || "!#$%&'*+-.^_`|~".unicodeScalars.contains($0) }
        return ok ? nil : "is not a valid HTTP header name"
    }

    private static func isLowerAlnum(_ c: Unicode.Scalar) -> Bool {
        ("a"..."z").contains(c) || ("0"..."9").contains(c)
    }

    private static func isAlnum(_ c: Unicode.Scalar) -> Bool {
        isLowerAlnum(c) || ("A"..."Z").contains(c)
    }
}
