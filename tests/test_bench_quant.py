"""`tokenpool bench engine|swap --quant`: the weight format reaches the engine and the JSON
(`quant`, `weight_bytes`, `kernel_isa`, `cpu.isa`), a smaller format packs fewer bytes, and,
where llama-cpp-python is installed, the llama.cpp comparator runs the same GGUF at batch 1.

Run in-process through `cli.main.main` on a 2-layer synthetic checkpoint and a Q8_0 GGUF
twin of it, so the file stays within seconds; the llama.cpp test uses the real SmolLM2 GGUF.
"""

from __future__ import annotations

import json

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from gguf_twins import write_twin
from tokenpool.bench import llama_cpp_reference, report
from tokenpool.cli.main import main
from tokenpool.models.locate import smollm2_gguf_path
from tokenpool.models.synth import write_synthetic_checkpoint

SYNTH, TWIN = "synth", "synth-q8"
ENGINE = ["--batch", "1,2", "--prompt-lens", "8-12", "--new-tokens", "3"]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> str:
    """A fleet of a float synthetic llama and its Q8_0 GGUF twin (as llama.cpp converts it)."""
    tmp = tmp_path_factory.mktemp("bench-quant")
    hf_dir = write_synthetic_checkpoint(tmp / "synth", num_layers=2, hidden_size=64,
                                        num_heads=4, num_kv_heads=2, seed=5)
    twin = write_twin(hf_dir, tmp / "synth-q8.gguf", Q.Q8_0)
    path = tmp / "fleet.yaml"
    path.write_text(f"models:\n  - {{id: {SYNTH}, source: {hf_dir}}}\n"
                    f"  - {{id: {TWIN}, source: {twin}}}\n"
                    "engine: {dtype: float32, kv_cache_bytes: 32MiB}\n")
    return str(path)


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def bench(capsys, tmp_path, kind: str, *args) -> tuple[dict, str]:
    out = tmp_path / f"{kind}-{len(list(tmp_path.iterdir()))}.json"
    code = main(["bench", kind, *map(str, args), "--json", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(out.read_text()), captured.out


def test_engine_quant_modes_report_the_format_and_its_bytes(fleet, tmp_path, capsys):
    reports = {}
    for quant in ("none", "int8", "int4"):
        reports[quant], table = bench(capsys, tmp_path, "engine", "--config", fleet,
                                      "--model", SYNTH, *ENGINE, "--quant", quant, "--no-hf")
        assert f"quant {quant}" in table.splitlines()[0]
    for quant, r in reports.items():
        assert r["quant"] == quant and r["dtype"] == "float32"
        assert [b["batch"] for b in r["results"]] == [1, 2]
        assert all(b["decode_tokens_per_s"] > 0 for b in r["results"])
        assert (r["hf"], r["speedup_vs_hf"], r["hf_weights"]) == ([], {}, None)
        # a safetensors checkpoint: no GGUF for llama.cpp to run
        assert r["llama_cpp"] == [] and r["speedup_vs_llama_cpp"] == {}
        assert ".gguf" in r["llama_cpp_skipped"]
        assert r["threads"] == {"ours": r["torch_threads"], "llama_cpp": None}
        assert set(r["cpu"]["isa"]) <= set(report.ISA_FLAGS)
    sizes = {q: r["weight_bytes"] for q, r in reports.items()}
    assert sizes["none"] > sizes["int8"] > sizes["int4"] > 0, sizes
    assert reports["none"]["kernel_isa"] is None
    assert isinstance(reports["int8"]["kernel_isa"], str) and reports["int8"]["kernel_isa"]


def test_engine_native_on_a_gguf_against_hf_on_its_dequantized_floats(fleet, tmp_path, capsys):
    native, table = bench(capsys, tmp_path, "engine", "--config", fleet, "--model", TWIN,
                          *ENGINE, "--quant", "native", "--no-llama-cpp")
    none, _ = bench(capsys, tmp_path, "engine", "--config", fleet, "--model", TWIN, *ENGINE,
                    "--quant", "none", "--no-hf", "--no-llama-cpp")
    assert native["quant"] == "native" and none["quant"] == "none"
    # Q8_0 is 34 bytes per 32 weights against float32's 128
    assert native["weight_bytes"] < none["weight_bytes"] / 2
    assert native["hf_weights"].startswith("dequantized float")
    assert [b["batch"] for b in native["hf"]] == [1, 2]
    assert set(native["speedup_vs_hf"]) == {"1", "2"}
    assert native["llama_cpp_skipped"] == "--no-llama-cpp" and native["llama_cpp"] == []
    assert "hf runs dequantized float" in table


def test_swap_int4_copies_fewer_bytes_than_floats(fleet, tmp_path, capsys):
    runs = {q: bench(capsys, tmp_path, "swap", "--config", fleet, "--models", SYNTH,
                     "--quant", q, "--no-hf")[0] for q in ("none", "int4")}
    for quant, r in runs.items():
        assert r["quant"] == quant
        assert set(r["quant_by_model"].values()) == {quant}
        assert r["switch_bytes"][SYNTH] == r["weight_bytes"]
        assert sum(r["weight_bytes_by_format"].values()) <= r["weight_bytes"]
    assert runs["int4"]["weight_bytes"] < runs["none"]["weight_bytes"] / 4
    assert "q4_1" in runs["int4"]["weight_bytes_by_format"]
    assert set(runs["none"]["weight_bytes_by_format"]) == {"float32"}


def test_cpu_isa_flags_read_the_flags_line():
    cpuinfo = ("processor\t: 0\nmodel name\t: X\n"
               "flags\t\t: fpu sse2 avx2 fma avx512f avx512_vnni amx_tile amx_int8 avx512_bf16\n"
               "processor\t: 1\nflags\t\t: fpu\n")
    assert report.cpu_isa_flags(cpuinfo) == ["avx2", "fma", "avx512f", "avx512_vnni",
                                             "avx512_bf16", "amx_tile", "amx_int8"]
    assert report.cpu_isa_flags("no flags here") == []


def test_llama_cpp_skip_reasons(tmp_path):
    gguf = tmp_path / "m.gguf"
    one = {1: [[1, 2]]}
    assert llama_cpp_reference.skip_reason(gguf, "cpu", True, one) == "--no-llama-cpp"
    assert "CPU only" in llama_cpp_reference.skip_reason(gguf, "cuda:0", False, one)
    assert ".gguf" in llama_cpp_reference.skip_reason(tmp_path, "cpu", False, one)
    assert "batch 1" in llama_cpp_reference.skip_reason(gguf, "cpu", False, {8: [[1]] * 8})


def test_llama_cpp_runs_the_same_gguf_with_the_same_threads(tmp_path, capsys):
    pytest.importorskip("llama_cpp")
    r, table = bench(capsys, tmp_path, "engine", "--model", "smollm2-135m-instruct",
                     "--quant", "native", "--batch", "1", "--prompt-lens", "8",
                     "--new-tokens", "4", "--threads", "1", "--no-hf")
    assert r["quant"] == "native" and r["weight_bytes"] > 0 and r["kernel_isa"]
    assert r["llama_cpp_skipped"] is None
    assert [b["batch"] for b in r["llama_cpp"]] == [1]
    assert all(v > 0 for v in r["llama_cpp"][0].values())
    assert set(r["speedup_vs_llama_cpp"]) == {"1"} and r["speedup_vs_llama_cpp"]["1"] > 0
    assert r["threads"] == {"ours": 1, "llama_cpp": 1} and r["torch_threads"] == 1
    assert r["llama_cpp_info"]["version"] and "system_info" in r["llama_cpp_info"]
    tokens = r["llama_cpp_tokens"]["1"]
    vocab = 49152
    assert len(tokens) == 4 and all(0 <= t < vocab for t in tokens)
    assert 0 <= r["llama_cpp_agreement"]["1"] <= 4
    assert "llama.cpp decode" in table
    assert smollm2_gguf_path().suffix == ".gguf"
