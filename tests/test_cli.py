"""The `tokenpool` command line, run as real processes on real checkpoints (no mocks).

Tiny settings keep the file near a minute on 2 CPU cores: 8 tokens on SmolLM2, and a 2-layer
synthetic checkpoint (written by `tokenpool fleet synth` itself) for everything else.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tokenpool.fleet import load_fleet
from tokenpool.gpu_pool.device import dtype_name, resolve_dtype
from tokenpool.gpu_pool.engine import LLMEngine
from tokenpool.models import load_checkpoint
from tokenpool.sampling import SamplingParams

REPO = Path(__file__).resolve().parent.parent
DEFAULT_FLEET = REPO / "configs" / "fleet.yaml"
MODEL = "smollm2-135m-instruct"
PROMPT = "The capital of France is"
SHAPES = {"2,64,4,2": "synth-l2-h64-nh4-kv2-f192", "2,64,4,1,128": "synth-l2-h64-nh4-kv1-f128"}
SYNTH = "synth-l2-h64-nh4-kv2-f192"
QWEN2 = "synth-qwen2-l2-h64-nh4-kv2-f192"


def tokenpool(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tokenpool.cli.main", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def assert_usage_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stdout == ""
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def engine_text(checkpoint, prompt_ids: list[int], max_tokens: int) -> str:
    """The engine's own greedy text for a prompt, under the default fleet's engine settings."""
    engine = LLMEngine.from_checkpoint(checkpoint, load_fleet(DEFAULT_FLEET).engine_config(MODEL))
    engine.add_request(prompt_ids, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    text = []
    while engine.has_unfinished():
        text += [out.new_text for out in engine.step()]
    return "".join(text)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """`fleet synth` output: (the directory, the YAML snippet it printed)."""
    out = tmp_path_factory.mktemp("synth")
    shapes = [arg for shape in SHAPES for arg in ("--shape", shape)]
    result = tokenpool("fleet", "synth", "--out", out, *shapes, "--seed", "3")
    assert result.returncode == 0, result.stderr
    return out, result.stdout


@pytest.fixture(scope="module")
def qwen2_synth(synth):
    """`fleet synth --family qwen2` output: its YAML snippet."""
    out, _ = synth
    result = tokenpool("fleet", "synth", "--out", out, "--family", "qwen2", "--shape", "2,64,4,2")
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def synth_fleet(synth, qwen2_synth) -> Path:
    """A fleet file made of the pasted snippets (the second one's models appended) plus a
    small KV cache."""
    out, snippet = synth
    path = out / "fleet.yaml"
    more = qwen2_synth.split("models:\n", 1)[1]
    path.write_text(snippet + more + "engine:\n  kv_cache_bytes: 64MiB\n")
    return path


# -- help and usage ----------------------------------------------------------------------------

@pytest.mark.parametrize("command", [[], ["generate"], ["fleet"], ["fleet", "synth"], ["bench"],
                                     ["bench", "engine"], ["bench", "swap"], ["simulate"],
                                     ["simulate", "sweep"]], ids=" ".join)
def test_help_exits_zero(command):
    result = tokenpool(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: tokenpool {' '.join(command)}".rstrip())


def test_console_script_and_no_command():
    script = Path(sys.executable).with_name("tokenpool")
    if script.exists():
        assert subprocess.run([script, "--version"], capture_output=True).returncode == 0
    assert_usage_error(tokenpool(), "required")


# -- generate ----------------------------------------------------------------------------------

def test_generate_prints_exactly_the_greedy_completion(smollm2):
    expected = engine_text(smollm2, smollm2.tokenizer.encode(PROMPT, add_special_tokens=True), 8)
    result = tokenpool("generate", "--model", MODEL, "--prompt", PROMPT, "--max-tokens", 8,
                       "--temperature", 0)  # the fleet's default for SmolLM2 samples
    assert result.returncode == 0, result.stderr
    assert expected.strip()
    assert result.stdout == expected + "\n"
    assert "8 generated tokens" in result.stderr


def test_generate_chat_uses_the_chat_template(smollm2):
    tok = smollm2.tokenizer
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi!"}], add_generation_prompt=True)
    expected = engine_text(smollm2, tok.encode(chat, add_special_tokens=False), 8)
    result = tokenpool("generate", "--config", DEFAULT_FLEET, "--model", MODEL, "--prompt", "Hi!",
                       "--chat", "--max-tokens", 8, "--temperature", 0)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"


def test_generate_bfloat16_with_stop_and_sampling(synth_fleet):
    result = tokenpool("generate", "--config", synth_fleet, "--model", SYNTH, "--prompt", "1, 2,",
                       "--dtype", "bfloat16", "--max-tokens", 6, "--temperature", 0.5,
                       "--seed", 1, "--top-k", 20, "--top-p", 0.9, "--stop", "\n")
    assert result.returncode == 0, result.stderr
    assert f"{SYNTH} (bfloat16 on cpu)" in result.stderr
    assert result.stdout.endswith("\n") and "\n" not in result.stdout[:-1]


@pytest.mark.parametrize("args, message", [
    (["--model", "nope", "--prompt", "hi"], "unknown model 'nope'; known models: smollm2-135m-code, "
                                                f"{MODEL}, "),
    (["--model", MODEL, "--prompt", ""], "prompt is empty"),
    (["--model", MODEL, "--prompt", "hi", "--temperature", "-1"], "temperature must be >= 0"),
    (["--model", MODEL, "--prompt", "hi", "--temperature", "hot"], "invalid float value"),
    (["--model", MODEL, "--prompt", "hi", "--max-tokens", "0"], "must be an integer >= 1"),
    (["--model", MODEL, "--prompt", "hi", "--config", "missing.yaml"], "config file not found"),
    (["--model", MODEL, "--prompt", "hi", "--top-p", "0"], "top_p must be in (0, 1]"),
    (["--model", MODEL, "--prompt", "hi", "--device", "tpu"], "expected cpu, cuda or cuda:N"),
    (["--model", MODEL], "the following arguments are required: --prompt"),
], ids=["unknown-model", "empty-prompt", "negative-temperature", "bad-float", "zero-max-tokens",
        "missing-config", "zero-top-p", "bad-device", "no-prompt"])
def test_generate_bad_input_exits_2(args, message):
    assert_usage_error(tokenpool("generate", *args), message)


@pytest.mark.parametrize("value", ["-1", "inf", "soon"])
def test_serve_bad_baseline_switch_overhead_exits_2(value):
    assert_usage_error(tokenpool("serve", "--baseline-switch-overhead", value),
                       "--baseline-switch-overhead")


def test_generate_float16_on_cpu_exits_2(synth_fleet):
    result = tokenpool("generate", "--config", synth_fleet, "--model", SYNTH, "--prompt", "hi",
                       "--dtype", "float16")
    assert_usage_error(result, "float16 is not supported on cpu")


# -- fleet synth -------------------------------------------------------------------------------

def test_synth_snippet_parses_and_checkpoints_load(synth, synth_fleet):
    out, snippet = synth
    models = yaml.safe_load(snippet)["models"]
    assert [m["id"] for m in models] == list(SHAPES.values())
    fleet = load_fleet(synth_fleet)
    assert fleet.models[-1].id == QWEN2
    assert load_checkpoint(fleet.models[-1].source, progress=False).config.qkv_bias
    for spec, (name, kv_heads) in zip(fleet.models, [(SYNTH, 2), (list(SHAPES.values())[1], 1)]):
        assert Path(spec.source) == (out / name).resolve()
        ckpt = load_checkpoint(spec.source, progress=False)
        assert ckpt.config.num_key_value_heads == kv_heads
        engine = LLMEngine.from_checkpoint(ckpt, fleet.engine_config(spec.id))
        [tokens] = engine.generate([ckpt.tokenizer.encode("hello")],
                                   SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
        assert len(tokens) == 3


@pytest.mark.parametrize("shape, message", [
    ("2,65,4,2", "must be a multiple of num_heads"),
    ("1,2,3", "expected L,H,NH,NKV[,FFN]"),
    ("2,64,4,3", "must be a multiple of num_kv_heads"),
    ("2,x,4,2", "hidden_size must be an integer"),
])
def test_synth_bad_shape_exits_2(tmp_path, shape, message):
    result = tokenpool("fleet", "synth", "--out", tmp_path / "out", "--shape", shape)
    assert_usage_error(result, "--shape", message)
    assert not (tmp_path / "out").exists()


# -- bench engine ------------------------------------------------------------------------------
# (--quant int8/int4/native and the llama.cpp comparator: tests/test_bench_quant.py)

# What `dtype: auto` resolves to here: bfloat16 on CPUs with AVX512-BF16/AMX, else float32.
AUTO_DTYPE = dtype_name(resolve_dtype("auto", torch.device("cpu")))
REPORT_KEYS = {"model", "device", "dtype", "quant", "weight_bytes", "kernel_isa", "new_tokens",
               "prompt_lens", "results", "hf", "hf_weights", "speedup_vs_hf", "llama_cpp",
               "speedup_vs_llama_cpp", "llama_cpp_skipped", "llama_cpp_info",
               "llama_cpp_tokens", "llama_cpp_agreement", "threads", "torch_threads", "cpu",
               "timestamp", "command"}
RESULT_KEYS = {"batch", "decode_tokens_per_s", "prefill_tokens_per_s", "ttft_s"}


def run_bench(fleet: Path, out: Path, *extra) -> dict:
    result = tokenpool("bench", "engine", "--config", fleet, "--model", SYNTH, "--batch", "1,2",
                       "--prompt-lens", "16-32", "--new-tokens", 4, "--json", out, *extra)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{SYNTH} on cpu ({AUTO_DTYPE}")
    return json.loads(out.read_text())


def assert_results(results: list[dict]) -> None:
    assert [r["batch"] for r in results] == [1, 2]
    for r in results:
        assert set(r) == RESULT_KEYS
        assert all(r[k] > 0 for k in RESULT_KEYS)


def test_bench_engine_writes_the_report_with_hf(synth_fleet, tmp_path):
    report = run_bench(synth_fleet, tmp_path / "b.json", "--seed", 5)
    assert set(report) == REPORT_KEYS
    assert (report["model"], report["device"], report["dtype"]) == (SYNTH, "cpu", AUTO_DTYPE)
    assert (report["new_tokens"], report["prompt_lens"]) == (4, [16, 32])
    assert_results(report["results"])
    assert_results(report["hf"])
    assert set(report["speedup_vs_hf"]) == {"1", "2"}
    assert all(v > 0 for v in report["speedup_vs_hf"].values())
    assert report["torch_threads"] >= 1 and report["command"].startswith("tokenpool bench engine")
    # floats (--quant's default); HF runs the same floats; no GGUF for llama.cpp
    assert (report["quant"], report["kernel_isa"]) == ("none", None)
    assert report["weight_bytes"] > 0 and report["hf_weights"].startswith("float")
    assert report["llama_cpp"] == [] and ".gguf" in report["llama_cpp_skipped"]
    assert report["threads"] == {"ours": report["torch_threads"], "llama_cpp": None}


def test_bench_engine_without_hf(synth_fleet, tmp_path):
    report = run_bench(synth_fleet, tmp_path / "sub" / "b.json", "--no-hf")
    assert_results(report["results"])
    assert (report["hf"], report["speedup_vs_hf"], report["hf_weights"]) == ([], {}, None)


@pytest.mark.parametrize("args, message", [
    (["--batch", "1,x"], "batch sizes must be comma-separated integers"),
    (["--batch", "0"], "batch sizes must be >= 1"),
    (["--prompt-lens", "64-16"], "prompt lengths must be N or LOW-HIGH"),
    (["--new-tokens", "1"], "must be at least 2"),
    (["--prompt-lens", "9000"], "exceed the engine's context"),
    (["--quant", "int3"], "invalid choice: 'int3'"),
])
def test_bench_bad_input_exits_2(synth_fleet, tmp_path, args, message):
    result = tokenpool("bench", "engine", "--config", synth_fleet, "--model", SYNTH,
                       "--json", tmp_path / "b.json", *args)
    assert_usage_error(result, message)
    assert not (tmp_path / "b.json").exists()


# -- bench swap --------------------------------------------------------------------------------

SWAP_KEYS = {"weight_bytes", "memcpy_gbps", "switch_s", "prefetched_switch_s", "hf_load_s",
             "ratio_to_memcpy_bound", "speedup_vs_hf_load", "kv_swap_gbps"}


def test_bench_swap_between_two_families_with_hf(synth_fleet, tmp_path):
    models = f"{SYNTH},{QWEN2}"
    out = tmp_path / "swap.json"
    result = tokenpool("bench", "swap", "--config", synth_fleet, "--models", models,
                       "--json", out)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert SWAP_KEYS <= set(report) and report["models"] == [SYNTH, QWEN2]
    assert report["families"] == ["llama", "qwen2"]
    assert all(report[k] > 0 for k in SWAP_KEYS)
    assert len(report["switch_s_all"]) == len(report["prefetched_switch_s_all"]) == 10
    # each switch against the plain copy of its own target's bytes, which differ here
    sizes = report["switch_bytes"]
    assert sizes[SYNTH] == report["weight_bytes"] != sizes[QWEN2]
    assert report["ratio_to_memcpy_bound"] == pytest.approx(statistics.median(
        s / c for s, c in zip(report["switch_s_all"], report["memcpy_s_all"])))
    assert report["speedup_vs_hf_load"] == pytest.approx(report["hf_load_s"] / report["switch_s"])
    assert "prefetched switch" in result.stdout


def test_bench_swap_one_model_fleet_uses_an_alias(synth_fleet, tmp_path):
    out = tmp_path / "swap.json"
    result = tokenpool("bench", "swap", "--config", synth_fleet, "--models", SYNTH, "--no-hf",
                       "--json", out)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["models"] == [SYNTH, f"{SYNTH}-alias"]
    assert report["hf_load_s"] is None and report["speedup_vs_hf_load"] is None


@pytest.mark.parametrize("args, message", [
    (["--models", "nope,also-nope"], "unknown model"),
    (["--repeats", "3"], "must be at least 10"),
])
def test_bench_swap_bad_input_exits_2(synth_fleet, tmp_path, args, message):
    result = tokenpool("bench", "swap", "--config", synth_fleet, "--json", tmp_path / "s.json",
                       *args)
    assert_usage_error(result, message)
    assert not (tmp_path / "s.json").exists()


# -- simulate ----------------------------------------------------------------------------------

SIM_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "sim" / "aegaeon-h800.yaml"
SIM_WORKLOADS = Path(__file__).resolve().parents[2] / "shared" / "data" / "aegaeon" / "workloads"
SIM_KEYS = {"scheduler", "num_models", "num_devices", "requests", "slo_attainment",
            "goodput_rps", "ttft_p50_s", "ttft_p99_s", "tbt_p99_s", "switches"}


def test_simulate_writes_the_keys_and_the_same_bytes_twice(tmp_path):
    outs = []
    for name in ("a.json", "b.json"):
        result = tokenpool("simulate", "--config", SIM_CONFIG, "--workload",
                           SIM_WORKLOADS / "synth-8-0.1-1.0-1.0.csv", "--seed", 3,
                           "--json", tmp_path / name)
        assert result.returncode == 0, result.stderr
        outs.append((tmp_path / name).read_bytes())
    assert outs[0] == outs[1]
    report = json.loads(outs[0])
    assert SIM_KEYS <= set(report)
    assert (report["scheduler"], report["num_devices"], report["requests"]) == \
        ("token-level", 16, 81)


def test_simulate_sweep_writes_json_and_plot(tmp_path):
    result = tokenpool("simulate", "sweep", "--config", SIM_CONFIG, "--workloads",
                       str(SIM_WORKLOADS / "synth-1[02]-0.1-1.0-1.0.csv"), "--schedulers",
                       "token-level,static", "--num-devices", 8, "--json", tmp_path / "s.json",
                       "--plot", tmp_path / "s.png")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "s.json").read_text())
    assert set(report) == {"token-level", "static"}
    for entry in report.values():
        assert [p["num_models"] for p in entry["points"]] == [10, 12]
        assert entry["max_rate_at_90"] is None
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, message", [
    (["--scheduler", "fifo"], "unknown 'fifo'"),
    (["--ttft-slo", "0"], "must be > 0"),
    (["--num-devices", "1"], "--num-devices: need at least 2 devices"),
])
def test_simulate_bad_input_exits_2(tmp_path, args, message):
    result = tokenpool("simulate", "--config", SIM_CONFIG, "--workload",
                       SIM_WORKLOADS / "synth-8-0.1-1.0-1.0.csv", "--json", tmp_path / "o.json",
                       *args)
    assert_usage_error(result, message)


def test_simulate_workload_writes_artifact_csvs(tmp_path):
    from tokenpool.sim.workload import load_aegaeon_csv

    result = tokenpool("simulate", "workload", "--models", "12,20", "--rates", "0.5",
                       "--duration", 60, "--lengths",
                       str(SIM_WORKLOADS / "synth-8-0.1-1.0-1.0.csv"), "--out-dir", tmp_path)
    assert result.returncode == 0, result.stderr
    requests = load_aegaeon_csv(tmp_path / "synth-20-0.5-1.0-1.0.csv")
    assert len({r.model for r in requests}) == 20
    assert 450 <= len(requests) <= 750  # Poisson, mean 20 * 0.5 * 60 = 600
    assert requests == sorted(requests, key=lambda r: r.arrival_s)
    again = tokenpool("simulate", "workload", "--models", "20", "--rates", "0.5",
                      "--duration", 60, "--lengths",
                      str(SIM_WORKLOADS / "synth-8-0.1-1.0-1.0.csv"), "--out-dir",
                      tmp_path / "again")
    assert again.returncode == 0
    assert (tmp_path / "again" / "synth-20-0.5-1.0-1.0.csv").read_bytes() == \
        (tmp_path / "synth-20-0.5-1.0-1.0.csv").read_bytes()


def test_simulate_capacity_autoscaled_and_pinned_reports(tmp_path):
    """`--autoscale` runs the elastic pool beside the fixed one it found, in device-hours;
    `--pin-top 1` sizes a fleet with the hottest model pinned against all-pooled."""
    result = tokenpool("simulate", "capacity", "--config", SIM_CONFIG, "--workload",
                       SIM_WORKLOADS / "synth-12-0.1-1.0-1.0.csv", "--schedulers",
                       "token-level", "--autoscale", "--pin-top", 1, "--json",
                       tmp_path / "c.json")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "c.json").read_text())
    elastic, fixed = (report["token-level"]["autoscale"][k] for k in ("elastic", "fixed"))
    assert fixed["devices"] == report["token-level"]["devices"]
    assert elastic["finished"] == fixed["finished"] == elastic["requests"]  # none lost
    assert elastic["min_workers"] <= elastic["mean_devices"] <= elastic["peak_devices"] \
        <= elastic["max_workers"]
    assert elastic["device_hours"] > 0 and fixed["device_hours"] > 0
    pinned = report["token-level+pins"]
    assert pinned["pinned_devices"] == 1
    assert pinned["devices"] == pinned["pinned_devices"] + pinned["pooled_devices"]
    assert pinned["pinned_switches"] == [1]  # its one load, never a switch after


def test_simulate_capacity_finds_devices_and_the_saving(tmp_path):
    result = tokenpool("simulate", "capacity", "--config", SIM_CONFIG, "--workload",
                       SIM_WORKLOADS / "synth-12-0.1-1.0-1.0.csv", "--json", tmp_path / "c.json")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "c.json").read_text())
    token, static = report["token-level"]["devices"], report["static"]["devices"]
    assert 2 <= token < static and static >= report["num_models"]
    for entry in (report["token-level"], report["static"]):
        passing = [t["num_devices"] for t in entry["tried"] if t["slo_attainment"] >= 0.9]
        failing = [t["num_devices"] for t in entry["tried"] if t["slo_attainment"] < 0.9]
        assert min(passing) == entry["devices"] and all(f < entry["devices"] for f in failing)
    assert report["saving"] == pytest.approx(1 - token / static)
