"""Every decoder family against HF transformers, on tiny random checkpoints it wrote (float32).

Each case (tests/family_checkpoints.py) is saved by `save_pretrained`, loaded by us with
`load_checkpoint` and by transformers with `from_pretrained`: greedy tokens must agree up to
the first near tie, with a whole batch of mixed lengths, also when the KV pool is too small and
sequences are preempted (swapped to host or recomputed); last-position logits must be close;
what we cannot serve must fail at load naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from family_checkpoints import (CASES, FEATURE_OFF, build_model, edit_config, load_hf,
                                reset_dynamic_rope, write_case)
from helpers import agreed_prefix, hf_greedy, make_engine, random_prompts, worker_over
from tokenpool.errors import CheckpointError
from tokenpool.models.families import FAMILIES
from tokenpool.models.checkpoint import Checkpoint, load_checkpoint
from tokenpool.sampling import SamplingParams

pytest.importorskip("transformers")

# Every sliding window (12-20) and every RoPE "original" length (32-64) is shorter than most
# prompts; the two extra prompts make the preemption tests' pool too small.
PROMPT_LENGTHS = (5, 23, 61, 130, 40, 90)
NEW_TOKENS = 24
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
LOGITS_RTOL = 1e-4  # max |ours - HF| / max |HF| at the last position, both float32
TIGHT_PAGES = 12  # 16-token pages: all six need 33 by the end, the longest alone 10


@dataclass(slots=True)
class FamilyCase:
    """One case, loaded by us and by HF, with HF's greedy answers for PROMPT_LENGTHS."""

    name: str
    checkpoint: Checkpoint
    hf: torch.nn.Module
    prompts: list[list[int]]
    reference: list[tuple[list[int], list[float]]]  # HF greedy tokens and top-2 gaps per prompt

    def hf_logits(self, prompt: list[int]) -> torch.Tensor:
        reset_dynamic_rope(self.hf)
        with torch.inference_mode():
            return self.hf(torch.tensor([prompt])).logits[0, -1].float()


def hf_reference(model, prompts, new_tokens: int) -> list[tuple[list[int], list[float]]]:
    """HF's greedy tokens and top-2 gaps, each prompt on its own (fresh dynamic-RoPE state)."""
    out = []
    for p in prompts:
        reset_dynamic_rope(model)  # HF's dynamic RoPE keeps state from the previous sequence
        out.append(hf_greedy(model, p, new_tokens))
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices gain nothing from a second thread, and on a shared CPU lose 10-50x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def written(tmp_path_factory):
    """Case name -> its checkpoint directory, each written once per session."""
    root, paths = tmp_path_factory.mktemp("families"), {}

    def path(name: str):
        if name not in paths:
            paths[name] = write_case(name, root / name)
        return paths[name]

    return path


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def family(request, written) -> FamilyCase:
    name = request.param
    path = written(name)
    hf = load_hf(path)
    prompts = random_prompts(PROMPT_LENGTHS, seed=3)
    reference = hf_reference(hf, prompts, NEW_TOKENS)
    return FamilyCase(name, load_checkpoint(path, progress=False), hf, prompts, reference)


@pytest.fixture(scope="module")
def engine(family):
    return make_engine(family.checkpoint, kv_cache_bytes=16 << 20)


def assert_matches_hf(family: FamilyCase, outputs: list[list[int]]) -> None:
    compared = sum(agreed_prefix(got, ref, gaps)
                   for got, (ref, gaps) in zip(outputs, family.reference))
    # Near ties are rare with these weights; if most tokens were excused the check is empty.
    total = NEW_TOKENS * len(outputs)
    assert compared >= 0.8 * total, f"only {compared} of {total} tokens compared"


def test_greedy_batch_matches_hf_token_for_token(family, engine):
    assert_matches_hf(family, engine.generate(family.prompts, GREEDY))
    assert engine.num_used_pages == 0


def test_last_position_logits_match_hf(family, engine):
    for prompt in (family.prompts[3], family.prompts[1]):  # 130 tokens, and 23
        ours = engine.next_token_logits(prompt).float()
        ref = family.hf_logits(prompt)
        assert torch.isfinite(ref).all()
        rel = float((ours - ref).abs().max() / ref.abs().max())
        assert rel < LOGITS_RTOL, f"{family.name}: max relative logit error {rel:.2e}"


