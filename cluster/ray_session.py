"""Connecting a job's driver to Ray: the cluster in RAY_ADDRESS (a cluster, or `ray job submit`),
else a local instance sized for the job. Used by every job that starts Ray (SFT/CPT, GRPO).
`stop_on_signals` turns Ctrl-C and SIGTERM into `Interrupted`, which the jobs report in one line.

The console (cluster/console.py; --verbose restores Ray's full output): Ray's own output stays in
Ray's log files, named once ("Ray logs: <session>/logs"), with the dashboard's address when it runs.
  - workers' output: of the lines Ray forwards to the driver, only the project's own (`[train] ...`,
    `[tracking] ...`: a `[tag] ` at the start) and the raylet's and autoscaler's (a worker killed for
    memory, resources that cannot be scheduled) are shown; the rest (Ray Train's controller, Ray
    Data's plans in its split coordinator, tracebacks of Ray's helper threads) is in the workers'
    log files. Errors of our workers reach the driver as the exceptions it raises.
  - the driver's Ray loggers show errors only; Ray Data prints no execution plans.
  - the dashboard runs on a local instance when Ray's dashboard dependencies are installed
    (ray[default]; POSTTRAIN_DASHBOARD=0 turns it off).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal

# set for every task and actor of a job (through ray.init's runtime_env)
JOB_ENV = {"RAY_TRAIN_V2_ENABLED": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}

# a worker's line the console shows: the project's `[tag] ` lines (not Ray's `[2026-01-01 ...]` ones)
OWN_LINE = re.compile(r"^\[[a-z][a-z0-9_-]*\] ")
_FORWARD_HANDLER = "posttrain_print_logs"
_RAY_FORWARD_HANDLER = "ray_print_logs"  # the handler ray.init(log_to_driver=True) installs
_DRIVER_LOG = "posttrain-driver-ray.log"  # the driver's Ray log records, in the session's logs folder


def dashboard_available() -> bool:
    """Whether a local Ray can run its dashboard: Ray's dashboard dependencies (ray[default]:
    aiohttp, aiohttp_cors, opencensus, prometheus_client, ...) import, and POSTTRAIN_DASHBOARD is not 0."""
    if os.environ.get("POSTTRAIN_DASHBOARD", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    try:
        import ray.dashboard.optional_deps  # noqa: F401 - what Ray itself checks
    except Exception:  # noqa: BLE001 - ImportError, or a dependency that fails on import
        return False
    return True


def can_filter_worker_logs() -> bool:
    """Whether this Ray's driver-side dispatcher of forwarded worker output is the one
    `_forward_own_lines` replaces (else a quiet console does not forward worker output at all)."""
    try:
        from ray._private import ray_logging, worker
    except ImportError:
        return False
    d = getattr(ray_logging, "global_worker_stdstream_dispatcher", None)
    return all(hasattr(d, m) for m in ("add_handler", "remove_handler")) and hasattr(worker, "print_to_stdstream")


def ray_init_options(verbose: bool, local: bool, *, dashboard: bool | None = None,
                     filterable: bool | None = None) -> dict:
    """The console-related keyword arguments of ray.init. verbose: Ray's full output (every worker
    line forwarded); quiet: worker output forwarded only to be filtered (`_forward_own_lines`), or
    not at all where this Ray cannot be filtered. local: a local instance, whose dashboard runs when
    available (dashboard: None = `dashboard_available()`); a cluster's is the cluster's."""
    if filterable is None:
        filterable = can_filter_worker_logs()
    opts = {"log_to_driver": True if verbose else filterable, "configure_logging": False}
    if local:
        opts["include_dashboard"] = dashboard_available() if dashboard is None else dashboard
    return opts


def init_ray(min_cpus: int = 1, num_cpus: int = 0, tag: str = "ray"):
    """Connect (or start) Ray once per process; returns the `ray` module.

    min_cpus: a local instance gets at least this many logical CPUs (workers plus room for Ray
      Data tasks: on a 2-core machine two training workers would otherwise leave the data
      pipeline no CPU and training would wait forever); num_cpus > 0 sets the count exactly.
    Under `ray job submit` the job's runtime_env is inherited, and Ray refuses to merge a key set
    twice (even to the same value): only the variables the job did not set are added.
    A local start that times out (a saturated machine) is tried three times.
    The console (module docstring) follows cluster.console.verbose().
    """
    import ray

    from cluster import console

    # the driver itself needs Train V2 and quiet Ray Data; TOKENIZERS_PARALLELISM stays as it is
    # here (the driver trains the tokenizer) and is set only for the workers
    for k in ("RAY_TRAIN_V2_ENABLED", "RAY_DATA_DISABLE_PROGRESS_BARS"):
        os.environ.setdefault(k, JOB_ENV[k])
    if ray.is_initialized():
        return ray
    verbose = console.verbose()
    import ray.data  # configures Ray Data's loggers, which quiet_ray_loggers then sees

    with contextlib.nullcontext() if verbose else _ray_startup_quiet():
        ctx = _start(ray, min_cpus, num_cpus, tag, verbose)
    if not verbose:
        quiet_ray_loggers()
    ctx_data = ray.data.DataContext.get_current()
    ctx_data.enable_progress_bars = False  # the jobs draw their own (cluster.console)
    ctx_data.print_on_execution_start = verbose  # "Starting execution of Dataset ...", its plan
    logs = _logs_dir(ctx)
    if verbose:
        _forward_all_lines()  # a quiet start earlier in this process left its filter behind
    else:
        _forward_own_lines()
        if logs:
            _driver_log_file(os.path.join(logs, _DRIVER_LOG))
    if logs:
        console.write(f"Ray logs: {logs}")
    url = getattr(ctx, "dashboard_url", "") or ""
    if url:
        console.write(f"Ray dashboard: {url if '://' in url else 'http://' + url}")
    if _stop_handlers_on:
        _install_stop_handlers()  # ray.init replaced the SIGTERM handler with its own
    return ray


def _start(ray, min_cpus: int, num_cpus: int, tag: str, verbose: bool):
    """ray.init: the cluster in RAY_ADDRESS, else a local instance (see init_ray); its RayContext."""
    from cluster import console

    address = os.environ.get("RAY_ADDRESS")
    if address and address != "local":  # "local": a new local instance, as Ray reads it
        job_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env", {})
        job_vars = (job_env or {}).get("env_vars", {}) or {}
        missing = {k: v for k, v in JOB_ENV.items() if k not in job_vars}
        return ray.init(address=address, runtime_env={"env_vars": missing} if missing else None,
                        **ray_init_options(verbose, local=False))
    cpus = num_cpus or max(os.cpu_count() or 1, min_cpus)
    opts = ray_init_options(verbose, local=True)
    for attempt in range(3):  # a raylet gets 30 s to register: on a saturated machine, try again
        try:
            return ray.init(num_cpus=cpus, runtime_env={"env_vars": dict(JOB_ENV)}, **opts)
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for this
            if "timed out during startup" not in str(e) or attempt == 2:
                raise
            console.write(f"[{tag}] Ray start timed out (busy machine?); retrying ({attempt + 1}/2)")
            ray.shutdown()


@contextlib.contextmanager
def _ray_startup_quiet():
    """While ray.init runs, Ray's driver logger passes errors only: ray.init(configure_logging=False)
    removes the `ray` logger's handlers, so its startup warnings (e.g. token authentication's
    notice) would reach Python's last-resort handler, on stderr."""
    ray_logger = logging.getLogger("ray")
    saved = ray_logger.level
    ray_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        ray_logger.setLevel(saved)


