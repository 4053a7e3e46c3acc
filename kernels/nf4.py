"""NF4 dequantisation: a Triton kernel and its pure-PyTorch reference, for bitsandbytes' 4-bit format.

The format (bitsandbytes `quantize_4bit(..., quant_type="nf4")`), for a weight W of shape [O, I]:

    flat = W.reshape(-1)                                   # row-major, n = O * I elements
    block b = elements [b * blocksize, (b + 1) * blocksize) # blocksize 64 by default
    absmax[b] = max |flat[block b]|                         # fp32, one per block
    code[e] = index of the NF4 value nearest flat[e] / absmax[b]   (4 bits)
    packed[e // 2] = code[e] << 4 | code[e + 1]             # even element in the high nibble

and dequantisation is `W[e] = NF4[code[e]] * absmax[e // blocksize]`, computed in fp32 and
rounded once to the output dtype. With double quantisation ("compress_statistics") the absmax
vector is itself stored in 8 bits: `offset = mean(absmax)`, then blockwise 8-bit quantisation of
`absmax - offset` with blocks of 256 and a 256-entry code table, so

    absmax[b] = code2[qabsmax[b]] * absmax2[b // 256] + offset       (fp32)

NF4 values are the 16 quantiles of N(0, 1) normalised to [-1, 1] from the QLoRA paper
(Dettmers et al. 2023, appendix E), listed below.

The Triton kernel dequantises one strip of packed bytes per program: it reads each byte once,
splits it into its two nibbles as a [BLOCK, 2] tile (so the two outputs of a byte are stored
next to each other, coalesced), rebuilds the block's absmax (nested or not) in registers and
writes the output dtype directly. Nothing is cached: callers dequantise right before a matmul
and drop the result after it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from math import prod
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.ops.common import launchable, use_triton

# The 16 NF4 levels (QLoRA paper, appendix E): 8 negative and 8 non-negative quantiles of N(0, 1),
# scaled so that the extremes are -1 and 1, with an exact zero.
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

# Which implementation dequantises bitsandbytes weights inside the fused LoRA path:
# "triton" (ours, default on CUDA) or "bnb" (bitsandbytes.functional.dequantize_4bit).
DEQUANT_ENV = "POSTTRAIN_NF4_DEQUANT"
PACKED_PER_PROGRAM = 1024  # packed bytes per Triton program -> 2048 outputs

_code_cache: dict[tuple[str, torch.device], torch.Tensor] = {}


def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 NF4 values as an fp32 tensor on `device` (cached)."""
    device = torch.device(device)
    key = ("nf4", device)
    if key not in _code_cache:
        _code_cache[key] = torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)
    return _code_cache[key]


