"""How much RAM and disk the cache may take: parsing the sizes users write, and the defaults.

Defaults: a quarter of the RAM available at fit start and a quarter of the free space of the disk that
holds the run directory, each divided by the processes on the machine; the disk tier never leaves the
file system with less than :func:`lightning_freeze.cache.disk.keep_free` bytes.

>>> parse_bytes("2GiB"), parse_bytes("1.5 MB"), parse_bytes(0.5, available=1000), parse_bytes(0)
(2147483648, 1500000, 500, 0)
"""

from __future__ import annotations

import math
import re

DEFAULT_RAM_FRACTION = 0.25
DEFAULT_DISK_FRACTION = 0.25

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(
    value: int | float | str | None, available: int | None = None, option: str = "max_bytes"
) -> int | None:
    """``None`` -> None (use the default); ``int`` bytes; ``"512MB"``/``"2GiB"``; a float in (0, 1) is a
    fraction of ``available`` bytes. A float of 1 or more must be whole (``1.5`` is neither a fraction
    nor a byte count: write ``"1.5GB"``)."""
    where = f"FrozenPrefixCache: {option}"
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{where} must be a size, got {value!r}")
    if isinstance(value, float) and 0 < value < 1:
        if available is None:
            raise ValueError(f"{where}: a fraction needs the available bytes")
        return int(value * available)
    if isinstance(value, (int, float)):
        if value < 0 or not math.isfinite(value) or value != int(value):
            raise ValueError(
                f"{where}={value!r} is neither a fraction of the available bytes (a number in (0, 1)) nor a "
                "whole number of bytes; write e.g. 0.25, 2000000000 or '2GB'"
            )
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"{where}: cannot read {value!r}; give bytes (int) or e.g. '512MB', '2GiB'")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def available_ram() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - psutil missing or unsupported: assume 4 GB
        return 4 << 30


def ram_budget(max_bytes: int | float | str | None, processes: int) -> int:
    """The RAM tier's budget in bytes for one process."""
    available = available_ram()
    explicit = parse_bytes(max_bytes, available=available)
    if explicit is not None:
        return explicit
    return int(DEFAULT_RAM_FRACTION * available / max(1, processes))


def disk_budget(max_disk_bytes: int | float | str | None, free: int, processes: int) -> int:
    """The disk tier's budget in bytes for one process, given the ``free`` bytes of its file system."""
    explicit = parse_bytes(max_disk_bytes, available=free, option="max_disk_bytes")
    if explicit is not None:
        return explicit
    return int(DEFAULT_DISK_FRACTION * free / max(1, processes))
