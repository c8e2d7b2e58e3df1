"""The `bitlaws` command line. Thin: each subcommand parses arguments and calls a library function.

Heavy modules are imported inside the subcommands so that ``bitlaws --help`` is instant.

Errors a user can cause (a missing or malformed input file, a bad config, an out-of-range flag, an output
folder that must not be written) end the command with exit status 2 and one line on stderr,
``bitlaws COMMAND: error: MESSAGE``, before anything is written. Flags are checked before any work starts.
Anything else (a bug) keeps its traceback.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import pickle
import shlex
import sys
import time
from typing import Optional, Sequence

# `bitlaws port` kinds: the keys of `bitlaws.port.convert.KINDS` (listed here so `bitlaws --help` imports no JAX;
# tests/port/test_convert.py checks the two agree).
PORT_KINDS = ("var", "vqvae", "dit", "vae", "inception", "llamagen", "llamagen_vq", "mar", "mar_vae")

# Exceptions that mean "bad input" (reported in one line, exit status 2). OSError covers unreadable,
# missing or misplaced files and folders (IsADirectoryError, NotADirectoryError, PermissionError ...);
# UnicodeDecodeError is a ValueError.
USER_ERRORS = (ValueError, KeyError, RuntimeError, OSError, pickle.UnpicklingError)

# `bitlaws train` dispatches on the config's `family` field.
TRAINERS = {
    "classifier": "bitlaws.demo.classifier",
    "vqvae": "bitlaws.demo.var_family",
    "var": "bitlaws.demo.var_family",
    "dit": "bitlaws.demo.dit_family",
    "mar": "bitlaws.demo.mar_family",
    "llamagen_vq": "bitlaws.demo.llamagen_family",
    "llamagen": "bitlaws.demo.llamagen_family",
}


def _require(condition: bool, message: str) -> None:
    """Raises ValueError(`message`) unless `condition` (flag checks that run before any work)."""
    if not condition:
        raise ValueError(message)


def _cmd_formats(args: argparse.Namespace) -> int:
    from bitlaws.quant import format_table  # pylint: disable=g-import-not-at-top

    group = format_table.GROUP_SIZE
    _require(args.size > 0 and args.size % group == 0,
             f"--size must be a positive multiple of {group} (the per-group column uses groups of {group}), "
             f"got {args.size}")
    names = args.formats or format_table.TABLE_FORMATS
    format_table.check_format_names(names)
    start = time.perf_counter()
    rows = format_table.format_rows(names, size=args.size, seed=args.seed, progress=not args.no_progress)
    print(format_table.render(rows, args.size))
    print(f"({time.perf_counter() - start:.1f} s)")
    return 0


def _cmd_port(args: argparse.Namespace) -> int:
    from bitlaws.port import convert  # pylint: disable=g-import-not-at-top

    start = time.perf_counter()
    out = convert.convert(args.kind, args.ckpt, args.out, config=args.config, key=args.key, force=args.force)
    print(f"ported {args.kind} from {args.ckpt} to {out} ({time.perf_counter() - start:.1f} s)")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from bitlaws.sweep import runner  # pylint: disable=g-import-not-at-top

    _require(args.workers >= 1, f"--workers must be >= 1, got {args.workers}")
    summary = runner.run_sweep_from_config(args.config, args.out, args.overrides, progress=not args.no_progress,
                                           force=args.force, workers=args.workers)
    print(f"sweep: {summary.finished}/{summary.total} cells finished ({len(summary.evaluated)} now, "
          f"{len(summary.failed)} failed) in {summary.wall_s:.1f} s -> {summary.results_path}")
    return summary.exit_code


def _cmd_ptq(args: argparse.Namespace) -> int:
    from bitlaws.ptq import run  # pylint: disable=g-import-not-at-top

    command = " ".join(["bitlaws ptq --config", shlex.quote(args.config),
                        *[f"--set {shlex.quote(o)}" for o in args.overrides], "--out", shlex.quote(args.out)])
    result = run.run_ptq_from_config(args.config, args.out, args.overrides, force=args.force, command=command)
    print(run.render_summary(result))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from bitlaws.laws import analyze  # pylint: disable=g-import-not-at-top

    _require(args.n_boot >= 0, f"--n-boot must be >= 0 (0: no bootstrap intervals), got {args.n_boot}")
    workers = args.workers if args.workers is not None else len(os.sched_getaffinity(0))
    _require(workers >= 1, f"--workers must be >= 1, got {workers}")
    outputs = analyze(args.results, args.out, n_boot=args.n_boot, seed=args.seed, workers=workers)
    for notice in outputs.notices:
        print(f"bitlaws report: notice: {notice}", file=sys.stderr)
    print(f"report: {outputs.report}")
    for path in outputs.plots:
        print(f"plot:   {path}")
    return 0


def _cmd_advise(args: argparse.Namespace) -> int:
    from bitlaws.laws import advise, render_advice  # pylint: disable=g-import-not-at-top

    print(render_advice(advise(args.results, args.budget_mb, family=args.family, metric=args.metric)))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from bitlaws import configlib  # pylint: disable=g-import-not-at-top

    config = configlib.load_config(args.config, args.overrides)
    family = config.get("family")
    if family not in TRAINERS:
        raise ValueError(f"config {args.config!r} has family={family!r}; trainable families: {sorted(TRAINERS)}")
    module = importlib.import_module(TRAINERS[family])
    out = args.out or config.get("out_dir") or f"runs/train/{config.get('name', family)}"
    with config.unlocked():
        config.command = " ".join(["bitlaws train --config", shlex.quote(args.config),
                                   *[f"--set {shlex.quote(o)}" for o in args.overrides], "--out", shlex.quote(out)])
    summary = module.train_from_config(config, out)
    print(f"trained {family}: {summary}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from bitlaws.eval import cli_impl  # pylint: disable=g-import-not-at-top

    _require(args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}")
    if args.eval_command == "fid":
        return cli_impl.cmd_eval_fid(args.samples, args.ref, args.inception, args.batch_size,
                                     progress=not args.no_progress)
    return cli_impl.cmd_eval_stats(args.samples, args.out, args.inception, args.batch_size,
                                   progress=not args.no_progress)


def _numbers(text: str, what: str) -> list[float]:
    """``"0:40:2"`` (start:stop:step, stop included) or ``"10,20,inf"`` -> floats."""
    try:
        if ":" in text:
            start, stop, step = (float(part) for part in text.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            count = int(round((stop - start) / step)) + 1
            return [start + i * step for i in range(count) if start + i * step <= stop + 1e-9]
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{what} must be START:STOP:STEP or a comma list of numbers, got {text!r}") from None
    if not values:
        raise ValueError(f"{what} is empty")
    return values


def _cmd_analyze(args: argparse.Namespace) -> int:
    from bitlaws.analysis import run  # pylint: disable=g-import-not-at-top
    from bitlaws.analysis.subjects import LAYER_KINDS, Precision  # pylint: disable=g-import-not-at-top

    _require(args.n >= 1, f"--n must be >= 1, got {args.n}")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    command = "bitlaws " + " ".join(shlex.quote(a) for a in getattr(args, "argv", ["analyze", args.analysis]))
    common = dict(n=args.n, seed=args.seed, command=command)
    # Flags are checked before the models are loaded; `job(subjects, out, ...)` runs the chosen analysis.
    if args.analysis == "errors":
        precision = Precision(args.precision, args.format, args.method)
        from bitlaws.sweep import settings  # pylint: disable=g-import-not-at-top

        settings.quant_rules(precision.setting, precision.format, ".*")  # a bad setting fails before any work
        settings.get_method(precision.method)
        job = functools.partial(run.analyze_errors, precision=precision)
    elif args.analysis == "noise":
        snrs = _numbers(args.snrs, "--snrs")
        accumulation = _numbers(args.accumulation_snrs, "--accumulation-snrs")
        _require(0 < args.fraction <= 1, f"--fraction must be in (0, 1], got {args.fraction}")
        job = functools.partial(run.analyze_noise, snrs=snrs, step=args.step, accumulation_snrs=accumulation,
                                fraction=args.fraction)
    else:
        kinds = [k.strip() for k in args.layers.split(",") if k.strip()]
        _require(bool(kinds) and all(k in LAYER_KINDS for k in kinds),
                 f"--layers must be a comma list of {', '.join(LAYER_KINDS)}, got {args.layers!r}")
        blocks = [int(b) for b in _numbers(args.blocks, "--blocks")]
        job = functools.partial(run.analyze_activations, blocks=blocks, kinds=kinds)
    subjects = run.load_subjects(models, var_dirs=args.var, dit_dirs=args.dit, dit_respacing=args.dit_respacing)
    paths = job(subjects, args.out, **common)
    for path in paths:
        print(f"wrote {path}")
    return 0


def _add_analyze_parser(sub) -> None:
    analyze = sub.add_parser("analyze", help="the paper's error-tolerance analyses: errors, noise, activations",
                             description="Section 3.2 of the paper as commands: per-step quantization errors "
                                         "(Figure 2), noise at a set SNR on the network output (Figure 3), layer "
                                         "input distributions over time (Figure 4). Each writes JSON, PNG and SVG "
                                         "into --out and refreshes analysis.md there.")
    analyses = analyze.add_subparsers(dest="analysis", metavar="ANALYSIS")
    analyses.required = True
    errors = analyses.add_parser("errors", help="per-step error after feature extraction and after reconstruction")
    errors.add_argument("--precision", default="W4A8", help="quantized setting W<w>A<a> (default W4A8)")
    errors.add_argument("--format", default="int", help="format family int / fp (default int)")
    errors.add_argument("--method", default="rtn", help="quantization method (default rtn)")
    noise = analyses.add_parser("noise", help="single-step SNR sweep and early-noise accumulation")
    noise.add_argument("--snrs", default="0:40:2", help="single-step SNRs in dB, START:STOP:STEP or a list "
                                                        "(default 0:40:2; +inf is always added as the control)")
    noise.add_argument("--step", type=int, default=None, help="the noisy step (default: the middle one; negative "
                                                               "counts from the end)")
    noise.add_argument("--accumulation-snrs", default="10,20,30", help="SNRs of the accumulation runs (dB)")
    noise.add_argument("--fraction", type=float, default=0.1, help="share of leading steps that get noise (0.1)")
    acts = analyses.add_parser("activations", help="fc1 / qkv / fc2 input distributions over scales / timesteps")
    acts.add_argument("--blocks", default="4,14", help="0-based block indices, clamped to the depth (default 4,14 "
                                                        "= the paper's 5th and 15th)")
    acts.add_argument("--layers", default="fc1,qkv,fc2", help="layer kinds (default fc1,qkv,fc2)")
    for parser, n in ((errors, 20), (noise, 20), (acts, 8)):
        parser.add_argument("--models", default="var-d4,dit-d4",
                            help="demo members, comma-separated (default var-d4,dit-d4; '' with --var/--dit only)")
        parser.add_argument("--var", nargs=2, metavar=("VAR_DIR", "VQVAE_DIR"),
                            help="also a ported VAR: the `bitlaws port var` and `bitlaws port vqvae` folders "
                                 "(sampled with cfg 1.5, top-k 900, top-p 0.96)")
        parser.add_argument("--dit", nargs=2, metavar=("DIT_DIR", "VAE_DIR"),
                            help="also a ported DiT: the `bitlaws port dit` and `bitlaws port vae` folders "
                                 "(250 DDPM steps, cfg 1.5)")
        parser.add_argument("--dit-respacing", default=None,
                            help="fewer DiT steps for a quick run: the DDIM respacing of demo DiTs (e.g. ddim10) and "
                                 "the DDPM respacing of a ported DiT (e.g. 25; default 250)")
        parser.add_argument("--n", type=int, default=n, help=f"samples (default {n})")
        parser.add_argument("--seed", type=int, default=0, help="PRNG seed of the sampling draws")
        parser.add_argument("--out", default="runs/demo/analysis",
                            help="output folder (default runs/demo/analysis, which `bitlaws report --results "
                                 "runs/demo` links)")
    analyze.set_defaults(func=_cmd_analyze)


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="sweep config FILE.py[:ARG], e.g. configs/sweeps/demo.py")
    parser.add_argument("--out", required=True, help="output folder (results.jsonl, config.json)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field (repeatable)")
    parser.add_argument("--force", action="store_true",
                        help="resume into a folder whose config.json differs in grid-defining fields")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--workers", type=int, default=1,
                        help="evaluate cells in N >= 1 processes, one model per process at a time (default 1: in "
                             "this process); on CPU hosts compilation dominates and N = cores is fastest")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bitlaws",
        description="Quantize vision generative models (VAR, DiT) and measure their bit-level scaling laws.")
    parser.add_argument("--version", action="version", version=f"bitlaws {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    formats = sub.add_parser("formats", help="table of every quantization format: bits, grid, max, error",
                             description="Print every quantization format with its bits per value, grid size, "
                                         "max normal and the relative RMS error of quantizing a standard-normal "
                                         "tensor per tensor / per channel / per group.")
    formats.add_argument("--size", type=int, default=4096,
                         help="side of the square test tensor: a positive multiple of 128, the group size of the "
                              "per-group column (default 4096)")
    formats.add_argument("--seed", type=int, default=0)
    formats.add_argument("--formats", nargs="*", metavar="FORMAT",
                         help="only these formats, e.g. int4 fp4_e2m1 mxfp4 (default: all)")
    formats.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    formats.set_defaults(func=_cmd_formats)

    port = sub.add_parser("port", help="convert an official PyTorch checkpoint to an orbax checkpoint (no torch needed)",
                          description="Read an official checkpoint with the safe torch-free reader, map its keys to "
                                      "our NNX model (every missing/unexpected/misshapen key is named), save orbax.")
    port.add_argument("kind", choices=PORT_KINDS)
    port.add_argument("--ckpt", required=True, help="the official weight file (.pth/.pt/.bin/.safetensors/.npz)")
    port.add_argument("--out", required=True,
                      help="output directory: new, empty, or holding an earlier port (replaced only with --force); "
                           "any other non-empty directory is refused, even with --force")
    port.add_argument("--config", help="model config FILE.py[:ARG] (required for var, vqvae, dit, llamagen and mar)")
    port.add_argument("--key", help="sub-dict of a nested checkpoint, e.g. 'ema' or 'model' (mar: 'model_ema' "
                                    "unless given)")
    port.add_argument("--force", action="store_true", help="replace the port already in --out")
    port.set_defaults(func=_cmd_port)

    sweep = sub.add_parser("sweep", help="run a resumable sweep of model x precision x format x method cells",
                           description="Evaluate every cell of a sweep config; finished cells are appended to "
                                       "OUT/results.jsonl and skipped when the sweep is rerun.")
    add_sweep_arguments(sweep)
    sweep.set_defaults(func=_cmd_sweep)

    ptq = sub.add_parser("ptq", help="quantize a model with one PTQ method; write a quantized checkpoint",
                         description="Quantize a demo member or a ported checkpoint with one method (packed weights) "
                                     "and write an orbax checkpoint that bitlaws.load_quantized(DIR) rebuilds, plus "
                                     "layer_errors.json (per-layer weight / output errors and storage).")
    ptq.add_argument("--config", required=True,
                     help="e.g. configs/ptq/demo.py:var-d4,W4A16,gptq (the variant grammar is in that file)")
    ptq.add_argument("--out", required=True, help="output folder: new or empty (an earlier quantized checkpoint is "
                                                  "replaced only with --force; other folders are refused)")
    ptq.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config field (repeatable), e.g. calibration.num_batches=2")
    ptq.add_argument("--force", action="store_true", help="replace the quantized checkpoint already in --out")
    ptq.set_defaults(func=_cmd_ptq)

    report = sub.add_parser("report", help="fit scaling laws to a sweep; write plots and report.md",
                            description="Power-law fits (bootstrap CIs), Pareto analysis, Figure-1 style plots "
                                        "(PNG + SVG) and report.md for a sweep's results.jsonl.")
    report.add_argument("--results", required=True, help="results.jsonl or the sweep folder")
    report.add_argument("--out", help="output folder (default: the sweep folder)")
    report.add_argument("--n-boot", type=int, default=200,
                        help="bootstrap resamples, >= 0 (default 200; 0: no confidence intervals)")
    report.add_argument("--seed", type=int, default=0)
    report.add_argument("--workers", type=int, default=None,
                        help="processes for the bootstrap fits (default: the CPUs this process may use); the "
                             "results do not depend on it")
    report.set_defaults(func=_cmd_report)

    advise = sub.add_parser("advise", help="best model size x precision for a weight-storage budget",
                            description="Answer, from the laws fitted to a sweep, which size and precision give the "
                                        "best quality within a budget of weight storage (MT bits / 8e6 MB).")
    advise.add_argument("--budget-mb", type=float, required=True)
    advise.add_argument("--results", required=True, help="results.jsonl or the sweep folder")
    advise.add_argument("--family", help="var or dit (default: every family)")
    advise.add_argument("--metric", choices=("mt", "ct"), default="mt")
    advise.set_defaults(func=_cmd_advise)

    train = sub.add_parser("train", help="train a demo model (classifier, vqvae, var, dit) from a config",
                           description="Train (or resume) a demo model; the config's `family` picks the trainer.")
    train.add_argument("--config", required=True, help="e.g. configs/demo/var.py:depth=4")
    train.add_argument("--out", help="checkpoint folder (default: the config's out_dir, else runs/train/NAME)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    train.set_defaults(func=_cmd_train)

    evaluate = sub.add_parser("eval", help="FID / IS with the standard FID Inception",
                              description="Sharded FID / Inception Score evaluation (weights: the pytorch-fid "
                                          "Inception file, see README).")
    eval_sub = evaluate.add_subparsers(dest="eval_command", metavar="EVAL_COMMAND")
    eval_sub.required = True
    fid = eval_sub.add_parser("fid", help="FID (and IS) of samples against reference statistics")
    fid.add_argument("--samples", required=True, help="samples: ADM-style .npz (arr_0 uint8 NHWC) or PNG folder")
    fid.add_argument("--ref", required=True, help="reference: stats .npz (mu, sigma) or samples")
    stats = eval_sub.add_parser("stats", help="write a reference statistics .npz (mu, sigma)")
    stats.add_argument("--samples", required=True, help="images: .npz (arr_0 uint8 NHWC) or a PNG folder")
    stats.add_argument("--out", required=True, help="output .npz")
    for p in (fid, stats):
        p.add_argument("--inception", help="pt_inception-2015-12-05-6726825d.pth (default: $BITLAWS_FID_INCEPTION)")
        p.add_argument("--batch-size", type=int, default=50, help="images per step, >= 1 (default 50)")
        p.add_argument("--no-progress", action="store_true")
    evaluate.set_defaults(func=_cmd_eval)
    _add_analyze_parser(sub)
    return parser


def _version() -> str:
    from bitlaws import package_version  # pylint: disable=g-import-not-at-top

    return package_version()


# Subcommands that compile XLA programs: they run with JAX's persistent compilation cache (`bitlaws.compile_cache`:
# the user's cache folder unless BITLAWS_COMPILATION_CACHE=0), so a second run starts warm.
COMPILING_COMMANDS = ("sweep", "ptq", "train", "eval", "port", "analyze")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded by jobs that write what made them
    if args.command in COMPILING_COMMANDS:
        from bitlaws import compile_cache  # pylint: disable=g-import-not-at-top

        compile_cache.enable()
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"bitlaws {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
