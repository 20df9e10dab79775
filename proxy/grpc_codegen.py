"""The gRPC code of `tokenpool.proto`, generated on first import and never committed.

`from tokenpool.proxy.grpc_codegen import pb2, pb2_grpc` gives the messages and the stubs.
They are generated with grpc_tools.protoc into `proxy/_generated/<key>/` (gitignored), where
the key hashes the .proto and the generator and runtime versions: editing the .proto or
upgrading grpcio-tools or protobuf regenerates, and otherwise the files are reused.

Two processes may import at once (the server and its Ray workers, or parallel tests): each
generates into its own temporary directory and renames it into place, which is atomic; the
loser of the race throws its copy away and uses the winner's. When the package directory is
read-only (an installed wheel), the files go to the user's cache directory instead.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from types import ModuleType

PROTO = Path(__file__).with_name("tokenpool.proto")
PACKAGE = "tokenpool.proxy"
_LOCK = threading.Lock()  # protoc's in-process entry point is not known to be re-entrant


def generation_key() -> str:
    """Changes whenever the generated code could: the .proto, or the tools' versions."""
    import google.protobuf
    import grpc_tools

    digest = hashlib.sha256(PROTO.read_bytes())
    versions = f"{_version('grpcio-tools', grpc_tools)}|{google.protobuf.__version__}"
    digest.update(versions.encode())
    return digest.hexdigest()[:16]


def _version(dist: str, module: ModuleType) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return getattr(module, "__version__", "unknown")


def candidate_roots() -> list[Path]:
    """Where generated code may live, in order of preference."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return [PROTO.parent / "_generated", cache / "tokenpool" / "grpc",
            Path(tempfile.gettempdir()) / f"tokenpool-grpc-{os.getuid()}"]


def generated_dir(roots: list[Path] | None = None) -> Path:
    """The directory holding tokenpool_pb2.py and tokenpool_pb2_grpc.py, built if need be
    under the first of `roots` (default: `candidate_roots()`) that can be written."""
    key = generation_key()
    errors = []
    for root in roots or candidate_roots():
        target = root / key
        if (target / "tokenpool_pb2_grpc.py").is_file():
            return target
        try:
            return _generate_into(root, target)
        except OSError as exc:  # read-only or full: try the next place
            errors.append(f"{root}: {exc}")
    raise RuntimeError("cannot write the generated gRPC code anywhere: " + "; ".join(errors))


def _generate_into(root: Path, target: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        _run_protoc(staging)
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the code from other users
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "tokenpool_pb2_grpc.py").is_file():
                raise
            # Another process won the race; its files are identical to ours.
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _run_protoc(out: Path) -> None:
    from grpc_tools import protoc

    args = ["grpc_tools.protoc", f"-I{PROTO.parent}", f"--python_out={out}",
            f"--grpc_python_out={out}", str(PROTO)]
    with _LOCK:
        status = protoc.main(args)
    if status != 0:
        raise RuntimeError(f"grpc_tools.protoc failed on {PROTO} (exit {status})")
    stubs = out / "tokenpool_pb2_grpc.py"
    # protoc writes a top-level `import tokenpool_pb2`; make it the package's own module, so
    # nothing has to be put on sys.path.
    text = re.sub(r"^import tokenpool_pb2 as", f"from {PACKAGE} import tokenpool_pb2 as",
                  stubs.read_text(), flags=re.MULTILINE)
    stubs.write_text(text)


def _load(name: str, path: Path) -> ModuleType:
    """Import `path` as `tokenpool.proxy.<name>`, so `import tokenpool.proxy.<name>` works."""
    full_name = f"{PACKAGE}.{name}"
    if full_name in sys.modules:
        return sys.modules[full_name]
    spec = importlib.util.spec_from_file_location(full_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[full_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[full_name]
        raise
    setattr(sys.modules[PACKAGE], name, module)
    return module


def load() -> tuple[ModuleType, ModuleType]:
    where = generated_dir()
    return (_load("tokenpool_pb2", where / "tokenpool_pb2.py"),
            _load("tokenpool_pb2_grpc", where / "tokenpool_pb2_grpc.py"))


pb2, pb2_grpc = load()
