"""Helpers shared by tests in several folders (tests/ is on sys.path: its conftest.py lives there)."""
from __future__ import annotations

import torch


def randomise_lora(model, seed: int = 1, std: float = 0.05) -> None:
    """PEFT starts lora_B at zero (adapter == no-op); give every adapter a real, seeded delta."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)
