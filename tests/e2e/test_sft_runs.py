"""End-to-end SFT runs of the tiny config on local Ray (CPU): the acceptance command, exact resume
after the driver is killed, and a Ray Train worker killed mid-run (restart from the checkpoint).

All three runs use the same config, so the uninterrupted run is the baseline of the other two. They
track live to TensorBoard and MLflow (report_to), read back here: every step once, a resumed run too.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time

import pytest
import torch
from sft_cli import ROOT, TINY_SFT, read_metrics, run_sft, sft_command, sft_env

STEPS = 40
ARGS = [f"max_steps={STEPS}", "trainer.checkpoint_every=10", "trainer.eval_every=20", "report_to=[tensorboard,mlflow]"]
KEEP = 2  # trainer.keep_checkpoints' default


def _checkpoint_folders(out: str) -> list[str]:
    """Checkpoint folders (those holding trainer_state.json) under the run's checkpoints/."""
    return [d for d, _, files in os.walk(os.path.join(out, "checkpoints")) if "trainer_state.json" in files]

pytestmark = pytest.mark.e2e


def _losses(out_dir):
    rows = read_metrics(out_dir)
    return [r["step"] for r in rows], [r["loss"] for r in rows]


def _tensorboard_losses(out_dir):
    """(steps, losses) of OUT/tensorboard (the live tracker); a resumed run's purged steps left out."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(out_dir, "tensorboard"))
    acc.Reload()
    events = acc.Scalars("loss")
    return [e.step for e in events], [e.value for e in events]


def _mlflow_runs(out_dir):
    """(client, runs oldest first) of OUT/mlruns, the MLflow file store the live tracker wrote."""
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for it to read the file store
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri="file://" + os.path.join(out_dir, "mlruns"))
    exp = client.get_experiment_by_name("ray-posttrain")
    return client, client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


CONSOLE: dict[str, str] = {}  # output_dir -> the run's stdout + stderr

# Ray's own output, which the console leaves in Ray's log files (cluster/ray_session.py)
RAY_NOISE = ("PlacementGroupCleaner", "Failed to query Ray Train Controller", "Execution plan of Dataset",
             "Starting execution of Dataset", "(TrainController", "(RayTrainWorker", "Reporting training result",
             "Progress bars disabled", "Token authentication is enabled", "\x1b[36m")


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sft-baseline"))
    CONSOLE[out] = run_sft(out, ARGS, timeout=600)[1]
    return out


def test_acceptance_loss_drops_30pct_and_saves_models(baseline):
    # the console: Ray's log folder named, ~10 progress lines, none of Ray's own chatter
    log = CONSOLE[baseline]
    assert "Ray logs: " in log and "[train] step 40/40" in log
    assert [n for n in RAY_NOISE if n in log] == [], log[-3000:]
    assert len(log.splitlines()) <= 30, log
    steps, losses = _losses(baseline)
    assert steps == list(range(1, STEPS + 1))
    assert losses[-1] <= 0.7 * losses[0], f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    assert os.path.exists(os.path.join(baseline, "adapter", "adapter_model.safetensors"))
    assert os.path.exists(os.path.join(baseline, "config.yaml"))
    summary = json.load(open(os.path.join(baseline, "summary.json")))
    assert summary["last_loss"] == pytest.approx(losses[-1])
    assert summary["report"] == os.path.join(baseline, "report.png") and os.path.getsize(summary["report"]) > 10_000

    # live tracking from rank 0 (report_to=[tensorboard,mlflow]): every step, read back
    tb_steps, tb_losses = _tensorboard_losses(baseline)
    assert tb_steps == steps and tb_losses == pytest.approx(losses, rel=1e-6)  # float32 in the events
    client, runs = _mlflow_runs(baseline)
    (run,) = runs
    assert run.info.status == "FINISHED" and run.data.params["max_steps"] == str(STEPS)
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == steps and [m.value for m in history] == pytest.approx(losses)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_loss")] == [20, 40]

    # the merged model gives the same logits as base + adapter
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from jobs.config import load
    from jobs.sft import SFTJobConfig, model_vocab_size
    from kernels.model import build_model
    from kernels.tokenizer import load_tokenizer

    cfg = load(SFTJobConfig, TINY_SFT, [f"output_dir={baseline}", *ARGS])
    tok = load_tokenizer(os.path.join(baseline, "tokenizer"))
    base = build_model(cfg.model, vocab_size=model_vocab_size(cfg, len(tok)), seed=cfg.seed)
    with_adapter = PeftModel.from_pretrained(base, os.path.join(baseline, "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(baseline, "merged"), dtype=torch.float32).eval()
    ids = torch.tensor([tok("Ava has 3 apples. How many?")["input_ids"]])
    with torch.no_grad():
        a = with_adapter(input_ids=ids).logits
        b = merged(input_ids=ids).logits
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)  # fp32; merge reorders one matmul


def test_resume_after_kill_continues_with_the_same_losses(baseline, tmp_path):
    out = str(tmp_path / "killed")
    proc = subprocess.Popen(sft_command(out, ARGS), cwd=ROOT, env=sft_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    from cluster.checkpoint import latest_checkpoint, read_state

    killed_at = None
    deadline = time.time() + 500
    while time.time() < deadline and proc.poll() is None:
        ck = latest_checkpoint(os.path.join(out, "checkpoints"))
        if ck and 10 <= read_state(ck)["step"] < STEPS:
            killed_at = read_state(ck)["step"]
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and its local Ray go down together
            break
        time.sleep(0.5)
    proc.wait(timeout=60)
    assert killed_at is not None, "the run finished or stalled before a checkpoint could be interrupted"

    _, log = run_sft(out, ARGS, timeout=600)
    assert "resumed from step" in log
    steps, losses = _losses(out)
    base_steps, base_losses = _losses(baseline)
    assert steps == base_steps  # no lost or repeated step
    # same data order, same RNG state: equal up to float summation noise across processes
    assert losses == pytest.approx(base_losses, rel=1e-4, abs=1e-5)
    assert len(_checkpoint_folders(out)) == KEEP  # the killed attempt's checkpoints are pruned too
    # TensorBoard: the killed attempt's steps after the checkpoint are purged, every step shows once
    tb_steps, tb_losses = _tensorboard_losses(out)
    assert tb_steps == base_steps and tb_losses == pytest.approx(base_losses, rel=1e-4, abs=1e-5)
    _, runs = _mlflow_runs(out)  # MLflow: the resumed attempt is a second run, from the checkpoint on
    resumed_at = re.search(r"resumed from step (\d+)", log).group(1)
    assert len(runs) == 2 and runs[1].data.tags["resumed_from_step"] == resumed_at


def test_worker_killed_mid_run_restarts_from_checkpoint(baseline, tmp_path):
    out = str(tmp_path / "worker-killed")
    result = {}

    def run():
        # the raw process: the exit code is checked on the test's thread
        result["proc"] = subprocess.run(sft_command(out, [*ARGS, "trainer.max_failures=1"]), cwd=ROOT, env=sft_env(),
                                        capture_output=True, text=True, timeout=600)

    t = threading.Thread(target=run)
    t.start()
    info = os.path.join(out, "workers", "rank1.json")
    killed = False
    deadline = time.time() + 500
    while time.time() < deadline and t.is_alive():
        if os.path.exists(info) and os.path.exists(os.path.join(out, "metrics.jsonl")):
            steps, _ = _losses(out)
            if steps and steps[-1] >= 12:
                pid = json.load(open(info))["pid"]
                os.kill(pid, signal.SIGKILL)
                killed = True
                break
        time.sleep(0.3)
    t.join(timeout=600)
    assert killed, "could not kill a worker mid-run"
    proc = result["proc"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps, losses = _losses(out)
    assert steps == list(range(1, STEPS + 1))
    _, base_losses = _losses(baseline)
    assert losses == pytest.approx(base_losses, rel=1e-4, abs=1e-5)
    assert len(_checkpoint_folders(out)) == KEEP
    assert _tensorboard_losses(out)[0] == steps  # the restarted worker's tracker purged the lost steps