@dataclass(frozen=True)
class NF4State:
    """Everything needed to dequantise one packed NF4 tensor.

    absmax: fp32 [n_blocks], or uint8 [n_blocks] codes when `nested` (double quantisation).
    code: the 16-entry fp32 table (NF4_VALUES; taken from bitsandbytes' state when converted).
    offset, nested_code, nested_absmax, nested_blocksize: the double-quantisation statistics
    (offset a 0-dim fp32 tensor, nested_code 256 fp32 values, nested_absmax fp32 [ceil(n_blocks / 256)]).
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    blocksize: int
    absmax: torch.Tensor
    code: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_absmax: torch.Tensor | None = None
    nested_blocksize: int = 256

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @classmethod
    def from_bnb(cls, quant_state) -> "NF4State":
        """From a bitsandbytes `QuantState` (quant_type "nf4"), sharing its tensors (no copies)."""
        if quant_state.quant_type != "nf4":
            raise ValueError(f"NF4State: quant_type {quant_state.quant_type!r} is not nf4")
        kw = dict(shape=tuple(quant_state.shape), dtype=quant_state.dtype, blocksize=int(quant_state.blocksize),
                  absmax=quant_state.absmax, code=quant_state.code)
        if quant_state.nested:
            s2 = quant_state.state2
            offset = quant_state.offset
            if not torch.is_tensor(offset):
                offset = torch.tensor(float(offset), dtype=torch.float32, device=quant_state.absmax.device)
            kw.update(offset=offset, nested_code=s2.code, nested_absmax=s2.absmax,
                      nested_blocksize=int(s2.blocksize))
        return cls(**kw)


def _check(packed: torch.Tensor, state: NF4State) -> torch.Tensor:
    """packed as a flat uint8 tensor (bitsandbytes may store it under another dtype)."""
    q = packed.reshape(-1)
    if q.dtype != torch.uint8:
        q = q.view(torch.uint8)
    if q.numel() * 2 < state.numel:
        raise ValueError(f"nf4: {q.numel()} packed bytes cannot hold {state.numel} values of shape {state.shape}")
    for name, bs in (("blocksize", state.blocksize), ("nested_blocksize", state.nested_blocksize)):
        if bs < 2 or bs & (bs - 1):
            raise ValueError(f"nf4: {name} must be a power of two >= 2, got {bs}")
    return q


# ----------------------------------------------------------------------------------------------
# Triton kernel and its launcher
# ----------------------------------------------------------------------------------------------

@triton.jit
def _nf4_dequant_kernel(Q, CODE, ABSMAX, NESTED_CODE, NESTED_ABSMAX, OFFSET, OUT, n_bytes, n_out,
                        HALF_BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                        NESTED: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # int64: 8B-parameter layers have > 2**31 outputs per model
    byte = pid * BLOCK + tl.arange(0, BLOCK)
    bmask = byte < n_bytes
    q = tl.load(Q + byte, mask=bmask, other=0).to(tl.int32)
    # both nibbles of a byte lie in the same quantisation block (blocksize is even)
    blk = byte // HALF_BLOCKSIZE
    if NESTED:
        qa = tl.load(ABSMAX + blk, mask=bmask, other=0).to(tl.int32)
        scale = tl.load(NESTED_ABSMAX + blk // NESTED_BLOCKSIZE, mask=bmask, other=0.0)
        absmax = tl.load(NESTED_CODE + qa, mask=bmask, other=0.0) * scale + tl.load(OFFSET)
    else:
        absmax = tl.load(ABSMAX + blk, mask=bmask, other=0.0).to(tl.float32)
    half = tl.arange(0, 2)
    # [BLOCK] bytes -> [BLOCK, 2] codes: column 0 is the high nibble (even element)
    nib = tl.where(half[None, :] == 0, (q >> 4)[:, None], (q & 15)[:, None])
    val = tl.load(CODE + nib) * absmax[:, None]
    out_idx = 2 * byte[:, None] + half[None, :]
    tl.store(OUT + out_idx, val.to(OUT.dtype.element_ty), mask=out_idx < n_out)


def nf4_dequantize_triton(packed: torch.Tensor, state: NF4State, dtype: torch.dtype | None = None,
                          out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton path: packed uint8 + state -> tensor of `state.shape` in `dtype` (default state.dtype)."""
    q = _check(packed, state)
    dtype = dtype or state.dtype
    if out is None:
        out = torch.empty(state.shape, dtype=dtype, device=q.device)
    else:
        _check_out(out, state.shape)
    if state.numel:
        _launch(_kernel_args(q, state), out)
    return out


def _check_out(out: torch.Tensor, shape) -> None:
    if tuple(out.shape) != tuple(shape) or not out.is_contiguous():
        raise ValueError(f"nf4: out must be contiguous with shape {tuple(shape)}, got {tuple(out.shape)}")


class _KernelArgs(NamedTuple):
    """Everything _nf4_dequant_kernel reads besides its output, in fp32 where it computes."""

    q: torch.Tensor
    code: torch.Tensor
    absmax: torch.Tensor
    ncode: torch.Tensor
    nabsmax: torch.Tensor
    offset: torch.Tensor
    n_bytes: int
    n: int
    half_blocksize: int
    nested_blocksize: int
    nested: bool
    shape: tuple[int, ...]


