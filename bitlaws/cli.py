"""The `bitlaws` command line. Thin: each subcommand parses arguments and calls a library function."""

from __future__ import annotations

import argparse
import pickle
import sys
import time
from typing import Optional, Sequence


def _cmd_formats(args: argparse.Namespace) -> int:
    from bitlaws.quant import format_table  # pylint: disable=g-import-not-at-top

    names = args.formats or format_table.TABLE_FORMATS
    start = time.perf_counter()
    rows = format_table.format_rows(names, size=args.size, seed=args.seed, progress=not args.no_progress)
    print(format_table.render(rows, args.size))
    print(f"({time.perf_counter() - start:.1f} s)")
    return 0


def _cmd_port(args: argparse.Namespace) -> int:
    from bitlaws.port import convert  # pylint: disable=g-import-not-at-top

    start = time.perf_counter()
    out = convert.convert(args.kind, args.ckpt, args.out, config=args.config, key=args.key)
    print(f"ported {args.kind} from {args.ckpt} to {out} ({time.perf_counter() - start:.1f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bitlaws",
        description="Quantize vision generative models (VAR, DiT) and measure their bit-level scaling laws.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    formats = sub.add_parser("formats", help="table of every quantization format: bits, grid, max, error",
                             description="Print every quantization format with its bits per value, grid size, "
                                         "max normal and the relative RMS error of quantizing a standard-normal "
                                         "tensor per tensor / per channel / per group.")
    formats.add_argument("--size", type=int, default=4096, help="side of the square test tensor (default 4096)")
    formats.add_argument("--seed", type=int, default=0)
    formats.add_argument("--formats", nargs="*", help="only these formats (default: all)")
    formats.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    formats.set_defaults(func=_cmd_formats)

    port = sub.add_parser("port", help="convert an official PyTorch checkpoint to an orbax checkpoint (no torch needed)",
                          description="Read an official checkpoint with the safe torch-free reader, map its keys to "
                                      "our NNX model (every missing/unexpected/misshapen key is named), save orbax.")
    port.add_argument("kind", choices=["var", "vqvae", "dit", "vae", "inception"])
    port.add_argument("--ckpt", required=True, help="the official weight file (.pth/.pt/.bin/.safetensors/.npz)")
    port.add_argument("--out", required=True, help="output directory")
    port.add_argument("--config", help="model config FILE.py[:ARG] (required for var, vqvae and dit)")
    port.add_argument("--key", help="sub-dict of a nested checkpoint, e.g. 'ema' or 'model'")
    port.set_defaults(func=_cmd_port)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError, pickle.UnpicklingError) as e:
        print(f"bitlaws {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
