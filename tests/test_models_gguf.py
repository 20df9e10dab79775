"""GGUF loading: the real SmolLM2 against HF's loader, and small files we write ourselves."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from fixtures_models import *  # noqa: F403
from fixtures_models import llama_cpp_permute
from tokenpool.errors import CheckpointError
from tokenpool.models import Tokenizer, load_checkpoint
from tokenpool.models.gguf_file import read_gguf
from tokenpool.models.gguf_loader import unpermute_rope_rows

# -- the real model ------------------------------------------------------------------------


def test_smollm2_weights_equal_hf(smollm2_checkpoint, hf_smollm2_model):
    ours = smollm2_checkpoint.weights
    theirs = hf_smollm2_model.state_dict()
    # HF's state_dict lists the tied lm_head too; ours leaves it out, as the config says.
    assert set(theirs) - set(ours) == {"lm_head.weight"}
    assert set(ours) <= set(theirs)
    for name, w in ours.items():
        assert w.dtype == torch.float32 and w.is_contiguous() and w.device.type == "cpu", name
        if not torch.equal(w, theirs[name]):  # equal in practice; assert_close is slow on 135M
            torch.testing.assert_close(w, theirs[name], rtol=0, atol=1e-6, msg=name)
    assert torch.equal(theirs["lm_head.weight"], ours["model.embed_tokens.weight"])


def test_smollm2_config_equals_hf(smollm2_checkpoint, hf_smollm2_model):
    cfg, hf = smollm2_checkpoint.config, hf_smollm2_model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.rope.theta == 100000.0 and cfg.tie_word_embeddings
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim",
                  "max_position_embeddings", "tie_word_embeddings", "bos_token_id"):
        assert getattr(cfg, field) == getattr(hf, field), field
    assert cfg.rope.theta == hf.rope_parameters["rope_theta"]
    assert cfg.rms_norm_eps == pytest.approx(hf.rms_norm_eps)
    assert cfg.eos_token_ids == (hf.eos_token_id,)


def test_smollm2_checkpoint_basics(smollm2_checkpoint, smollm2_path):
    assert smollm2_checkpoint.source == str(smollm2_path)
    assert smollm2_checkpoint.tokenizer.vocab_size == smollm2_checkpoint.config.vocab_size


def test_metadata_matches_gguf_reader(gguf_dir):
    """Our fast parser reads the same metadata and tensor table as gguf.GGUFReader."""
    path = _write_tiny_gguf(gguf_dir / "meta.gguf", Q.Q4_1, seed=3)
    ours = read_gguf(path)
    reader = gguf.GGUFReader(path)
    for key, field in reader.fields.items():
        if not key.startswith("GGUF."):
            assert ours.metadata[key] == pytest.approx(field.contents()), key
    assert [t.name for t in ours.tensors] == [t.name for t in reader.tensors]
    for mine, theirs in zip(ours.tensors, reader.tensors):
        assert mine.qtype == theirs.tensor_type
        assert np.array_equal(mine.data, theirs.data.view(np.uint8).reshape(mine.data.shape))


# -- small files we write --------------------------------------------------------------------

# The gguf package can quantize these; K-quants and IQ types it can only dequantize, so they
# are tested from raw blocks in test_k_quant_blocks_match_gguf_dequantize.
QUANTIZABLE = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]
REL_ERROR = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 0.01, Q.Q5_0: 0.06, Q.Q5_1: 0.06,
             Q.Q4_0: 0.12, Q.Q4_1: 0.12}
TINY = dict(layers=2, hidden=64, heads=4, kv_heads=2, ffn=128)


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf")


def _tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    """A byte-level BPE vocabulary: 256 bytes, a few merges, three control tokens."""
    from tokenpool.models.tokenizer import _bytes_to_unicode
    tokens = list(_bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
    tokens += ["Ġt", "he", "Ġthe", "in", "Ġa", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    types = [1] * (len(tokens) - 3) + [3, 3, 3]
    return tokens, types, merges


def _source_weights(seed: int, untied: bool) -> dict[str, np.ndarray]:
    """HF-named, HF-ordered weights: what the GGUF file should load back as."""
    rng = np.random.default_rng(seed)
    h, f, v = TINY["hidden"], TINY["ffn"], len(_tiny_vocab()[0])
    hd = h // TINY["heads"]
    mat = lambda *s: rng.normal(0, 0.02, s).astype(np.float32)  # noqa: E731
    w = {"model.embed_tokens.weight": mat(v, h), "model.norm.weight": 1 + mat(h)}
    if untied:
        w["lm_head.weight"] = mat(v, h)
    for i in range(TINY["layers"]):
        p = f"model.layers.{i}."
        kv = TINY["kv_heads"] * hd
        w |= {p + "input_layernorm.weight": 1 + mat(h),
              p + "post_attention_layernorm.weight": 1 + mat(h),
              p + "self_attn.q_proj.weight": mat(h, h), p + "self_attn.k_proj.weight": mat(kv, h),
              p + "self_attn.v_proj.weight": mat(kv, h), p + "self_attn.o_proj.weight": mat(h, h),
              p + "mlp.gate_proj.weight": mat(f, h), p + "mlp.up_proj.weight": mat(f, h),
              p + "mlp.down_proj.weight": mat(h, f)}
    return w


_GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _gguf_name(hf: str) -> str:
    glob = {"model.embed_tokens.weight": "token_embd.weight",
            "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    if hf in glob:
        return glob[hf]
    _, _, i, rest = hf.split(".", 3)
    return f"blk.{i}.{_GGUF_NAMES[rest.removesuffix('.weight')]}.weight"


def _rope_heads(hf_name: str) -> int | None:
    """Heads whose rows llama.cpp permutes in this weight: Q's, K's, or none."""
    if "q_proj" in hf_name:
        return TINY["heads"]
    return TINY["kv_heads"] if "k_proj" in hf_name else None


def _stored(hf_name: str, w: np.ndarray) -> np.ndarray:
    """What llama.cpp's converter writes for this weight: Q and K rows permuted."""
    heads = _rope_heads(hf_name)
    return w if heads is None else llama_cpp_permute(w, heads)


