"""One module per comparison; ``benchmarks.harness.discover()`` imports them all (each registers itself)."""
