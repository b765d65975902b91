from benchmarks.bench_freezeout import run  # noqa: F401 - registers the "freezeout" comparison
