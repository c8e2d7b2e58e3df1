"""The demo's digits classifier: a small CNN whose penultimate features define the Digits Frechet Distance.

The network is the demo's stand-in for the Inception network of FID (see `bitlaws.demo.metric`). It is
trained on the train split of `bitlaws.demo.data.load_digits` with random +-1 pixel shifts, so generated
digits that sit slightly off-centre still classify, and ships as an orbax checkpoint in
``bitlaws/demo/checkpoints/classifier/``. Its layers are `QConv` / `QLinear` like every model of the
library, but the sweep never quantizes it (the feature net stays in float, as in the paper).

Architecture for ``channels=(c1, c2, c3)``, ``feature_dim=D`` on ``[B, 16, 16, 3]`` images::

    conv3x3(c1) relu avgpool2 -> [B, 8, 8, c1]
    conv3x3(c2) relu avgpool2 -> [B, 4, 4, c2]
    conv3x3(c3) relu          -> [B, 4, 4, c3] -> flatten [B, 16 * c3]
    dense(D) relu             -> [B, D]   features (penultimate)
    dense(10)                 -> [B, 10]  logits
"""

from __future__ import annotations

import functools
import pathlib
import time
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from bitlaws.checkpoint import load_metadata, load_model, save_model
from bitlaws.demo.data import IMAGE_SIZE, NUM_CLASSES, load_digits
from bitlaws.quant.layers import QConv, QLinear
from bitlaws.train import TrainConfig, train_module

SHIPPED_CHECKPOINT = pathlib.Path(__file__).parent / "checkpoints" / "classifier"
BACKGROUND = -1.0  # pixel value of the empty canvas in [-1, 1] images


class DigitsClassifier(nnx.Module):
    """Small CNN classifier of 16x16 digits.

    Args:
        channels: Widths of the 3x3 convolutions; a 2x2 average pool follows every one but the last.
        feature_dim: Width D of the penultimate (feature) layer.
        num_classes: Number of logits.
        image_size: Side of the square input images.
        rngs: Initialisation randomness.
    """

    def __init__(self, *, channels: Sequence[int] = (16, 32, 32), feature_dim: int = 64,
                 num_classes: int = NUM_CLASSES, image_size: int = IMAGE_SIZE, rngs: nnx.Rngs):
        channels = tuple(int(c) for c in channels)
        num_pools = len(channels) - 1
        if not channels or image_size % (2 ** num_pools):
            raise ValueError(f"image_size {image_size} must be divisible by 2**{num_pools} (channels {channels})")
        widths = (3,) + channels
        self.convs = nnx.List([QConv(widths[i], widths[i + 1], 3, padding="SAME", rngs=rngs)
                               for i in range(len(channels))])
        pooled = image_size // (2 ** num_pools)
        self.feature = QLinear(pooled * pooled * channels[-1], feature_dim, rngs=rngs)
        self.head = QLinear(feature_dim, num_classes, rngs=rngs)

    def features(self, images: jax.Array) -> jax.Array:
        """Penultimate features: ``[B, H, W, 3]`` float in [-1, 1] -> ``[B, D]`` float32 (non-negative)."""
        x = images.astype(jnp.float32)
        last = len(self.convs) - 1
        for index, conv in enumerate(self.convs):
            x = jax.nn.relu(conv(x))
            if index < last:
                x = _avg_pool2(x)  # [B, H/2, W/2, C]
        x = x.reshape(x.shape[0], -1)  # [B, h * w * C]
        return jax.nn.relu(self.feature(x))

    def logits_from_features(self, features: jax.Array) -> jax.Array:
        """``[B, D] -> [B, num_classes]``."""
        return self.head(features)

    def __call__(self, images: jax.Array) -> jax.Array:
        """Logits: ``[B, H, W, 3]`` float in [-1, 1] -> ``[B, num_classes]`` float32."""
        return self.logits_from_features(self.features(images))


def _avg_pool2(x: jax.Array) -> jax.Array:
    """2x2 average pool, stride 2: ``[B, H, W, C] -> [B, H/2, W/2, C]``."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def model_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Constructor arguments of `DigitsClassifier` from a config's ``model`` block (JSON-friendly)."""
    return {"channels": [int(c) for c in config.model.channels], "feature_dim": int(config.model.feature_dim)}


