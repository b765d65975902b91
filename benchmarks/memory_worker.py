"""Worker for the memory comparison: ``python -m benchmarks.memory_worker NAME CONFIG_JSON``.

Runs one registered memory contender in this (fresh) process and prints its measurements as one JSON
line; a failure is printed as ``{"error": "..."}`` so the comparison can report it.
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    name, cfg = argv[0], json.loads(argv[1])
    try:
        from benchmarks.comparisons.memory import MEMORY_CONTENDERS
        from benchmarks.harness import discover

        if name not in MEMORY_CONTENDERS:
            discover()  # registered by another benchmark module (imported only then: keeps this process lean)
        if name not in MEMORY_CONTENDERS:
            raise KeyError(f"no memory contender {name!r}; known: {sorted(MEMORY_CONTENDERS)}")
        out = MEMORY_CONTENDERS[name][0](cfg)
    except Exception as exc:  # noqa: BLE001 - reported by the parent
        from benchmarks.harness import format_error

        print(json.dumps({"error": format_error(exc)}), flush=True)
        return 0
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
