"""The node-wide host model cache: every fleet model packed once, in files under /dev/shm.

Each model is one file `{root}/tokenpool-{namespace}-{safe id}.bin` holding its packed bytes
(see packing.py) and a JSON index next to it (PackIndex.to_dict() plus the model id). Every
worker process on the node maps the same files with MAP_SHARED, so the bytes sit in memory
once however many workers read them, and a worker that restarts finds them still there.
A model switch is then one large copy from the mapping into the arena.

Files are written under a temporary name and renamed into place, the index last: a reader
that sees an index sees a complete model. Publishing (evict to fit, load, fill, rename) holds
a node-wide flock on `tokenpool-{namespace}.lock`, so a model missing on every worker is
read from disk once, not once per worker. Reading a resident model takes no such lock.

LRU order is node-wide: a counter in `tokenpool-{namespace}.clock` (flock'd for each
increment) stamps an entry whenever a process gets it, and the stamp is stored as the index
file's mtime, so it goes wherever the entry goes and disappears when any process evicts it.

Eviction unlinks the files. A process that still maps an evicted model keeps reading valid
bytes, and the kernel frees them when the last mapping goes. The budget therefore bounds
the published files, not those stragglers; `get` notices an evicted or replaced file and
maps the new one.

Views: `get` returns a read-only memoryview of the mapping. While any view of a model (or a
numpy array or tensor made from it) is alive, its mapping cannot be unmapped; `close` and
`evict` unmap what they can and leave the rest mapped until the caller's last view is gone.
A `fill` callback must not keep references to the buffer it was given.

Pure stdlib by design (see tests/test_architecture.py): numpy and torch wrap the views.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import mmap
import os
import re
from dataclasses import dataclass
from contextlib import contextmanager
from typing import Callable, Iterator

from tokenpool.memory.packing import PackIndex

Fill = Callable[[memoryview], None]  # writes a model's packed bytes into the buffer it gets
Loader = Callable[[str], "tuple[PackIndex, Fill]"]  # reads a model from disk on a miss

# Map every page at mmap() time, so the first switch does not take one fault per 4 KiB.
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
_NAMESPACE = re.compile(r"[A-Za-z0-9_]+")  # no '-': it separates namespace from model


class ModelTooLargeError(ValueError):
    """One model alone is larger than the cache's byte budget."""


def safe_name(model_id: str) -> str:
    """A file-name form of `model_id`; the hash keeps ids that differ only in symbols apart."""
    readable = re.sub(r"[^A-Za-z0-9._]+", "_", model_id)[:80]
    return f"{readable}-{hashlib.sha1(model_id.encode()).hexdigest()[:10]}"


@dataclass(slots=True)
class _Mapping:
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


