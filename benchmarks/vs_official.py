"""bitlaws against the official PyTorch code, side by side on this machine, interleaved in one run.

The official side (upstream VAR / DiT / pytorch-fid code, in a Python that has torch) runs in a long-lived
subprocess (`benchmarks/official_worker.py`); ours runs in this process. For every repeat each workload is
timed once on each side, the order alternating between repeats, so that both sides see the same machine
state. The first call of each side is a warm-up (ours: compilation) and is reported apart. Both sides get
random N(0, 0.02) weights of the released sizes, float32, and the same images (FID); torch uses
``--threads`` threads, XLA its default (every core). Ours runs the library's programs with their compiler options
(`bitlaws.xla_options`), at JAX's default matmul precision (float32 dots on the CPU: the same outputs as
``precision="highest"``, checked on a 4096^3 matmul; forcing 'highest' changed nothing there).

Setting up the official side (a scratch folder outside the repository; torch is never a dependency of
bitlaws)::

    python3.11 -m venv /tmp/official/venv && /tmp/official/venv/bin/pip install torch==2.13.0 numpy timm
    # the upstream code at the parity fixtures' commits, e.g. from snapshots of
    #   FoundationVision/VAR, facebookresearch/DiT, mseitzer/pytorch-fid (+ torchvision for pytorch-fid)

Usage::

    python benchmarks/vs_official.py --official-python /tmp/official/venv/bin/python \\
        --var-repo /tmp/official/src/VAR --dit-repo /tmp/official/src/DiT --pytorch-fid /tmp/official/src/pfid/src \\
        [--shim /tmp/official/tvshim.py] [--repeats 3] [--only var_full dit_step] [--tiny]

Prints, per workload, min and median seconds of each side, official / ours (> 1: we are faster), the load
average seen around the calls, and for ``dit_step`` the achieved GFLOP/s against this run's JAX matmul
ceiling (FLOPs per CFG step: ``2 rows [N (12 L d^2 + 48 d) + 256 d + 3 d^2 + 6 L d^2] + 4 rows L N^2 d`` with
N tokens, L blocks, width d; ``rows`` = 2 x batch).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bitlaws import configlib
from bitlaws.port.convert import REPO_CONFIGS, model_ctor
from bitlaws.xla_options import COMPILER_OPTIONS

WORKLOADS = ("var_full", "vqvae_decode", "dit_step", "fid_features", "matmul", "conv3x3")
FID_IMAGES, FID_BATCH = 256, 32


def _abstract_then(ctor_fn, std=0.02, seed=0):
    """The model `ctor_fn` builds (abstractly), every state leaf := N(0, std) float32 drawn with numpy."""
    model = nnx.eval_shape(ctor_fn)
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree.flatten(state)
    new = [jnp.asarray(rng.standard_normal(x.shape, dtype=np.float32) * np.float32(std)) for x in leaves]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, new))


def dit_step_flops(batch: int, tokens: int, depth: int, width: int) -> float:
    """FLOPs of one DiT CFG step at `batch` images (2 x batch rows), the issue's formula."""
    rows, n, layers, d = 2 * batch, tokens, depth, width
    return 2 * rows * (n * (layers * 12 * d * d + 48 * d) + 256 * d + 3 * d * d + layers * 6 * d * d) \
        + 4 * rows * layers * n * n * d


def random_var(depth: int = 16, tiny: bool = False):
    """``(vae, var, var_ctor, vq_ctor)``: VAR-d`depth` and its VQVAE at the released sizes with N(0, 0.02)
    weights (`tiny`: a 2-block model on 4 scales, for checking the plumbing)."""
    from bitlaws.models.var import VAR, var_ctor_kwargs  # pylint: disable=g-import-not-at-top
    from bitlaws.models.vqvae import VQVAE  # pylint: disable=g-import-not-at-top

    config = configlib.load_config(str(REPO_CONFIGS / f"var_d{depth}.py"))
    vq_ctor = model_ctor(config.vqvae)
    var_ctor = var_ctor_kwargs(model_ctor(config.var), vq_ctor)
    if tiny:
        patch = (1, 2, 3, 4)
        vq_ctor.update(vocab_size=64, z_channels=8, ch=32, v_patch_nums=patch)
        var_ctor.update(depth=2, embed_dim=128, num_heads=2, patch_nums=patch, vocab_size=64, Cvae=8)
    vae = _abstract_then(lambda: VQVAE(**vq_ctor, rngs=nnx.Rngs(0)), seed=0)
    var = _abstract_then(lambda: VAR(**var_ctor, rngs=nnx.Rngs(0)), seed=1)
    return vae, var, var_ctor, vq_ctor


