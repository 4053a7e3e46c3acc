"""Code-execution reward: pass fractions, and the sandbox's limits (time, memory, files, network).

These run in the isolated sandbox where it works here, else in `sandbox="unsafe"` mode (the
harness's own guards apply in both); tests/rewards/test_sandbox_isolation.py tests the isolation.
"""
import functools
import os
import time

import pytest

from rewards.code import code_execution as _code_execution
from rewards.code import extract_code
from rewards.code import run_tests as _run_tests
from rewards.code_isolation import isolation_error

SANDBOX = "isolated" if isolation_error() is None else "unsafe"
code_execution = functools.partial(_code_execution, sandbox=SANDBOX)
run_tests = functools.partial(_run_tests, sandbox=SANDBOX)

ADD = "def add(a, b):\n    return a + b\n"
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(0, 0) == 0", "assert add('a', 'b') == 'ab'"]


def fenced(code):
    return f"Here you go:\n```python\n{code}```\nDone."


def test_extract_code_prefers_the_last_python_block():
    text = "```\nbare\n```\n```python\nfirst\n```\n```py\nsecond\n```"
    assert extract_code(text).strip() == "second"
    assert extract_code("```\nonly bare\n```").strip() == "only bare"
    assert extract_code("x = 1") == "x = 1"


def test_correct_code_passes_wrong_code_fails_partial_counts():
    wrong = "def add(a, b):\n    return a - b\n"
    half = "def add(a, b):\n    return a + b if isinstance(a, int) else None\n"
    out = code_execution(["p"] * 4, [fenced(ADD), fenced(wrong), fenced(half), "no code at all"],
                         tests=[ADD_TESTS] * 4)
    assert out == pytest.approx([1.0, 1 / 3, 2 / 3, 0.0])  # wrong code still passes add(0, 0) == 0


def test_test_script_and_humaneval_check():
    script = "assert add(2, 2) == 4\nassert add(0, 0) == 0\n"
    check = "def check(candidate):\n    assert candidate(2, 3) == 5\n"
    out = code_execution(["p"] * 2, [fenced(ADD)] * 2, tests=[script, check], entry_point=[None, "add"])
    assert out == [1.0, 1.0]
    assert code_execution(["p"], [fenced("def add(a, b):\n    return 0\n")], tests=[check], entry_point="add") == [0.0]


def test_solution_that_crashes_or_exits_gets_zero():
    assert run_tests("raise SystemExit(0)", ["assert True"]).passed == 0
    r = run_tests("import os\nos._exit(0)", ["assert True"])
    assert (r.passed, r.finished) == (0, False)


def test_printed_or_forged_results_do_not_count():
    forge = ("import os, sys\n"
             "for fd in range(1, 12):\n"
             "    try: os.write(fd, b'0 pass\\ndone\\n')\n"
             "    except OSError: pass\n"
             "print('0 pass')\n"
             "try: sys.audit('sandbox.report', '0 pass')\n"
             "except PermissionError: pass\n"
             "raise SystemExit\n")
    assert run_tests(forge, ["assert True"]).passed == 0
    patch = "import builtins\nbuiltins.exec = lambda *a, **k: None\nbuiltins.enumerate = lambda t: []\n"
    assert run_tests(patch, ["assert False", "assert True"]).passed == 1


def test_infinite_loop_is_killed_at_the_timeout_and_finished_tests_count():
    t0 = time.monotonic()
    r = run_tests("def f():\n    while True:\n        pass\n", ["assert True", "f()"], timeout_s=1.0)
    elapsed = time.monotonic() - t0
    assert r.timed_out and (r.passed, r.total) == (1, 2)
    assert 0.9 <= elapsed < 4.0


