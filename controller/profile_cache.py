"""The start-up cost profile, kept beside the host cache so a restart need not profile again.

The key covers what the fitted costs depend on: every model's shape, dtype and packing
(quantized formats cost differently and copy fewer bytes), the device,
the torch thread count, the CPU model and the profile plan. A different machine or fleet
misses and profiles afresh. The file lives in the host cache's tmpfs, so a reboot clears it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

from tokenpool.gpu_pool.device import cpu_name
from tokenpool.schedulers.cost import CostModel, Linear3, ModelCost


def profile_key(fleet, models, plan) -> str:
    parts = [repr(plan), fleet.engine.device, str(fleet.pool.torch_threads), cpu_name(),
             str(fleet.engine.kv_cache_bytes)]
    for model_id, layout in sorted(models.layouts.items()):
        packing = hashlib.sha1(json.dumps(layout.index.to_dict()).encode()).hexdigest()
        parts.append(f"{model_id}|{layout.config!r}|{layout.dtype}|{packing}")
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:16]


def cache_path(fleet, key: str) -> Path:
    return Path(fleet.memory.host_cache_dir) / f"tokenpool-profile-{key}.json"


def load_profile(path: Path) -> CostModel | None:
    try:
        data = json.loads(path.read_text())
        models = {m: ModelCost(Linear3(**c["prefill"]), Linear3(**c["decode"]),
                               c["weight_bytes"], c["kv_bytes_per_token"])
                  for m, c in data["models"].items()}
        return CostModel(models, data["h2d_bytes_per_s"], data["kv_capacity_bytes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing or unreadable: profile again


def save_profile(path: Path, cost: CostModel) -> None:
    data = {"models": {m: dataclasses.asdict(c) for m, c in cost.models.items()},
            "h2d_bytes_per_s": cost.h2d_bytes_per_s, "kv_capacity_bytes": cost.kv_capacity_bytes}
    scratch = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        scratch.write_text(json.dumps(data))
        os.replace(scratch, path)
    except OSError:
        scratch.unlink(missing_ok=True)  # a read-only cache dir only costs a profile next time
