"""Kernel tests: on CPU, Triton runs through its interpreter.

TRITON_INTERPRET=1 must be set before triton is first imported (CI and `make test` set it in
the environment; this is the fallback for a bare `pytest tests/kernels`). On a CUDA machine it
is left unset so the kernels compile for the GPU.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
