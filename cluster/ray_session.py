"""Connecting a job's driver to Ray: the cluster in RAY_ADDRESS (a cluster, or `ray job submit`),
else a local instance sized for the job. Used by every job that starts Ray (SFT/CPT, GRPO).
`stop_on_signals` turns Ctrl-C and SIGTERM into `Interrupted`, which the jobs report in one line."""
from __future__ import annotations

import json
import os
import signal

# set for every task and actor of a job (through ray.init's runtime_env)
JOB_ENV = {"RAY_TRAIN_V2_ENABLED": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}


def init_ray(min_cpus: int = 1, num_cpus: int = 0, tag: str = "ray"):
    """Connect (or start) Ray once per process; returns the `ray` module.

    min_cpus: a local instance gets at least this many logical CPUs (workers plus room for Ray
      Data tasks: on a 2-core machine two training workers would otherwise leave the data
      pipeline no CPU and training would wait forever); num_cpus > 0 sets the count exactly.
    Under `ray job submit` the job's runtime_env is inherited, and Ray refuses to merge a key set
    twice (even to the same value): only the variables the job did not set are added.
    A local start that times out (a saturated machine) is tried three times.
    """
    import ray

    # the driver itself needs Train V2 and quiet Ray Data; TOKENIZERS_PARALLELISM stays as it is
    # here (the driver trains the tokenizer) and is set only for the workers
    for k in ("RAY_TRAIN_V2_ENABLED", "RAY_DATA_DISABLE_PROGRESS_BARS"):
        os.environ.setdefault(k, JOB_ENV[k])
    if ray.is_initialized():
        return ray
    address = os.environ.get("RAY_ADDRESS")
    if address:
        job_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env", {})
        job_vars = (job_env or {}).get("env_vars", {}) or {}
        missing = {k: v for k, v in JOB_ENV.items() if k not in job_vars}
        ray.init(address=address, runtime_env={"env_vars": missing} if missing else None,
                 configure_logging=False)
    else:
        cpus = num_cpus or max(os.cpu_count() or 1, min_cpus)
        for attempt in range(3):  # a raylet gets 30 s to register: on a saturated machine, try again
            try:
                ray.init(num_cpus=cpus, include_dashboard=False, configure_logging=False,
                         runtime_env={"env_vars": dict(JOB_ENV)})
                break
            except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for this
                if "timed out during startup" not in str(e) or attempt == 2:
                    raise
                print(f"[{tag}] Ray start timed out (busy machine?); retrying ({attempt + 1}/2)", flush=True)
                ray.shutdown()
    ray.data.DataContext.get_current().enable_progress_bars = False
    if _stop_handlers_on:
        _install_stop_handlers()  # ray.init replaced the SIGTERM handler with its own
    return ray


def shutdown_ray() -> None:
    """Disconnect from Ray (a local instance stops with its workers), e.g. before an interrupted
    job tidies its checkpoint folder, so no worker is still writing into it."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the job. A KeyboardInterrupt, so no `except Exception` swallows it;
    the job's main ends with one line and `exit_code` (128 + the signal: 130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.name, self.exit_code = signum, signal.Signals(signum).name, 128 + signum


_stop_handlers_on = False


def _raise_interrupted(signum, frame):
    signal.signal(signum, signal.SIG_DFL)  # a second Ctrl-C or SIGTERM ends the process at once
    raise Interrupted(signum)


def _install_stop_handlers() -> None:
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, _raise_interrupted)


def stop_on_signals() -> None:
    """From now on SIGINT and SIGTERM raise `Interrupted` in the main thread, and keep doing so after
    `init_ray` (ray.init installs a SIGTERM handler of its own). Without this, Ray Train's SIGINT
    handler exits 1 without a word, and SIGTERM ends the driver with Ray's native stack dump.
    Call it from a job's main thread (the jobs' `main`)."""
    global _stop_handlers_on
    _stop_handlers_on = True
    _install_stop_handlers()
