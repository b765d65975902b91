"""How much RAM and disk the cache may take: parsing the sizes users write, and the defaults.

A size is whole bytes, a string with a unit, or a fraction of what is available. A fraction (the defaults
too: a quarter of the RAM available at fit start, a quarter of the free space of the disk that holds the
run directory) is divided by the processes on the machine, since they all draw on the same RAM and disk.
The disk tier never leaves the file system with less than :func:`lightning_freeze.cache.disk.keep_free`
bytes.

>>> [share(v, available=1000, processes=2, default=0.25) for v in ("2GiB", "1.5 MB", 0.5, 0, None)]
[2147483648, 1500000, 250, 0, 125]
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


def check_size(value: int | float | str | None, option: str) -> int | float | str | None:
    """``value`` as given, once it is a size :func:`share` can read: None, whole bytes, a string such as
    ``"512MB"``/``"2GiB"``, or a fraction in (0, 1). A float of 1 or more must be whole (``1.5`` is neither a
    fraction nor a byte count: write ``"1.5GB"``)."""
    where = f"FrozenPrefixCache: {option}"
    if value is None or (isinstance(value, float) and 0 < value < 1):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{where} must be a size, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0 or not math.isfinite(value) or value != int(value):
            raise ValueError(
                f"{where}={value!r} is neither a fraction of the available bytes (a number in (0, 1)) nor a "
                "whole number of bytes; write e.g. 0.25, 2000000000 or '2GB'"
            )
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"{where}: cannot read {value!r}; give bytes (int) or e.g. '512MB', '2GiB'")
    return value


def share(value: int | float | str | None, available: int, processes: int, default: float) -> int:
    """The bytes one process may take: an absolute size as given, or a fraction (``default`` for None) of the
    ``available`` bytes divided by the ``processes`` on this machine (they all draw on the same RAM and disk)."""
    if value is None:
        value = default
    if isinstance(value, float) and 0 < value < 1:
        return int(value * available / max(1, processes))
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        assert match is not None, "checked by check_size"
        return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    return int(value)


def available_ram() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - psutil missing or unsupported: assume 4 GB
        return 4 << 30
