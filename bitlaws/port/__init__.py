"""Porting pretrained PyTorch checkpoints to JAX: torch-free, pickle-safe readers."""

from bitlaws.port.reader import read_state_dict
from bitlaws.port.safetensors_io import read_safetensors, write_safetensors
from bitlaws.port.torch_pickle import UnsafeCheckpointError

__all__ = [
    "UnsafeCheckpointError",
    "read_safetensors",
    "read_state_dict",
    "write_safetensors",
]
