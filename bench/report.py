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
                  hf: list[BatchResult], torch_threads: int, command: str,
                  quant: str = "none", weight_bytes: int = 0, kernel_isa: str | None = None,
                  hf_weights: str | None = None, llama_cpp: list[BatchResult] = (),
                  llama_cpp_threads: int | None = None, llama_cpp_info: dict | None = None,
                  llama_cpp_skipped: str | None = None) -> dict:
    """prompt_lens is [low, high] (equal for a fixed length). `llama_cpp_skipped` says why
    the llama.cpp comparator did not run (None when it did)."""
    return {
        "model": model,
        "device": device,
        "dtype": dtype,
        "quant": quant,
        "weight_bytes": weight_bytes,
        "kernel_isa": kernel_isa,
        "new_tokens": new_tokens,
        "prompt_lens": list(prompt_lens),
        "results": [r.to_json() for r in ours],
        "hf": [r.to_json() for r in hf],
        "hf_weights": hf_weights if hf else None,
        "speedup_vs_hf": speedups(ours, hf),
        "llama_cpp": [r.to_json() for r in llama_cpp],
        "speedup_vs_llama_cpp": speedups(ours, list(llama_cpp)),
        "llama_cpp_skipped": llama_cpp_skipped,
        "llama_cpp_info": llama_cpp_info,
        "threads": {"ours": torch_threads, "llama_cpp": llama_cpp_threads},
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


# The /proc/cpuinfo flags the quantized and bfloat16 kernels choose their path by.
ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
             "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")


def cpu_info() -> dict:
    from tokenpool.gpu_pool.device import cpu_has_fast_bf16, cpu_name

    return {"name": cpu_name(), "logical_cores": os.cpu_count(),
            "fast_bf16": bool(cpu_has_fast_bf16()), "machine": platform.machine(),
            "isa": cpu_isa_flags()}


def cpu_isa_flags(cpuinfo: str | None = None) -> list[str]:
    """The ISA_FLAGS this CPU has, from /proc/cpuinfo's first `flags` line (Linux; [] where
    there is none)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            present = set(line.split(":", 1)[-1].split())
            return [f for f in ISA_FLAGS if f in present]
    return []


def write_json(path: Path, report: dict) -> None:
    path = Path(path)
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def engine_table(report: dict) -> str:
    """One row per batch size: ours, HF and (batch 1, when it ran) llama.cpp side by side,
    with the decode speedups."""
    low, high = report["prompt_lens"]
    lens = str(low) if low == high else f"{low}-{high}"
    quant = report.get("quant", "none")
    isa = f", kernels {report['kernel_isa']}" if report.get("kernel_isa") else ""
    title = (f"{report['model']} on {report['device']} ({report['dtype']}, quant {quant}, "
             f"{_mib(report.get('weight_bytes'))} weights{isa}, "
             f"{report['torch_threads']} threads): prompts {lens} tokens, "
             f"{report['new_tokens']} new tokens")
    hf = {r["batch"]: r for r in report["hf"]}
    lcpp = {r["batch"]: r for r in report.get("llama_cpp") or []}
    header = ("batch", "decode tok/s", "hf decode", "speedup", "prefill tok/s", "hf prefill",
              "ttft ms", "hf ttft ms")
    if lcpp:
        header += ("llama.cpp decode", "vs llama.cpp", "llama.cpp ttft ms")
    rows = [header]
    for r in report["results"]:
        h = hf.get(r["batch"], {})
        speedup = report["speedup_vs_hf"].get(str(r["batch"]))
        row = (str(r["batch"]), _num(r["decode_tokens_per_s"]),
               _num(h.get("decode_tokens_per_s")), _ratio(speedup),
               _num(r["prefill_tokens_per_s"]), _num(h.get("prefill_tokens_per_s")),
               _ms(r["ttft_s"]), _ms(h.get("ttft_s")))
        if lcpp:
            c = lcpp.get(r["batch"], {})
            row += (_num(c.get("decode_tokens_per_s")),
                    _ratio(report["speedup_vs_llama_cpp"].get(str(r["batch"]))),
                    _ms(c.get("ttft_s")))
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    notes = []
    if report.get("hf") and report.get("hf_weights"):
        notes.append(f"hf runs {report['hf_weights']}")
    if report.get("llama_cpp_skipped"):
        notes.append(f"llama.cpp skipped: {report['llama_cpp_skipped']}")
    return "\n".join([title, *lines, *notes]) + "\n"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _mib(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.1f} MiB"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def swap_table(result: dict) -> str:
    """The swap benchmark's headline numbers, one per line."""
    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)

    formats = ", ".join(f"{f} {_mib(n) if n >= 2**20 else f'{n / 2**10:.1f} KiB'}"
                        for f, n in (result.get("weight_bytes_by_format") or {}).items())
    rows = [
        ("models", " <-> ".join(f"{m} ({f})" for m, f in zip(result["models"],
                                                            result["families"]))),
        ("weight bytes", f"{_mib(result['weight_bytes'])} ({result['dtype']}, "
                         f"quant {result.get('quant', 'none')})"),
        *([("  by format", formats)] if formats else []),
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
