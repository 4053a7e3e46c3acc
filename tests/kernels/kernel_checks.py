"""Helpers shared by the kernel tests: the device, fp32 references, comparisons."""
from __future__ import annotations

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def leaf(t: torch.Tensor, dtype=None) -> torch.Tensor:
    """A detached copy (optionally cast) that requires grad."""
    return t.detach().to(dtype or t.dtype).clone().requires_grad_(True)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str = ""):
    """|actual - expected| <= atol * scale + rtol * |expected|, scale = max(1, max |expected|).

    atol is relative to the reference's largest magnitude, so one tolerance fits outputs and
    gradients (a weight gradient sums over all rows and grows with them).
    """
    expected = expected.float()
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.float(), expected, atol=atol * scale, rtol=rtol, msg=lambda m: f"{what}: {m}")
