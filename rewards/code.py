"""Code-execution reward: run a completion's Python against the sample's tests.

    reward = tests passed / tests given

The code is the last ```python (or ```py, or bare ```) block of the completion, or the whole
completion when it has no fenced block. The `tests` column holds, per sample, either a list
of test snippets (typically one `assert` each; each is one test) or one test script (one
test; a HumanEval-style script defining `check(candidate)` is called with the
`entry_point` column's function).

Each completion runs in its own `python -I rewards/code_sandbox.py` child process under a
wall-clock timeout (the process group is killed; tests that finished before it still count).
`sandbox` (a keyword argument, `kwargs.sandbox` in the config) says how it is confined:
  - "isolated" (the default): inside a bubblewrap sandbox (rewards/code_isolation.py): its own
    user, mount, PID, network and IPC namespaces, uid 65534, only the Python installation
    visible (read-only) and a small tmpfs as its working directory: it cannot read the
    parent's files or environment, see other processes, or reach the network. When that
    cannot be set up here (no `bwrap`, namespaces refused), the reward refuses to run.
  - "unsafe": a plain child process in a fresh temporary directory, with only the harness's
    resource limits and audit hook (network, processes and writes outside the directory are
    refused; READS ARE NOT: the code can read whatever this process can). Logged as unsafe.
Either way the harness (code_sandbox.py) limits memory, CPU time, file size and open files.
"""
from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .code_isolation import HARNESS_SOURCE, OUTER_ENV, SandboxUnavailable, isolation_error, sandbox_command
from .registry import register

