"""`posttrain sft` on one GPU through Ray Train: with CUDA graphs (the default) the losses follow
the eager run's, with gradient accumulation over packed rows, bf16 autocast and fused LoRA."""
from __future__ import annotations

import pytest
from sft_cli import run_sft

pytestmark = [pytest.mark.e2e, pytest.mark.gpu]

# trainable embeddings keep graphs off (their backward reads back to the host): adapters only
ARGS = ["max_steps=8", "trainer.num_workers=1", "trainer.use_gpu=true", "trainer.grad_accum=2",
        "trainer.checkpoint_every=0", "trainer.eval_every=0", "model.train_embeddings=false",
        "model.gradient_checkpointing=true"]


def _run(out_dir, extra=()):
    return run_sft(out_dir, [*ARGS, *extra])


def test_cuda_graphs_follow_eager_losses(tmp_path):
    eager, log_eager = _run(str(tmp_path / "eager"), ["trainer.cuda_graphs=false"])
    graphed, log = _run(str(tmp_path / "graphed"))
    assert "'cuda_graphs': 'on'" in log and "'cuda_graphs'" not in log_eager
    a, b = [r["loss"] for r in eager], [r["loss"] for r in graphed]
    assert len(a) == len(b) == 8
    assert b == pytest.approx(a, rel=2e-2), (a, b)
    assert b[-1] < b[0]
