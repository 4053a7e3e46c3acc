"""Code-execution reward: run a completion's Python against the sample's tests.

    reward = tests passed / tests given

The code is the last ```python (or ```py, or bare ```) block of the completion, or the whole
completion when it has no fenced block. The `tests` column holds, per sample, either a list
of test snippets (typically one `assert` each; each is one test) or one test script (one
test; a HumanEval-style script defining `check(candidate)` is called with the
`entry_point` column's function).

Each completion runs in its own `python -I rewards/code_sandbox.py` child process, in a fresh
temporary directory that is deleted afterwards, under a wall-clock timeout (the process
group is killed), an address-space limit and an audit hook that refuses network, processes
and writes outside that directory; see code_sandbox.py. Tests that finished before a
timeout still count.
"""
from __future__ import annotations

import json
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

from .registry import register

_SANDBOX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "code_sandbox.py")
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


def run_tests(code: str, tests: list[str] | str, *, timeout_s: float = 5.0, memory_mb: int = 512,
              fsize_mb: int = 16, entry_point: str | None = None, python: str | None = None) -> TestRun:
    """Run `code` then each test in a sandboxed child process; count the passes."""
    if isinstance(tests, str):
        tests = [tests]
    tests = [str(t) for t in tests]
    if not tests:
        raise ValueError("code reward: a sample has no tests")
    nonce = secrets.token_hex(16)
    payload = {"code": code, "tests": tests, "nonce": nonce, "entry_point": entry_point,
               "memory_mb": int(memory_mb), "cpu_s": max(1, int(timeout_s) + 1), "fsize_mb": int(fsize_mb)}
    workdir = tempfile.mkdtemp(prefix="reward-code-")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": workdir, "TMPDIR": workdir,
           "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
    timed_out = False
    try:
        proc = subprocess.Popen([python or sys.executable, "-I", _SANDBOX], cwd=workdir, env=env,
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
                   memory_mb: int = 512, max_parallel: int | None = None, **_):
    """Fraction of each sample's `tests` that its completion's code passes."""
    if tests is None:
        raise ValueError("code_execution needs a 'tests' column (per sample: a list of asserts or a test script)")
    if len(tests) != len(completions):
        raise ValueError(f"code_execution: {len(tests)} test sets for {len(completions)} completions")
    entries = entry_point if entry_point is not None else [None] * len(completions)
    if isinstance(entries, str):
        entries = [entries] * len(completions)
    workers = max(1, min(max_parallel or os.cpu_count() or 1, len(completions)))

    def one(i: int) -> float:
        run = run_tests(extract_code(completions[i]), tests[i], timeout_s=timeout_s, memory_mb=memory_mb,
                        entry_point=entries[i])
        return run.fraction

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, range(len(completions))))
