"""Print the engine and swap JSONs of this directory as README's tables."""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).parent


def engine_rows() -> None:
    print("| run | weights MiB | kernel | batch | ours tok/s | HF tok/s | vs HF | llama.cpp tok/s | vs llama.cpp |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in sorted(HERE.glob("engine-*.json")):
        d = json.loads(path.read_text())
        hf = {r["batch"]: r["decode_tokens_per_s"] for r in d["hf"]}
        llama = {r["batch"]: r["decode_tokens_per_s"] for r in d.get("llama_cpp", [])}
        for r in d["results"]:
            b = r["batch"]
            ours = r["decode_tokens_per_s"]
            vs_hf = f"{ours / hf[b]:.2f}x" if b in hf else "-"
            vs_ll = f"{ours / llama[b]:.2f}x" if b in llama else "-"
            print(f"| {path.stem[7:]} | {d['weight_bytes'] / 2**20:.1f} | {d['kernel_isa']} | {b} "
                  f"| {ours:.1f} | {_num(hf.get(b))} | {vs_hf} | {_num(llama.get(b))} | {vs_ll} |")


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def swap_rows() -> None:
    print("| quant | switch MiB | switch ms | memcpy bound ms | ratio |")
    print("|---|---|---|---|---|")
    for path in sorted(HERE.glob("swap-*.json")):
        d = json.loads(path.read_text())
        bound = d["weight_bytes"] / (d["memcpy_gbps"] * 1e9)
        print(f"| {d['quant']} | {d['weight_bytes'] / 2**20:.1f} | {d['switch_s'] * 1e3:.1f} "
              f"| {bound * 1e3:.1f} | {d['ratio_to_memcpy_bound']:.2f}x |")


if __name__ == "__main__":
    engine_rows() if sys.argv[1:] != ["swap"] else swap_rows()
