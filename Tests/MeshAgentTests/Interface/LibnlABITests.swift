import Foundation
import MeshTestSupport
import Testing

/// CNetlink calls libnl through pointers it resolves with dlopen/dlsym, declared with its own prototypes so
/// that building needs no libnl headers. This checks those prototypes and constants against the installed
/// libnl headers (found with pkg-config, as scripts/bootstrap installs them): shim.c compiled with
/// -DMESH_CHECK_LIBNL_ABI static-asserts every function's type and every constant.
@Suite(.rationed) struct LibnlABITests {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().deletingLastPathComponent().path

    @Test func shimMatchesLibnlHeaders() async throws {
        let flags = try await run("/usr/bin/env", ["pkg-config", "--cflags", "libnl-route-3.0"])
        try #require(
            flags.status == 0,
            "pkg-config knows no libnl-route-3.0 (scripts/bootstrap installs libnl-route-3-dev): \(flags.stderr)"
        )
        let cflags = flags.stdout.split(whereSeparator: \.isWhitespace).map(String.init)
        #expect(cflags.contains { $0.hasSuffix("libnl3") }, "libnl's include folder comes from pkg-config: \(cflags)")
        let shim = Self.root + "/Sources/CNetlink/shim.c"
        let include = Self.root + "/Sources/CNetlink/include"
        let checked = try await run(
            "/usr/bin/env",
            ["cc", "-fsyntax-only", "-Werror", "-DMESH_CHECK_LIBNL_ABI", "-I", include] + cflags + [shim]
        )
        #expect(checked.status == 0, "shim.c disagrees with libnl's headers:\n\(checked.stderr)")
        // And the build proper needs none of them: the same file compiles without libnl's include folder.
        let plain = try await run("/usr/bin/env", ["cc", "-fsyntax-only", "-Werror", "-I", include, shim])
        #expect(plain.status == 0, "shim.c should compile without libnl's headers:\n\(plain.stderr)")
    }
}
