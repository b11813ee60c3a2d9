"""Reports built from the ledger (pure: rows in, rows out), shared by the CLI and the server."""
