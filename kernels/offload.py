"""Gradient checkpointing per decoder layer, with the saved layer inputs offloaded to CPU memory.

    n = enable_offloaded_checkpointing(model)     # every decoder layer; returns how many
    disable_offloaded_checkpointing(model)        # back to what the layers had before

Plain checkpointing keeps one [batch, seq, hidden] tensor per layer on the GPU (the layer's
input) and recomputes the layer in the backward. Here that input goes to pinned CPU memory
instead: the device-to-host copy is queued on a side CUDA stream right after the layer's forward
(the compute stream does not wait for it), and in the backward the host-to-device copy of layer
i-1's input is queued on the side stream while layer i recomputes, so it is back on the GPU
before layer i-1's recompute starts. GPU memory for saved activations drops from
n_layers x B x T x H to about two layers' worth; the copies overlap with compute.

How it plugs in: Hugging Face decoder layers (GradientCheckpointingLayer) call
`self._gradient_checkpointing_func(layer_call, hidden_states)` when checkpointing is on; we
install our function there. It is a reentrant-style autograd function: its forward runs the layer
keeping nothing for backward, its backward re-runs the layer with grad and back-propagates through it. A
constant leaf that requires grad is passed in so the node is always part of the graph even when
the layer input does not require grad (frozen embeddings under LoRA) - otherwise the adapters of
the first layer would get no gradient. RNG and autocast state are restored for the recompute.

The forward runs the layer in the same grad mode as the recompute (grad enabled, the input
requiring grad exactly when it will in the backward), with every tensor autograd would save dropped
as it is packed: nothing is kept, but the kernels are the ones the recompute will run. Under
no_grad some kernels are chosen differently (SDPA on cuDNN builds its inference graph, without
softmax statistics, when no input requires grad), so the output handed to the next layer would not
be the one the backward differentiates - a bf16-rounding mismatch at every layer that plain
(non-reentrant) checkpointing, whose forward runs with grad, does not have.

On CPU tensors the "offload" is a plain copy (no streams, no pinning), so the same code path,
bookkeeping included, runs in CPU tests. With DDP, use static_graph=True (reentrant backward).
"""
from __future__ import annotations

import functools
import weakref

import torch
from torch import nn

from kernels.recompute import recomputing

_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device=device)
    return _STREAMS[device]


class _SavedInput:
    """One layer input living on the CPU between the forward and the recompute."""

    __slots__ = ("cpu", "device", "d2h", "gpu", "h2d", "prev", "__weakref__")

    def __init__(self, t: torch.Tensor, prev: "_SavedInput | None"):
        self.device = t.device
        self.prev = weakref.ref(prev) if prev is not None else None
        self.gpu = self.h2d = self.d2h = None
        t = t.detach()
        if t.device.type != "cuda":
            self.cpu = t.clone()  # CPU: the copy path without streams
            return
        stream = _side_stream(t.device)
        self.cpu = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        stream.wait_stream(torch.cuda.current_stream(t.device))  # t is complete on the compute stream
        with torch.cuda.stream(stream):
            self.cpu.copy_(t, non_blocking=True)
            self.d2h = torch.cuda.Event()
            self.d2h.record(stream)
        t.record_stream(stream)  # the allocator must not reuse t's memory before the copy is done

    def prefetch(self) -> None:
        """Queue the host-to-device copy (side stream), if not already done."""
        if self.gpu is not None or self.cpu is None:
            return
        if self.device.type != "cuda":
            self.gpu = self.cpu
            return
        stream = _side_stream(self.device)
        stream.wait_event(self.d2h)
        with torch.cuda.stream(stream):
            self.gpu = self.cpu.to(self.device, non_blocking=True)
            self.h2d = torch.cuda.Event()
            self.h2d.record(stream)
        self.gpu.record_stream(torch.cuda.current_stream(self.device))  # consumed on the compute stream

    def fetch(self) -> torch.Tensor:
        """The input back on its device, ordered before the compute stream's next work."""
        self.prefetch()
        if self.h2d is not None:
            torch.cuda.current_stream(self.device).wait_event(self.h2d)
        t = self.gpu
        self.gpu = self.cpu = self.h2d = self.d2h = None
        return t

    def previous(self) -> "_SavedInput | None":
        return self.prev() if self.prev is not None else None


class Offloader:
    """Per-model bookkeeping: the chain of saved inputs, newest last, for prefetching."""

    def __init__(self, offload: bool = True):
        self.offload = offload
        self._last = None  # weakref to the newest _SavedInput
        self.anchor = torch.empty((), requires_grad=True)  # keeps every layer node in the graph

    def __deepcopy__(self, memo):
        return Offloader(self.offload)

    def save(self, t: torch.Tensor) -> "_SavedInput | torch.Tensor":
        if not self.offload:
            return t.detach()
        prev = self._last() if self._last is not None else None
        saved = _SavedInput(t, prev)
        self._last = weakref.ref(saved)
        return saved


def _drop_saved(t: torch.Tensor) -> None:
    return None  # the forward's graph is thrown away: keep none of the tensors it would save