def _write_tiny_gguf(path, qtype: Q, *, seed: int = 0, untied: bool = False,
                     raw: dict[str, np.ndarray] | None = None):
    """A llama GGUF with every matrix stored as `qtype` (norms stay F32, as llama.cpp does)."""
    tokens, types, merges = _tiny_vocab()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(TINY["layers"]); w.add_context_length(512)  # noqa: E702
    w.add_embedding_length(TINY["hidden"]); w.add_feed_forward_length(TINY["ffn"])  # noqa: E702
    w.add_head_count(TINY["heads"]); w.add_head_count_kv(TINY["kv_heads"])  # noqa: E702
    w.add_rope_dimension_count(TINY["hidden"] // TINY["heads"])
    w.add_rope_freq_base(5e4)
    w.add_layer_norm_rms_eps(1e-5); w.add_vocab_size(len(tokens))  # noqa: E702
    w.add_tokenizer_model("gpt2"); w.add_tokenizer_pre("gpt2")  # noqa: E702
    w.add_token_list(tokens); w.add_token_types(types); w.add_token_merges(merges)  # noqa: E702
    w.add_bos_token_id(len(tokens) - 3); w.add_eos_token_id(len(tokens) - 1)  # noqa: E702
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                        "{{ m['content'] }}<|im_end|>\n{% endfor %}")
    for hf_name, value in _source_weights(seed, untied).items():
        stored = _stored(hf_name, value)
        if raw is not None and stored.ndim == 2:
            w.add_tensor(_gguf_name(hf_name), raw[hf_name], raw_dtype=qtype)
        elif stored.ndim == 1 or qtype == Q.F32:
            w.add_tensor(_gguf_name(hf_name), stored)
        elif qtype == Q.F16:
            w.add_tensor(_gguf_name(hf_name), stored.astype(np.float16))
        else:
            w.add_tensor(_gguf_name(hf_name), quantize(stored, qtype), raw_dtype=qtype)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file()  # noqa: E702
    w.close()
    return path


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda q: q.name)
def test_tiny_gguf_loads_with_correct_values(gguf_dir, qtype):
    path = _write_tiny_gguf(gguf_dir / f"tiny-{qtype.name}.gguf", qtype, seed=1)
    ckpt = load_checkpoint(path, progress=False)
    assert ckpt.config.tie_word_embeddings and "lm_head.weight" not in ckpt.weights
    assert ckpt.config.rope.theta == 5e4 and ckpt.config.head_dim == 16
    for name, src in _source_weights(1, untied=False).items():
        got = ckpt.weights[name]
        expect_dtype = {Q.F16: torch.float16, Q.BF16: torch.bfloat16}.get(qtype, torch.float32)
        assert got.dtype == (torch.float32 if src.ndim == 1 else expect_dtype), name
        # Exactly what gguf's own dequantize gives for the stored bytes, un-permuted...
        stored = _stored(name, src)
        if src.ndim == 2 and qtype not in (Q.F32, Q.F16):
            ref = torch.from_numpy(dequantize(quantize(stored, qtype), qtype))
            ref = _unpermute(name, ref)
            assert torch.equal(got.float(), ref), name
        # ...and within quantization error of the original: a wrong Q/K permutation is ~140% off.
        err = np.linalg.norm(got.float().numpy() - src) / np.linalg.norm(src)
        assert err <= (REL_ERROR[qtype] if src.ndim == 2 else 0) + 1e-7, (name, err)