SANDBOX_MODES = ("isolated", "unsafe")
_NPROC = 32  # tasks (processes and threads) of the sandbox's own uid; counted inside its user namespace
logger = logging.getLogger(__name__)
_unsafe_warned = False
_FENCE_RE = re.compile(r"```[ \t]*(python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(completion: str) -> str:
    """The last ```python block (else the last bare ``` block, else the whole text)."""
    blocks = _FENCE_RE.findall(completion)
    tagged = [body for lang, body in blocks if lang]
    if tagged:
        return tagged[-1]
    if blocks:
        return blocks[-1][1]
    return completion


@dataclass
class TestRun:
    """What happened when one completion ran against its tests."""

    passed: int
    total: int
    timed_out: bool = False
    finished: bool = False  # the harness reached its end (False: killed, crashed or exited early)
    failures: list[str] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        return self.passed / self.total if self.total else 0.0


def _check_mode(sandbox: str) -> None:
    if sandbox not in SANDBOX_MODES:
        raise ValueError(f"code_execution: kwargs.sandbox must be 'isolated' or 'unsafe', got {sandbox!r}")


def _refusal(reason: str) -> SandboxUnavailable:
    return SandboxUnavailable(
        f"code_execution: refusing to run model-written code without process isolation ({reason}); "
        "expected bubblewrap with user namespaces (`apt-get install bubblewrap`, or `make setup` as root), "
        "or kwargs.sandbox: unsafe on the code reward to run it unisolated")


def _warn_unsafe() -> None:
    global _unsafe_warned
    if not _unsafe_warned:
        _unsafe_warned = True
        logger.warning("code_execution: sandbox: unsafe - model-written code runs WITHOUT process isolation: "
                       "it can read any file and environment this process can")


def check_sandbox(sandbox: str = "isolated", bwrap: str | None = None) -> None:
    """Raise (ValueError, SandboxUnavailable) unless code rewards can run with `sandbox` here."""
    _check_mode(sandbox)
    if sandbox == "unsafe":
        _warn_unsafe()
        return
    reason = isolation_error(bwrap)
    if reason is not None:
        raise _refusal(reason)


def run_tests(code: str, tests: list[str] | str, *, timeout_s: float = 5.0, memory_mb: int = 512,
              fsize_mb: int = 16, entry_point: str | None = None, python: str | None = None,
              sandbox: str = "isolated", bwrap: str | None = None) -> TestRun:
    """Run `code` then each test in a sandboxed child process; count the passes.

    sandbox: "isolated" (namespaces, see rewards/code_isolation.py; SandboxUnavailable when they
    cannot be set up) or "unsafe" (a plain child process). bwrap: the bubblewrap binary
    (default: $POSTTRAIN_BWRAP, else `bwrap` on PATH).
    """
    _check_mode(sandbox)
    if isinstance(tests, str):
        tests = [tests]
    tests = [str(t) for t in tests]
    if not tests:
        raise ValueError("code reward: a sample has no tests")
    nonce = secrets.token_hex(16)
    payload = {"code": code, "tests": tests, "nonce": nonce, "entry_point": entry_point,
               "memory_mb": int(memory_mb), "cpu_s": max(1, int(timeout_s) + 1), "fsize_mb": int(fsize_mb)}
    python = python or sys.executable
    workdir = None
    if sandbox == "isolated":
        try:  # the tmpfs holds every file the code writes: a few times the per-file limit
            argv = sandbox_command(python, HARNESS_SOURCE, tmp_mb=max(64, 4 * int(fsize_mb)), bwrap=bwrap)
        except SandboxUnavailable as e:
            raise _refusal(str(e)) from None
        env = dict(OUTER_ENV)  # bwrap clears it again for the code
        payload["nproc"] = _NPROC
    else:
        _warn_unsafe()
        workdir = tempfile.mkdtemp(prefix="reward-code-")
        argv = [python, "-I", HARNESS_SOURCE]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": workdir, "TMPDIR": workdir,
               "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
    timed_out = False
    try:
        proc = subprocess.Popen(argv, cwd=workdir, env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                start_new_session=True)  # own process group: one kill takes it all
        try:
            out, _ = proc.communicate(json.dumps(payload).encode(), timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            out, _ = proc.communicate()
        finally:
            if proc.poll() is None:
                _kill_group(proc)
                proc.wait()
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    return _parse(out.decode("utf-8", "replace"), nonce, len(tests), timed_out)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _parse(out: str, nonce: str, total: int, timed_out: bool) -> TestRun:
    passed: set[int] = set()
    failures: list[str] = []
    finished = False
    for line in out.splitlines():
        head, _, rest = line.partition(" ")
        if head != nonce:
            continue  # anything else on stdout is the code's own (it should not get there anyway)
        if rest == "done":
            finished = True
            continue
        idx, _, verdict = rest.partition(" ")
        if not idx.isdigit() or int(idx) >= total:
            continue
        if verdict == "pass":
            passed.add(int(idx))
        else:
            failures.append(f"test {idx}: {verdict.removeprefix('fail ')}")
    if timed_out:
        failures.append("timed out")
    elif not finished:
        failures.append("the process ended before finishing (killed, crashed or exited early)")
    return TestRun(len(passed), total, timed_out, finished, failures)


@register("code_execution")
def code_execution(prompts, completions, *, tests=None, entry_point=None, timeout_s: float = 5.0,
                   memory_mb: int = 512, max_parallel: int | None = None, sandbox: str = "isolated", **_):
    """Fraction of each sample's `tests` that its completion's code passes.

    sandbox: "isolated" (default; refuses to run where process isolation is unavailable) or
    "unsafe" (no isolation; see the module doc).
    """
    if tests is None:
        raise ValueError("code_execution needs a 'tests' column (per sample: a list of asserts or a test script)")
    if len(tests) != len(completions):
        raise ValueError(f"code_execution: {len(tests)} test sets for {len(completions)} completions")
    entries = entry_point if entry_point is not None else [None] * len(completions)
    if isinstance(entries, str):
        entries = [entries] * len(completions)
    check_sandbox(sandbox)  # once for the batch: refuse before any code runs
    workers = max(1, min(max_parallel or os.cpu_count() or 1, len(completions)))

    def one(i: int) -> float:
        run = run_tests(extract_code(completions[i]), tests[i], timeout_s=timeout_s, memory_mb=memory_mb,
                        entry_point=entries[i], sandbox=sandbox)
        return run.fraction

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, range(len(completions))))
