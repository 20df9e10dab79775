"""The host cache's file operations: locked, pre-reserved, populated mappings of /dev/shm files.

Pure stdlib, as the rest of memory/ (tests/test_architecture.py).
"""

from __future__ import annotations

import fcntl
import mmap
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from tokenpool.memory.packing import PackIndex

Fill = Callable[[memoryview], None]  # writes a model's packed bytes into the buffer it gets


def map_flags() -> int:
    """Map every page at mmap() time, so the first switch does not take one fault per 4 KiB."""
    return mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)


@dataclass(slots=True)
class MappedModel:
    index: PackIndex
    mm: mmap.mmap | None  # None for an empty model: mmap cannot map zero bytes
    identity: tuple[int, int]  # (st_dev, st_ino) of the file mapped, to spot a replaced one

    def view(self) -> memoryview:
        if self.mm is None:
            return memoryview(b"")
        # The mapping is PROT_READ; a read-only view makes writes an error, not a SIGSEGV.
        return memoryview(self.mm).toreadonly()

    def try_close(self) -> bool:
        """Unmap unless views are still exported; those keep the mmap alive until released."""
        if self.mm is None:
            return True
        try:
            self.mm.close()
        except BufferError:
            return False
        return True


@contextmanager
def flocked(path: str) -> Iterator[int]:
    """An exclusive flock on `path` for the `with` block; yields the descriptor."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)  # releases the flock


def write_file(path: str, nbytes: int, fill: Fill, model_id: str) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        if nbytes == 0:
            fill(memoryview(bytearray()))
            return
        # Reserve the pages now: on a full tmpfs this fails with ENOSPC, where a sparse file
        # would SIGBUS the writer halfway through fill.
        os.posix_fallocate(fd, 0, nbytes)
        mm = mmap.mmap(fd, nbytes, flags=map_flags())  # one populate beats a fault a page
    finally:
        os.close(fd)
    view = memoryview(mm)
    try:
        fill(view)
    finally:
        _unmap_after_fill(mm, view, model_id)


def _unmap_after_fill(mm: mmap.mmap, view: memoryview, model_id: str) -> None:
    try:
        view.release()
        mm.close()
    except BufferError:
        raise RuntimeError(f"fill for model {model_id!r} kept a reference to its buffer; "
                           f"it must drop every view before returning") from None


def unlink(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
