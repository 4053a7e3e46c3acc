"""Three optimizer steps of the tiny LoRA model with fused kernels, in one process (gloo, world
size 1): plain PyTorch, or DeepSpeed ZeRO-2/3 through cluster.deepspeed_strategy. Prints one
JSON line {"losses": [...], "grad_norms": [...], "trainable": {name: sum}}; more config
overrides come from the environment variable DS_STEPS_OVERRIDES (space-separated). Run by
test_deepspeed_strategy.py in a subprocess (DeepSpeed keeps process-wide state)."""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def main(strategy: str, port: str, grad_accum: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo")
    from cluster.train import TrainSpec, _build_for_training
    from kernels.training import LossForward, accumulate_step, grad_norm_and_clip, make_optimizer
    from jobs.config import load
    from jobs.sft import SFTJobConfig

    over = [f"trainer.grad_accum={grad_accum}"] + os.environ.get("DS_STEPS_OVERRIDES", "").split()
    if strategy != "plain":
        over += ["trainer.strategy=deepspeed", f"trainer.deepspeed.zero_stage={strategy[-1]}"]
    cfg = load(SFTJobConfig, os.path.join(ROOT, "jobs", "configs", "tiny-sft.yaml"), over)
    spec = TrainSpec(output_dir="unused", model=cfg.model, train=cfg.trainer, tokenizer_dir="",
                     total_steps=3, steps_per_epoch=3, vocab_size=1024, kernels=cfg.kernels)
    model, _ = _build_for_training(spec, torch.device("cpu"))
    loss_module = LossForward(model)
    opt = make_optimizer(model, "adamw", 1e-3, 0.0, 0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    engine = None
    if strategy != "plain":
        from cluster import deepspeed_strategy as dss

        engine, _ = dss.initialize(loss_module, model, opt, sched, ds=cfg.trainer.deepspeed,
                                   micro_batch_size=2, grad_accum=grad_accum, world_size=1,
                                   max_grad_norm=1.0, bf16=False)
    g = torch.Generator().manual_seed(0)
    losses, norms = [], []
    for _ in range(3):
        micro = []
        for _ in range(grad_accum):
            n = int(torch.randint(24, 64, (1,), generator=g))
            ids = torch.randint(0, 1024, (2, n), generator=g)
            labels = ids.clone()
            labels[:, : n // 3] = -100
            micro.append({"input_ids": ids, "labels": labels,
                          "position_ids": torch.arange(n).expand(2, n).clone()})
        if engine is None:
            st = accumulate_step(loss_module, micro, device=torch.device("cpu"))
            norms.append(grad_norm_and_clip([p for p in model.parameters() if p.requires_grad], 1.0))
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        else:
            st = accumulate_step(engine, micro, device=torch.device("cpu"), backward=dss.backward(engine))
            norms.append(dss.grad_norm(engine))
        losses.append(st["loss"])
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ctx = dss.gathered(model, [p for _, p in trainable]) if engine is not None else torch.no_grad()
    with ctx:
        sums = {n: float(p.detach().double().sum()) for n, p in trainable}
    print(json.dumps({"losses": losses, "grad_norms": norms, "trainable": sums}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
