// The MeshClient module; see README.md.
