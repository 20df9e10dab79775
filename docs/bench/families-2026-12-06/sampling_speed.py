"""Batch-1 decode speed of SmolLM2 by sampling kind (the table in README.md here).

Run from the repository root: .venv/bin/python docs/bench/families-2026-12-06/sampling_speed.py
"""
import time
from tokenpool.models.checkpoint import load_checkpoint
from tokenpool.models.locate import smollm2_gguf_path
from tokenpool.gpu_pool.engine import LLMEngine
from tokenpool.gpu_pool.engine_config import EngineConfig
from tokenpool.sampling import SamplingParams
ck = load_checkpoint(smollm2_gguf_path(), progress=False)
eng = LLMEngine.from_checkpoint(ck, EngineConfig(dtype="float32", kv_cache_bytes=64<<20))
for name, p in [("greedy", SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)),
                ("t0.1 top_p0.9", SamplingParams(max_tokens=48, temperature=0.1, top_p=0.9, ignore_eos=True, seed=1)),
                ("t0.1", SamplingParams(max_tokens=48, temperature=0.1, ignore_eos=True, seed=1)),
                ("greedy", SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)),
                ("t0.1 top_p0.9", SamplingParams(max_tokens=48, temperature=0.1, top_p=0.9, ignore_eos=True, seed=1))]:
    eng.generate([[5]*64], p)
    t = time.perf_counter(); eng.generate([[5]*64], p); print(name, round(48/(time.perf_counter()-t),1), "tok/s", flush=True)
