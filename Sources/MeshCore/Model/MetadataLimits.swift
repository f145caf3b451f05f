/// The limits on an object's labels and annotations, as Kubernetes sets them, checked in time linear
/// in the size of the metadata.
///
/// - label keys: an optional DNS-1123 subdomain prefix (at most 253 characters) and `/`, then a
///   name of 1-63 letters, digits, `-`, `_`, `.` that starts and ends with a letter or digit;
/// - label values: empty, or 1-63 characters of the same set;
/// - at most `maxLabels` labels (Kubernetes has no count limit; 64 is far beyond what selectors
///   use, and keeps the labels column, selector matching and watch filtering cheap);
/// - annotation keys follow the label key rules; keys and values together hold at most 256 KiB.
public enum MetadataLimits {
    /// Labels one object may carry.
    public static let maxLabels = 64
    /// Bytes of annotation keys and values together (Kubernetes' `TotalAnnotationSizeLimitB`).
    public static let maxAnnotationBytes = 256 * 1024
    /// Field errors reported for one map; the rest are summed up in one more line.
    public static let maxReportedErrors = 16

    /// The errors of `labels` and `annotations`, paths under `metadata.`. A map over its count or size
    /// limit gets one error and its entries are not looked at one by one.
    public static func errors(labels: [String: String]?, annotations: [String: String]?) -> [FieldError] {
        var errs: [FieldError] = []
        if let labels {
            if labels.count > Self.maxLabels {
                errs.append(
                    FieldError("metadata.labels", "must have at most \(Self.maxLabels) labels (has \(labels.count))")
                )
            } else {
                var found: [FieldError] = []
                for (k, v) in labels.sorted(by: { $0.key < $1.key }) {
                    if let e = Names.labelKeyError(k) { found.append(FieldError("metadata.labels[\(k)]", "key \(e)")) }
                    if let e = Names.labelValueError(v) {
                        found.append(FieldError("metadata.labels[\(k)]", "value \(e)"))
                    }
                }
                errs += Self.capped(found, path: "metadata.labels")
            }
        }
        if let annotations {
            let bytes = Self.annotationBytes(annotations)
            if bytes > Self.maxAnnotationBytes {
                errs.append(
                    FieldError(
                        "metadata.annotations",
                        "must hold at most 256 KiB (262144 bytes) of keys and values in all (holds \(bytes))"
                    )
                )
            } else {
                var found: [FieldError] = []
                for k in annotations.keys.sorted() {
                    if let e = Names.labelKeyError(k) {
                        found.append(FieldError("metadata.annotations[\(k)]", "key \(e)"))
                    }
                }
                errs += Self.capped(found, path: "metadata.annotations")
            }
        }
        return errs
    }

    /// Checks the labels and annotations of a raw document before it is decoded, so that a body with
    /// 20,000 labels is refused after one count, not after decoding and checking each of them.
    /// Throws a `ValidationError` naming `kind` and the document's name.
    public static func precheck(_ document: JSONValue, kind: String) throws {
        guard let metadata = document["metadata"] else { return }
        var errs: [FieldError] = []
        if case .object(let labels)? = metadata["labels"], labels.count > Self.maxLabels {
            errs.append(
                FieldError("metadata.labels", "must have at most \(Self.maxLabels) labels (has \(labels.count))")
            )
        }
        if case .object(let annotations)? = metadata["annotations"] {
            var bytes = 0
            for (k, v) in annotations {
                bytes += k.utf8.count
                if case .string(let s) = v { bytes += s.utf8.count }
            }
            if bytes > Self.maxAnnotationBytes {
                errs.append(
                    FieldError(
                        "metadata.annotations",
                        "must hold at most 256 KiB (262144 bytes) of keys and values in all (holds \(bytes))"
                    )
                )
            }
        }
        if !errs.isEmpty {
            throw ValidationError(kind: kind, name: metadata["name"]?.stringValue ?? "", fields: errs)
        }
    }

    static func annotationBytes(_ annotations: [String: String]) -> Int {
        annotations.reduce(0) { $0 + $1.key.utf8.count + $1.value.utf8.count }
    }

    /// The first `maxReportedErrors` of `errors`, and one line counting the rest.
    static func capped(_ errors: [FieldError], path: String) -> [FieldError] {
        guard errors.count > Self.maxReportedErrors else { return errors }
        return Array(errors.prefix(Self.maxReportedErrors)) + [
            FieldError(path, "\(errors.count - Self.maxReportedErrors) more invalid entries not listed")
        ]
    }
}
