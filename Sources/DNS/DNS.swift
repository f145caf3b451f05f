// The DNS module; see README.md.
