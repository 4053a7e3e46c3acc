"""The code reward's process isolation (rewards/code_isolation.py).

Model-written code must not read the parent's files, home or environment, see other processes
or reach the network. Each attack is also run with `sandbox="unsafe"` to show it is real (that
mode is the old behaviour: a plain child process). Where isolation cannot be set up, the reward
refuses to run unless told `sandbox: unsafe`.
"""
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import sys
import textwrap

import pytest

import rewards.code as code_mod
from rewards.code import code_execution, run_tests
from rewards.code_isolation import BWRAP_ENV, HARNESS_SOURCE, SandboxUnavailable, isolation_error, sandbox_command

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ADD = "```python\ndef add(a, b):\n    return a + b\n```"
ADD_TESTS = ["assert add(1, 2) == 3", "assert add('a', 'b') == 'ab'"]


@pytest.fixture(scope="module")
def isolated():
    """Skip (with the reason) where namespaces are unavailable; as root, a missing bwrap is a set-up bug."""
    reason = isolation_error()
    if reason is None:
        return
    if os.geteuid() == 0 and shutil.which("bwrap") is None and shutil.which("apt-get"):
        pytest.fail(f"process isolation unavailable ({reason}); `make setup` as root installs bubblewrap")
    pytest.skip(f"process isolation unavailable here: {reason} (install bubblewrap: `make setup` as root)")


def test_reads_of_the_parents_files_home_and_processes_fail(isolated, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".netrc").write_text("machine hub password top-secret\n")
    monkeypatch.setenv("HOME", str(home))
    attacks = [
        "assert 'root:' in open('/etc/passwd').read()",
        f"assert 'top-secret' in open({str(home / '.netrc')!r}).read()",
        f"assert {str(os.getpid())!r} in os.listdir('/proc')",  # the test process itself
        "assert len([p for p in os.listdir('/proc') if p.isdigit()]) > 3",  # a PID namespace of its own
    ]
    r = run_tests("import os", attacks, sandbox="isolated")
    assert r.finished and r.passed == 0, r
    assert run_tests("import os", attacks, sandbox="unsafe").passed == len(attacks)  # the attacks are real


def test_the_parents_environment_cannot_be_read(isolated):
    # /proc/<pid>/environ shows a process's environment as it was at exec: start a parent with the secret.
    secret = "hf_" + secrets.token_hex(12)
    parent = textwrap.dedent("""
        import os, sys
        from rewards.code import run_tests
        leak = (
            "import os\\n"
            "seen = b''\\n"
            "try: pids = os.listdir('/proc')\\n"
            "except OSError: pids = []\\n"
            "for pid in ['self', '1', str(os.getppid()), '%d'] + pids:\\n"
            "    for name in ('environ', 'cmdline'):\\n"
            "        try: seen += open('/proc/' + pid + '/' + name, 'rb').read()\\n"
            "        except OSError: pass\\n"
        ) % os.getpid()
        test = ["assert %r.encode() in seen" % os.environ["HF_TOKEN"]]
        r = run_tests(leak, test, sandbox="isolated")
        print(r.passed, r.failures[0].split(":")[1].strip(), run_tests(leak, test, sandbox="unsafe").passed)
    """)
    out = subprocess.run([sys.executable, "-c", parent], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "HF_TOKEN": secret})
    assert out.returncode == 0, out.stderr
    # isolated: the leak code ran and found nothing; unsafe: the parent's token leaks
    assert out.stdout.split() == ["0", "AssertionError", "1"], out


def test_code_past_the_harness_is_still_confined(isolated, tmp_path):
    # Plain Python in the sandbox, without the harness's audit hook and limits: the namespaces alone.
    secret_file = tmp_path / "secret.txt"
    secret_file.write_text("x")
    probe = textwrap.dedent(f"""
        import json, os, socket
        r = {{"uid": os.getuid(), "env": dict(os.environ), "ifaces": [n for _, n in socket.if_nameindex()]}}
        try:
            socket.create_connection(("1.1.1.1", 53), timeout=2)
            r["net"] = "connected"
        except OSError as e:
            r["net"] = e.errno
        r["seen"] = [p for p in ("/etc/passwd", "/proc/1/environ", "/home", {str(secret_file)!r},
                                 {os.path.join(ROOT, "pyproject.toml")!r})
                     if os.path.exists(p)]
        r["wrote"] = []
        for p in ("/x", "/usr/x", "/dev/x", {os.path.join(sys.prefix, "x")!r}, "/tmp/x"):
            try:
                open(p, "w").close()
                r["wrote"].append(p)
            except OSError:
                pass
        print(json.dumps(r))
    """)
    argv = sandbox_command(sys.executable, HARNESS_SOURCE, tmp_mb=64)
    assert argv[-1] == "/harness.py"
    env = {"PATH": "/usr/bin:/bin", "HF_TOKEN": "hf_secret"}  # bwrap's own environment: not passed on
    out = subprocess.run(argv[:-1] + ["-c", probe], capture_output=True, text=True, timeout=60, env=env,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["uid"] == 65534 and "HF_TOKEN" not in r["env"] and r["env"]["HOME"] == "/tmp"
    assert r["ifaces"] == ["lo"] and r["net"] != "connected"  # a network namespace with only loopback
    assert r["seen"] == [] and r["wrote"] == ["/tmp/x"]


def test_no_network_and_a_bounded_writable_tmpfs(isolated):
    r = run_tests("import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)", ["assert True"])
    assert r.passed == 0
    # writes: the working directory only, a tmpfs of 4 x fsize_mb (64 MiB here), not the host's disk
    fill = "for i in range(8):\n    open(f'f{i}', 'wb').write(b'x' * 15 * 2**20)"  # 8 files under fsize_mb
    r = run_tests("open('ok.txt', 'w').write('ok')",
                  ["assert open('ok.txt').read() == 'ok'", "open('/usr/evil', 'w')", fill], fsize_mb=16)
    assert (r.passed, r.total) == (1, 3) and "No space left" in r.failures[-1], r


def test_honest_code_still_passes(isolated):
    assert code_execution(["p"] * 2, [ADD, "def add(a, b):\n    return 0\n"], tests=[ADD_TESTS] * 2) == [1.0, 0.0]


def test_without_isolation_the_reward_refuses_unless_unsafe(tmp_path, monkeypatch, caplog):
    for bwrap, why in [(str(tmp_path / "no-such-bwrap"), "not an executable file"),
                       (shutil.which("false") or "/bin/false", "failed (exit 1)")]:  # namespaces refused
        monkeypatch.setenv(BWRAP_ENV, bwrap)
        with pytest.raises(SandboxUnavailable, match=f"refusing.*{re.escape(why)}.*kwargs.sandbox: unsafe"):
            code_execution(["p"], [ADD], tests=[ADD_TESTS])
        with pytest.raises(SandboxUnavailable, match="without process isolation"):
            run_tests("x = 1", ["assert True"])
    monkeypatch.setattr(code_mod, "_unsafe_warned", False)
    with caplog.at_level(logging.WARNING, logger="rewards.code"):
        assert code_execution(["p"], [ADD], tests=[ADD_TESTS], sandbox="unsafe") == [1.0]
    assert "unsafe" in caplog.text and "WITHOUT process isolation" in caplog.text
    with pytest.raises(ValueError, match="kwargs.sandbox must be 'isolated' or 'unsafe', got 'off'"):
        code_execution(["p"], [ADD], tests=[ADD_TESTS], sandbox="off")
