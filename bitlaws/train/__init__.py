"""The one training loop of bitlaws (QAT and the demo trainers): see `bitlaws.train.loop`."""

from bitlaws.train.loop import (METRICS_FILE, TrainConfig, TrainResult, initialize_distributed, metrics_lines, train,
                                train_module)
from bitlaws.train.optimizer import make_optimizer, make_schedule
from bitlaws.train.sharding import batch_sharding, make_mesh, param_shardings
from bitlaws.train.state_io import STATE_DIR, TrainStateStore

__all__ = ["METRICS_FILE", "STATE_DIR", "TrainConfig", "TrainResult", "TrainStateStore", "batch_sharding",
           "initialize_distributed", "make_mesh", "make_optimizer", "make_schedule", "metrics_lines",
           "param_shardings", "train", "train_module"]
