"""The official PyTorch side of `benchmarks/vs_official.py`, run by a Python that has torch (never bitlaws').

It imports nothing from bitlaws (nor JAX): `vs_official.py` starts it with the interpreter given by
``--official-python`` and talks to it over stdin/stdout, one JSON object per line:

    -> {"workload": "var_full", "size": "full"}                       (build once, then time one call)
    <- {"workload": "var_full", "seconds": 37.1, "threads": 2, "torch": "2.13.0+cpu", "load": 0.31}

Workloads (random N(0, 0.02) weights of the released sizes, float32, ``torch.no_grad``, eval mode):

==================  ===========================================================================================
``var_full``        VAR-d16 ``autoregressive_infer_cfg(B=8, cfg=1.5, top_k=900, top_p=0.96)`` incl. the decode
``vqvae_decode``    the VQVAE's ``fhat_to_img`` of one ``[8, 32, 16, 16]`` f_hat (the decode inside ``var_full``)
``dit_step``        DiT-XL/2 ``forward_with_cfg`` at batch 8 (16 rows), latents ``[16, 4, 32, 32]``
``fid_features``    pytorch-fid ``InceptionV3([3])`` pool3 features of the shared images, in batches
``matmul``          a 4096^3 float32 matmul
``conv3x3``         a 3x3 convolution 160 -> 160 channels on ``[8, 160, 128, 128]``
==================  ===========================================================================================

``"size": "tiny"`` builds small models of the same code (checks the plumbing in seconds). Images for
``fid_features`` come from the ``.npy`` file named in the request (uint8 NHWC, shared with the JAX side).
Upstream code is imported from the folders given on the command line (``--var-repo``, ``--dit-repo``,
``--pytorch-fid``); ``--shim`` names a module to import first (e.g. one that lets a torchvision wheel built for
another torch import).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import time


def _normal_init(module, std: float = 0.02) -> None:
    import torch  # pylint: disable=g-import-not-at-top

    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


class Official:
    """Builds each workload once (lazily) and times single calls."""

    def __init__(self, args):
        import torch  # pylint: disable=g-import-not-at-top

        torch.set_num_threads(args.threads)
        # Random weights shrink activations layer by layer into subnormal floats, which x86 handles ~100x slower
        # unless flushed to zero; XLA:CPU flushes them, torch does not by default. Real checkpoints do not go
        # there, so flush here too, or the official convnets would be timed on an artifact.
        torch.set_flush_denormal(True)
        self.torch = torch
        self.args = args
        self.built = {}

    def _var(self, size: str):
        sys.path.insert(0, self.args.var_repo)
        from models import build_vae_var  # pylint: disable=g-import-not-at-top
        sys.path.remove(self.args.var_repo)
        if size == "tiny":
            vae, var = build_vae_var(device="cpu", patch_nums=(1, 2, 3, 4), V=64, Cvae=8, ch=32, depth=2,
                                     flash_if_available=False, fused_if_available=False)
        else:
            vae, var = build_vae_var(device="cpu", depth=16, flash_if_available=False, fused_if_available=False)
        _normal_init(var)
        _normal_init(vae)
        return vae.eval(), var.eval()

    def build(self, workload: str, size: str, request: dict):
        torch = self.torch
        key = (workload, size)
        if key in self.built:
            return self.built[key]
        tiny = size == "tiny"
        if workload in ("var_full", "vqvae_decode"):
            vae, var = self.built.get(("var", size)) or self._var(size)
            self.built[("var", size)] = (vae, var)
            if workload == "var_full":
                labels = torch.arange(8) % var.num_classes
                fn = lambda: var.autoregressive_infer_cfg(B=8, label_B=labels, g_seed=0, cfg=1.5,  # noqa: E731
                                                          top_k=900 if not tiny else 32, top_p=0.96,
                                                          more_smooth=False)
            else:
                side = 4 if tiny else 16  # the last scale's side (patch_nums[-1])
                f_hat = torch.randn(8, vae.Cvae, side, side, generator=torch.Generator().manual_seed(1))
                fn = lambda: vae.fhat_to_img(f_hat)  # noqa: E731
        elif workload == "dit_step":
            # DiT's models.py under its own module name (VAR's `models` package may be imported already)
            spec = importlib.util.spec_from_file_location("dit_models", os.path.join(self.args.dit_repo, "models.py"))
            models = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(models)
            model = models.DiT_models["DiT-S/8" if tiny else "DiT-XL/2"](input_size=32, num_classes=1000)
            _normal_init(model)
            model.eval()
            gen = torch.Generator().manual_seed(2)
            x = torch.randn(16, 4, 32, 32, generator=gen)
            t = torch.full((16,), 500, dtype=torch.long)
            y = torch.cat([torch.arange(8), torch.full((8,), 1000)])
            fn = lambda: model.forward_with_cfg(x, t, y, 1.5)  # noqa: E731
        elif workload == "fid_features":
            sys.path.insert(0, self.args.pytorch_fid)
            import numpy as np  # pylint: disable=g-import-not-at-top
            from fid_throughput import pytorch_fid_model  # pylint: disable=g-import-not-at-top  (stdlib-only module)
            model = pytorch_fid_model()  # pytorch-fid's FID trunk, built without downloading its weights
            sys.path.remove(self.args.pytorch_fid)
            _normal_init(model, 0.05)
            images = torch.from_numpy(np.load(request["images"])).permute(0, 3, 1, 2).float() / 255.0
            batch = int(request.get("batch", 32))

            def fn():
                return [model(images[i:i + batch])[0] for i in range(0, images.shape[0], batch)]
        elif workload == "matmul":
            n = 512 if tiny else 4096
            gen = torch.Generator().manual_seed(3)
            a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
            fn = lambda: a @ b  # noqa: E731
        elif workload == "conv3x3":
            side, ch = (32, 32) if tiny else (128, 160)
            conv = torch.nn.Conv2d(ch, ch, 3, padding=1).eval()
            x = torch.randn(8, ch, side, side, generator=torch.Generator().manual_seed(4))
            fn = lambda: conv(x)  # noqa: E731
        else:
            raise ValueError(f"unknown workload {workload!r}")
        self.built[key] = fn
        return fn

    def time(self, request: dict) -> dict:
        fn = self.build(request["workload"], request.get("size", "full"), request)
        with self.torch.no_grad():
            start = time.perf_counter()
            fn()
            seconds = time.perf_counter() - start
        return {"workload": request["workload"], "seconds": seconds, "threads": self.torch.get_num_threads(),
                "torch": self.torch.__version__, "load": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--var-repo", required=True)
    parser.add_argument("--dit-repo", required=True)
    parser.add_argument("--pytorch-fid", required=True, help="folder holding the pytorch_fid package")
    parser.add_argument("--shim", default=None, help="module imported before anything else (path to a .py)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    replies, sys.stdout = sys.stdout, sys.stderr  # upstream code prints: keep stdout for the replies
    if args.shim:
        sys.path.insert(0, os.path.dirname(os.path.abspath(args.shim)))
        importlib.import_module(os.path.splitext(os.path.basename(args.shim))[0])
    official = Official(args)
    print(json.dumps({"ready": True}), file=replies, flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        try:
            reply = official.time(request)
        except Exception as e:  # pylint: disable=broad-except
            reply = {"workload": request.get("workload"), "error": f"{type(e).__name__}: {e}"}
        print(json.dumps(reply), file=replies, flush=True)


if __name__ == "__main__":
    main()
