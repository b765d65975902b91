"""The app's checkpoints: where they go, which one a resume starts from, and whether a file is one at all.

``checkpoint`` (a ``ModelCheckpoint`` node, ``dirpath: null`` = ``<run dir>/checkpoints``) writes periodic
checkpoints and ``last.ckpt``. ``resume=last`` continues from the newest ``last*.ckpt`` there (a fresh start
when there is none yet: the first attempt of an auto-requeued job); ``ckpt_path=<file>`` from that file. A
file that is missing, empty, truncated or corrupt is refused before anything is built, naming the option.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

from lightning_freeze.app.arguments import ConfigError

__all__ = ["RESUME_CHOICES", "check_checkpoint_file", "checkpoint_dir", "newest_checkpoint"]

RESUME_CHOICES = (None, "last")


def checkpoint_dir(node: Any, run_dir: Path) -> Path:
    """The directory the ``checkpoint`` node writes to.

    Args:
        node: the ``checkpoint`` config node (or None): its ``dirpath`` when set.
        run_dir: the run directory; the default is ``<run dir>/checkpoints``.
    """
    dirpath = node.get("dirpath") if node is not None and hasattr(node, "get") else None
    return Path(dirpath) if dirpath else run_dir / "checkpoints"


def newest_checkpoint(directory: Path, pattern: str = "*.ckpt") -> Path | None:
    """The most recently written checkpoint in a directory (None when there is none).

    Args:
        directory: where to look (a missing directory holds none).
        pattern: the file names to consider, e.g. ``last*.ckpt``.
    """
    if not directory.is_dir():
        return None
    found = [p for p in directory.glob(pattern) if p.is_file()]
    return max(found, key=lambda p: (p.stat().st_mtime_ns, p.name)) if found else None


def check_checkpoint_file(path: str | Path, option: str) -> Path:
    """A readable, complete PyTorch checkpoint file, or a :class:`ConfigError` naming ``option``.

    PyTorch writes checkpoints as zip archives: every member's CRC is checked (a truncated or corrupted file
    fails here, not with ``UnicodeDecodeError`` or ``OSError: Invalid argument`` inside ``torch.load``).
    Nothing is unpickled.

    Args:
        path: the checkpoint file.
        option: the config option that named it (``ckpt_path``), named by the error.

    Raises:
        ConfigError: the file is missing, a directory, empty, truncated or corrupt.
    """
    file = Path(path)
    if not file.exists():
        raise ConfigError(f"{option}={str(path)!r}: no such file; fix `{option}`")
    if not file.is_file():
        raise ConfigError(f"{option}={str(path)!r} is a directory, not a checkpoint file; fix `{option}`")
    if file.stat().st_size == 0:
        raise ConfigError(f"{option}={str(path)!r} is empty (an interrupted save?); pick another checkpoint")
    try:
        with zipfile.ZipFile(file) as archive:
            bad = archive.testzip()
            has_pickle = any(name.endswith("data.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise ConfigError(
            f"{option}={str(path)!r} is not a complete PyTorch checkpoint (truncated or corrupt: {err}); "
            "pick another checkpoint"
        ) from None
    if bad is not None or not has_pickle:
        what = f"member {bad!r} is corrupt" if bad is not None else "it holds no pickled state"
        raise ConfigError(
            f"{option}={str(path)!r} is not a usable PyTorch checkpoint: {what}; pick another checkpoint"
        )
    return file
