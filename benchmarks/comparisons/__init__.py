"""One module per comparison; ``benchmarks.harness.discover()`` imports them all (each registers itself)."""

from benchmarks import bench_unfreezing  # noqa: E402,F401  (registers "unfreezing"; the module lives in benchmarks/)