def _kernel_args(q: torch.Tensor, state: NF4State) -> _KernelArgs:
    code = state.code if state.code is not None else nf4_code(q.device)
    code = code.to(device=q.device, dtype=torch.float32)
    if state.nested:
        absmax, ncode, nabsmax, offset = state.absmax, state.nested_code, state.nested_absmax, state.offset
        ncode = ncode.to(torch.float32)
        nabsmax = nabsmax.to(torch.float32)
        offset = offset.to(torch.float32).reshape(1)
    else:
        absmax = state.absmax.to(torch.float32)
        ncode = nabsmax = offset = absmax  # unused by the kernel when NESTED is False
    return _KernelArgs(q, code, absmax, ncode, nabsmax, offset, (state.numel + 1) // 2, state.numel,
                       state.blocksize // 2, state.nested_blocksize, state.nested, tuple(state.shape))


def _launch(a: _KernelArgs, out: torch.Tensor) -> None:
    launchable(_nf4_dequant_kernel, a.q.device)[(triton.cdiv(a.n_bytes, PACKED_PER_PROGRAM),)](
        a.q, a.code, a.absmax, a.ncode, a.nabsmax, a.offset, out, a.n_bytes, a.n,
        HALF_BLOCKSIZE=a.half_blocksize, NESTED_BLOCKSIZE=a.nested_blocksize, NESTED=a.nested,
        BLOCK=PACKED_PER_PROGRAM, num_warps=4)


# ----------------------------------------------------------------------------------------------
# Pure-PyTorch reference: quantise and dequantise
# ----------------------------------------------------------------------------------------------

def absmax_reference(state: NF4State) -> torch.Tensor:
    """The fp32 per-block absmax, undoing double quantisation when present."""
    if not state.nested:
        return state.absmax.float()
    idx = torch.arange(state.absmax.numel(), device=state.absmax.device) // state.nested_blocksize
    return state.nested_code.float()[state.absmax.long()] * state.nested_absmax.float()[idx] + state.offset.float()


def nf4_dequantize_reference(packed: torch.Tensor, state: NF4State, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Pure PyTorch: unpack nibbles, look up NF4 values, scale by the block's absmax (fp32), round once."""
    q = _check(packed, state)
    n = state.numel
    codes = torch.stack([q >> 4, q & 15], dim=1).reshape(-1)[:n].long()  # [n_bytes] -> [n] high nibble first
    code = (state.code if state.code is not None else nf4_code(q.device)).float().to(q.device)
    block = torch.arange(n, device=q.device) // state.blocksize
    vals = code[codes] * absmax_reference(state)[block]
    return vals.reshape(state.shape).to(dtype or state.dtype)


def nf4_quantize_reference(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True,
                           nested_blocksize: int = 256,
                           nested_code: torch.Tensor | None = None) -> tuple[torch.Tensor, NF4State]:
    """Pure PyTorch quantiser to the same packed layout (for tests and CPU tools).

    Nearest NF4 level per element; with `double_quant`, absmax - mean(absmax) is stored as uint8
    indices into `nested_code` (default: 256 evenly spaced values in [-1, 1], a stand-in for
    bitsandbytes' dynamic map: dequantisation only needs *a* table) scaled per block of 256.
    Returns (packed uint8 [ceil(n / 2), 1], state).
    """
    flat = w.detach().reshape(-1).float()
    n = flat.numel()
    n_blocks = (n + blocksize - 1) // blocksize
    padded = torch.nn.functional.pad(flat, (0, n_blocks * blocksize - n))
    absmax = padded.view(n_blocks, blocksize).abs().amax(dim=1)  # [n_blocks]
    scaled = (padded.view(n_blocks, blocksize) / absmax.clamp_min(1e-12)[:, None]).reshape(-1)[:n]
    code = nf4_code(w.device)
    idx = (scaled[:, None] - code[None, :]).abs().argmin(dim=1).to(torch.uint8)  # [n] nearest level
    if n % 2:
        idx = torch.cat([idx, idx.new_zeros(1)])
    packed = ((idx[0::2] << 4) | idx[1::2]).unsqueeze(1)
    state = NF4State(shape=tuple(w.shape), dtype=w.dtype, blocksize=blocksize, absmax=absmax, code=code)
    if not double_quant:
        return packed, state
    offset = absmax.mean()
    centred = absmax - offset
    n2 = (n_blocks + nested_blocksize - 1) // nested_blocksize
    pad2 = torch.nn.functional.pad(centred, (0, n2 * nested_blocksize - n_blocks))
    scale2 = pad2.view(n2, nested_blocksize).abs().amax(dim=1).clamp_min(1e-12)  # [n2]
    table = nested_code if nested_code is not None else torch.linspace(-1.0, 1.0, 256, device=w.device)
    table = table.float()
    norm = (pad2.view(n2, nested_blocksize) / scale2[:, None]).reshape(-1)[:n_blocks]
    qabs = (norm[:, None] - table[None, :]).abs().argmin(dim=1).to(torch.uint8)
    return packed, replace(state, absmax=qabs, offset=offset.reshape(()), nested_code=table,
                           nested_absmax=scale2, nested_blocksize=nested_blocksize)


# ----------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------

def nf4_dequantize(packed: torch.Tensor, state: NF4State, dtype: torch.dtype | None = None,
                   mode: str | None = None) -> torch.Tensor:
    """Dequantise packed NF4 data: Triton on CUDA (mode "auto"), the reference on CPU."""
    if use_triton(mode, packed):
        return nf4_dequantize_triton(packed, state, dtype)
    return nf4_dequantize_reference(packed, state, dtype)


def dequant_impl() -> str:
    """Which implementation dequantises bitsandbytes weights: POSTTRAIN_NF4_DEQUANT=triton|bnb."""
    impl = os.environ.get(DEQUANT_ENV, "triton").strip().lower() or "triton"
    if impl not in ("triton", "bnb"):
        raise ValueError(f"{DEQUANT_ENV}: expected 'triton' or 'bnb', got {impl!r}")
    return impl


def is_4bit_weight(weight) -> bool:
    """A bitsandbytes Params4bit that holds quantised data (duck-typed: no bitsandbytes import)."""
    return getattr(weight, "quant_state", None) is not None and getattr(weight, "bnb_quantized", True)


_ARGS_ATTR = "_posttrain_nf4_args"  # on a Params4bit: (key, kernel arguments, the quant state)


def _bnb_kernel_args(weight, qs) -> _KernelArgs:
    """The kernel's arguments for a bitsandbytes weight, prepared once: the fused LoRA path
    dequantises every frozen weight three times a step (forward, recomputation, backward), and
    rebuilding the state and its fp32 views each time costs more host time than the launch.
    Rebuilt when the packed storage or the quant state object changes (re-quantisation, a move)."""
    key = (weight.data_ptr(), id(qs))
    cached = weight.__dict__.get(_ARGS_ATTR)
    if cached is not None and cached[0] == key:
        return cached[1]
    state = NF4State.from_bnb(qs)
    args = _kernel_args(_check(weight.data, state), state)
    weight.__dict__[_ARGS_ATTR] = (key, args, qs)  # qs kept: its id stays its own
    return args


def dequantize_bnb_weight(weight, dtype: torch.dtype | None = None, impl: str | None = None,
                          mode: str | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """A bitsandbytes Params4bit -> dense [out, in] tensor in `dtype` (default: its original dtype).

    impl "triton" runs ours (NF4 only; fp4 falls back to bitsandbytes), "bnb" runs
    bitsandbytes.functional.dequantize_4bit. The result is a fresh tensor the caller owns, or
    `out` (contiguous, the weight's shape, e.g. a block of rows of a larger buffer) filled in place.
    """
    qs = weight.quant_state
    impl = impl or dequant_impl()
    if out is not None:
        _check_out(out, qs.shape)
    if impl == "triton" and qs.quant_type == "nf4" and use_triton(mode, weight):
        args = _bnb_kernel_args(weight, qs)
        if out is None:
            out = torch.empty(args.shape, dtype=dtype or qs.dtype, device=weight.device)
        _launch(args, out)
        return out
    if impl == "triton" and qs.quant_type == "nf4":
        w = nf4_dequantize(weight.data, NF4State.from_bnb(qs), dtype=dtype, mode=mode)
    else:
        import bitsandbytes.functional as bnbf

        w = bnbf.dequantize_4bit(weight.data, qs)
        w = w if dtype is None or w.dtype == dtype else w.to(dtype)
    return w if out is None else out.copy_(w)
