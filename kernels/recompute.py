"""Marks the checkpointed recomputation of a layer, so that its last op can skip what nobody reads.

    from kernels.recompute import checkpoint, in_recompute, recomputing

A checkpointed decoder layer runs its forward twice: once in the forward pass, once in the
backward to recover the tensors its backward needs. In the second run, the output of the layer's
last projection (Llama-style layers: the MLP's down projection, followed only by the residual
add, which saves nothing) is never read: the backward of that projection needs its saved inputs,
not its output. The fused LoRA MLP (kernels/fused_lora_mlp.py) skips that GEMM while
`in_recompute()` - a sixth or so of a layer's recomputed FLOPs - where its layer allows it.

`checkpoint` is torch.utils.checkpoint.checkpoint with every call of `run_fn` after the first
(the recomputations) run inside `recomputing()`; kernels/offload.py marks its own recomputation.
"""
from __future__ import annotations

import contextlib

import torch.utils.checkpoint

_DEPTH = [0]


def in_recompute() -> bool:
    """True while a checkpointed layer is being recomputed for its backward."""
    return _DEPTH[0] > 0


@contextlib.contextmanager
def recomputing():
    _DEPTH[0] += 1
    try:
        yield
    finally:
        _DEPTH[0] -= 1


def checkpoint(run_fn, *args, **kwargs):
    """torch.utils.checkpoint.checkpoint(run_fn, ...), the recomputation marked."""
    calls = [0]

    def run(*a, **k):
        calls[0] += 1
        if calls[0] == 1:
            return run_fn(*a, **k)
        with recomputing():
            return run_fn(*a, **k)

    return torch.utils.checkpoint.checkpoint(run, *args, **kwargs)
