"""The demo's digits classifier: the feature network of the Digits Frechet Distance (DFD).

Reproduce the shipped checkpoint with::

    bitlaws train --config configs/demo/classifier.py --out bitlaws/demo/checkpoints/classifier

``configs/demo/classifier.py:quick`` trains for a few steps only (smoke tests).
"""

import ml_collections

from bitlaws.configlib import parse_arg


def get_config(arg=None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, allowed=("quick",))
    config = ml_collections.ConfigDict()
    config.family = "classifier"
    config.seed = 0

    config.model = ml_collections.ConfigDict()
    config.model.channels = (16, 32, 32)  # conv widths; a 2x2 average pool follows each of the first two
    config.model.feature_dim = 64  # penultimate features (what the DFD uses)

    config.train = ml_collections.ConfigDict()
    config.train.steps = 20 if args.get("quick") else 1200
    config.train.batch_size = 64
    config.train.learning_rate = 2e-3
    config.train.weight_decay = 1e-4
    config.train.max_shift = 1  # random +-pixels translation augmentation
    config.train.eval_batch_size = 512
    return config
