"""The disk tier of the cache: row chunks in memory-mapped files in the run directory.

Each chunk is one file, reserved on disk in full when it is created (``posix_fallocate``), so a full
disk shows up as "no more chunks" and never as a crash when a page is written later. Files are created
only while the tier's budget allows it and the file system keeps ``reserve`` bytes free, and they are
deleted when the tier is released (end of fit, a dropped cache, an exception).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

#: free space a chunk must leave on the file system: max(1 GiB, 5% of its size)
MIN_FREE_BYTES = 1 << 30
MIN_FREE_FRACTION = 0.05


def _existing(directory: str | os.PathLike[str]) -> Path:
    """``directory``, or its nearest ancestor that exists (where the file system can be asked)."""
    path = Path(directory).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def keep_free(directory: str | os.PathLike[str]) -> int:
    """Bytes the disk tier never takes from the file system that holds ``directory``."""
    total = shutil.disk_usage(_existing(directory)).total
    return max(MIN_FREE_BYTES, int(MIN_FREE_FRACTION * total))


def free_bytes(directory: str | os.PathLike[str]) -> int:
    return shutil.disk_usage(_existing(directory)).free


class DiskTier:
    """Chunk files of at most ``budget`` bytes in all, under a fresh folder in ``directory``.

    Nothing is created on disk until the first chunk is; :meth:`release` removes what was created.
    """

    def __init__(self, directory: str | os.PathLike[str], budget: int, reserve: int | None = None) -> None:
        self.parent = Path(directory)
        self.folder: Path | None = None
        self.made_parents: list[Path] = []  # folders created for the tier, removed again if left empty
        self.budget = int(budget)
        self.reserve = keep_free(directory) if reserve is None else int(reserve)
        self.allocated = 0
        self.files: list[Path] = []
        self.made = 0  # chunk files created so far (names are never reused)
        self.full = False

    def _folder(self) -> Path:
        if self.folder is None:
            missing = []
            path = self.parent.absolute()
            while not path.exists():
                missing.append(path)
                path = path.parent
            self.parent.mkdir(parents=True, exist_ok=True)
            self.made_parents = missing
            self.folder = Path(tempfile.mkdtemp(prefix=f"rows-{os.getpid()}-", dir=self.parent))
        return self.folder

    def room(self) -> int:
        """Bytes a new chunk may take now."""
        if self.full:
            return 0
        try:
            free = free_bytes(self.parent) - self.reserve
        except OSError:
            return 0
        return max(0, min(self.budget - self.allocated, free))

    def allocate(self, nbytes: int) -> np.memmap | None:
        """A new chunk file of ``nbytes`` bytes, reserved on disk and mapped; None when it does not fit."""
        if nbytes <= 0 or nbytes > self.room():
            self.full = True
            return None
        path = self._folder() / f"chunk-{self.made:05d}.bin"
        self.made += 1
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, nbytes)
            else:  # pragma: no cover - macOS/Windows: write the file out
                os.ftruncate(fd, nbytes)
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            self.full = True
            return None
        os.close(fd)
        self.files.append(path)
        self.allocated += nbytes
        return np.memmap(path, dtype=np.uint8, mode="r+", shape=(nbytes,))

    def free(self, mapping: np.memmap) -> None:
        """Delete one chunk's file (its mapping stays readable until dropped)."""
        path = Path(mapping.filename)
        if path in self.files:
            self.files.remove(path)
            self.allocated -= int(mapping.shape[0])
            self.full = False
            path.unlink(missing_ok=True)

    def release(self) -> None:
        """Delete every chunk file and the folders made for them (mapped chunks stay readable until dropped)."""
        for path in self.files:
            path.unlink(missing_ok=True)
        self.files = []
        self.allocated = 0
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
        for path in self.made_parents:  # innermost first
            try:
                path.rmdir()
            except OSError:
                break  # not empty: someone else's files are there


def drop_from_page_cache(folder: str | os.PathLike[str]) -> None:
    """Ask the kernel to forget the cached pages of every file under ``folder`` (benchmarks: cold reads)."""
    for path in Path(folder).rglob("*"):
        if not path.is_file():
            continue
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            continue
        try:
            os.fdatasync(fd)  # dirty pages cannot be dropped
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
