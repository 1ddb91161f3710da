"""The consumer-group runtime: key-ordered parallel workers, commits, shaping, retries, dead letters."""
