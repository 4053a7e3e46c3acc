"""`ray job submit` end to end: a real head node (`ray start --head`), the tiny SFT job shipped
as working_dir through the dashboard's Jobs API, the run's artifacts checked on disk.

The head is isolated from any other Ray on the machine: its own --temp-dir (so `ray.init()`
elsewhere does not find it), explicit free ports, and Ray token authentication with a token
of its own (RAY_AUTH_MODE=token + RAY_AUTH_TOKEN; the client sends it as a bearer header).
It is stopped by signalling the `ray start --block` process we started (never `ray stop`,
which would stop every Ray on the machine), then any leftover process of our temp dir.
"""
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

pytestmark = pytest.mark.e2e

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# ~4 min on an idle 2-core CI box is typical; shared machines are slower
JOB_TIMEOUT_S = int(os.environ.get("E2E_JOB_TIMEOUT_S", "600"))


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _pids_using(marker: str) -> list[int]:
    """Processes whose command line mentions `marker` (our private temp dir)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    out.append(int(pid))
        except OSError:
            continue
    return out


def _stop_head(proc: subprocess.Popen, temp_dir: str) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:  # `ray start --block` often outlives SIGTERM by 30 s; what it leaves is killed below
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    deadline = time.time() + 10
    while time.time() < deadline and _pids_using(temp_dir):
        time.sleep(0.5)
    for pid in _pids_using(temp_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture()
def ray_head():
    # the `ray` script of this interpreter's environment (make test runs .venv/bin/python without
    # activating the venv, so .venv/bin need not be on PATH)
    bin_dir = os.path.dirname(sys.executable)
    ray_cli = shutil.which("ray", path=bin_dir + os.pathsep + os.environ.get("PATH", ""))
    if not ray_cli:
        pytest.skip("the `ray` CLI is neither beside this Python nor on PATH")
    temp_dir = tempfile.mkdtemp(prefix="rpt-", dir="/tmp")        # short: Ray's socket paths
    gcs, dash, client, agent, agent_grpc, metrics, renv = free_ports(7)
    token = secrets.token_hex(32)
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update({
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
        "PATH": bin_dir + os.pathsep + env.get("PATH", ""),
    })
    log = open(os.path.join(temp_dir, "ray-start.log"), "w")
    proc = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
         f"--runtime-env-agent-port={renv}",
         f"--temp-dir={temp_dir}", "--num-cpus=4", "--num-gpus=0",
         "--object-store-memory=600000000", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=temp_dir)
    url = f"http://127.0.0.1:{dash}"
    try:
        _wait_for_dashboard(url, token, proc, temp_dir)
        yield url, token
    finally:
        _stop_head(proc, temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_dashboard(url: str, token: str, proc, temp_dir: str, timeout: float = 120) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            break
        try:
            req = urllib.request.Request(url + "/api/jobs/", headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(req, timeout=5) as r:
                if r.status == 200:
                    return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(1.0)
    with open(os.path.join(temp_dir, "ray-start.log")) as f:
        tail = f.read()[-4000:]
    pytest.fail(f"the Ray head's dashboard did not come up at {url}:\n{tail}")


def test_submit_tiny_sft_job(ray_head, tmp_path):
    if not os.path.isfile(os.path.join(ROOT, "jobs", "sft.py")) or \
            not os.path.isfile(os.path.join(ROOT, "jobs", "configs", "tiny-sft.yaml")):
        pytest.skip("jobs/sft.py or jobs/configs/tiny-sft.yaml not present")
    from ray.job_submission import JobStatus, JobSubmissionClient

    url, token = ray_head
    out = str(tmp_path / "run")
    client = JobSubmissionClient(url, headers={"Authorization": f"Bearer {token}"})
    entrypoint = (f"python -m jobs.sft jobs/configs/tiny-sft.yaml output_dir={out} max_steps=5 "
                  f"trainer.num_workers=1")
    t0 = time.perf_counter()
    runtime_env = {
        "working_dir": ROOT,
        # every top-level hidden folder (.git, .venv, caches, local tool kits) and runs/: the job
        # needs only the project's packages and configs
        "excludes": sorted(n for n in os.listdir(ROOT) if n.startswith(".")) + ["runs", "**/__pycache__"],
        # the job sets RAY_TRAIN_V2_ENABLED & co. itself in ray.init's runtime_env; Ray refuses
        # to merge a key given both there and here, so only other keys go here
        "env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    }
    # the dashboard answers before its job agent has registered: retry that one error briefly
    deadline = time.perf_counter() + 90
    while True:
        try:
            job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
            break
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.perf_counter() > deadline:
                raise
            time.sleep(2.0)
    status = None
    while time.perf_counter() - t0 < JOB_TIMEOUT_S:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(2.0)
    elapsed = time.perf_counter() - t0
    logs = client.get_job_logs(job_id)
    if status != JobStatus.SUCCEEDED:
        if status not in (JobStatus.FAILED, JobStatus.STOPPED):
            client.stop_job(job_id)
        pytest.fail(f"job {job_id} ended {status} after {elapsed:.0f}s; logs:\n{logs[-8000:]}")
    print(f"\n[e2e] job {job_id} SUCCEEDED in {elapsed:.0f}s")

    for rel in ("config.yaml", "metrics.jsonl", "summary.json",
                "adapter/adapter_model.safetensors", "merged/config.json"):
        assert os.path.isfile(os.path.join(out, rel)), f"missing {rel} in {out}; job logs:\n{logs[-4000:]}"
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert sum(1 for line in f if line.strip()) >= 1