class Ours:
    """The same workloads in bitlaws (jit-compiled, built once)."""

    def __init__(self, tiny: bool, images_file: str):
        self.tiny = tiny
        self.images_file = images_file
        self.built = {}
        self.flops = {}

    def _var(self):
        if "var" not in self.built:
            self.built["var"] = random_var(16, self.tiny)
        return self.built["var"]

    def build(self, workload: str):
        if workload in self.built:
            return self.built[workload]
        if workload == "var_full":
            from bitlaws.sample.var_sampler import autoregressive_infer_cfg  # pylint: disable=g-import-not-at-top

            vae, var, var_ctor, _ = self._var()
            labels = jnp.arange(8) % var_ctor["num_classes"]
            fn = lambda: autoregressive_infer_cfg(var, vae, B=8, label_B=labels, key=jax.random.key(0),  # noqa: E731
                                                  cfg=1.5, top_k=32 if self.tiny else 900, top_p=0.96)
        elif workload == "vqvae_decode":
            vae, _, var_ctor, vq_ctor = self._var()
            side = var_ctor["patch_nums"][-1]
            f_hat = jax.random.normal(jax.random.key(1), (8, side, side, vq_ctor["z_channels"]))
            from bitlaws.sample.var_sampler import decode_f_hat  # pylint: disable=g-import-not-at-top

            vae_def, vae_state = nnx.split(vae)
            fn = lambda: decode_f_hat(vae_state, f_hat, vae_def=vae_def)  # noqa: E731  (the sampler's decode program)
        elif workload == "dit_step":
            from bitlaws.models.dit import DiT  # pylint: disable=g-import-not-at-top

            config = configlib.load_config(str(REPO_CONFIGS / "dit.py") + (":s8" if self.tiny else ":xl2"))
            ctor = model_ctor(config.model)
            dit = _abstract_then(lambda: DiT(**ctor, rngs=nnx.Rngs(0)), seed=2)
            size, channels, patch = ctor["input_size"], ctor["in_channels"], ctor["patch_size"]
            x = jax.random.normal(jax.random.key(2), (16, size, size, channels))
            t = jnp.full((16,), 500)
            y = jnp.concatenate([jnp.arange(8), jnp.full((8,), ctor["num_classes"])])
            graphdef, state = nnx.split(dit)
            step = jax.jit(lambda s, x, t, y: nnx.merge(graphdef, s).forward_with_cfg(x, t, y, 1.5),
                           compiler_options=COMPILER_OPTIONS)
            fn = lambda: step(state, x, t, y)  # noqa: E731
            self.flops["dit_step"] = dit_step_flops(8, (size // patch) ** 2, ctor["depth"], ctor["hidden_size"])
        elif workload == "fid_features":
            from bitlaws.eval.fid import random_fid_inception  # pylint: disable=g-import-not-at-top

            model = random_fid_inception(0, include_fc=False)
            images = np.load(self.images_file)
            graphdef, state = nnx.split(model)
            features = jax.jit(lambda s, x: nnx.merge(graphdef, s).features(x), compiler_options=COMPILER_OPTIONS)
            batches = [jnp.asarray(images[i:i + FID_BATCH]) for i in range(0, images.shape[0], FID_BATCH)]
            fn = lambda: [features(state, b) for b in batches]  # noqa: E731
        elif workload == "matmul":
            n = 512 if self.tiny else 4096
            a = jax.random.normal(jax.random.key(3), (n, n))
            b = jax.random.normal(jax.random.key(4), (n, n))
            mm = jax.jit(jnp.dot, compiler_options=COMPILER_OPTIONS)
            fn = lambda: mm(a, b)  # noqa: E731
            self.flops["matmul"] = 2.0 * n ** 3
        elif workload == "conv3x3":
            side, ch = (32, 32) if self.tiny else (128, 160)
            x = jax.random.normal(jax.random.key(5), (8, side, side, ch))
            w = jax.random.normal(jax.random.key(6), (3, 3, ch, ch)) * 0.02
            conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
                x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")), compiler_options=COMPILER_OPTIONS)
            fn = lambda: conv(x, w)  # noqa: E731
            self.flops["conv3x3"] = 2.0 * 8 * side * side * ch * ch * 9
        else:
            raise ValueError(f"unknown workload {workload!r}")
        self.built[workload] = fn
        return fn

    def time(self, workload: str) -> dict:
        fn = self.build(workload)
        start = time.perf_counter()
        jax.block_until_ready(fn())
        return {"seconds": time.perf_counter() - start, "load": os.getloadavg()[0]}


class OfficialProcess:
    """The official worker subprocess: one JSON request per line, one reply per line."""

    def __init__(self, args, images_file: str):
        worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "official_worker.py")
        cmd = [args.official_python, worker, "--var-repo", args.var_repo, "--dit-repo", args.dit_repo,
               "--pytorch-fid", args.pytorch_fid, "--threads", str(args.threads)]
        if args.shim:
            cmd += ["--shim", args.shim]
        self.size = "tiny" if args.tiny else "full"
        self.images_file = images_file
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = self.proc.stdout.readline()
        if not ready.strip():
            raise RuntimeError(f"the official worker did not start ({' '.join(cmd)})")
        self.versions = {}

    def time(self, workload: str) -> dict:
        self.proc.stdin.write(json.dumps({"workload": workload, "size": self.size, "images": self.images_file,
                                          "batch": FID_BATCH}) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        if "error" in reply:
            raise RuntimeError(f"official {workload}: {reply['error']}")
        self.versions = {"torch": reply["torch"], "threads": reply["threads"]}
        return reply

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _summary(times: list[float]) -> tuple[float, float]:
    return min(times), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--official-python", required=True, help="a python with torch (and timm for DiT)")
    parser.add_argument("--var-repo", required=True, help="checkout of FoundationVision/VAR")
    parser.add_argument("--dit-repo", required=True, help="checkout of facebookresearch/DiT")
    parser.add_argument("--pytorch-fid", required=True, help="folder holding the pytorch_fid package (src/)")
    parser.add_argument("--shim", default=None, help="module the official worker imports first")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--tiny", action="store_true", help="small models: checks the plumbing in seconds")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        images_file = os.path.join(tmp, "images.npy")
        side = 64 if args.tiny else 299
        np.save(images_file, np.random.default_rng(0).integers(0, 256, (FID_IMAGES if not args.tiny else 64, side,
                                                                        side, 3), dtype=np.uint8))
        official, ours = OfficialProcess(args, images_file), Ours(args.tiny, images_file)
        rows = []
        try:
            for workload in args.only:
                first = {"official": official.time(workload)["seconds"], "ours": ours.time(workload)["seconds"]}
                times = {"official": [], "ours": []}
                loads = []
                for r in range(args.repeats):
                    order = ("official", "ours") if r % 2 == 0 else ("ours", "official")
                    for side_name in order:
                        reply = (official if side_name == "official" else ours).time(workload)
                        times[side_name].append(reply["seconds"])
                        loads.append(reply["load"])
                rows.append((workload, first, times, loads))
                o_min, o_med = _summary(times["official"])
                b_min, b_med = _summary(times["ours"])
                print(f"{workload}: official min {o_min:.3f} med {o_med:.3f} s | ours min {b_min:.3f} "
                      f"med {b_med:.3f} s | official/ours (median) {o_med / b_med:.2f}x", flush=True)
        finally:
            official.close()

    print(f"\n# vs official — {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"jax {jax.__version__} on {jax.devices()[0].device_kind}, torch {official.versions.get('torch')} "
          f"({official.versions.get('threads')} threads), {args.repeats} repeats{' (tiny)' if args.tiny else ''}")
    print("| workload | official min / median (s) | bitlaws min / median (s) | official / ours | first call "
          "official / ours (s) | load avg |")
    print("|---|---|---|---|---|---|")
    matmul_rate = None
    for workload, first, times, loads in rows:
        o_min, o_med = _summary(times["official"])
        b_min, b_med = _summary(times["ours"])
        print(f"| {workload} | {o_min:.3f} / {o_med:.3f} | {b_min:.3f} / {b_med:.3f} | **{o_med / b_med:.2f}x** | "
              f"{first['official']:.2f} / {first['ours']:.2f} | {min(loads):.2f}-{max(loads):.2f} |")
        if workload == "matmul":
            matmul_rate = ours.flops["matmul"] / b_min
    if "dit_step" in ours.flops:
        rate = ours.flops["dit_step"] / _summary(next(t for w, _, t, _ in rows if w == "dit_step")["ours"])[0]
        ceiling = f", {rate / matmul_rate:.0%} of this run's JAX matmul ceiling ({matmul_rate / 1e9:.0f} GFLOP/s)" \
            if matmul_rate else " (run the matmul workload too for the ceiling)"
        print(f"\ndit_step: {ours.flops['dit_step'] / 1e12:.2f} TFLOP per CFG step, ours {rate / 1e9:.0f} GFLOP/s"
              f"{ceiling}")
    if "var_full" in ours.built and "vqvae_decode" in ours.built:
        print("var_full includes one VQVAE decode (vqvae_decode): the transformer scales are the difference.")


if __name__ == "__main__":
    sys.exit(main())
