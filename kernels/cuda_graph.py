"""Forward + backward of a training micro-batch as one CUDA graph, replayed step after step.

    step = GraphedStep(loss_fn, params)                 # loss_fn(**inputs) -> summed loss (0-d tensor)
    loss = step({"input_ids": ids, "labels": labels}, scale=1 / n_targets)   # grads accumulate into p.grad

Why: at 1B sizes a LoRA step is bound by the host issuing ~1,600 kernels (Python, autograd and
launch overhead per kernel), not by the kernels: the GPU idles in thousands of small gaps. A
replayed graph issues the whole forward and backward (checkpointed recomputation included) in
one launch, so the step takes the GPU's time.

Semantics are those of `(loss_fn(**inputs) * scale).backward()`, once per call:
- The first `warmup` calls for an input signature run eagerly (on a side stream, as CUDA graph
  capture wants: lazy initialisations, Triton compiles and cached kernel arguments happen there).
  The next call captures (recording runs nothing) and then replays the graph once.
- A signature is the inputs' shapes and dtypes plus whether `position_ids` show packed sequences
  (decided on the host from the CPU tensor, see `_host_decided_masks`). At most `max_graphs`
  signatures get a graph (they share one memory pool); further ones run eagerly.
- Gradients accumulate in place into tensors the graph owns. If a caller set `p.grad = None`
  (optimizer.zero_grad(set_to_none=True)) or replaced it, the next call puts the graph's tensor
  back (zeroed, or holding the replacement's values), so any zero_grad mode works.
- The returned loss is a fresh copy: it stays valid after later replays.

Requirements (checked by `unsupported_reason`, the caller falls back to eager with the reason):
CUDA tensors; no layer with a sliding attention window (the non-packed graph relies on SDPA's
causal flag); no CPU offload of activations (kernels.offload); no trainable embeddings; no
DDP/DeepSpeed wrapper (the trainer checks these); the
parameters keep their storage (in-place optimizer steps; no re-assignment of `p.data`); the
loss function does not read tensors back to the host. Autocast, if used, must run with
`cache_enabled=False` (the step passes `autocast_dtype` and does this itself). Should a capture
still fail (an op that reads back to the host), that signature runs eagerly from then on, with
a warning: the step's result is the same, only slower.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable

import numpy as np
import torch

log = logging.getLogger(__name__)


def is_packed(position_ids) -> bool:
    """True when some row's positions restart (several sequences packed in one row): the rule
    transformers uses to build a block-causal mask, evaluated on the host."""
    if position_ids is None:
        return False
    pos = position_ids.numpy() if isinstance(position_ids, torch.Tensor) else np.asarray(position_ids)
    return bool(pos.shape[-1] > 1 and (np.diff(pos, axis=-1) != 1).any())


def _config(model):
    from kernels.model import base_model

    return getattr(base_model(model), "config", None)


def unsupported_reason(model, device: torch.device) -> str | None:
    """Why `model` cannot be trained through GraphedStep here (None: it can)."""
    if device.type != "cuda":
        return f"device {device.type} (CUDA graphs need a CUDA device)"
    cfg = _config(model)
    if cfg is None:
        return "the model has no transformers config"
    layer_types = set(getattr(cfg, "layer_types", None) or ())
    if layer_types - {"full_attention"}:
        return f"layer types {sorted(layer_types)} (only full attention: sliding-window masks are built per batch)"
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) and not layer_types:
        return f"sliding_window={cfg.sliding_window}"
    from kernels.offload import offloaded_checkpointing_enabled

    if offloaded_checkpointing_enabled(model):
        return "activations are offloaded to CPU (gradient_checkpointing=offload)"
    if any(isinstance(m, torch.nn.Embedding) and m.weight.requires_grad for m in model.modules()):
        return "trainable embeddings (their CUDA backward reads a count back to the host)"
    return None


def graphed_causal_lm(model, device: torch.device, autocast_dtype: torch.dtype | None = None):
    """(GraphedStep over kernels.loss.causal_lm_loss of `model`, None), or (None, why it cannot be).
    Its inputs: input_ids, labels and optionally position_ids; the trainer and the bench use it."""
    why = unsupported_reason(model, device)
    if why is not None:
        return None, why
    from kernels.loss import causal_lm_loss

    def loss_fn(input_ids, labels, position_ids=None):
        return causal_lm_loss(model, input_ids, labels, position_ids)

    params = [p for p in model.parameters() if p.requires_grad]
    return GraphedStep(loss_fn, params, model=model, device=device, autocast_dtype=autocast_dtype), None


@contextlib.contextmanager
def _host_decided_masks(model, packed: bool):
    """While capturing: transformers cannot look at position_ids (that would read the GPU), so it
    always builds an explicit block mask, which turns SDPA's flash kernel off. The host knows
    whether the batch is packed; for a batch that is not, the mask builders of the model's
    modelling module return None (SDPA's causal flag, exactly what eager does for such a batch).
    Packed batches keep transformers' own block-causal mask, built inside the graph."""
    if packed:
        yield
        return
    from kernels.model import base_model

    decoder = getattr(base_model(model), "model", None)
    mod = sys.modules.get(type(decoder).__module__) if decoder is not None else None
    names = [n for n in ("create_causal_mask", "create_sliding_window_causal_mask") if hasattr(mod, n)]
    saved = {n: getattr(mod, n) for n in names}
    try:
        for n in names:
            setattr(mod, n, lambda *a, **k: None)
        yield
    finally:
        for n, f in saved.items():
            setattr(mod, n, f)


class _Graph:
    """One captured signature: its static inputs, the graph, and the captured loss."""

    def __init__(self):
        self.eager_calls = 0
        self.failed = False  # capture raised: this signature runs eagerly from now on
        self.graph = None
        self.inputs: dict[str, torch.Tensor] = {}
        self.scale: torch.Tensor | None = None
        self.loss: torch.Tensor | None = None


class GraphedStep:
    """See the module docstring. `loss_fn(**inputs)` returns the summed loss of a micro-batch;
    `params` are the trainable parameters (their .grad is where gradients accumulate)."""

    def __init__(self, loss_fn: Callable[..., torch.Tensor], params, *, model=None, device=None,
                 warmup: int = 2, max_graphs: int = 2, autocast_dtype: torch.dtype | None = None):
        if warmup < 1:
            raise ValueError(f"GraphedStep: warmup must be >= 1 (eager calls before capture), got {warmup}")
        self.loss_fn = loss_fn
        self.params = [p for p in params if p.requires_grad]
        self.model = model
        self.device = torch.device(device) if device is not None else self.params[0].device
        self.warmup, self.max_graphs = warmup, max_graphs
        self.autocast_dtype = autocast_dtype
        self._graphs: dict[tuple, _Graph] = {}
        self._pool = None
        self._grads: list[torch.Tensor] | None = None  # the graph-owned gradient tensors
        self._stream = None
        self._warned_eager = False
        self.replays = 0

    # -- public ------------------------------------------------------------------------------
    def __call__(self, inputs: dict[str, torch.Tensor | None], scale: float) -> torch.Tensor:
        inputs = {k: v for k, v in inputs.items() if v is not None}
        packed = is_packed(inputs.get("position_ids").cpu() if "position_ids" in inputs else None)
        key = (tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(inputs.items())), packed)
        self._restore_grads()  # every path below, eager ones too, adds into the graph-owned gradients
        g = self._graphs.get(key)
        if g is None:
            if len(self._graphs) >= self.max_graphs:
                if not self._warned_eager:
                    log.warning("cuda graphs: a %d-th input signature %s runs eagerly (max_graphs=%d)",
                                len(self._graphs) + 1, key, self.max_graphs)
                    self._warned_eager = True
                return self._eager(inputs, scale, side_stream=False)
            g = self._graphs[key] = _Graph()
        if g.failed:
            return self._eager(inputs, scale, side_stream=False)
        if g.graph is None and g.eager_calls < self.warmup:
            g.eager_calls += 1
            return self._eager(inputs, scale, side_stream=True)
        if g.graph is None:
            try:
                self._capture(g, inputs, packed)
            except Exception as e:  # an op that cannot be captured: keep training, eagerly
                g.failed, g.graph = True, None
                log.warning("cuda graphs: capture failed, inputs %s run eagerly: %s: %s",
                            {k: tuple(v.shape) for k, v in inputs.items()}, type(e).__name__,
                            str(e).strip().splitlines()[0][:200] if str(e).strip() else "")
                torch.cuda.synchronize(self.device)
                return self._eager(inputs, scale, side_stream=False)
        for k, v in inputs.items():
            g.inputs[k].copy_(v, non_blocking=True)
        g.scale.fill_(scale)
        g.graph.replay()
        self.replays += 1
        return g.loss.clone()

    @property
    def captured(self) -> int:
        return sum(g.graph is not None for g in self._graphs.values())

    # -- internals ---------------------------------------------------------------------------
    def _amp(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        # a graph must not reuse casts cached by autocast outside it (their memory is not the graph's)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=False)

    def _eager(self, inputs, scale, side_stream: bool) -> torch.Tensor:
        cur = torch.cuda.current_stream(self.device)
        if side_stream:
            if self._stream is None:
                self._stream = torch.cuda.Stream(self.device)
            self._stream.wait_stream(cur)
            ctx = torch.cuda.stream(self._stream)
        else:
            ctx = contextlib.nullcontext()
        with ctx:
            dev = {k: v.to(self.device, non_blocking=True) for k, v in inputs.items()}
            with self._amp():
                loss = self.loss_fn(**dev)
            (loss * scale).backward()
            loss = loss.detach().clone()
        if side_stream:
            cur.wait_stream(self._stream)
        return loss

    def _restore_grads(self) -> None:
        """Gradients must live in the tensors the graphs add into."""
        if self._grads is None:
            return
        zero = []
        for p, g in zip(self.params, self._grads):
            cur = p.grad
            if cur is g:
                continue
            if cur is None:
                zero.append(g)
            else:
                g.copy_(cur)
            p.grad = g
        if zero:
            torch._foreach_zero_(zero)

    def _capture(self, g: _Graph, inputs, packed: bool) -> None:
        from kernels.fused_lora import uncached_adapter_casts

        if self._grads is None:
            # the graph adds into existing gradients in place (autograd accumulates into a defined
            # .grad in place); allocated outside the graph's pool so that they outlive nothing
            missing = [p for p in self.params if p.grad is None]
            for p in missing:
                p.grad = torch.zeros_like(p)
            self._grads = [p.grad for p in self.params]
        g.inputs = {k: torch.empty_like(v, device=self.device) for k, v in inputs.items()}
        g.scale = torch.zeros((), dtype=torch.float32, device=self.device)
        torch.cuda.synchronize(self.device)
        # the warm-up left activations cached in the ordinary pool; the graph gets its own
        torch.cuda.empty_cache()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with _host_decided_masks(self.model, packed), uncached_adapter_casts():
            with torch.cuda.graph(graph, pool=self._pool):
                with self._amp():
                    loss = self.loss_fn(**g.inputs)
                (loss * g.scale).backward()
                g.loss = loss.detach()
        g.graph = graph
        log.info("cuda graphs: captured forward+backward for inputs %s (packed=%s)",
                 {k: tuple(v.shape) for k, v in inputs.items()}, packed)
