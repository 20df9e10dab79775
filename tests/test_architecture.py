"""DESIGN §1's arrows: policy and bookkeeping stay pure, so the simulator can run them
unchanged, and imports run one way: proxy -> controller -> schedulers; controller -> gpu_pool
-> memory."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = {"torch", "asyncio", "time", "numpy", "ray", "grpc", "threading"}
# package -> tokenpool packages it must never import
LAYERS = {
    "schedulers": {"controller", "gpu_pool", "memory", "proxy", "sim", "bench", "cli"},
    "memory": {"controller", "gpu_pool", "schedulers", "proxy", "sim", "bench", "cli"},
    "gpu_pool": {"controller", "proxy", "sim", "bench", "cli"},
    "proxy": {"gpu_pool", "memory", "bench", "cli"},
    "controller": {"proxy", "sim", "bench", "cli"},
}


def imported_modules(path: Path) -> set[str]:
    """Every absolute module an import statement in `path` names, at any depth."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
            modules |= {f"{node.module}.{alias.name}" for alias in node.names}
    return modules


def imported_roots(path: Path) -> set[str]:
    return {m.split(".")[0] for m in imported_modules(path)}


def tokenpool_packages(path: Path) -> set[str]:
    """The tokenpool packages `path` imports: `tokenpool.gpu_pool.x` -> "gpu_pool"."""
    return {m.split(".")[1] for m in imported_modules(path)
            if m.startswith("tokenpool.") and m.count(".") >= 1}


def files_of(package: str) -> list[Path]:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no Python files"
    return files


@pytest.mark.parametrize("package", ["schedulers", "memory"])
def test_pure_packages_import_no_runtime(package):
    for path in files_of(package):
        bad = imported_roots(path) & RUNTIME
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


@pytest.mark.parametrize("module", ["engine_scheduler", "step_batch", "prefix_pages"])
def test_the_engine_scheduler_and_what_it_uses_import_no_torch(module):
    path = ROOT / "gpu_pool" / f"{module}.py"
    assert not imported_roots(path) & {"torch", "numpy"}


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_imports_run_one_way(package):
    for path in files_of(package):
        bad = tokenpool_packages(path) & LAYERS[package]
        assert not bad, f"{path.relative_to(ROOT)} imports tokenpool.{sorted(bad)}"


def test_the_checks_see_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import time\nfrom torch import nn\n\n\ndef f():\n"
                     "    from tokenpool.controller.core import ControllerCore\n"
                     "    from tokenpool import proxy\n")
    assert {"time", "torch", "tokenpool"} <= imported_roots(probe)
    assert tokenpool_packages(probe) >= {"controller", "proxy"}
