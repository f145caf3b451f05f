import Foundation
import MeshCore
import MeshTestSupport
import Testing

/// `meshctl apply -f` of manifests nested 10,000 deep: it crashed (exit 139); now a clear error, exit 1.
@Suite(.rationed) struct DeepManifestTests {
    let bin = binaryDirectory()

    @Test func meshctlRefusesDeeplyNestedManifestsWithExit1() async throws {
        let dir = TempDir()
        // Credentials of a throwaway CA: meshctl wants some before it reads the files.
        try seedNodeCredentials(stateDir: dir.path, nodeName: "edge-test")
        let pki = dir.path + "/pki"
        let files = [
            "flow.yaml": String(repeating: "[", count: 10_000) + String(repeating: "]", count: 10_000),
            "block.yaml": "apiVersion: mesh.edge/v1\nkind: Service\nspec:\n  x:\n    "
                + String(repeating: "- ", count: 10_000)
                + "1\n",
            "deep.json": "{\"apiVersion\":\"mesh.edge/v1\",\"kind\":\"Service\",\"spec\":"
                + String(repeating: "{\"a\":", count: 10_000) + "1" + String(repeating: "}", count: 10_001),
        ]
        for (file, text) in files.sorted(by: { $0.key < $1.key }) {
            let path = dir.path + "/" + file
            try text.write(toFile: path, atomically: true, encoding: .utf8)
            // No control plane: the manifest is refused before anything is sent.
            let r = try await run(
                self.bin + "/meshctl",
                [
                    "apply", "-f", path, "--server", "https://127.0.0.1:\(freePort())",
                    "--certificate-authority", pki + "/ca.crt", "--client-certificate", pki + "/node.crt",
                    "--client-key", pki + "/node.key",
                ],
                environment: ["XDG_CONFIG_HOME": dir.path + "/xdg-config", "XDG_STATE_HOME": dir.path + "/xdg-state"]
            )
            #expect(r.status == 1, "\(file): exit \(r.status), \(r.stderr)")
            #expect(
                r.stderr.contains("\(path): line ") && r.stderr.contains("nest deeper than \(Strict.maxDepth) levels"),
                "\(file): \(r.stderr)"
            )
        }
    }
}
