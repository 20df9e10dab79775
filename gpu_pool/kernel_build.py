"""Build a C++ torch extension once per machine, safe against concurrent and killed builders.

torch's `load` guards its build directory with a lock *file* that only the builder deletes.
A builder killed mid-build (a worker process killed by a crash, a test or an operator) leaves
that file behind, and every later `load` of the extension on the machine waits on it forever:
a server whose workers never finish starting. Here builders are serialised by flock(2)
instead, which the kernel releases when its holder dies, so a lock file found while holding
the flock is stale and is removed before torch looks for it.

The build directory is named by the source's contents and the build flags, and the source is
copied into it, so checkouts of the repository at different paths share one build: ninja
rebuilds whenever a source path in build.ninja changes, and alternating checkouts would
otherwise recompile on every start. The CPU's instruction-set extensions are part of the name
too: builds use -march=native, and one made on another CPU model (a home directory shared
across machines, a copied cache) may hold instructions this one lacks and die of SIGILL.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import re
import sys
from pathlib import Path
from types import ModuleType

log = logging.getLogger("tokenpool.gpu_pool")

TORCH_BATON = "lock"  # the lock file torch.utils.cpp_extension.load creates and deletes

# /proc/cpuinfo flags naming x86 instruction-set extensions that -march=native may use.
_X86_ISA = re.compile(r"^(sse|ssse|avx|amx|fma|f16c|bmi|adx|aes|sha|vaes|vpclmul|pclmul|gfni"
                      r"|movbe|popcnt|abm|lzcnt|xop|tbm|cx16|rdrand|rdseed|clflushopt|clwb"
                      r"|movdir|serialize|waitpkg|xsave|fsgsbase)")


def build_directory(name: str, source: Path, cflags: tuple[str, ...], ldflags: tuple[str, ...],
                    build_root: Path | None = None) -> Path:
    """Where `name` is built: under torch's extensions root (TORCH_EXTENSIONS_DIR, else
    ~/.cache/torch_extensions), one directory per source and flags."""
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    key = hashlib.sha256(source.read_bytes())
    flags = (tuple(cflags), tuple(ldflags), torch.__version__, sys.version_info[:2],
             cpu_isa_flags())
    key.update(repr(flags).encode())
    root = Path(build_root) if build_root is not None else Path(get_default_build_root())
    return root / f"{name}-{key.hexdigest()[:12]}"


@functools.cache
def cpu_isa_flags() -> tuple[str, ...]:
    """The CPU's instruction-set extensions, sorted: x86 `flags` filtered to ISA names, an Arm
    `Features` line whole. Empty where /proc/cpuinfo is absent (not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return tuple(sorted({f for f in value.split() if _X86_ISA.match(f)}))
        if key.strip() == "Features":
            return tuple(sorted(set(value.split())))
    return ()


def build_extension(name: str, source: Path, cflags: tuple[str, ...], ldflags: tuple[str, ...],
                    build_root: Path | None = None) -> ModuleType:
    """The compiled module `name` from the single C++ file `source`, built if need be."""
    from torch.utils.cpp_extension import load

    build_dir = build_directory(name, source, cflags, ldflags, build_root)
    build_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(build_dir / "build.flock", what=name):
        # Holding the flock, no live builder of ours is in there: a baton is a dead one's.
        (build_dir / TORCH_BATON).unlink(missing_ok=True)
        local = build_dir / source.name
        text = source.read_bytes()
        if not local.is_file() or local.read_bytes() != text:
            local.write_bytes(text)
        # Lists of their own: load() appends to the ones it is given.
        return load(name=name, sources=[str(local)], extra_cflags=list(cflags),
                    extra_ldflags=list(ldflags), build_directory=str(build_dir), verbose=False)


@contextlib.contextmanager
def _exclusive(path: Path, what: str):
    with open(path, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process to finish building %s", what)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
