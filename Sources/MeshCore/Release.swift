/// The release every component reports (`meshctl version`, the agent's `/status`, the control plane's
/// `/version`).
public enum MeshRelease {
    public static let version = "0.1.0"
}
