"""`tokenpool fleet synth`: random-initialised checkpoints of chosen families and shapes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tokenpool.cli import _args

SHAPE_HELP = "L,H,NH,NKV[,FFN]: layers, hidden size, attention heads, KV heads, FFN size"

SYNTH_DESCRIPTION = f"""\
Write one random-initialised checkpoint of --family (HF layout: config.json,
model.safetensors, SmolLM2's tokenizer) per --shape under DIR, in a subdirectory named after
the shape (synth-l<L>-h<H>-nh<NH>-kv<NKV>-f<FFN>, with the family after `synth-` for families
other than llama), then print to stdout a YAML `models:` snippet that lists them, ready to
paste into a fleet file. Progress goes to stderr. Each family's checkpoint has its
features switched on (Qwen2's q/k/v biases, Gemma's soft-capping and sliding layers, ...).

shape: {SHAPE_HELP}.
H must be a multiple of NH with an even head size H/NH, and NH a multiple of NKV.
FFN defaults to SmolLM2's ratio (about 2.67 x H, rounded to 64)."""

SYNTH_EPILOG = """\
examples:
  tokenpool fleet synth --out synth --shape 4,256,8,2 --shape 8,512,8,8,1024
  tokenpool fleet synth --out synth --family gemma2 --shape 4,256,4,2
  tokenpool fleet synth --out synth --shape 2,64,4,1 --dtype bfloat16 >> my-fleet-models.yaml"""


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "fleet", help="tools for fleet files (synth: write synthetic checkpoints)",
        description="Tools for fleet files and the checkpoints they name.",
        formatter_class=_args.HelpFormatter)
    actions = p.add_subparsers(dest="fleet_command", metavar="ACTION", required=True)
    synth = actions.add_parser(
        "synth", help="write random-initialised Llama checkpoints of chosen shapes",
        description=SYNTH_DESCRIPTION, epilog=SYNTH_EPILOG, formatter_class=_args.HelpFormatter)
    synth.add_argument("--out", metavar="DIR", type=Path, required=True,
                       help="directory to write the checkpoints under (created if missing)")
    synth.add_argument("--shape", metavar="L,H,NH,NKV[,FFN]", action="append", required=True,
                       type=_args.checked(_parse_shape, "shape"),
                       help="a checkpoint shape; repeat the option for several checkpoints")
    synth.add_argument("--family", choices=_families(), default="llama",
                       help="the model family written (default: llama)")
    synth.add_argument("--seed", metavar="N", type=_args.any_int, default=0,
                       help="seed of the random weights (default: 0)")
    synth.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                       help="dtype the weights are stored in (default: float32)")
    synth.set_defaults(func=run_synth)


def run_synth(args: argparse.Namespace) -> int:
    import torch

    from tokenpool.models import write_synthetic_checkpoint
    from tokenpool.models.synth import smollm2_tokenizer

    shapes = _unique(args.shape)
    tokenizer = smollm2_tokenizer()
    written = []
    for shape in shapes:
        out = args.out / shape_name(shape, args.family)
        print(f"tokenpool: writing {out}", file=sys.stderr, flush=True)
        write_synthetic_checkpoint(out, **shape, seed=args.seed, family=args.family,
                                   dtype=getattr(torch, args.dtype), tokenizer=tokenizer)
        written.append((shape, out.resolve()))
    sys.stdout.write(models_snippet(written, args.family))
    return 0


def _parse_shape(text: str) -> dict[str, int]:
    from tokenpool.models.synth_shape import default_intermediate_size, parse_shape

    shape = parse_shape(text)
    if shape.get("intermediate_size") is None:
        shape["intermediate_size"] = default_intermediate_size(shape["hidden_size"])
    return shape


def _unique(shapes: list[dict[str, int]]) -> list[dict[str, int]]:
    seen: dict[str, dict[str, int]] = {}
    for shape in shapes:
        seen.setdefault(shape_name(shape), shape)
    return list(seen.values())


def _families() -> list[str]:
    from tokenpool.models.families import FAMILIES

    return list(FAMILIES)


def shape_name(shape: dict[str, int], family: str = "llama") -> str:
    """{'num_layers': 4, 'hidden_size': 256, ...} -> 'synth-l4-h256-nh8-kv2-f768', and
    'synth-qwen2-l4-...' for family qwen2."""
    prefix = "synth-" if family == "llama" else f"synth-{family}-"
    return (f"{prefix}l{shape['num_layers']}-h{shape['hidden_size']}-nh{shape['num_heads']}"
            f"-kv{shape['num_kv_heads']}-f{shape['intermediate_size']}")


def models_snippet(written: list[tuple[dict[str, int], Path]], family: str = "llama") -> str:
    """A `models:` block for a fleet file; sources are absolute so it pastes anywhere."""
    import yaml

    lines = ["# written by tokenpool fleet synth: paste into a fleet file", "models:"]
    for shape, path in written:
        lines.append(f"  # {family}: {shape['num_layers']} layers, hidden {shape['hidden_size']}, "
                     f"{shape['num_heads']} heads, {shape['num_kv_heads']} KV heads, "
                     f"FFN {shape['intermediate_size']}")
        lines.append(f"  - id: {_yaml_scalar(yaml, shape_name(shape, family))}")
        lines.append(f"    source: {_yaml_scalar(yaml, str(path))}")
    return "\n".join(lines) + "\n"


def _yaml_scalar(yaml, value: str) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).splitlines()[0]