def build_classifier(kwargs: dict[str, Any], seed: int = 0) -> DigitsClassifier:
    """A freshly initialised classifier from `model_kwargs`-style arguments.

    The model is built abstractly and filled on the host with numpy (eager JAX initialisation compiles one
    kernel per parameter shape, which dominates a short run on CPU): kernels LeCun-normal
    ``N(0, 1 / fan_in)`` with ``fan_in`` the product of all but the output axis, biases zero.
    """
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: DigitsClassifier(**kwargs, rngs=nnx.Rngs(0))))

    def init(path, leaf):
        shape = tuple(leaf.shape)
        if str(path[-1].key) == "kernel":
            return jnp.asarray(rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1])), jnp.float32)
        return jnp.zeros(shape, jnp.float32)

    pure = jax.tree_util.tree_map_with_path(init, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def random_shift(images: jax.Array, key: jax.Array, max_shift: int) -> jax.Array:
    """Translates each image by an independent random offset in ``[-max_shift, max_shift]`` pixels.

    Uncovered pixels are filled with the background value -1.

    Args:
        images: ``[B, H, W, C]`` float32.
        key: PRNG key.
        max_shift: Largest shift per axis (0 returns `images`).

    Returns:
        ``[B, H, W, C]`` float32.
    """
    if max_shift == 0:
        return images
    b, h, w, c = images.shape
    padded = jnp.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)),
                     constant_values=BACKGROUND)  # [B, H + 2m, W + 2m, C]
    offsets = jax.random.randint(key, (b, 2), 0, 2 * max_shift + 1)  # [B, 2]

    def crop(image: jax.Array, offset: jax.Array) -> jax.Array:
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))

    return jax.vmap(crop)(padded, offsets)


@functools.partial(jax.jit, static_argnums=0)
def _logits_step(graphdef: nnx.GraphDef, state: nnx.State, images: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state)(images)