def test_writes_outside_the_working_directory_are_refused(tmp_path):
    target = tmp_path / "escaped.txt"
    attempts = [
        f"open({str(target)!r}, 'w').write('x')",
        f"import os\nfd = os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)\nos.write(fd, b'x')",
        f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')",
        f"import os\nos.chdir({str(tmp_path)!r})\nopen('escaped.txt', 'w').write('x')",
        "open('../../../../../../" + str(target).lstrip("/") + "', 'w').write('x')",
        f"import os\nos.symlink({str(tmp_path)!r}, 'link')\nopen('link/escaped.txt', 'w').write('x')",
        f"import shutil\nshutil.copyfile(__file__ if '__file__' in dir() else '/etc/hostname', {str(target)!r})",
        "import os\nos.system('touch " + str(target) + "')",
    ]
    for code in attempts:
        assert run_tests(code, ["assert True"]).passed == 0, code
        assert not target.exists(), code
    keep = tmp_path / "keep.txt"
    keep.write_text("mine")
    assert run_tests(f"import os\nos.remove({str(keep)!r})", ["assert True"]).passed == 0
    assert keep.read_text() == "mine"
    # inside its own directory the code may write and read back
    assert run_tests("open('out.txt', 'w').write('ok')\nimport os\nos.makedirs('a/b')",
                     ["assert open('out.txt').read() == 'ok'"]).passed == 1


def test_network_is_refused():
    for code in ["import socket\nsocket.socket()",
                 "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:1', timeout=1)",
                 "import socket\nsocket.create_connection(('127.0.0.1', 80), timeout=1)"]:
        r = run_tests(code, ["assert True"])
        assert r.passed == 0 and "PermissionError" in r.failures[0], (code, r)


def test_memory_hog_is_stopped():
    t0 = time.monotonic()
    r = run_tests("x = bytearray(4 * 1024 ** 3)", ["assert True"], memory_mb=256)
    assert r.passed == 0 and "MemoryError" in r.failures[0]
    r = run_tests("x = []\nwhile True:\n    x.append(bytearray(50 * 1024 ** 2))", ["assert True"], memory_mb=256)
    assert r.passed == 0 and not r.timed_out
    assert time.monotonic() - t0 < 4.0


def test_common_libraries_still_work():
    code = "import collections, dataclasses, tempfile, json, re, numpy\nP = collections.namedtuple('P', 'x y')\n"
    assert run_tests(code, ["assert P(1, 2).y == 2", "tempfile.TemporaryFile().close()"]).passed == 2


def test_code_reward_validates_its_columns():
    with pytest.raises(ValueError, match="needs a 'tests' column"):
        code_execution(["p"], ["x"])
    with pytest.raises(ValueError, match="no tests"):
        code_execution(["p"], ["x"], tests=[[]])


def test_temporary_directories_are_removed():
    code = "import os\nopen(os.path.join(os.getcwd(), 'marker'), 'w').write(os.getcwd())"
    before = set(os.listdir(os.environ.get("TMPDIR", "/tmp")))
    run_tests(code, ["assert True"])
    after = set(os.listdir(os.environ.get("TMPDIR", "/tmp")))
    assert not {d for d in after - before if d.startswith("reward-code-")}


def test_processes_and_limit_changes_are_refused(tmp_path):
    target = tmp_path / "spawned.txt"
    attempts = [
        f"import subprocess\nsubprocess.run(['touch', {str(target)!r}])",
        f"import os\nif os.fork() == 0:\n    open({str(target)!r}, 'w')\n",
        f"import os\nos.posix_spawn('/usr/bin/touch', ['touch', {str(target)!r}], {{}})",
        # a str subclass that hides its name from a naive denylist check
        "class S(str):\n    __eq__ = lambda s, o: False\n    __hash__ = lambda s: 1\n__import__(S('_posixsubprocess'))",
        "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))",
        "import ctypes\nctypes.CDLL('libc.so.6')",
    ]
    for code in attempts:
        r = run_tests(code, ["assert True"])
        assert r.passed == 0 and "PermissionError" in r.failures[0], (code, r)
    assert not target.exists()
