"""Argument helpers shared by the subcommands: option definitions and value parsers.

Nothing heavy is imported here, so `tokenpool --help` stays instant.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

# The fleet file in this repository; `--config` falls back to it.
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "fleet.yaml"
DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANT_MODES = ("none", "native", "int8", "int4")  # memory/quant_formats.py's, kept import-free
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the line breaks of descriptions and epilogs (the examples)."""

    def __init__(self, prog: str):
        super().__init__(prog, max_help_position=32)


def add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="FILE", type=Path, default=DEFAULT_CONFIG,
        help="fleet file (YAML) that lists the models and the engine settings "
             "(default: configs/fleet.yaml of this repository)")


def add_json_out(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="OUT", type=Path, required=True,
                        help="write the results as one JSON object to this file")


def add_dtype(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--dtype", choices=DTYPES, default=None,
        help=f"weight and compute dtype of {what}, overriding the fleet file "
             "(auto: bfloat16 on CUDA and on CPUs with AVX512-BF16/AMX, else float32; "
             "float16 needs CUDA)")


def add_quant(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--quant", choices=QUANT_MODES, default="none",
        help=f"weight format of {what}, whatever the fleet file's quantization says: "
             "none (default: floats in --dtype; a GGUF dequantized), native (a GGUF's Q8_0, "
             "Q4_0, Q4_1, Q4_K and Q6_K tensors served as stored), int8 (per output channel) "
             "or int4 (groups of 32, Q4_1 blocks), quantized at load")


def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", metavar="DEV", default=None, type=device_name,
        help="cpu, cuda or cuda:N, overriding engine.device of the fleet file")


def device_name(text: str) -> str:
    if not _DEVICE.match(text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def any_int(text: str) -> int:
    return _int(text)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def checked(parse, what: str):
    """Wrap a parser that raises ValueError so argparse reports its message (exit 2)."""

    def convert(text: str):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = what  # argparse names the type in some messages
    return convert


def port(text: str) -> int:
    value = _int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port in 0..65535, got {text!r}")
    return value


def command_line(args: argparse.Namespace) -> str:
    """The command as the user typed it, for the reports that say how they were made."""
    import shlex
    import sys

    argv = getattr(args, "argv", None)
    return shlex.join(["tokenpool", *(sys.argv[1:] if argv is None else argv)])
