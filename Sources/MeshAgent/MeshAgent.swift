// The MeshAgent module; see README.md.
