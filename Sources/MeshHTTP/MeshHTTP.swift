// The MeshHTTP module; see README.md.
