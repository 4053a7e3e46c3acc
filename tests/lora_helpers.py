"""Helpers shared by tests in several folders (tests/ is on sys.path: its conftest.py lives there)."""
from __future__ import annotations

import contextlib

import torch


def randomise_lora(model, seed: int = 1, std: float = 0.05) -> None:
    """PEFT starts lora_B at zero (adapter == no-op); give every adapter a real, seeded delta."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


@contextlib.contextmanager
def logit_hook(model, token_ids: list[int], bonus: float, after_calls: int = 0):
    """Add `bonus` to the logits of token_ids from the (after_calls + 1)-th forward on (forces or
    forbids tokens in generation tests)."""
    calls = []

    def hook(module, args, out):
        calls.append(1)
        if len(calls) > after_calls:
            out = out.clone()
            out[..., token_ids] += bonus
        return out

    handle = model.get_output_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def quantize_nf4_on_cpu(model):
    """What kernels.qlora.quantize_linears_nf4 does, on the CPU (bitsandbytes' CPU backend): every
    nn.Linear but lm_head becomes an NF4 Linear4bit; returns the model."""
    import bitsandbytes as bnb
    from torch import nn

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and name != "lm_head":
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=torch.float32,
                                      compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8,
                                      device="meta")
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, blocksize=64,
                                             compress_statistics=True, quant_type="nf4",
                                             quant_storage=torch.uint8, module=q)._quantize("cpu")
                setattr(parent, name, q)
    model.is_loaded_in_4bit = True
    return model


def random_grpo_batch(vocab: int, seed: int = 0, n: int = 7, rollout_logprob=lambda i, j: -1.0) -> dict:
    """A learner batch of n random sequences of varied prompt (3-6) and completion (1-7) lengths;
    rollout_logprob(i, j) gives sequence i's j-th rollout logprob; advantages from -1 to 1."""
    g = torch.Generator().manual_seed(seed)
    prompts, completions = [], []
    for i in range(n):
        prompts.append(torch.randint(4, vocab, (3 + i % 4,), generator=g).tolist())
        completions.append(torch.randint(4, vocab, (1 + (i * 3) % 7,), generator=g).tolist())
    return {"prompt_ids": prompts, "completion_ids": completions,
            "rollout_logprobs": [[rollout_logprob(i, j) for j in range(len(c))] for i, c in enumerate(completions)],
            "advantages": torch.linspace(-1, 1, n).tolist()}
