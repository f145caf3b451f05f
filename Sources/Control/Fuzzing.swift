import Foundation
import MeshCore
import MeshHTTP

/// The control plane's parsers, for the libFuzzer target `mesh-fuzz` (scripts/fuzz api): request
/// bodies (JSON), manifests (YAML), label selectors, request targets, times, addresses and config
/// files. Each must return or throw its typed error for any input, never crash or hang.
@_spi(Fuzzing)
public enum APIFuzzing {
    public static func fuzzOne(_ bytes: UnsafeRawBufferPointer) {
        guard let selector = bytes.first else { return }
        let rest = Data(bytes.dropFirst())
        let text = String(decoding: rest, as: UTF8.self)
        switch selector % 6 {
        case 0:
            // A request body as the API reads it.
            if let value = try? JSONValue.parse(json: rest) {
                _ = try? Registry.object(from: value)
                _ = value.jsonData()
            }
            // The join, token and renewal payloads go through the same strict decoding.
            _ = try? SecurityPayloads.decode(JoinRequest.self, json: rest)
            _ = try? SecurityPayloads.decode(BootstrapTokenRequest.self, json: rest)
            _ = try? SecurityPayloads.decode(CertificateRenewalRequest.self, json: rest)
            if let text = String(data: rest, encoding: .utf8) { _ = JoinTokens.parse(text) }
        case 1:
            // A manifest file as meshctl reads it.
            if let docs = try? Strict.documents(yaml: text) {
                for doc in docs { _ = try? Registry.object(from: doc) }
            }
        case 2:
            _ = try? LabelSelector(parsing: text)
            _ = HTTPRequest.split(text)
        case 3:
            _ = Timestamp.parse(text)
            _ = IPAddress(text)?.reverseName
            _ = CIDR(text)?.description
            _ = try? ListenAddress(text, field: "f")
        case 4:
            if let config = try? ConfigFile.decode(ControlConfig.self, yaml: text) { _ = try? config.validate() }
        default:
            _ = HTTPEndpoint(url: text)
            _ = HTTPRequest.percentDecode(text, plusIsSpace: true)
        }
    }
}
