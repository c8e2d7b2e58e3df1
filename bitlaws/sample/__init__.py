"""Samplers: VAR next-scale prediction, DiT Gaussian diffusion."""
