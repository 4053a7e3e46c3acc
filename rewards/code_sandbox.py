"""Child-process harness of the code-execution reward (run as a script: `python -I code_sandbox.py`).

Not imported by the parent; stdlib only. The parent (rewards/code.py) starts it in a fresh
temporary directory, writes one JSON object on stdin and reads result lines on stdout:

    stdin : {"code": str, "tests": [str, ...], "nonce": str, "entry_point": str | null,
             "memory_mb": int, "cpu_s": int, "fsize_mb": int, "nproc": int (optional)}
    stdout: "<nonce> <i> pass" | "<nonce> <i> fail <reason>"  per test, as each finishes,
            "<nonce> done"                                     at the end.

The security boundary is the parent's bubblewrap sandbox (rewards/code_isolation.py: no view of
the parent's files, environment, processes or network); with `sandbox: unsafe` there is none
and these guards are all there is. Guards, set before the completion's code runs (best
effort; the parent adds the wall-clock kill):
  - resource limits: address space, CPU seconds, file size, open files, no core dumps, and
    (in the sandbox, where the count is the sandbox's own) processes and threads;
  - an audit hook (sys.addaudithook: it cannot be removed) that refuses sockets, processes
    (fork/exec/spawn/system/Popen, signals), ctypes, raising resource limits, links, and
    opening for writing / creating / removing / renaming paths outside the working directory
    (resolved lexically: with links refused, the fresh directory holds no symlinks);
  - results are not printed by code the completion could imitate: the nonce and the result
    descriptor live only in the hook's closure (unreachable from Python once gc
    introspection and tracing are refused), and the hook writes a result line only when the
    event comes from `main`'s own frame, so fake lines, early exits and functions rebuilt
    from this file's code objects do not count;
  - everything `main` uses after the completion's code has run is bound to locals first,
    so monkeypatching builtins or modules does not change the verdicts.
"""
import builtins
import json
import os
import posix
import resource
import signal
import sys

_BLOCKED_PREFIXES = (
    "socket.", "subprocess.", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty",
    "os.system", "os.kill", "os.killpg", "os.link", "os.symlink", "signal.pthread_kill", "ctypes.",
    "pty.", "sys.settrace", "sys.setprofile", "sys.addaudithook", "sys._current_frames",
    "sys._current_exceptions", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
    "resource.setrlimit", "resource.prlimit", "webbrowser.", "urllib.Request", "ftplib.", "http.client.",
    "smtplib.", "imaplib.", "poplib.", "nntplib.", "telnetlib.", "sandbox.arm",
)
_BLOCKED_IMPORTS = frozenset({"_posixsubprocess", "_socket", "socket", "subprocess", "multiprocessing",
                              "_multiprocessing", "pty"})