def predict_logits(model: DigitsClassifier, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Logits of many images, batch by batch: ``[N, H, W, 3]`` in [-1, 1] -> ``[N, 10]`` float32 (numpy)."""
    graphdef, state = nnx.split(model)
    images = np.asarray(images, np.float32)
    parts = []
    for start in range(0, images.shape[0], batch_size):
        batch = images[start:start + batch_size]
        padded = np.concatenate([batch, np.zeros((batch_size - batch.shape[0],) + batch.shape[1:], np.float32)])
        parts.append(np.asarray(_logits_step(graphdef, state, padded))[:batch.shape[0]])
    return np.concatenate(parts) if parts else np.zeros((0, NUM_CLASSES), np.float32)


def accuracy(model: DigitsClassifier, images: np.ndarray, labels: np.ndarray, batch_size: int = 512) -> float:
    """Fraction of `images` ``[N, H, W, 3]`` whose argmax logit equals `labels` ``[N]``."""
    predictions = predict_logits(model, images, batch_size).argmax(axis=-1)
    return float(np.mean(predictions == np.asarray(labels)))


def train_config(config: ml_collections.ConfigDict) -> TrainConfig:
    """The loop settings: AdamW, warm-up over 5 % of the steps (at least one), cosine to 1 %, no clipping."""
    steps = int(config.train.steps)
    return TrainConfig(steps=steps, learning_rate=config.train.learning_rate, warmup_steps=max(1, steps // 20),
                       final_lr_fraction=0.01, weight_decay=config.train.weight_decay, grad_clip=None,
                       seed=int(config.seed), log_every=int(config.train.get("log_every", 1)))


class EpochBatches:
    """``step -> (images, labels)``: consecutive slices of an endless stream of seeded permutations.

    The stream is ``permutation 0, permutation 1, ...`` drawn from one ``numpy`` generator seeded with `seed`;
    batch ``s`` is its slice ``[s * B, (s + 1) * B)`` (batches straddle epochs). Permutations are drawn as
    needed and kept, so the batch is a pure function of the step.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int):
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self._rng = np.random.default_rng(seed)
        self._stream: list[np.ndarray] = []

    def indices(self, step: int) -> np.ndarray:
        """``[B]`` int32 example indices of batch `step`."""
        n = self.labels.shape[0]
        start, stop = step * self.batch_size, (step + 1) * self.batch_size
        while len(self._stream) * n < stop:
            self._stream.append(self._rng.permutation(n).astype(np.int32))
        return np.concatenate(self._stream[start // n:(stop - 1) // n + 1])[start % n:start % n + self.batch_size]

    def __call__(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        index = self.indices(step)
        return self.images[index], self.labels[index]


def _train_loss(model: DigitsClassifier, batch: tuple[jax.Array, jax.Array], key: jax.Array, *,
                max_shift: int) -> tuple[jax.Array, dict]:
    images, labels = batch
    logits = model(random_shift(images, key, max_shift))  # [B, 10]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), {}


def train_classifier(config: ml_collections.ConfigDict, out_dir: Union[str, pathlib.Path], *,
                     progress: bool = True) -> dict[str, Any]:
    """Trains the digits classifier with `bitlaws.train` and writes an orbax checkpoint to `out_dir`.

    Adam(W) with linear warm-up and cosine decay (`train_config`) on the train split, random
    +-``config.train.max_shift`` pixel shifts drawn from the step's key; the val split is only used for the
    reported accuracy. A short run: no train state is kept and `out_dir` holds only the final checkpoint.

    Args:
        config: A config from ``configs/demo/classifier.py``.
        out_dir: Checkpoint directory (replaced if it exists).
        progress: Show a tqdm progress bar.

    Returns:
        The training summary, also stored as the checkpoint's metadata: ``family``, ``model`` (constructor
        arguments), ``config``, ``final_train_loss`` (mean of the last 10% of steps), ``val_accuracy``,
        ``wall_time_s``, ``num_params``, ``steps``.
    """
    start = time.perf_counter()
    train, val = load_digits("train"), load_digits("val")
    kwargs = model_kwargs(config)
    model = build_classifier(kwargs, seed=int(config.seed))
    loop_config = train_config(config)
    get_batch = EpochBatches(train.images, train.labels, int(config.train.batch_size), int(config.seed))
    loss_fn = functools.partial(_train_loss, max_shift=int(config.train.max_shift))
    result = train_module(model, loss_fn, get_batch, loop_config, progress=progress, desc="classifier")
    tail = max(1, loop_config.steps // 10)
    losses = [r["loss"] for r in result.history if r["step"] > loop_config.steps - tail] or [result.metrics["loss"]]
    summary = {
        "family": "classifier",
        "model": kwargs,
        "config": config.to_dict(),
        "steps": result.step,
        "final_train_loss": float(np.mean(losses)),
        "val_accuracy": accuracy(model, val.images, val.labels, int(config.train.eval_batch_size)),
        "num_params": int(sum(np.size(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))),
    }
    summary["wall_time_s"] = round(time.perf_counter() - start, 2)
    save_model(model, out_dir, summary)
    return summary


def train_from_config(config: ml_collections.ConfigDict, out_dir: Union[str, pathlib.Path]) -> dict[str, Any]:
    """Entry point of ``bitlaws train`` for configs with ``family == "classifier"``."""
    if config.get("family") != "classifier":
        raise ValueError(f"train_from_config expects a classifier config, got family {config.get('family')!r}")
    return train_classifier(config, out_dir)


def load_classifier(directory: Optional[Union[str, pathlib.Path]] = None) -> DigitsClassifier:
    """Restores a classifier checkpoint (default: the one shipped in ``bitlaws/demo/checkpoints/classifier``).

    Raises:
        FileNotFoundError: `directory` holds no checkpoint.
        ValueError: the checkpoint is not a classifier's.
    """
    directory = SHIPPED_CHECKPOINT if directory is None else pathlib.Path(directory)
    metadata = load_metadata(directory)
    if metadata.get("family") != "classifier":
        raise ValueError(f"{directory} holds a {metadata.get('family')!r} checkpoint, not a classifier")
    kwargs = metadata["model"]
    return load_model(lambda: build_classifier(kwargs), directory)
