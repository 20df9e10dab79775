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

import hashlib
import json
import mmap
import os
import re
from typing import Callable

from tokenpool.memory.host_files import (Fill, MappedModel, flocked, map_flags, unlink,
                                         write_file)
from tokenpool.memory.packing import PackIndex

Loader = Callable[[str], "tuple[PackIndex, Fill]"]  # reads a model from disk on a miss

_NAMESPACE = re.compile(r"[A-Za-z0-9_]+")  # no '-': it separates namespace from model


class ModelTooLargeError(ValueError):
    """One model alone is larger than the cache's byte budget."""


def safe_name(model_id: str) -> str:
    """A file-name form of `model_id`; the hash keeps ids that differ only in symbols apart."""
    readable = re.sub(r"[^A-Za-z0-9._]+", "_", model_id)[:80]
    return f"{readable}-{hashlib.sha1(model_id.encode()).hexdigest()[:10]}"


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
        self._open: dict[str, MappedModel] = {}  # this process's mappings

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

    def _still_published(self, model_id: str, mapping: MappedModel) -> bool:
        try:
            st = os.stat(self._path(model_id, ".bin"))
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == mapping.identity

    def _map(self, model_id: str) -> MappedModel | None:
        """Map the published files of `model_id`, or None when they are not there."""
        try:
            with open(self._path(model_id, ".json")) as f:
                index = PackIndex.from_dict(json.load(f))
            fd = os.open(self._path(model_id, ".bin"), os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            st = os.fstat(fd)
            mm = (mmap.mmap(fd, index.nbytes, flags=map_flags(), prot=mmap.PROT_READ)
                  if index.nbytes else None)
        finally:
            os.close(fd)  # the mapping keeps the file's pages; the descriptor is not needed
        mapping = MappedModel(index, mm, (st.st_dev, st.st_ino))
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
        with flocked(self._side_file(".clock")) as fd:
            raw = os.pread(fd, 8, 0)
            stamp = int.from_bytes(raw, "little") + 1 if len(raw) == 8 else 1
            os.pwrite(fd, stamp.to_bytes(8, "little"), 0)
            return stamp

    # -- writing ----------------------------------------------------------------------------

    def put(self, model_id: str, index: PackIndex, fill: Fill) -> None:
        """Publish a model: evict LRU entries to fit, write it via `fill`, rename into place."""
        self._check_fits(model_id, index.nbytes)
        with flocked(self._side_file(".lock")):
            self._publish(model_id, index, fill)

    def _load_once(self, model_id: str) -> None:
        """Load through the loader unless another process published it while we waited."""
        with flocked(self._side_file(".lock")):
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
            write_file(tmp, index.nbytes, fill, model_id)
            os.replace(tmp, self._path(model_id, ".bin"))
        except BaseException:
            unlink(tmp)
            raise
        tmp = self._path(model_id, f".json.tmp{os.getpid()}")
        try:
            with open(tmp, "w") as f:
                json.dump({"model_id": model_id, **index.to_dict()}, f)
            stamp = self._tick()
            os.utime(tmp, ns=(stamp, stamp))
            os.replace(tmp, self._path(model_id, ".json"))  # the entry is complete from here
        except BaseException:
            unlink(tmp)
            unlink(self._path(model_id, ".bin"))  # unindexed bytes would escape the budget
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
        was_resident = unlink(self._path(model_id, ".json"))
        unlink(self._path(model_id, ".bin"))
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
                unlink(entry.path)
