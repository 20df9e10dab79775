"""`tokenpool generate`: one prompt through one model of a fleet, streamed to stdout."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TextIO

from tokenpool.cli import _args

DEFAULT_MAX_TOKENS = 64  # neither --max-tokens nor the model's defaults set one

DESCRIPTION = """\
Generate a completion for one prompt with one model of a fleet file and stream it to
stdout as it is produced. Only the completion text (and a final newline) goes to stdout;
progress bars and the summary line go to stderr, so the output can be piped or compared.

A sampling value left out takes the model's default, as the server's requests do: its fleet
entry's `defaults:`, else its checkpoint's generation_config.json, else OpenAI's (temperature
1, top_p 1, top_k off; max tokens 64 here)."""

EPILOG = """\
examples:
  tokenpool generate --model smollm2-135m-instruct --prompt "The capital of France is"
  tokenpool generate --model smollm2-135m-instruct --chat --prompt "Tell me a joke" \\
      --temperature 0.7 --seed 1 --max-tokens 128
  tokenpool generate --config my-fleet.yaml --model synth-l4-h256-nh8-kv2-f768 \\
      --prompt "hello" --dtype bfloat16"""


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "generate", help="generate a completion for one prompt (printed to stdout)",
        description=DESCRIPTION, epilog=EPILOG, formatter_class=_args.HelpFormatter)
    _args.add_config(p)
    p.add_argument("--model", metavar="ID", required=True,
                   help="model id, as listed under models: in the fleet file")
    p.add_argument("--prompt", metavar="TEXT", required=True,
                   help="the prompt text (with --chat: the user's message)")
    p.add_argument("--max-tokens", metavar="N", type=_args.positive_int, default=None,
                   help="generate at most N tokens (default: the model's, else 64)")
    p.add_argument("--temperature", metavar="T", type=float, default=None,
                   help="sampling temperature; 0 means greedy (default: the model's, else 1)")
    p.add_argument("--top-p", metavar="P", type=float, default=None,
                   help="nucleus sampling: keep the smallest set of tokens whose probability "
                        "reaches P, in (0, 1] (default: the model's, else 1, off)")
    p.add_argument("--top-k", metavar="K", type=_args.any_int, default=None,
                   help="sample only among the K most likely tokens; -1 turns it off "
                        "(default: the model's, else -1)")
    p.add_argument("--seed", metavar="S", type=_args.any_int, default=None,
                   help="seed of this request's sampler, for reproducible sampling "
                        "(default: drawn from the engine's seed)")
    p.add_argument("--stop", metavar="STR", action="append", default=[],
                   help="stop before this string; repeat for several (the stop string "
                        "itself is not printed)")
    p.add_argument("--chat", action="store_true",
                   help="send the prompt as one user message through the model's chat "
                        "template")
    _args.add_dtype(p, "the model")
    _args.add_device(p)
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bars and no summary line on stderr")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tokenpool.errors import EmptyPromptError

    sampling = sampling_request(args)  # bad values fail here, before torch even loads
    if not args.prompt:
        raise EmptyPromptError()
    from tokenpool.cli._model import find_model, load_model
    from tokenpool.models.generation_defaults import model_defaults

    fleet, spec = find_model(args.config, args.model)
    model = load_model(fleet, spec, dtype=args.dtype, device=args.device,
                       progress=not args.quiet)
    prompt_ids = encode_prompt(model.checkpoint.tokenizer, args.prompt, chat=args.chat)
    params = sampling.resolve(model_defaults(spec.defaults, model.path),
                              model.engine.max_model_len - len(prompt_ids))
    start = time.perf_counter()
    last = stream_completion(model.engine, prompt_ids, params, sys.stdout)
    if not args.quiet:
        print(summary(spec.id, model.engine, last, time.perf_counter() - start),
              file=sys.stderr)
    return 0


def sampling_request(args: argparse.Namespace):
    """What the command line asked for; the model's defaults fill the rest once loaded."""
    from tokenpool.sampling import SamplingDefaults, SamplingRequest

    asked = SamplingDefaults(temperature=args.temperature, top_p=args.top_p,
                             top_k=args.top_k, max_tokens=args.max_tokens)
    return SamplingRequest(asked, DEFAULT_MAX_TOKENS,
                           dict(seed=args.seed, stop=tuple(args.stop)))


def encode_prompt(tokenizer, prompt: str, *, chat: bool) -> list[int]:
    # Imported here: it pulls in torch, which `--help` and argument errors need not wait for.
    from tokenpool.models.prompts import encode_chat, encode_text

    if chat:
        return encode_chat(tokenizer, [{"role": "user", "content": prompt}])
    return encode_text(tokenizer, prompt)


def stream_completion(engine, prompt_ids: list[int], params, out: TextIO):
    """Write the text as the engine produces it; returns the request's last RequestOutput."""
    request_id = engine.add_request(prompt_ids, params)
    last = None
    while engine.has_unfinished():
        for output in engine.step():
            if output.request_id != request_id:
                continue
            if output.new_text:
                out.write(output.new_text)
                out.flush()
            last = output
    out.write("\n")
    out.flush()
    return last


def summary(model_id: str, engine, last, seconds: float) -> str:
    generated = last.num_output_tokens if last else 0
    prompt = last.num_prompt_tokens if last else 0
    rate = generated / seconds if seconds > 0 else 0.0
    return (f"tokenpool: {model_id} ({engine.dtype_name} on {engine.device}): {prompt} prompt "
            f"+ {generated} generated tokens, finish={last.finish_reason if last else None}, "
            f"{seconds:.2f} s ({rate:.1f} tok/s)")
