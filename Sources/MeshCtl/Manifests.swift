import Foundation
import MeshCore

/// One document of a manifest file, with where it came from for error messages.
public struct ManifestDocument: Sendable {
    /// `file.yaml` or `file.yaml#2` (the second document).
    public var source: String
    public var value: JSONValue
}

/// Reads `-f` arguments: files, directories (their *.yaml, *.yml and *.json, sorted) or `-` for stdin.
public enum Manifests {
    public static func load(_ paths: [String], stdin: () -> String = Manifests.readStdin) throws -> [ManifestDocument] {
        var docs: [ManifestDocument] = []
        for path in paths {
            if path == "-" {
                docs += try self.parse(stdin(), source: "stdin")
                continue
            }
            var isDir: ObjCBool = false
            guard FileManager.default.fileExists(atPath: path, isDirectory: &isDir) else {
                throw ManifestError("\(path): no such file or directory")
            }
            let files: [String]
            if isDir.boolValue {
                let names = try FileManager.default.contentsOfDirectory(atPath: path)
                files = names.filter { $0.hasSuffix(".yaml") || $0.hasSuffix(".yml") || $0.hasSuffix(".json") }.sorted()
                    .map { path.hasSuffix("/") ? path + $0 : path + "/" + $0 }
                if files.isEmpty { throw ManifestError("\(path): no .yaml, .yml or .json files in this directory") }
            } else {
                files = [path]
            }
            for file in files {
                guard let data = FileManager.default.contents(atPath: file),
                    let text = String(data: data, encoding: .utf8)
                else {
                    throw ManifestError("\(file): cannot read the file as UTF-8 text")
                }
                docs += try self.parse(text, source: file)
            }
        }
        return docs
    }

    static func parse(_ text: String, source: String) throws -> [ManifestDocument] {
        let values: [JSONValue]
        do {
            values = try Strict.documents(yaml: text)
        } catch let e as ManifestError {
            throw ManifestError("\(source): \(e.message)")
        }
        let docs = values.filter { if case .null = $0 { return false } else { return true } }
        return docs.enumerated().map { i, v in
            ManifestDocument(source: docs.count > 1 ? "\(source)#\(i + 1)" : source, value: v)
        }
    }

    public static func readStdin() -> String {
        String(decoding: FileHandle.standardInput.readDataToEndOfFile(), as: UTF8.self)
    }
}
