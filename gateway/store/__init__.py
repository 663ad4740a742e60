"""The embedded local store: SQLite in WAL mode, the gateway's own memory.

The API reads from it, so a box cut off from the network still serves its operators.
`schema` creates and migrates it, `writer` is the one thread that writes, `queries` reads,
`maintenance` rolls raw telemetry up into minutes and enforces retention.
"""
