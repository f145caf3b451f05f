import MeshCore

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

#if canImport(Glibc)
import Glibc
#endif

/// Why keys or certificates could not be made, read or trusted; the message names the file.
public struct IdentityError: Error, Sendable, CustomStringConvertible, Equatable {
    public var message: String

    public init(_ message: String) {
        self.message = message
    }

    public var description: String { self.message }
}

/// Reading and writing PEM files: private keys are written owner-only (0600), atomically.
public enum PEMFiles {
    public static func exists(_ path: String) -> Bool {
        FileManager.default.fileExists(atPath: path)
    }

    /// The file's text; a clear error when it cannot be read.
    public static func read(_ path: String, what: String) throws -> String {
        guard let data = FileManager.default.contents(atPath: path) else {
            let reason = access(path, F_OK) != 0 ? "it does not exist" : "it is not readable by this user"
            throw IdentityError("cannot read the \(what) \(path): \(reason)")
        }
        guard let text = String(data: data, encoding: .utf8) else {
            throw IdentityError("the \(what) \(path) is not a PEM file (not text)")
        }
        return text
    }

    /// Writes `text` to `path` with `mode` (0600 for keys), replacing it atomically.
    public static func write(_ text: String, to path: String, mode: Int) throws {
        if let slash = path.lastIndex(of: "/"), slash != path.startIndex {
            try StatePaths.ensureDirectory(String(path[..<slash]))
        }
        let tmp = path + ".tmp-\(getpid())"
        let fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode_t(mode))
        guard fd >= 0 else {
            throw IdentityError("cannot write \(path): \(String(cString: strerror(errno)))")
        }
        fchmod(fd, mode_t(mode))
        let bytes = Array(text.utf8)
        var written = 0
        while written < bytes.count {
            let n = bytes[written...].withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
            if n < 0 {
                close(fd)
                unlink(tmp)
                throw IdentityError("cannot write \(path): \(String(cString: strerror(errno)))")
            }
            written += n
        }
        fsync(fd)
        close(fd)
        guard rename(tmp, path) == 0 else {
            unlink(tmp)
            throw IdentityError("cannot write \(path): \(String(cString: strerror(errno)))")
        }
    }

    /// The file's permission bits (for checks and tests).
    public static func mode(_ path: String) -> Int? {
        var st = stat()
        guard stat(path, &st) == 0 else { return nil }
        return Int(st.st_mode & 0o777)
    }
}