def test_bfloat16_serving_stays_close_to_float32(family, engine):
    """bfloat16 weights and KV (the default fleet's dtype) on the same prompt: logits within
    bfloat16's precision of float32's, through every family's norms, caps and windows
    (measured 1.1-3.7e-2 relative over the cases)."""
    low = make_engine(family.checkpoint, dtype="bfloat16", kv_cache_bytes=16 << 20)
    prompt = family.prompts[3]  # 130 tokens: past every sliding window
    ref = engine.next_token_logits(prompt).float()
    got = low.next_token_logits(prompt).float()
    rel = float((got - ref).abs().max() / ref.abs().max())
    assert torch.isfinite(got).all() and rel < 0.06, f"{family.name}: bf16 off by {rel:.2e}"


def page_bytes(engine) -> int:
    return engine.memory.kv.shape.page_bytes


def test_preempted_and_swapped_sequences_still_match_hf(family, engine):
    # A standalone engine has host swap space: preempted sequences move there and back.
    tight = make_engine(family.checkpoint, kv_cache_bytes=TIGHT_PAGES * page_bytes(engine))
    outputs = tight.generate(family.prompts, GREEDY)
    assert tight.num_preemptions > 0, "the pool was meant to be too small for the batch"
    assert tight.swapper.bytes_moved > 0, "preempted sequences were meant to be swapped"
    assert_matches_hf(family, outputs)
    assert tight.num_used_pages == 0


def test_preempted_and_recomputed_sequences_still_match_hf(family, engine):
    if not CASES[family.name].recompute_exact:
        pytest.skip("length-dependent RoPE (dynamic, longrope): recomputing rotates cached keys "
                    "for the longer length, HF's cache keeps each key's own")
    # No swap space: preempted sequences are dropped and their prompt + output recomputed.
    page = page_bytes(engine)
    worker = worker_over({"m": family.checkpoint}, kv_cache_bytes=TIGHT_PAGES * page,
                         slab_bytes=page, swap_bytes=0)
    worker.switch("m")
    tight = worker.engine("m")
    outputs = tight.generate(family.prompts, GREEDY)
    assert tight.num_preemptions > 0 and tight.swapper is None
    assert_matches_hf(family, outputs)
    assert tight.num_used_pages == 0


@pytest.mark.parametrize("case, changes", [
    pytest.param(case, changes, id=f"{case}-{feature.replace(' ', '_')}")
    for case, features in FEATURE_OFF.items() for feature, changes in features.items()])
def test_each_feature_changes_hf_greedy_tokens(case, changes):
    """Guards the fixtures: a window or RoPE change that never bites would test nothing."""
    model_type, config = CASES[case].model_type, CASES[case].config
    prompts = random_prompts(PROMPT_LENGTHS[2:4], seed=3)  # 61 and 130 tokens

    def greedy(**overrides) -> list[list[int]]:
        model = build_model(model_type, **{**config, **overrides})
        return [tokens for tokens, _ in hf_reference(model, prompts, 8)]

    assert greedy() != greedy(**changes)


# -- what we cannot serve ------------------------------------------------------------------

@pytest.mark.parametrize("case, changes, key", [
    ("llama", {"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]}, "model_type"),
    ("llama", {"hidden_act": "relu2"}, "hidden_act"),
    ("gemma2", {"hidden_activation": "relu2"}, "hidden_activation"),
    ("llama", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                                   "short_factor": [1.0] * 8,
                                   "original_max_position_embeddings": 64}}, "long_factor"),
    ("llama", {"rope_parameters": {"rope_type": "foo", "rope_theta": 10000.0}}, "rope_type"),
    ("llama", {"quantization_config": {"quant_method": "awq", "bits": 4}},
     "quantization_config"),
    ("gemma3", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
], ids=["model_type", "hidden_act", "hidden_activation", "longrope-no-long-factor", "rope-foo",
        "quantization", "bidirectional"])
def test_unsupported_checkpoint_fails_at_load_naming_the_key(written, tmp_path, case, changes,
                                                              key):
    path = edit_config(written(case), tmp_path / "edited", **changes)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, progress=False)
    assert key in str(info.value), f"message does not name {key!r}: {info.value}"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_synthetic_checkpoints_of_every_family_load_in_transformers(tmp_path, family):
    """What `tokenpool fleet synth --family` writes is the family's checkpoint to transformers
    too: it loads them, and its logits are ours (synthetic weights give near-uniform logits,
    so logits, not greedy tokens, are compared)."""
    from tokenpool.models.synth import write_synthetic_checkpoint

    path = write_synthetic_checkpoint(tmp_path / family, family=family, num_layers=2,
                                      hidden_size=64, num_heads=4, num_kv_heads=2, seed=1)
    ours = make_engine(load_checkpoint(path, progress=False))
    prompt = random_prompts([40], seed=2)[0]
    with torch.inference_mode():
        ref = load_hf(path)(torch.tensor([prompt])).logits[0, -1]
    got = ours.next_token_logits(prompt)
    assert (got - ref).abs().max() / ref.abs().max() < 1e-4
