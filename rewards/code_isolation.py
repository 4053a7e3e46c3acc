"""Process isolation for the code-execution reward: a bubblewrap (`bwrap`) sandbox.

Model-written code runs in fresh Linux namespaces made by bubblewrap:
  - user namespace: uid/gid 65534 inside, no capabilities, no further user namespaces
    (`--disable-userns` where bwrap has it); it cannot change its own limits back;
  - mount namespace built from nothing: `/usr` (and the `/bin`, `/lib*` links), the Python
    installation that runs the harness (its prefix, and the virtual environment's), the
    harness script and `/etc/ld.so.cache`, all read-only; a minimal `/dev`, and a size-capped
    tmpfs at `/tmp` as the only writable place (the working directory, HOME and TMPDIR).
    Nothing of /home, /root or /etc beyond that exists inside; the root and /dev are
    remounted read-only. No /proc at all: not even a fresh one, whose /proc/self/mem would
    let the code read the harness's memory (and its result nonce); Python does not need it;
  - PID namespace: no other process can be signalled; when bwrap dies (the parent kills it
    at the timeout, or the parent dies) every process inside dies with it;
  - network namespace with only a downed loopback: no network at all;
  - IPC, UTS (and cgroup where possible) namespaces; a new session (no terminal injection);
  - an environment built from nothing (`--clearenv`): nothing of the parent's variables.

Inside, the harness (code_sandbox.py) adds resource limits (memory, CPU time, file size,
open files, processes) and its audit hook. `SandboxUnavailable` is raised when bwrap is
missing or the kernel / container refuses the namespaces; the caller then refuses to run
unless the config says `sandbox: unsafe`.
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys

BWRAP_ENV = "POSTTRAIN_BWRAP"  # path of the bwrap binary; default: `bwrap` on PATH
SANDBOX_ID = "65534"  # uid and gid inside ("nobody")
WORKDIR = "/tmp"  # the only writable place inside: a tmpfs
HARNESS = "/harness.py"  # where the harness script appears inside
HARNESS_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "code_sandbox.py")
# What the code's process sees; nothing comes from the parent's environment.
INNER_ENV = {"PATH": "/usr/bin:/bin", "HOME": WORKDIR, "TMPDIR": WORKDIR, "LANG": "C.UTF-8",
             "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1",
             # one thread per BLAS library: the sandbox's process limit counts threads
             "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
OUTER_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}  # bwrap's own (readable as /proc/1/environ inside)
_PROBE_TIMEOUT_S = 30.0


class SandboxUnavailable(RuntimeError):
    """Process isolation cannot be set up here (no bwrap, or namespaces refused)."""


def bwrap_path(explicit: str | None = None) -> str | None:
    """The bwrap binary: `explicit`, else $POSTTRAIN_BWRAP, else `bwrap` on PATH (None: not found)."""
    if explicit:
        return explicit
    return os.environ.get(BWRAP_ENV) or shutil.which("bwrap")


def python_roots(python: str) -> list[tuple[str, str]]:
    """(host folder, path inside) pairs the interpreter needs, read-only: its prefix and its venv's.

    A folder reached through a symlink appears at both its link path and its real path.
    """
    paths = {os.path.dirname(os.path.dirname(os.path.abspath(python))),
             os.path.dirname(os.path.dirname(os.path.realpath(python)))}
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        paths |= {os.path.abspath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
    paths |= {os.path.realpath(p) for p in paths}
    paths.discard("/")
    home = os.path.realpath(os.path.expanduser("~"))
    for p in sorted(paths):
        real = os.path.realpath(p)
        if home in (p, real) or home.startswith(real.rstrip("/") + "/") or home.startswith(p.rstrip("/") + "/"):
            raise SandboxUnavailable(f"the Python installation at {p} would expose the home directory {home}")
    kept: list[tuple[str, str]] = []
    for p in sorted(paths):  # parents sort first: one bind covers what lies inside it
        real = os.path.realpath(p)
        if p == "/usr" or (p.startswith("/usr/") and real.startswith("/usr/")):
            continue  # /usr is bound already
        if any(p.startswith(d + "/") and real.startswith(s + "/") for s, d in kept):
            continue
        kept.append((real, p))
    return kept


@functools.lru_cache(maxsize=None)
def _features(bwrap: str) -> frozenset[str]:
    """Options this bwrap has (older versions lack --size and --disable-userns)."""
    try:
        out = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=_PROBE_TIMEOUT_S,
                             env=OUTER_ENV)
    except (OSError, subprocess.SubprocessError) as e:
        raise SandboxUnavailable(f"cannot run {bwrap}: {e}") from None
    text = out.stdout + out.stderr
    return frozenset(f for f in ("--size", "--disable-userns") if f in text)


def _argv(bwrap: str, python: str, harness: str, tmp_mb: int, features: frozenset[str]) -> list[str]:
    argv = [bwrap, "--unshare-user", "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
            "--unshare-cgroup-try", "--uid", SANDBOX_ID, "--gid", SANDBOX_ID, "--hostname", "sandbox",
            "--die-with-parent", "--new-session", "--cap-drop", "ALL"]
    if "--disable-userns" in features:
        argv.append("--disable-userns")
    argv += ["--ro-bind", "/usr", "/usr"]
    for d in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(d):  # merged /usr: keep the link
            argv += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            argv += ["--ro-bind", d, d]
    argv += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache", "--dev", "/dev"]
    if "--size" in features:
        argv += ["--size", str(int(tmp_mb) * 1024 * 1024)]
    argv += ["--tmpfs", WORKDIR]  # before the Python binds: an installation under /tmp stays visible
    for src, dest in python_roots(python):
        argv += ["--ro-bind", src, dest]
    argv += ["--ro-bind", harness, HARNESS, "--remount-ro", "/dev", "--remount-ro", "/", "--chdir", WORKDIR,
             "--clearenv"]
    for k, v in INNER_ENV.items():
        argv += ["--setenv", k, v]
    return argv + ["--", python, "-I"]


@functools.lru_cache(maxsize=None)
def _probe(bwrap: str, python: str, harness: str) -> str | None:
    """None when a sandboxed `python -I -c pass` runs; else why not, in one line."""
    try:
        argv = _argv(bwrap, python, harness, 16, _features(bwrap))
    except SandboxUnavailable as e:
        return str(e)
    try:
        out = subprocess.run(argv + ["-c", "pass"], capture_output=True, text=True, timeout=_PROBE_TIMEOUT_S,
                             env=OUTER_ENV, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as e:
        return f"cannot run {bwrap}: {e}"
    if out.returncode != 0:
        lines = [ln.strip() for ln in (out.stderr or "").splitlines() if ln.strip()]
        return f"{bwrap} failed (exit {out.returncode}): {lines[-1] if lines else 'no message'}"
    return None


def sandbox_command(python: str, harness: str, *, tmp_mb: int, bwrap: str | None = None) -> list[str]:
    """The argv that runs `python -I harness` in the sandbox; SandboxUnavailable when it cannot."""
    exe = bwrap_path(bwrap)
    if not exe:
        raise SandboxUnavailable(f"bwrap (bubblewrap) not found on PATH and ${BWRAP_ENV} is not set")
    if os.sep not in exe:  # a bare name: look it up on PATH
        exe = shutil.which(exe) or exe
    if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
        raise SandboxUnavailable(f"bwrap path {exe!r} is not an executable file")
    reason = _probe(exe, python, harness)
    if reason is not None:
        raise SandboxUnavailable(reason)
    return _argv(exe, python, harness, tmp_mb, _features(exe)) + [HARNESS]


def isolation_error(bwrap: str | None = None, python: str | None = None) -> str | None:
    """None when the sandbox works here; else why not (for tests and preflight checks)."""
    try:
        sandbox_command(python or sys.executable, HARNESS_SOURCE, tmp_mb=16, bwrap=bwrap)
    except SandboxUnavailable as e:
        return str(e)
    return None
