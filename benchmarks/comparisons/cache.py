from benchmarks.bench_cache import run  # noqa: F401 - registers the "cache" comparison
