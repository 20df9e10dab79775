"""Text <-> token ids, built from an HF tokenizer.json or from GGUF tokenizer metadata."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from tokenpool.errors import CheckpointError
from tokenpool.models.chat_template import jinja_env, template_message

# GGUF tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
_CONTROL, _USER_DEFINED = 3, 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_byte_level() -> pre_tokenizers.PreTokenizer:
    # llama.cpp splits off every \p{N} code point before the GPT-2 regex, as SmolLM2's and
    # StarCoder's own tokenizer.json do with Digits(individual_digits=True).
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), _byte_level()])


def _llama3_split() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


# tokenizer.ggml.pre -> pre-tokenizer, following the regexes in llama.cpp's llama-vocab.cpp.
_PRE_TOKENIZERS = {
    **dict.fromkeys(["smollm", "starcoder", "refact", "codeshell", "command-r", "exaone",
                     "minerva"], _digits_then_byte_level),
    **dict.fromkeys(["default", "gpt2", "gpt-2", "mpt", "olmo", "jais"], _byte_level),
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3"],
                    _llama3_split),
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of each byte, as byte-level BPE vocabularies use."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    spelling, extra = {}, 0
    for b in range(256):
        if b in printable:
            spelling[b] = chr(b)
        else:
            spelling[b] = chr(256 + extra)
            extra += 1
    return spelling


class Tokenizer:
    """A tokenizers.Tokenizer plus what generation needs: special ids and the chat template."""

    def __init__(self, backend: Backend, *, bos_token: str | None, eos_tokens: Sequence[str],
                 chat_template: str | None = None, add_bos_token: bool = False,
                 unk_token: str | None = None, pad_token: str | None = None,
                 extra_eos_ids: Sequence[int] = ()):
        self.backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_tokens[0] if eos_tokens else None
        self.unk_token, self.pad_token = unk_token, pad_token
        self.add_bos_token = add_bos_token
        self._chat_template = chat_template
        self._template = None  # compiled on first use
        ids = [self._id(t) for t in eos_tokens] + list(extra_eos_ids)
        self._eos_ids = tuple(dict.fromkeys(i for i in ids if i is not None))
        if add_bos_token and bos_token is not None and backend.post_processor is None:
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B",
                special_tokens=[(bos_token, self._id(bos_token))])

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise CheckpointError(f"{path} has no tokenizer.json")
        backend = Backend.from_file(str(path / "tokenizer.json"))
        cfg = read_json(path / "tokenizer_config.json")
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            template = {t["name"]: t["template"] for t in template}.get("default")
        if template is None and (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        gen_eos = read_json(path / "generation_config.json").get("eos_token_id")
        eos = _token_content(cfg.get("eos_token"))
        return cls(backend, bos_token=_token_content(cfg.get("bos_token")),
                   eos_tokens=[eos] if eos else [], chat_template=template,
                   add_bos_token=bool(cfg.get("add_bos_token", False)),
                   unk_token=_token_content(cfg.get("unk_token")),
                   pad_token=_token_content(cfg.get("pad_token")),
                   extra_eos_ids=_as_id_list(gen_eos))

    @classmethod
    def from_gguf(cls, source: Any) -> "Tokenizer":
        """From GGUF metadata: a dict (gguf_file.read_gguf().metadata) or a gguf.GGUFReader."""
        meta = source if isinstance(source, dict) else _reader_metadata(source)
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise CheckpointError(
                f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
        if "tokenizer.ggml.tokens" not in meta:
            raise CheckpointError("GGUF metadata has no tokenizer.ggml.tokens")
        tokens = _byte_level_spelling(meta["tokenizer.ggml.tokens"])
        pre = meta.get("tokenizer.ggml.pre", "default")
        if pre not in _PRE_TOKENIZERS:
            raise CheckpointError(f"GGUF pre-tokenizer {pre!r} is not supported; known: "
                                  f"{', '.join(sorted(_PRE_TOKENIZERS))}")
        merges = meta.get("tokenizer.ggml.merges", [])
        backend = _bpe_backend(tokens, merges, _PRE_TOKENIZERS[pre]())
        _add_gguf_added_tokens(backend, tokens, meta.get("tokenizer.ggml.token_type") or [])
        special = {key: tokens[meta[f"tokenizer.ggml.{key}_token_id"]]
                   for key in ("bos", "eos", "unknown", "padding")
                   if f"tokenizer.ggml.{key}_token_id" in meta}
        return cls(backend, bos_token=special.get("bos"),
                   eos_tokens=[special["eos"]] if "eos" in special else [],
                   chat_template=meta.get("tokenizer.chat_template"),
                   add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                   unk_token=special.get("unknown"), pad_token=special.get("padding"))

    # -- use ----------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """The text HF's apply_chat_template(tokenize=False) gives: the same variables (tools
        and documents None, only the special tokens that are set) and the same messages."""
        if self._chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        if self._template is None:
            self._template = jinja_env().from_string(self._chat_template)
        special = {"bos_token": self.bos_token, "eos_token": self.eos_token,
                   "unk_token": self.unk_token, "pad_token": self.pad_token}
        return self._template.render({
            "tools": None, "documents": None,
            **{name: token for name, token in special.items() if token is not None},
            **kwargs,
            "messages": [template_message(m) for m in messages],
            "add_generation_prompt": add_generation_prompt,
        })

    def token_to_id(self, token: str) -> int | None:
        return self._id(token)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos_ids

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    def save_pretrained(self, out_dir: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json in the layout HF's AutoTokenizer reads."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(out / "tokenizer.json"))
        cfg = {
            # The generic class loads tokenizer.json as written; a model-specific class would
            # rebuild the pre-tokenizer its own way.
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token, "eos_token": self.eos_token,
            "unk_token": self.unk_token, "pad_token": self.pad_token,
            "add_bos_token": self.add_bos_token, "clean_up_tokenization_spaces": False,
            "chat_template": self._chat_template,
        }
        cfg = {k: v for k, v in cfg.items() if v is not None}
        text = json.dumps(cfg, indent=2, ensure_ascii=False)
        (out / "tokenizer_config.json").write_text(text + "\n")

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)


def _bpe_backend(tokens: list[str], merges: list[str], pre: pre_tokenizers.PreTokenizer) -> Backend:
    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ")) for m in merges]
    bad = next((m for m, p in zip(merges, pairs) if len(p) != 2), None)
    if bad is not None:
        raise CheckpointError(f"GGUF merge {bad!r} is not two space-separated tokens")
    backend = Backend(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    backend.pre_tokenizer = pre
    backend.decoder = decoders.ByteLevel()
    return backend


def _add_gguf_added_tokens(backend: Backend, tokens: list[str], types: list[int]) -> None:
    """Control tokens (<|im_start|>) become special; user-defined ones are matched whole too."""
    special = [AddedToken(t, special=True, normalized=False)
               for t, kind in zip(tokens, types) if kind == _CONTROL]
    plain = [AddedToken(t, special=False, normalized=False)
             for t, kind in zip(tokens, types) if kind == _USER_DEFINED]
    backend.add_special_tokens(special)
    backend.add_tokens(plain)


def _byte_level_spelling(tokens: list[str]) -> list[str]:
    # Some converters store a token with characters outside the byte alphabet (raw UTF-8);
    # respell those in the alphabet so the BPE model can reach them, as transformers does.
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    return [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))
            for t in tokens]


def _reader_metadata(reader: Any) -> dict[str, Any]:
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


def read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e


def _token_content(token: Any) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
