"""A checkpoint's own sampling defaults, read as vLLM's `--generation-config auto` reads them.

An HF directory's generation_config.json: `temperature`, `top_p`, `top_k` and
`max_new_tokens` (as max_tokens), whatever `do_sample` says. vLLM takes them regardless of
`do_sample` too (ModelConfig.get_diff_sampling_param): a model creator who writes
`temperature: 0.6` means it, and `do_sample: false` only tells HF's own `generate` to ignore
it. vLLM also reads `min_p` and `repetition_penalty`; tokenpool's sampler has neither.

A GGUF file has no generation_config.json. llama.cpp's converter copies the same values into
`general.sampling.*` metadata; files converted before it (SmolLM2's, for one) carry none, and
then there are no defaults.

Values out of range are the checkpoint's fault: a CheckpointError naming the file and key.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenpool.errors import CheckpointError, InvalidSamplingError
from tokenpool.sampling import SamplingDefaults

# SamplingDefaults field <- key in generation_config.json / in GGUF metadata.
_HF_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
            "max_tokens": "max_new_tokens"}
_GGUF_KEYS = {"temperature": "general.sampling.temp", "top_p": "general.sampling.top_p",
              "top_k": "general.sampling.top_k"}
_FLOATS = ("temperature", "top_p")


def model_defaults(fleet_defaults: SamplingDefaults | None, source: str | Path, *,
                   read=None) -> SamplingDefaults:
    """A served model's defaults: its fleet entry's `defaults:` over its checkpoint's.
    `read`: read_generation_defaults, or a cached one where aliases share a checkpoint."""
    checkpoint = (read or read_generation_defaults)(source)
    return (fleet_defaults or SamplingDefaults()).over(checkpoint)


def read_generation_defaults(source: str | Path) -> SamplingDefaults:
    """The defaults a checkpoint (an HF directory or a .gguf file) carries; none if none."""
    path = Path(source)
    if path.is_dir():
        where = path / "generation_config.json"
        return _defaults(_read_json(where), _HF_KEYS, where)
    if path.suffix == ".gguf":
        from tokenpool.models.gguf_file import read_gguf  # numpy and gguf: only when needed

        return _defaults(read_gguf(path).metadata, _GGUF_KEYS, path)
    return SamplingDefaults()


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _defaults(raw: dict, keys: dict[str, str], where: Path) -> SamplingDefaults:
    values = {field: _number(field, raw[key], key, where) for field, key in keys.items()
              if raw.get(key) is not None}
    try:
        return SamplingDefaults(**values)
    except InvalidSamplingError as exc:
        raise CheckpointError(f"{where}: {keys[exc.param]}: {exc}") from exc


def _number(field: str, value, key: str, where: Path) -> float | int:
    # bool is an int to Python, never a sampling value; JSON writes 1.0 as 1 at times.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CheckpointError(f"{where}: {key}: expected a number, got {value!r}")
    if field in _FLOATS:
        return float(value)
    if isinstance(value, float) and not value.is_integer():
        raise CheckpointError(f"{where}: {key}: expected an integer, got {value!r}")
    return int(value)
