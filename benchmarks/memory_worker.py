"""Worker for the memory comparison: ``python -m benchmarks.memory_worker CONFIG_JSON NAME [NAME ...]``.

Runs the registered memory contenders named, one after the other, in this (fresh) process and prints one JSON
line per contender (``{"name": ..., <measurements>}``); a failure is printed as ``{"name": ..., "error": "..."}``
so the comparison can report it. The full benchmark names one contender per process; quick mode names them all
in one process, whose peak is reset before each (see :func:`benchmarks.comparisons.memory.measure`).
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    cfg, names = json.loads(argv[0]), argv[1:]
    for name in names:
        try:
            from benchmarks.comparisons.memory import MEMORY_CONTENDERS
            from benchmarks.harness import discover

            if name not in MEMORY_CONTENDERS:
                discover()  # registered by another benchmark module (imported only then: keeps this process lean)
            if name not in MEMORY_CONTENDERS:
                raise KeyError(f"no memory contender {name!r}; known: {sorted(MEMORY_CONTENDERS)}")
            out = {"name": name, **MEMORY_CONTENDERS[name][0](cfg)}
        except Exception as exc:  # noqa: BLE001 - reported by the parent
            from benchmarks.harness import format_error

            out = {"name": name, "error": format_error(exc)}
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