class HostModelCache:
    def __init__(self, budget_bytes: int, namespace: str, root: str = "/dev/shm",
                 loader: Loader | None = None):
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        if not _NAMESPACE.fullmatch(namespace):
            raise ValueError(f"namespace must match {_NAMESPACE.pattern}, got {namespace!r}")
        self.budget_bytes = budget_bytes
        self.namespace = namespace
        self.root = root
        self.loader = loader
        self._prefix = f"tokenpool-{namespace}-"
        self._open: dict[str, _Mapping] = {}  # this process's mappings

    # -- paths ------------------------------------------------------------------------------

    def _path(self, model_id: str, suffix: str) -> str:
        return os.path.join(self.root, f"{self._prefix}{safe_name(model_id)}{suffix}")

    def _side_file(self, suffix: str) -> str:
        return os.path.join(self.root, f"tokenpool-{self.namespace}{suffix}")

    # -- queries ----------------------------------------------------------------------------

    def contains(self, model_id: str) -> bool:
        return os.path.exists(self._path(model_id, ".json"))

    def model_ids(self) -> list[str]:
        """Resident models, least recently used first."""
        return [model_id for model_id, _, _ in self._resident()]

    @property
    def used_bytes(self) -> int:
        return sum(nbytes for _, nbytes, _ in self._resident())

    def _resident(self) -> list[tuple[str, int, int]]:
        """(model id, bytes, LRU stamp) of every published entry, oldest stamp first."""
        rows = []
        for entry in os.scandir(self.root):
            if not (entry.name.startswith(self._prefix) and entry.name.endswith(".json")):
                continue  # another namespace, a data file, or a write in progress
            try:
                with open(entry.path) as f:
                    model_id = json.load(f)["model_id"]
                stamp = os.stat(entry.path).st_mtime_ns
                nbytes = os.stat(self._path(model_id, ".bin")).st_size
            except FileNotFoundError:
                continue  # evicted by another process while we looked
            rows.append((model_id, nbytes, stamp))
        return sorted(rows, key=lambda row: (row[2], row[0]))

    # -- reading ----------------------------------------------------------------------------

    def get(self, model_id: str) -> tuple[PackIndex, memoryview]:
        """The model's index and a zero-copy read-only view of its bytes; loads it on a miss."""
        mapping = self._open.get(model_id)
        if mapping is not None and not self._still_published(model_id, mapping):
            self._forget(model_id)
            mapping = None
        if mapping is None:
            mapping = self._map(model_id)
        if mapping is None:
            if self.loader is None:
                raise KeyError(f"model {model_id!r} is not in the host cache "
                               f"{self.namespace!r} and no loader was given")
            self._load_once(model_id)
            mapping = self._map(model_id)
            if mapping is None:
                raise KeyError(f"model {model_id!r} was evicted right after loading; "
                               f"the host cache budget is too small for concurrent use")
        self._touch(model_id)
        return mapping.index, mapping.view()

    def _still_published(self, model_id: str, mapping: _Mapping) -> bool:
        try:
            st = os.stat(self._path(model_id, ".bin"))
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == mapping.identity

    def _map(self, model_id: str) -> _Mapping | None:
        """Map the published files of `model_id`, or None when they are not there."""
        try:
            with open(self._path(model_id, ".json")) as f:
                index = PackIndex.from_dict(json.load(f))
            fd = os.open(self._path(model_id, ".bin"), os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            st = os.fstat(fd)
            mm = (mmap.mmap(fd, index.nbytes, flags=_MAP_FLAGS, prot=mmap.PROT_READ)
                  if index.nbytes else None)
        finally:
            os.close(fd)  # the mapping keeps the file's pages; the descriptor is not needed
        mapping = _Mapping(index, mm, (st.st_dev, st.st_ino))
        self._open[model_id] = mapping
        return mapping

    def _touch(self, model_id: str) -> None:
        try:
            stamp = self._tick()
            os.utime(self._path(model_id, ".json"), ns=(stamp, stamp))
        except FileNotFoundError:
            pass  # evicted meanwhile; our mapping stays valid

    def _tick(self) -> int:
        """The next value of the node-wide LRU counter."""
        with _flocked(self._side_file(".clock")) as fd:
            raw = os.pread(fd, 8, 0)
            stamp = int.from_bytes(raw, "little") + 1 if len(raw) == 8 else 1
            os.pwrite(fd, stamp.to_bytes(8, "little"), 0)
            return stamp

    # -- writing ----------------------------------------------------------------------------

    def put(self, model_id: str, index: PackIndex, fill: Fill) -> None:
        """Publish a model: evict LRU entries to fit, write it via `fill`, rename into place."""
        self._check_fits(model_id, index.nbytes)
        with _flocked(self._side_file(".lock")):
            self._publish(model_id, index, fill)

    def _load_once(self, model_id: str) -> None:
        """Load through the loader unless another process published it while we waited."""
        with _flocked(self._side_file(".lock")):
            if self.contains(model_id):
                return
            index, fill = self.loader(model_id)
            self._check_fits(model_id, index.nbytes)
            self._publish(model_id, index, fill)

    def _check_fits(self, model_id: str, nbytes: int) -> None:
        if nbytes > self.budget_bytes:
            raise ModelTooLargeError(f"model {model_id!r} needs {nbytes} B, more than the "
                                     f"host cache budget of {self.budget_bytes} B")

    def _publish(self, model_id: str, index: PackIndex, fill: Fill) -> None:
        """Called with the publish lock held."""
        self.evict(model_id)  # a reader must never pair the old index with the new bytes
        self._make_room(model_id, index.nbytes)
        tmp = self._path(model_id, f".bin.tmp{os.getpid()}")
        try:
            _write_file(tmp, index.nbytes, fill, model_id)
            os.replace(tmp, self._path(model_id, ".bin"))
        except BaseException:
            _unlink(tmp)
            raise
        tmp = self._path(model_id, f".json.tmp{os.getpid()}")
        try:
            with open(tmp, "w") as f:
                json.dump({"model_id": model_id, **index.to_dict()}, f)
            stamp = self._tick()
            os.utime(tmp, ns=(stamp, stamp))
            os.replace(tmp, self._path(model_id, ".json"))  # the entry is complete from here
        except BaseException:
            _unlink(tmp)
            _unlink(self._path(model_id, ".bin"))  # unindexed bytes would escape the budget
            raise

    def _make_room(self, model_id: str, nbytes: int) -> None:
        resident = self._resident()
        used = sum(size for _, size, _ in resident)
        for victim, size, _ in resident:  # oldest first
            if used + nbytes <= self.budget_bytes:
                break
            self.evict(victim)
            used -= size

    # -- removal ----------------------------------------------------------------------------

    def evict(self, model_id: str) -> bool:
        """Unlink a model's files (the index first: it marks the entry complete)."""
        was_resident = _unlink(self._path(model_id, ".json"))
        _unlink(self._path(model_id, ".bin"))
        self._forget(model_id)
        return was_resident

    def _forget(self, model_id: str) -> None:
        mapping = self._open.pop(model_id, None)
        if mapping is not None:
            mapping.try_close()

    def close(self) -> list[str]:
        """Unmap this process's mappings. Returns the models whose views the caller still
        holds: those stay mapped (safely) until the last view is released."""
        still_viewed = [model_id for model_id, mapping in self._open.items()
                        if not mapping.try_close()]
        self._open.clear()
        return still_viewed

    def destroy(self) -> None:
        """Close, then unlink every file of this namespace, the lock and clock included."""
        self.close()
        for entry in os.scandir(self.root):
            if entry.name.startswith(self._prefix) or entry.name in (
                    f"tokenpool-{self.namespace}.lock", f"tokenpool-{self.namespace}.clock"):
                _unlink(entry.path)


@contextmanager
def _flocked(path: str) -> Iterator[int]:
    """An exclusive flock on `path` for the `with` block; yields the descriptor."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)  # releases the flock


def _write_file(path: str, nbytes: int, fill: Fill, model_id: str) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        if nbytes == 0:
            fill(memoryview(bytearray()))
            return
        # Reserve the pages now: on a full tmpfs this fails with ENOSPC, where a sparse file
        # would SIGBUS the writer halfway through fill.
        os.posix_fallocate(fd, 0, nbytes)
        mm = mmap.mmap(fd, nbytes, flags=_MAP_FLAGS)  # one populate beats a fault a page
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


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
