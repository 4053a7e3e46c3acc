"""What every op shares: the Triton-or-PyTorch switch and how a kernel is launched.

Modes (the switch): "auto" runs Triton on CUDA tensors and the PyTorch reference on CPU
tensors (Triton's interpreter is far too slow to train with); "triton" always runs the Triton
kernel (on CPU through Triton's interpreter: for tests); "reference" always runs PyTorch.
The environment variable POSTTRAIN_KERNELS=auto|triton|reference overrides any mode given
in code, so a run can be flipped to the reference path without editing its config.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

MODES = ("auto", "triton", "reference")
ENV_VAR = "POSTTRAIN_KERNELS"


def resolve_mode(mode: str | None = None) -> str:
    """The mode in force: POSTTRAIN_KERNELS if set, else `mode`, else "auto"."""
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env:
        if env not in MODES:
            raise ValueError(f"{ENV_VAR}: expected one of {', '.join(MODES)}, got {env!r}")
        return env
    mode = mode or "auto"
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
    return mode


def use_triton(mode: str | None, *tensors: torch.Tensor) -> bool:
    """Whether the Triton path runs for these tensors under `mode`."""
    mode = resolve_mode(mode)
    if mode == "reference":
        return False
    if mode == "triton":
        return True
    return all(t.is_cuda for t in tensors)


def launchable(kernel, device: torch.device):
    """The kernel to launch for tensors on `device`.

    On CPU Triton runs through its interpreter, which must be switched on with
    TRITON_INTERPRET=1 before triton is first imported (the decorator then returns
    interpreted kernels); we cannot switch it on afterwards, so say so clearly.
    """
    if device.type == "cuda":
        return kernel
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(kernel, InterpretedFunction):
        raise RuntimeError(
            "Triton kernels on CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before "
            "triton is imported, or use mode='reference' / 'auto' (PyTorch on CPU)")
    return kernel


def triton_interpreted() -> bool:
    """Whether Triton kernels in this process run through the interpreter."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_probe, InterpretedFunction)


@triton.jit
def _probe():
    pass


@triton.jit
def tanh(a):
    """tanh through exp of a non-positive number (no overflow; core triton.language of 3.6 only)."""
    e = tl.exp(-2.0 * tl.abs(a))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(a < 0, -t, t)


def next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


# Elements per program tile. On CUDA a few thousand keeps registers in check; Triton's
# interpreter runs programs one after another in Python (numpy underneath), so there we take
# tiles as large as possible: a launch then costs a handful of programs, not thousands.
GPU_TILE = 4096
INTERPRETER_TILE = 1 << 16


def tile_elements(device: torch.device, gpu_tile: int = GPU_TILE) -> int:
    return gpu_tile if device.type == "cuda" else INTERPRETER_TILE


def rows_per_tile(block_cols: int, device: torch.device, n_rows: int, gpu_tile: int = GPU_TILE) -> int:
    """Power-of-2 number of rows per tile of `block_cols` (a power of 2) columns, at most ~n_rows."""
    rows = max(1, tile_elements(device, gpu_tile) // block_cols)
    return min(rows, next_power_of_2(n_rows))


def num_programs_hint(device: torch.device) -> int:
    """Rough count of programs that fill the device (per-SM x 4 on CUDA; a handful on CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count * 4
    return 4