# Events whose first n arguments are paths that get modified.
_PATH_EVENTS = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.rename": 2, "os.chmod": 1, "os.chown": 1,
                "os.utime": 1, "os.truncate": 1, "os.mkfifo": 1, "os.mknod": 1, "os.setxattr": 1,
                "os.removexattr": 1, "shutil.rmtree": 1, "shutil.copyfile": 2, "shutil.copytree": 2,
                "shutil.move": 2, "shutil.chown": 1}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _make_hook(root):
    # Every name the hook uses is bound here: the completion may patch builtins and modules.
    getcwd, fspath, write, getframe = posix.getcwd, posix.fspath, posix.write, sys._getframe
    str_t, bytes_t, int_t, type_t, bool_t, exc_t, denied = str, bytes, int, type, bool, Exception, PermissionError
    isinstance_ = isinstance
    blocked_prefixes, blocked_imports, path_events = _BLOCKED_PREFIXES, _BLOCKED_IMPORTS, _PATH_EVENTS
    write_flags, prefix = _WRITE_FLAGS, root.rstrip("/") + "/"
    armed = {}  # nonce, fd, frame: set once by main, before any completion code

    def inside(path):
        if type_t(path) is int_t:
            return False  # a descriptor: we cannot tell where it points
        try:
            p = fspath(path)
        except exc_t:
            return False
        if type_t(p) is bytes_t:
            p = bytes_t.decode(p, "utf-8", "surrogateescape")
        if type_t(p) is not str_t or not p:
            return False
        if not p.startswith("/"):
            p = getcwd() + "/" + p
        parts = []
        for part in p.split("/"):
            if part == "..":
                if parts:
                    parts.pop()
            elif part and part != ".":
                parts.append(part)
        full = "/" + "/".join(parts)
        return full == prefix[:-1] or full.startswith(prefix)

    def hook(event, args):
        if event == "sandbox.report":
            # Only main's own frame may report; anything else is the completion forging.
            if "frame" not in armed or getframe(1) is not armed["frame"]:
                raise denied("sandbox: reporting is not allowed")
            write(armed["fd"], (armed["nonce"] + " " + args[0].replace("\n", " ") + "\n").encode("utf-8", "replace"))
            return
        if event == "ctypes.dlopen" and args[0] is None:
            return  # `import ctypes` (numpy does) opens the running process; no other ctypes action is allowed
        if event.startswith(blocked_prefixes):
            if event == "sandbox.arm" and "frame" not in armed:
                armed["nonce"], armed["fd"], armed["frame"] = args[0], args[1], getframe(1)
                return
            raise denied("sandbox: " + event + " is not allowed")
        if event == "import":
            name = str_t.__str__(args[0]) if isinstance_(args[0], str_t) else args[0]  # a str subclass: its value
            if name in blocked_imports:
                raise denied("sandbox: importing " + name + " is not allowed")
        if event == "open":
            path, mode, flags = args
            writing = (mode is not None and ("w" in mode or "a" in mode or "x" in mode or "+" in mode)) \
                or bool_t((flags or 0) & write_flags)
            # os.open (mode None) may carry a dir_fd we cannot see: it must use an absolute path.
            relative_os_open = mode is None and not (type_t(path) is str_t and path.startswith("/"))
            if writing and (relative_os_open or not inside(path)):
                raise denied("sandbox: writing outside the working directory is not allowed")
        n = path_events.get(event)
        if n is not None:
            for p in args[:n]:
                if p is not None and not inside(p):
                    raise denied("sandbox: " + event + " outside the working directory is not allowed")

    return hook


def main():
    raw = sys.stdin.read()
    payload = json.loads(raw)
    del raw
    # Bound now; used after the completion's code has run (which may patch anything global).
    _exec, _compile, _str, _type, _callable, _exit = exec, compile, str, type, callable, os._exit
    _audit, _base_exc, _enumerate, _len = sys.audit, BaseException, enumerate, len
    tests = tuple(payload["tests"])  # a tuple: the completion cannot swap the tests out
    entry, code = payload.get("entry_point"), payload["code"]
    n_tests = _len(tests)

    out_fd = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # the completion's prints, and C-level writes, go nowhere
    os.dup2(devnull, 2)
    os.close(devnull)
    sys.stdin = open(os.devnull)  # input() sees EOF

    mb = 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (payload["memory_mb"] * mb,) * 2)
    resource.setrlimit(resource.RLIMIT_CPU, (payload["cpu_s"], payload["cpu_s"] + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (payload["fsize_mb"] * mb,) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    if payload.get("nproc"):  # only inside the user namespace: outside it counts all of the user's processes
        resource.setrlimit(resource.RLIMIT_NPROC, (payload["nproc"],) * 2)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write raises instead of killing

    sys.addaudithook(_make_hook(os.path.realpath(os.getcwd())))
    _audit("sandbox.arm", payload.pop("nonce"), out_fd)
    del payload, out_fd

    ns = {"__name__": "__solution__", "__builtins__": builtins}
    solution_error = None
    try:
        _exec(_compile(code, "<solution>", "exec"), ns)
    except _base_exc as e:  # SystemExit included: the code does not get to end the run
        try:
            solution_error = "solution raised " + _type(e).__name__ + ": " + _str(e)[:200]
        except _base_exc:
            solution_error = "solution raised an unprintable exception"
    for i, test in _enumerate(tests):
        if solution_error is not None:
            _audit("sandbox.report", f"{i} fail {solution_error}")
            continue
        try:
            _exec(_compile(test, f"<test {i}>", "exec"), ns)
            check = ns.get("check")
            if entry and n_tests == 1 and _callable(check):  # HumanEval-style script
                check(ns[entry])
            verdict = "pass"
        except _base_exc as e:
            try:
                verdict = "fail " + _type(e).__name__ + ": " + _str(e)[:200]
            except _base_exc:
                verdict = "fail (unprintable exception)"
        _audit("sandbox.report", f"{i} {verdict}")
    _audit("sandbox.report", "done")
    _exit(0)  # skip interpreter teardown: atexit handlers registered by the code do not run


if __name__ == "__main__":
    main()
