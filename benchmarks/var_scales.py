"""Where a VAR sample's time goes: each scale's transformer and tokenizer programs and the decode, timed apart.

Runs `bitlaws.sample.var_sampler`'s own programs one by one (blocking after each) for a VAR of the released
sizes with random N(0, 0.02) weights, at two `scale_lengths` paddings side by side (default: the auto choice
for the model and the demo's 0.3), and prints per padding the first call (compilation included) and the
steady calls, per scale and in total, with the ratio of the steady totals.

Usage::

    python benchmarks/var_scales.py                      # VAR-d16, batch 8, top-k 900, top-p 0.96, 2 rounds
    python benchmarks/var_scales.py --depth 20 --paddings 0 --rounds 3
    python benchmarks/var_scales.py --tiny               # seconds: checks the plumbing
    python benchmarks/var_scales.py --profile            # also: the last scale's transformer program, per XLA op

``--profile`` traces one steady call of the last scale's transformer program with `jax.profiler` and prints the
XLA:CPU thunks that took the most time (summed over threads, by op name), then times a program made of the same
block matmuls alone (the scale's matmul floor).
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import tempfile
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vs_official import random_var  # noqa: E402  pylint: disable=g-import-not-at-top

from bitlaws.models.var import scale_bounds  # noqa: E402
from bitlaws.sample import var_sampler as vs  # noqa: E402
from bitlaws.sample import var_tokenizer  # noqa: E402


def build(depth: int, tiny: bool):
    """``(var, vae)`` of the released size (`vs_official.random_var`)."""
    vae, var, _, _ = random_var(depth, tiny)
    return var, vae


def one_sample(var, vae, batch: int, padding: float, top_k: int, top_p: float, key) -> dict:
    """One `autoregressive_infer_cfg` call, program by program: seconds per scale (transformer, tokens), decode."""
    patch_nums = tuple(var.patch_nums)
    n = len(patch_nums)
    labels = jnp.arange(batch, dtype=jnp.int32) % var.num_classes
    labels_2B = jnp.concatenate([labels, jnp.full_like(labels, var.num_classes)])
    var_def, var_state = nnx.split(var)
    vae_def, vae_state = nnx.split(vae)
    lengths = vs.scale_lengths(patch_nums, padding)
    extents = vs.kv_extents(patch_nums, lengths)
    bounds = scale_bounds(patch_nums)
    capacity = max(begin + length for (begin, _), length in zip(bounds, lengths))
    keys = jax.random.split(key, n)
    start = time.perf_counter()
    cond, rows, cache, f_hat = jax.block_until_ready(vs._initial_state(  # pylint: disable=protected-access
        var_def, var_state, labels_2B, capacity=capacity))
    chunk = var_tokenizer.chunk_rows(rows.shape[1], batch)
    scales = []
    for si, ((begin, end), length) in enumerate(zip(bounds, lengths)):
        t0 = time.perf_counter()
        guided, cache = jax.block_until_ready(vs._scale_logits(  # pylint: disable=protected-access
            var_state, rows, cond, cache, vs._guidance_weights(1.5, si, n),  # pylint: disable=protected-access
            np.int32(begin), np.int32(end - begin), var_def=var_def, length=length, kv_extent=extents[si]))
        t1 = time.perf_counter()
        _, f_hat, rows = jax.block_until_ready(vs._scale_tokens(  # pylint: disable=protected-access
            vae_state, var_tokenizer.scale_tables(vae, si), guided, f_hat, keys[si], vae_def=vae_def,
            top_k=top_k, top_p=top_p, more_smooth=False, chunk=chunk))
        scales.append((t1 - t0, time.perf_counter() - t1))
    t0 = time.perf_counter()
    jax.block_until_ready(vs.decode_f_hat(vae_state, f_hat, vae_def=vae_def))
    decode = time.perf_counter() - t0
    return {"scales": scales, "decode": decode, "total": time.perf_counter() - start, "lengths": lengths}


def profile_last_scale(var, vae, batch: int, top: int = 15) -> None:
    """Per-op thunk times of the last scale's transformer program, and the same scale's block matmuls alone."""
    patch_nums = tuple(var.patch_nums)
    bounds = scale_bounds(patch_nums)
    begin, end = bounds[-1]
    length, capacity = end - begin, end
    var_def, var_state = nnx.split(var)
    labels = jnp.arange(2 * batch, dtype=jnp.int32) % (var.num_classes + 1)

    guidance = vs._guidance_weights(1.5, len(patch_nums) - 1, len(patch_nums))  # pylint: disable=protected-access

    def call():
        cond, _, cache, _ = vs._initial_state(  # pylint: disable=protected-access
            var_def, var_state, labels, capacity=capacity)
        rows = jnp.zeros((batch, length, var.Cvae), jnp.float32)
        jax.block_until_ready(cache)
        start = time.perf_counter()
        jax.block_until_ready(vs._scale_logits(  # pylint: disable=protected-access
            var_state, rows, cond, cache, guidance, np.int32(begin), np.int32(length), var_def=var_def,
            length=length, kv_extent=capacity))
        return time.perf_counter() - start

    call()
    with tempfile.TemporaryDirectory() as folder:
        jax.profiler.start_trace(folder)
        seconds = call()
        jax.profiler.stop_trace()
        data = jax.profiler.ProfileData.from_file(sorted(glob.glob(f"{folder}/**/*.xplane.pb", recursive=True))[-1])
    total, count = collections.Counter(), collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if line.name == "python":
                continue
            for event in line.events:
                if "Execute" not in event.name:
                    name = re.sub(r"\.\d+$", "", event.name)
                    total[name] += event.duration_ns
                    count[name] += 1
    print(f"\nprofile of the last scale's transformer program ({length} rows x {2 * batch}, {capacity} cache rows): "
          f"{seconds:.2f} s traced; thunk time by op (summed over threads):")
    for name, ns in total.most_common(top):
        print(f"  {ns / 1e9:7.3f} s  x{count[name]:4d}  {name}")

    weights = [(b.attn.mat_qkv.kernel[...], b.attn.proj.kernel[...], b.ffn.fc1.kernel[...], b.ffn.fc2.kernel[...])
               for b in var.blocks]
    width = var.embed_dim

    @jax.jit
    def dots_only(x, weights):
        for qkv, proj, fc1, fc2 in weights:
            x = x + (x @ qkv)[:, :width] @ proj
            x = x + jax.nn.gelu(x @ fc1) @ fc2
        return x

    x = jnp.ones((2 * batch * length, width), jnp.float32)
    jax.block_until_ready(dots_only(x, weights))
    start = time.perf_counter()
    jax.block_until_ready(dots_only(x, weights))
    print(f"the same scale's block matmuls alone ({2 * batch * length} rows): {time.perf_counter() - start:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depth", type=int, default=16, choices=(16, 20, 24, 30))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--paddings", type=float, nargs="*", default=None,
                        help="scale_lengths paddings to compare (default: the auto choice and 0.3)")
    parser.add_argument("--rounds", type=int, default=2, help="calls per padding (the first compiles)")
    parser.add_argument("--top-k", type=int, default=900)
    parser.add_argument("--top-p", type=float, default=0.96)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--profile", action="store_true", help="profile the last scale's transformer program")
    args = parser.parse_args()
    var, vae = build(args.depth, args.tiny)
    paddings = args.paddings if args.paddings is not None else sorted({vs.auto_padding(var), vs.DEFAULT_PADDING})
    top_k = min(args.top_k, 32) if args.tiny else args.top_k
    print(f"# VAR-d{args.depth}{' (tiny)' if args.tiny else ''}, batch {args.batch}, top-k {top_k}, "
          f"top-p {args.top_p}; "
          f"{os.cpu_count()} cores, jax {jax.__version__} on {jax.devices()[0].device_kind}; auto padding "
          f"{vs.auto_padding(var)}", flush=True)
    steady = {}
    for padding in paddings:
        runs = [one_sample(var, vae, args.batch, padding, top_k, args.top_p, jax.random.key(r))
                for r in range(args.rounds)]
        first, rest = runs[0], runs[1:] or runs
        best = min(rest, key=lambda r: r["total"])
        steady[padding] = best["total"]
        print(f"\npadding {padding}: lengths {best['lengths']}  (load {os.getloadavg()[0]:.2f})")
        print(f"  first call {first['total']:.1f} s, steady {best['total']:.1f} s "
              f"(transformer {sum(a for a, _ in best['scales']):.1f} s, "
              f"tokens {sum(b for _, b in best['scales']):.1f} s, "
              f"decode {best['decode']:.1f} s)")
        print("  per scale, steady (transformer / tokens, s): " + "  ".join(
            f"{pn}x{pn} {a:.2f}/{b:.2f}" for pn, (a, b) in zip(var.patch_nums, best["scales"])))
    if len(steady) > 1:
        base = paddings[-1]
        print("\nsteady totals relative to padding " + str(base) + ": " + ", ".join(
            f"padding {p}: {steady[base] / steady[p]:.2f}x" for p in paddings))
    if args.profile:
        profile_last_scale(var, vae, args.batch)


if __name__ == "__main__":
    main()
