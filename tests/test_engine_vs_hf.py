"""The engine against HF transformers on the same GGUF weights (float32)."""

from __future__ import annotations

import pytest
import torch

from tokenpool.sampling import SamplingParams
from helpers import agreed_prefix, hf_greedy

NEW_TOKENS = 48
PLAIN = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea, there lived",
    "Les mathématiques sont 🧮 un langage: 1, 1, 2, 3, 5, 8,",
]
CHAT = [
    [{"role": "user", "content": "What is the boiling point of water?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Name three primary colors."}],
    [{"role": "user", "content": "Write a haiku about GPUs."}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Explain recursion in one sentence."}],
]


@pytest.fixture(scope="module")
def prompts(smollm2):
    tok = smollm2.tokenizer
    chat = [tok.encode(tok.apply_chat_template(m, add_generation_prompt=True)) for m in CHAT]
    return [tok.encode(p) for p in PLAIN] + chat


def test_greedy_matches_hf_token_for_token(engine, hf_smollm2, prompts):
    # All 8 run together, continuously batched, ignoring EOS so every step is compared.
    ours = engine.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0,
                                                   ignore_eos=True))
    compared = 0
    for prompt, got in zip(prompts, ours):
        ref, gaps = hf_greedy(hf_smollm2, prompt, NEW_TOKENS)
        compared += agreed_prefix(got, ref, gaps)
    # Near ties are rare; if most tokens were excused the check would be meaningless.
    assert compared >= 0.8 * NEW_TOKENS * len(prompts), f"only {compared} tokens compared"


def test_last_position_logits_match_hf(engine, hf_smollm2, prompts):
    for prompt in prompts[:3] + prompts[-2:]:
        ours = engine.next_token_logits(prompt)
        with torch.inference_mode():
            ref = hf_smollm2(torch.tensor([prompt])).logits[0, -1].float()
        rel = (ours - ref).abs().max() / ref.abs().max()
        assert rel < 1e-3, f"max relative logit error {rel:.2e}"


def test_hf_and_gguf_configs_agree(smollm2, hf_smollm2):
    cfg, ref = smollm2.config, hf_smollm2.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.num_hidden_layers == ref.num_hidden_layers
    assert cfg.rope.theta == 100000.0
    assert cfg.tie_word_embeddings