def _never_unpacked(_) -> torch.Tensor:
    raise RuntimeError("offloaded checkpoint: the forward's own graph was used for backward (internal error)")


def _detached(out):
    if torch.is_tensor(out):
        return out.detach()
    if isinstance(out, tuple):
        return tuple(_detached(o) for o in out)
    return out


def _autocast_state(device_type: str):
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


class OffloadedCheckpointFunction(torch.autograd.Function):
    """apply(run_fn, offloader, hidden, anchor, *rest) -> run_fn(hidden, *rest), recomputed in backward."""

    @staticmethod
    def forward(ctx, run_fn, offloader, hidden, anchor, *rest):
        ctx.run_fn, ctx.offloader, ctx.rest = run_fn, offloader, rest
        ctx.device = hidden.device
        ctx.autocast = _autocast_state(hidden.device.type)
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else None
        # grad mode and requires_grad as in the recompute (see the module docstring); the graph this
        # builds holds no tensors and dies with `out`'s detach
        x = hidden.detach().requires_grad_(hidden.requires_grad)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_drop_saved, _never_unpacked):
            out = _detached(run_fn(x, *rest))
        del x
        ctx.saved = offloader.save(hidden)
        ctx.hidden_dtype = hidden.dtype
        return out

    @staticmethod
    def backward(ctx, *grads):
        saved = ctx.saved
        if saved is None:
            raise RuntimeError("offloaded checkpoint: backward through this layer ran already; a second "
                               "backward through the same graph (retain_graph=True) is not supported")
        ctx.saved = None
        if isinstance(saved, _SavedInput):
            hidden = saved.fetch()
            prev = saved.previous()
            if prev is not None:
                prev.prefetch()  # overlaps with this layer's recompute and backward
        else:
            hidden = saved
        need_dx = ctx.needs_input_grad[2]  # False for layer 0 under LoRA (frozen embeddings)
        hidden = hidden.detach().requires_grad_(need_dx)
        devices = [ctx.device] if ctx.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=True):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
            with torch.enable_grad(), torch.autocast(ctx.device.type, dtype=ctx.autocast,
                                                     enabled=ctx.autocast is not None), recomputing():
                out = ctx.run_fn(hidden, *ctx.rest)  # values unread past the last projection
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads)
                 if torch.is_tensor(o) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        ctx.run_fn = ctx.rest = None
        return (None, None, hidden.grad if need_dx else None, None) + (None,) * len(ctx.needs_input_grad[4:])


def offloaded_checkpoint(offloader: Offloader, run_fn, *args, **kwargs):
    """Drop-in for a layer's `_gradient_checkpointing_func(run_fn, hidden_states, ...)`."""
    if kwargs or not args or not torch.is_tensor(args[0]) or not torch.is_grad_enabled():
        if not torch.is_grad_enabled():
            return run_fn(*args, **kwargs)
        from torch.utils.checkpoint import checkpoint

        return checkpoint(run_fn, *args, use_reentrant=False, **kwargs)
    hidden, rest = args[0], args[1:]
    if any(torch.is_tensor(r) and r.requires_grad for r in rest):
        # extra positional inputs needing gradients: not our case (HF passes only hidden states)
        from torch.utils.checkpoint import checkpoint

        return checkpoint(run_fn, *args, use_reentrant=False)
    return OffloadedCheckpointFunction.apply(run_fn, offloader, hidden, offloader.anchor, *rest)


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


_PREV = "_offload_ckpt_prev"


def enable_offloaded_checkpointing(model: nn.Module, offload: bool = True) -> int:
    """Checkpoint every decoder layer, saving its input on the CPU (`offload=False`: on the GPU,
    i.e. plain reentrant-style checkpointing through the same code). Returns the number of layers."""
    layers = _decoder_layers(model)
    if not layers:
        raise ValueError(f"offloaded checkpointing: no Hugging Face decoder layers "
                         f"(GradientCheckpointingLayer) found in {type(model).__name__}")
    offloader = Offloader(offload)
    for layer in layers:
        if _PREV not in layer.__dict__:
            layer.__dict__[_PREV] = (layer.__dict__.get("gradient_checkpointing", None),
                                     layer.__dict__.get("_gradient_checkpointing_func", None))
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = functools.partial(offloaded_checkpoint, offloader)
    return len(layers)


def disable_offloaded_checkpointing(model: nn.Module) -> int:
    """Give every layer back the checkpointing setting it had before enable_... Returns the count."""
    n = 0
    for layer in _decoder_layers(model):
        prev = layer.__dict__.pop(_PREV, None)
        if prev is None:
            continue
        flag, fn = prev
        layer.__dict__.pop("gradient_checkpointing", None)
        layer.__dict__.pop("_gradient_checkpointing_func", None)
        if flag is not None:
            layer.gradient_checkpointing = flag
        if fn is not None:
            layer._gradient_checkpointing_func = fn
        n += 1
    return n


def offloaded_checkpointing_enabled(model: nn.Module) -> bool:
    return any(_PREV in m.__dict__ for m in _decoder_layers(model))
