"""DFD of the shipped demo members over a grid of sampling settings (how their sampling settings were chosen).

Usage::

    python -m bitlaws.demo.sampling_grid var --cfg 0,0.5,1,1.5,3 --top-p 0,0.85
    python -m bitlaws.demo.sampling_grid dit --cfg 1,1.25,1.5,2

Every member of the family samples ``--n-per-class`` digits per class with the same key for every setting
(float weights) and gets a DFD / classifier accuracy per setting; the table goes to stdout. VAR settings are
``cfg`` (guidance, ramped over scales) x ``top_p`` (0 = off); DiT settings are the CFG scale (``--top-p`` does
not apply).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
from typing import Optional, Sequence

import jax
import numpy as np

from bitlaws.demo import dit_family, family, metric, var_family  # noqa: F401  (registers the families)

NUM_CLASSES = 10


def _with_setting(member, cfg: float, top_p: float):
    """`member` with its sampling setting replaced (VAR: cfg and top_p; DiT, MAR: the CFG scale)."""
    if member.family == var_family.FAMILY:
        return dataclasses.replace(member, cfg=cfg, top_p=top_p)
    if top_p:
        raise ValueError("top_p applies to VAR members only")
    if hasattr(member, "sampling"):  # MAR: the settings are a dict (the CFG scale is its "cfg")
        return dataclasses.replace(member, sampling={**member.sampling, "cfg": cfg})
    return dataclasses.replace(member, cfg_scale=cfg)


def evaluate_grid(family_name: str, cfgs: Sequence[float], top_ps: Sequence[float] = (0.0,),
                  n_per_class: int = 50, seed: int = 0, members: Optional[Sequence[str]] = None) -> list[dict]:
    """One row per (member, cfg, top_p): ``{"member", "cfg", "top_p", "dfd", "accuracy"}``."""
    names = list(members) if members else family.member_names(family_name)
    labels = np.repeat(np.arange(NUM_CLASSES, dtype=np.int32), n_per_class)
    rows = []
    for name in names:
        member = family.load_member(name)
        for cfg, top_p in itertools.product(cfgs, top_ps):
            images = _with_setting(member, cfg, top_p).sample(member.model, labels, jax.random.key(seed))
            scores = metric.evaluate_samples(np.clip(np.asarray(images), -1.0, 1.0), labels)
            rows.append(dict(member=name, cfg=cfg, top_p=top_p, dfd=float(scores["dfd"]),
                             accuracy=float(scores["accuracy"])))
    return rows


def _floats(text: str) -> list[float]:
    return [float(value) for value in text.split(",") if value]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("family", choices=family.families())
    parser.add_argument("--cfg", type=_floats, required=True, help="comma-separated guidance values")
    parser.add_argument("--top-p", type=_floats, default=[0.0], help="comma-separated top_p values (VAR; 0 = off)")
    parser.add_argument("--n-per-class", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--members", type=lambda text: text.split(","), help="e.g. var-d2,var-d4 (default: all)")
    args = parser.parse_args(argv)
    rows = evaluate_grid(args.family, args.cfg, args.top_p, args.n_per_class, args.seed, args.members)
    print("| member | cfg | top_p | DFD | classifier acc. |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['member']} | {row['cfg']:g} | {row['top_p']:g} | {row['dfd']:.1f} | {row['accuracy']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
