// The Control module; see README.md.