def _logs_dir(ctx) -> str | None:
    """<session dir>/logs of the Ray instance this driver is connected to (on its head node)."""
    info = getattr(ctx, "address_info", None) or {}
    session = info.get("session_dir")
    return os.path.join(session, "logs") if session else None


def quiet_ray_loggers(level: int = logging.ERROR) -> None:
    """The driver's Ray loggers (`ray`, `ray.data`, ...) show only `level` and above on the console;
    their file handlers (ray-data.log, and the driver's log from _driver_log_file) keep the rest.
    A `ray` logger without a console handler gets one (else Python's last-resort handler would
    print its warnings)."""
    names = ["ray"] + [n for n in logging.root.manager.loggerDict if n.startswith("ray.")]
    for name in names:
        for h in logging.getLogger(name).handlers:
            if _is_console(h):
                h.setLevel(max(h.level, level))
    ray_logger = logging.getLogger("ray")
    if not ray_logger.propagate and not any(_is_console(h) for h in ray_logger.handlers):
        h = logging.StreamHandler()  # sys.stderr
        h._posttrain_console = True
        h.setLevel(level)
        h.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        ray_logger.addHandler(h)


def _is_console(h: logging.Handler) -> bool:
    return isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)


def _driver_log_file(path: str) -> None:
    """The driver's `ray` log records (INFO and above) also into `path`, one file per session."""
    ray_logger = logging.getLogger("ray")
    for h in [h for h in ray_logger.handlers if getattr(h, "_posttrain", False)]:
        ray_logger.removeHandler(h)
        h.close()
    try:
        h = logging.FileHandler(path, delay=True)
    except OSError:
        return
    h._posttrain = True
    h.setLevel(logging.INFO)
    h.setFormatter(logging.Formatter("%(asctime)s\t%(levelname)s %(name)s %(filename)s:%(lineno)s -- %(message)s"))
    ray_logger.addHandler(h)


def forwarded_lines(data: dict) -> list[str]:
    """The lines of one batch of forwarded worker output that a quiet console shows (the project's
    `[tag] ` lines); the raylet's and autoscaler's batches are shown whole by Ray's own printer."""
    return [line for line in data.get("lines", ()) if OWN_LINE.match(line)]


def _forward_own_lines() -> None:
    """Replace Ray's printer of forwarded worker output with one that shows only `forwarded_lines`
    (through cluster.console.write, so a progress bar is not torn). A no-op where this Ray's
    dispatcher is not the expected one (ray_init_options then turned forwarding off)."""
    if not can_filter_worker_logs():
        return
    from ray._private import ray_logging, worker

    from cluster import console

    def handler(data: dict) -> None:
        try:
            if data.get("pid") in ("raylet", "autoscaler"):  # rare, and about the job's fate
                worker.print_to_stdstream(data, ignore_prefix=False)
                return
            for line in forwarded_lines(data):
                console.write(line)
        except Exception:  # noqa: BLE001 - Ray's log thread must keep running
            pass

    d = ray_logging.global_worker_stdstream_dispatcher
    d.remove_handler(_RAY_FORWARD_HANDLER)
    d.remove_handler(_FORWARD_HANDLER)
    d.add_handler(_FORWARD_HANDLER, handler)


def _forward_all_lines() -> None:
    if can_filter_worker_logs():
        from ray._private import ray_logging

        ray_logging.global_worker_stdstream_dispatcher.remove_handler(_FORWARD_HANDLER)


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
