// The MeshCtl module; see README.md.
