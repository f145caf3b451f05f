// The MeshSQLite module; see README.md.
