"""A request prefilled on one worker and decoded on another (disaggregated roles, issue 5).

Two synthetic Llamas of different page shapes. The yardstick is a standalone engine: moving a
request's KV between workers, at whatever step, must not change one token or one character.
"""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest
import torch
from helpers import worker_over as make_worker

from tokenpool.gpu_pool.kv_handoff import HandoffError, SequenceHandoff, restore_sequence
from tokenpool.gpu_pool.sequence import SeqStatus
from tokenpool.memory.slabs import PageShape
from tokenpool.models.checkpoint import load_checkpoint
from tokenpool.models.detokenizer import IncrementalDetokenizer
from tokenpool.models.synth import write_synthetic_checkpoint
from tokenpool.sampling import SamplingParams

SHAPES = {"m-a": dict(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2),
          "m-b": dict(num_layers=3, hidden_size=96, num_heads=6, num_kv_heads=3,
                      tie_word_embeddings=False)}
# 21 prompt tokens and 20 more: the KV spans pages on export and grows new ones after import.
PROMPT = [1, 504, 3458, 282, 4649, 314, 30, 2200, 17, 4302, 9, 88, 14, 2, 715, 400, 12, 99,
          1000, 5, 77]
GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=20, temperature=0.8, seed=7, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("handoff-fleet")
    return {name: load_checkpoint(write_synthetic_checkpoint(root / name, seed=i + 3, **shape),
                                  progress=False)
            for i, (name, shape) in enumerate(SHAPES.items())}


def standalone(checkpoint, prompts, params) -> list[tuple[list[int], str]]:
    """Each request's (tokens, text) from an engine that never hands anything off."""
    from helpers import make_engine

    engine = make_engine(checkpoint, kv_cache_bytes=4 << 20)
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    got = {i: ([], []) for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id][0].extend(out.new_token_ids)
            got[out.request_id][1].append(out.new_text)
    return [(got[i][0], "".join(got[i][1])) for i in ids]


def steps(engine, n: int | None, got: dict) -> None:
    """Step `n` times (None: to the end), appending each request's tokens and text."""
    while engine.has_unfinished() and (n is None or n > 0):
        for out in engine.step():
            tokens, text = got.setdefault(out.request_id, ([], []))
            tokens.extend(out.new_token_ids)
            text.append(out.new_text)
        n = None if n is None else n - 1


def page_bytes(engine, request_id: str) -> torch.Tensor:
    kv = engine.memory.kv
    return torch.cat([kv.page_bytes_view(p).clone()
                      for p in engine.blocks.block_table(request_id)])


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("steps_before", [1, 7], ids=["after-prefill", "mid-decode"])
def test_prefill_here_decode_there_matches_a_standalone_engine(checkpoints, params,
                                                               steps_before):
    [(want_tokens, want_text)] = standalone(checkpoints["m-a"], [PROMPT], [params])
    a, b = make_worker(checkpoints), make_worker(checkpoints)
    a.switch("m-a")
    b.switch("m-a")
    source, target = a.engine("m-a"), b.engine("m-a")
    source.add_request(PROMPT, params, "r")
    got: dict = {}
    steps(source, steps_before, got)
    kv_before = page_bytes(source, "r")
    handoff = source.export_sequence("r")
    assert source.num_used_pages == 0 and not source.has_unfinished()
    target.import_sequence(pickle.loads(pickle.dumps(handoff)))
    assert [s.seq_id for s in target.running] == ["r"]
    # The KV arrives bit for bit, so decoding resumes exactly where it stopped.
    assert torch.equal(page_bytes(target, "r"), kv_before)
    steps(target, None, got)
    assert got["r"][0] == want_tokens
    assert "".join(got["r"][1]) == want_text and want_text
    for worker in (a, b):
        assert worker.usage()["kv"]["used"] == 0 and worker.usage()["swap"]["used"] == 0


def test_a_handoff_is_one_contiguous_host_array_that_pickles(checkpoints):
    worker = make_worker(checkpoints)
    worker.switch("m-b")
    engine = worker.engine("m-b")
    engine.add_request(PROMPT, SEEDED, "r")
    engine.step()
    handoff = engine.export_sequence("r")
    shape = worker.memory.models["m-b"].page_shape
    assert isinstance(handoff.kv, np.ndarray) and handoff.kv.flags.c_contiguous
    assert handoff.kv.shape == (2, shape.page_bytes) and handoff.nbytes == 2 * shape.page_bytes
    assert handoff.page_shape == shape and handoff.dtype == "float32"
    assert handoff.model == "m-b" and handoff.generator_state is not None
    assert handoff.prompt_ids == tuple(PROMPT) and len(handoff.output_ids) == 1
    copy = pickle.loads(pickle.dumps(handoff, protocol=5))
    assert np.array_equal(copy.kv, handoff.kv) and copy.params == SEEDED
    assert copy.generator_state == handoff.generator_state
    with pytest.raises(dataclasses.FrozenInstanceError):
        handoff.model = "other"
    with pytest.raises(KeyError):
        engine.export_sequence("r")  # it left the engine