def _unpermute(name: str, w: torch.Tensor) -> torch.Tensor:
    heads = _rope_heads(name)
    return w if heads is None else unpermute_rope_rows(w, heads)


@pytest.mark.parametrize("qtype,untied", [(Q.Q8_0, False), (Q.Q4_1, True), (Q.F16, False),
                                           (Q.F32, True)], ids=lambda v: getattr(v, "name", str(v)))
def test_tiny_gguf_equals_hf_loader(gguf_dir, qtype, untied):
    """HF un-permutes Q/K in its own code: our weights must equal its state_dict exactly."""
    transformers = pytest.importorskip("transformers")
    path = _write_tiny_gguf(gguf_dir / f"hf-{qtype.name}-{untied}.gguf", qtype, seed=2,
                            untied=untied)
    ckpt = load_checkpoint(path, progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                           dtype=torch.float32)
    theirs = hf.state_dict()
    assert ckpt.config.tie_word_embeddings == (not untied) == hf.config.tie_word_embeddings
    for name, w in ckpt.weights.items():
        torch.testing.assert_close(w.float(), theirs[name], rtol=0, atol=1e-6, msg=name)


def test_tiny_gguf_tokenizer_equals_hf(gguf_dir):
    transformers = pytest.importorskip("transformers")
    path = _write_tiny_gguf(gguf_dir / "tok.gguf", Q.F32)
    ours = load_checkpoint(path, progress=False).tokenizer
    hf = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in ["in the theater", " the  a", "x<|im_end|>y", "héllo 🙂 123", "\n\n the"]:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False), text
    vocab = len(_tiny_vocab()[0])
    assert ours.bos_token_id == vocab - 3 and ours.eos_token_ids == (vocab - 1,)


def test_tokenizer_from_gguf_reader_equals_from_metadata(gguf_dir):
    path = _write_tiny_gguf(gguf_dir / "reader.gguf", Q.F32)
    from_reader = Tokenizer.from_gguf(gguf.GGUFReader(path))
    from_meta = Tokenizer.from_gguf(read_gguf(path).metadata)
    for text in ["in the theater", "x<|im_end|>y", "héllo 🙂 123"]:
        assert from_reader.encode(text) == from_meta.encode(text)
    assert from_reader.chat_template == from_meta.chat_template is not None
    assert from_reader.eos_token_ids == from_meta.eos_token_ids


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
def test_k_quant_blocks_match_gguf_dequantize(tmp_path, qtype, monkeypatch):
    """gguf cannot quantize K-quants, so store random blocks and compare with its dequantize."""
    monkeypatch.setitem(TINY, "hidden", 256)  # K-quant rows are whole 256-value super-blocks
    monkeypatch.setitem(TINY, "ffn", 256)
    rng = np.random.default_rng(0)
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = {}
    for name, src in _source_weights(0, untied=False).items():
        if src.ndim == 2:
            shape = (src.shape[0], src.shape[1] // block, nbytes)
            blocks = rng.integers(0, 256, shape, dtype=np.uint8)
            scale = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
            # Scales must be finite: d, dmin lead a Q4_K block; d ends a Q6_K block.
            blocks[..., 0:2] = blocks[..., 2:4] = blocks[..., -2:] = scale
            raw[name] = blocks.reshape(src.shape[0], -1)
    path = _write_tiny_gguf(tmp_path / "k.gguf", qtype, raw=raw)
    ckpt = load_checkpoint(path, progress=False)
    for name, blocks in raw.items():
        ref = _unpermute(name, torch.from_numpy(dequantize(blocks, qtype)))
        torch.testing.assert_close(ckpt.weights[name], ref, rtol=0, atol=0, equal_nan=True,
                                   msg=name)


def test_unpermute_inverts_llama_cpp_permute():
    w = np.arange(12 * 3, dtype=np.float32).reshape(12, 3)
    for heads in (1, 2, 3):
        back = unpermute_rope_rows(torch.from_numpy(llama_cpp_permute(w, heads)), heads)
        assert torch.equal(back, torch.from_numpy(w))


# -- errors ------------------------------------------------------------------------------------


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        load_checkpoint(bad)


def test_truncated_gguf_file(tmp_path, gguf_dir):
    path = _write_tiny_gguf(gguf_dir / "whole.gguf", Q.Q8_0)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated|past the end"):
        load_checkpoint(cut)


def test_empty_gguf_file(tmp_path):
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="cannot read GGUF"):
        load_checkpoint(empty)


def test_non_llama_gguf(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_block_count(1)
    w.write_header_to_file(); w.write_kv_data_to_file()  # noqa: E702
    w.write_tensors_to_file(); w.close()  # noqa: E702
    with pytest.raises(CheckpointError, match="architecture 'gpt2' is not supported"):
        load_checkpoint(tmp_path / "gpt2.gguf")
