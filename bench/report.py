"""Benchmark reports: the JSON object `--json` writes, and the table printed to stdout."""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

from tokenpool.bench.engine_bench import BatchResult


def engine_report(*, model: str, device: str, dtype: str, new_tokens: int,
                  prompt_lens: tuple[int, int], ours: list[BatchResult],
                  hf: list[BatchResult], torch_threads: int, command: str) -> dict:
    """prompt_lens is [low, high] (equal for a fixed length)."""
    return {
        "model": model,
        "device": device,
        "dtype": dtype,
        "new_tokens": new_tokens,
        "prompt_lens": list(prompt_lens),
        "results": [r.to_json() for r in ours],
        "hf": [r.to_json() for r in hf],
        "speedup_vs_hf": speedups(ours, hf),
        "torch_threads": torch_threads,
        "cpu": cpu_info(),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
    }


def speedups(ours: list[BatchResult], hf: list[BatchResult]) -> dict[str, float]:
    """Decode tok/s ratio per batch size; string keys, as JSON has no others."""
    theirs = {r.batch: r.decode_tokens_per_s for r in hf}
    return {str(r.batch): r.decode_tokens_per_s / theirs[r.batch]
            for r in ours if theirs.get(r.batch)}


def cpu_info() -> dict:
    from tokenpool.gpu_pool.device import cpu_has_fast_bf16, cpu_name

    return {"name": cpu_name(), "logical_cores": os.cpu_count(),
            "fast_bf16": bool(cpu_has_fast_bf16()), "machine": platform.machine()}


def write_json(path: Path, report: dict) -> None:
    path = Path(path)
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def engine_table(report: dict) -> str:
    """One row per batch size: ours and HF side by side, and the decode speedup."""
    low, high = report["prompt_lens"]
    lens = str(low) if low == high else f"{low}-{high}"
    title = (f"{report['model']} on {report['device']} ({report['dtype']}, "
             f"{report['torch_threads']} threads): prompts {lens} tokens, "
             f"{report['new_tokens']} new tokens")
    hf = {r["batch"]: r for r in report["hf"]}
    header = ("batch", "decode tok/s", "hf decode", "speedup", "prefill tok/s", "hf prefill",
              "ttft ms", "hf ttft ms")
    rows = [header]
    for r in report["results"]:
        h = hf.get(r["batch"], {})
        speedup = report["speedup_vs_hf"].get(str(r["batch"]))
        rows.append((str(r["batch"]), _num(r["decode_tokens_per_s"]),
                     _num(h.get("decode_tokens_per_s")),
                     f"{speedup:.2f}x" if speedup is not None else "-",
                     _num(r["prefill_tokens_per_s"]), _num(h.get("prefill_tokens_per_s")),
                     _ms(r["ttft_s"]), _ms(h.get("ttft_s"))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    return "\n".join([title, *lines]) + "\n"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def swap_table(result: dict) -> str:
    """The swap benchmark's headline numbers, one per line."""
    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)

    rows = [
        ("models", " <-> ".join(f"{m} ({f})" for m, f in zip(result["models"],
                                                            result["families"]))),
        ("weight bytes", f"{result['weight_bytes'] / 2**20:.1f} MiB ({result['dtype']})"),
        ("memcpy", f"{result['memcpy_gbps']:.2f} GB/s"),
        ("switch", f"{result['switch_s'] * 1e3:.1f} ms"),
        *((f"  to {m}", f"{t * 1e3:.1f} ms ({result['switch_bytes'][m] / 2**20:.1f} MiB)")
          for m, t in result["switch_s_by_target"].items()),
        ("  / memcpy bound", f"{result['ratio_to_memcpy_bound']:.2f}x"),
        ("prefetched switch", f"{result['prefetched_switch_s'] * 1e3:.3f} ms"),
        ("HF from_pretrained", fmt(result["hf_load_s"], ".2f") + " s"),
        ("  speedup", fmt(result["speedup_vs_hf_load"], ".1f") + "x"),
        ("KV swap out+in", f"{result['kv_swap_gbps']:.2f} GB/s"),
    ]
    width = max(len(name) for name, _ in rows)
    return "".join(f"{name:<{width}}  {value}\n" for name, value in rows)