def test_a_swapped_out_request_exports_from_its_host_slabs(checkpoints):
    [(want, _)] = standalone(checkpoints["m-a"], [PROMPT], [GREEDY])
    a, b = make_worker(checkpoints), make_worker(checkpoints)
    a.switch("m-a")
    b.switch("m-a")
    source = a.engine("m-a")
    source.add_request(PROMPT, GREEDY, "r")
    got: dict = {}
    steps(source, 3, got)
    kv_before = page_bytes(source, "r")
    assert source.swap_out() > 0 and source.num_used_pages == 0
    handoff = source.export_sequence("r")
    assert handoff.num_pages == 2 and a.usage()["swap"]["used"] == 0
    assert torch.equal(torch.from_numpy(handoff.kv).view(-1), kv_before)
    b.engine("m-a").import_sequence(handoff)
    steps(b.engine("m-a"), None, got)
    assert got["r"][0] == want


@pytest.mark.parametrize("swap_bytes, lands_in", [(4 << 20, SeqStatus.SWAPPED),
                                                  (0, SeqStatus.WAITING)])
def test_an_import_without_free_pages_waits_and_still_decodes_exactly(checkpoints, swap_bytes,
                                                                      lands_in):
    prompts, params = [PROMPT, PROMPT[:6]], [dataclasses.replace(GREEDY, max_tokens=10)] * 2
    want = [tokens for tokens, _ in standalone(checkpoints["m-a"], prompts, params)]
    page = make_worker({"m-a": checkpoints["m-a"]}).memory.models["m-a"].page_shape.page_bytes
    a = make_worker({"m-a": checkpoints["m-a"]})
    # Two device pages in all: the running request holds both, so the import cannot start.
    b = make_worker({"m-a": checkpoints["m-a"]}, kv_cache_bytes=2 * page, slab_bytes=2 * page,
                    swap_bytes=swap_bytes)
    for worker in (a, b):
        worker.switch("m-a")
    b.engine("m-a").add_request(prompts[0], params[0], "busy")
    a.engine("m-a").add_request(prompts[1], params[1], "moved")
    got: dict = {}
    steps(b.engine("m-a"), 1, got)
    steps(a.engine("m-a"), 2, got)
    handoff = a.engine("m-a").export_sequence("moved")
    target = b.engine("m-a")
    target.import_sequence(handoff)
    assert [s.status for s in (*target.swapped, *target.waiting)] == [lands_in]
    if lands_in is SeqStatus.SWAPPED:  # its KV waits in host slabs, bit for bit
        host = target.swapper.host_kv
        held = [host.page_bytes_view(p) for p in target.swapper.host_blocks.block_table("moved")]
        assert torch.equal(torch.cat(held), torch.from_numpy(handoff.kv).view(-1))
    steps(target, None, got)
    assert [got["busy"][0], got["moved"][0]] == want
    assert b.usage()["kv"]["used"] == 0 and b.usage()["swap"]["used"] == 0


def test_a_mismatched_page_shape_or_model_is_refused(checkpoints):
    # Two workers that disagree about what "m" is: its pages have another shape there.
    a = make_worker({"m": checkpoints["m-a"]})
    b = make_worker({"m": checkpoints["m-b"], "m-a": checkpoints["m-a"]})
    a.switch("m")
    a.engine("m").add_request(PROMPT, GREEDY, "r")
    a.engine("m").step()
    handoff = a.engine("m").export_sequence("r")
    with pytest.raises(HandoffError, match=r"2 layers x 2 kv heads.*3 layers x 3 kv heads"):
        b.engine("m").import_sequence(handoff)
    with pytest.raises(HandoffError, match="exported by model 'm'.*serves 'm-a'"):
        b.engine("m-a").import_sequence(handoff)
    for engine in b.engines.values():
        assert not engine.has_unfinished() and engine.num_used_pages == 0
    same = make_worker({"m": checkpoints["m-a"]})
    same.engine("m").import_sequence(handoff)
    with pytest.raises(HandoffError, match="already"):
        same.engine("m").import_sequence(handoff)
    same.engine("m").abort("r")
    assert same.usage()["kv"]["used"] == 0


def test_a_replayed_detokenizer_continues_like_an_uninterrupted_one(checkpoints):
    tokenizer = checkpoints["m-a"].tokenizer
    # Multi-byte characters split across tokens, and a stop string that may straddle the cut.
    ids = tokenizer.encode("Café 🙂 naïve ok STOP after")
    params = SamplingParams(max_tokens=64, stop=("ok STOP",))
    whole = IncrementalDetokenizer(tokenizer, stop=params.stop)
    want = [whole.add(t) for t in ids]
    for cut in range(1, len(ids)):
        handoff = SequenceHandoff("r", "m-a", (1,), tuple(ids[:cut]), params, None,
                                  PageShape(1, 1, 1, 4), "float32",
                                  np.empty((0, 128), np.uint8))
        seq = restore_sequence(handoff, IncrementalDetokenizer(tokenizer, stop=params.stop))
        assert [seq.detokenizer.add(t) for t in ids[cut:]] == want[cut:], cut
        assert seq.output_ids == ids[:cut] and seq.detokenizer.stop_hit == whole.stop_hit
