"""SFT on a two-node Ray cluster (ray.cluster_utils.Cluster: two raylets on this machine), with
one Ray Train worker on each node (placement STRICT_SPREAD)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.e2e

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import ray
    from ray.cluster_utils import Cluster
    from jobs.config import load
    from jobs.sft import SFTJobConfig, run_sft

    out = sys.argv[1]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3})
    cluster.add_node(num_cpus=3)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, runtime_env={"env_vars": {"RAY_TRAIN_V2_ENABLED": "1"}})
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    cfg = load(SFTJobConfig, os.path.join(%(root)r, "jobs", "configs", "tiny-sft.yaml"),
               [f"output_dir={out}", "max_steps=4", "trainer.num_workers=2",
                "trainer.placement_strategy=STRICT_SPREAD", "trainer.eval_every=0",
                "trainer.checkpoint_every=0", "data.builtin_train_size=300", "data.builtin_eval_size=20"])
    summary = run_sft(cfg)
    print("NODES", json.dumps(nodes))
    ray.shutdown()
    cluster.shutdown()
""") % {"root": ROOT}


def test_sft_runs_with_a_worker_on_each_of_two_nodes(tmp_path):
    out = str(tmp_path / "run")
    env = dict(os.environ, PYTHONPATH=ROOT, RAY_TRAIN_V2_ENABLED="1")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, out], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    nodes = json.loads(proc.stdout.split("NODES", 1)[1].strip().splitlines()[0])
    assert len(nodes) == 2
    ranks = [json.load(open(os.path.join(out, "workers", f"rank{r}.json"))) for r in (0, 1)]
    assert {r["node_id"] for r in ranks} == set(nodes), "workers did not land on both nodes"
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert os.path.exists(os.path.join(out, "adapter", "adapter_model.safetensors"))
