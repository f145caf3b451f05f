#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Daemon configuration files: YAML, every field defaulted, unknown fields rejected by name.
public enum ConfigFile {
    /// Reads `path` (YAML) over the defaults of `T()` and decodes it strictly.
    /// An empty file, or no path, yields the defaults.
    public static func load<T: Codable & DefaultConstructible>(_ type: T.Type, path: String?) throws -> T {
        guard let path else { return T() }
        let text: String
        do {
            text = try String(contentsOfFile: path, encoding: .utf8)
        } catch {
            throw ManifestError("\(path): cannot read the config file: \(ConfigFile.reason(error))")
        }
        do {
            return try ConfigFile.decode(T.self, yaml: text)
        } catch let e as ManifestError {
            throw ManifestError("\(path): \(e.message)")
        }
    }

    /// Decodes YAML text over the defaults of `T()`.
    public static func decode<T: Codable & DefaultConstructible>(_ type: T.Type, yaml text: String) throws -> T {
        let docs = try Strict.documents(yaml: text)
        guard docs.count <= 1 else { throw ManifestError("a config file holds one YAML document, found \(docs.count)") }
        let defaults = try JSONValue.parse(json: try MeshJSON.encode(T()))
        guard let doc = docs.first else { return T() }
        if case .null = doc { return T() }
        guard case .object = doc else {
            throw ManifestError("the config must be a mapping of settings, not a \(doc.typeName)")
        }
        return try Strict.decode(T.self, from: Strict.merge(defaults, doc))
    }
}

extension ConfigFile {
    /// A short reason for a file-system error: the system's message when there is one.
    static func reason(_ error: any Error) -> String {
        if let posix = error as? POSIXError { return String(cString: strerror(posix.code.rawValue)) }
        if let cocoa = error as? CocoaError, let underlying = cocoa.underlying as? POSIXError {
            return String(cString: strerror(underlying.code.rawValue))
        }
        return "\(error)"
    }
}

/// A type with a value holding every default.
public protocol DefaultConstructible {
    init()
}

/// Where daemons keep their files when not told otherwise.
public enum StatePaths {
    /// `$XDG_STATE_HOME/edge-mesh`, else `~/.local/state/edge-mesh`; `/var/lib/edge-mesh` for root
    /// without a home.
    public static func defaultDataDir() -> String {
        let env = ProcessInfo.processInfo.environment
        if let x = env["XDG_STATE_HOME"], !x.isEmpty { return x + "/edge-mesh" }
        if let home = env["HOME"], !home.isEmpty, home != "/" { return home + "/.local/state/edge-mesh" }
        return "/var/lib/edge-mesh"
    }

    /// Creates `dir` (and parents) with owner-only permissions when absent.
    public static func ensureDirectory(_ dir: String) throws {
        do {
            try FileManager.default.createDirectory(
                atPath: dir,
                withIntermediateDirectories: true,
                attributes: [.posixPermissions: 0o700]
            )
        } catch {
            throw ManifestError("cannot create the data directory \(dir): \(ConfigFile.reason(error))")
        }
    }
}

/// An exclusive lock on a data directory, so two daemons never share one store.
public final class DirectoryLock: Sendable {
    let fd: Int32
    public let path: String

    /// Takes `<dir>/<name>.lock`, failing at once (with the holder's pid) when another process has it.
    public init(directory: String, name: String) throws {
        let path = "\(directory)/\(name).lock"
        self.path = path
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw ManifestError("cannot open \(path): \(String(cString: strerror(errno)))") }
        if flock(fd, LOCK_EX | LOCK_NB) != 0 {
            var buf = [UInt8](repeating: 0, count: 32)
            let n = read(fd, &buf, 31)
            close(fd)
            let pid =
                n > 0
                ? String(decoding: buf[0..<n], as: UTF8.self).filter { !$0.isWhitespace } : "?"
            throw ManifestError(
                "\(directory) is in use by another \(name) (pid \(pid)); stop it or choose another data directory"
            )
        }
        ftruncate(fd, 0)
        let pid = "\(getpid())\n"
        _ = pid.withCString { write(fd, $0, strlen($0)) }
        self.fd = fd
    }

    deinit {
        flock(self.fd, LOCK_UN)
        close(self.fd)
    }
}
