import ArgumentParser
import Foundation
import MeshClient
import MeshCore
import MeshCtl
import MeshHTTP

// meshctl apply, get, delete and watch: objects of the control API.

struct Apply: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Create or update objects from YAML or JSON manifests (several documents per file)."
    )

    @OptionGroup var server: ServerOptions

    @Option(
        name: [.short, .customLong("filename")],
        help: "A file, a directory of *.yaml/*.yml/*.json, or - for stdin."
    )
    var files: [String]

    @Option(name: .shortAndLong, help: "Print the stored objects as json instead of a line each.")
    var output: String?

    func run() async throws {
        guard !self.files.isEmpty else { throw ValidationError("give at least one -f FILE") }
        let ops = try self.server.operations()
        let docs: [ManifestDocument]
        do {
            docs = try Manifests.load(self.files)
        } catch {
            // A bad file is not a usage error: its message, exit 1.
            FileHandle.standardError.write(Data("error: \(ops.explain(error))\n".utf8))
            throw ExitCode.failure
        }
        if docs.isEmpty { throw ValidationError("no objects in \(self.files.joined(separator: ", "))") }
        if !(await ops.apply(docs, outputJSON: self.output == "json")) { throw ExitCode.failure }
    }
}

struct Get: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show objects: meshctl get services [NAME] [-n NS | -A] [-o table|wide|json|yaml|name] [-l k=v]."
    )

    @OptionGroup var server: ServerOptions

    @Argument(help: ObjectScope.kindHelp)
    var kind: String

    @Argument(help: "One object's name; all when omitted.")
    var name: String?

    @OptionGroup var scope: ObjectScope

    @Option(name: .shortAndLong, help: "table, wide, json, yaml or name.")
    var output: OutputFormat = .table

    func run() async throws {
        let type = try Self.kindOrThrow(self.kind)
        let ops = try self.server.operations()
        let ok = await ops.get(
            type,
            name: self.name,
            namespace: self.scope.namespace,
            allNamespaces: self.scope.allNamespaces,
            selector: self.scope.selector,
            format: self.output
        )
        if !ok { throw ExitCode.failure }
    }

    static func kindOrThrow(_ kind: String) throws -> ResourceType {
        do {
            return try Operations.kind(kind)
        } catch let e as ManifestError {
            throw ValidationError(e.message)
        }
    }
}

/// Which objects `get` and `watch` show: one namespace, every namespace, and a label selector.
struct ObjectScope: ParsableArguments {
    /// The kinds `get` and `watch` take, with their short names.
    static let kindHelp = ArgumentHelp(
        "services (svc), endpoints (ep), nodes (no), relays, workloads (wl), devices (dev) or devicemodels (dm)."
    )

    @Option(name: .shortAndLong, help: "Namespace (default: default).")
    var namespace: String?

    @Flag(name: [.customShort("A"), .customLong("all-namespaces")], help: "Every namespace.")
    var allNamespaces = false

    @Option(name: [.customShort("l"), .customLong("selector")], help: "Label selector, e.g. app=web,tier!=db.")
    var selector: String?
}

struct Delete: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Delete objects by name (meshctl delete svc web -n shop) or from manifests (-f)."
    )

    @OptionGroup var server: ServerOptions

    @Argument(help: "KIND NAME... (omit with -f).")
    var args: [String] = []

    @Option(name: [.short, .customLong("filename")], help: "Delete the objects these manifests name.")
    var files: [String] = []

    @Option(name: .shortAndLong, help: "Namespace (default: default).")
    var namespace: String?

    @Flag(name: .long, help: "Succeed when an object is already gone.")
    var ignoreNotFound = false

    func run() async throws {
        let ops = try self.server.operations()
        if !self.files.isEmpty {
            guard self.args.isEmpty else { throw ValidationError("give either -f FILE or KIND NAME, not both") }
            let docs: [ManifestDocument]
            do {
                docs = try Manifests.load(self.files)
            } catch {
                // A bad file is not a usage error: its message, exit 1.
                FileHandle.standardError.write(Data("error: \(ops.explain(error))\n".utf8))
                throw ExitCode.failure
            }
            if !(await ops.delete(docs, ignoreNotFound: self.ignoreNotFound)) { throw ExitCode.failure }
            return
        }
        guard self.args.count >= 2 else { throw ValidationError("give KIND and at least one NAME, or -f FILE") }
        let type = try Get.kindOrThrow(self.args[0])
        let ok = await ops.delete(
            type,
            names: Array(self.args.dropFirst()),
            namespace: self.namespace,
            ignoreNotFound: self.ignoreNotFound
        )
        if !ok { throw ExitCode.failure }
    }
}

struct Watch: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Print changes to objects as they happen (Ctrl-C stops)."
    )

    @OptionGroup var server: ServerOptions

    @Argument(help: ObjectScope.kindHelp)
    var kind: String

    @OptionGroup var scope: ObjectScope

    @Option(name: .shortAndLong, help: "table (a line per change), json (one event per line) or yaml.")
    var output: OutputFormat = .table

    @Option(name: .long, help: "Stop after this many changes (the current objects count as ADDED changes).")
    var maxEvents: Int?

    func run() async throws {
        let type = try Get.kindOrThrow(self.kind)
        let ops = try self.server.operations()
        let ok = await ops.watch(
            type,
            namespace: self.scope.namespace,
            allNamespaces: self.scope.allNamespaces,
            selector: self.scope.selector,
            format: self.output,
            maxEvents: self.maxEvents
        )
        if !ok { throw ExitCode.failure }
    }
}
