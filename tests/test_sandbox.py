"""The code sandbox: results, limits, isolation and refused operations."""

import os
import shutil
import tempfile
import time

import pytest

from kvcomm_jax.agents.sandbox import run_python


def test_runs_code_with_stdin():
    r = run_python("import math\nprint(math.factorial(5), input()[::-1])", stdin="abc\n")
    assert (r.ok, r.returncode, r.timed_out, r.reason) == (True, 0, False, "ok")
    assert r.stdout == "120 cba\n"


def test_exception_fails_with_its_message():
    r = run_python("def f():\n    return 1 / 0\nf()")
    assert not r.ok and r.returncode == 1 and not r.timed_out
    assert r.reason == "ZeroDivisionError: division by zero"
    assert "Traceback" in r.stderr


def test_exit_code_is_reported():
    r = run_python("import sys\nsys.exit(3)")
    assert not r.ok and r.returncode == 3 and r.reason == "exit code 3"


def test_infinite_loop_times_out_and_is_killed():
    start = time.monotonic()
    r = run_python("print('started', flush=True)\nwhile True:\n    pass", timeout_s=1.0)
    assert time.monotonic() - start < 3.0
    assert r.timed_out and not r.ok and r.returncode is None
    assert r.reason == "timed out after 1 s"
    assert r.stdout == "started\n"


def test_huge_output_is_capped():
    start = time.monotonic()
    r = run_python("while True:\n    print('x' * 10000)", max_output_bytes=20_000)
    assert time.monotonic() - start < 5.0
    assert not r.ok and not r.timed_out and r.returncode is None
    assert 10_000 < len(r.stdout) <= 20_000
    assert r.reason == "output exceeded 20000 bytes"


def test_memory_limit():
    r = run_python("x = bytearray(1 << 30)", memory_mb=256)
    assert not r.ok and r.reason == "MemoryError"


def test_write_outside_the_sandbox_is_refused():
    outside = tempfile.mkdtemp(prefix="kvcomm_test_outside_")
    target = os.path.join(outside, "evil.txt")
    code = ("try:\n"
            f"    open({target!r}, 'w').write('pwned')\n"
            "except BaseException:\n"
            "    pass\n"
            "print('survived')\n")
    try:
        r = run_python(code)
        assert not r.ok
        assert r.reason.startswith("sandbox violation:") and "evil.txt" in r.reason
        assert "survived" not in r.stdout
        assert not os.path.exists(target)
    finally:
        shutil.rmtree(outside)


def test_writes_inside_the_sandbox_work_and_are_deleted():
    r = run_python("import os\nopen('out.txt', 'w').write('hi')\n"
                   "print(open('out.txt').read())\nprint(os.getcwd())")
    assert r.ok, r.reason
    said, workdir = r.stdout.splitlines()
    assert said == "hi"
    assert not os.path.exists(workdir)


def test_environment_secrets_are_not_inherited(monkeypatch):
    monkeypatch.setenv("KVCOMM_TEST_SECRET", "s3cret-value-123")
    monkeypatch.setenv("HOME", "/kvcomm-test-home")
    r = run_python("import os\nprint(os.environ.get('KVCOMM_TEST_SECRET'))\n"
                   "print(os.environ['HOME'] == os.getcwd())\nprint(dict(os.environ))")
    assert r.ok, r.reason
    assert r.stdout.splitlines()[:2] == ["None", "True"]  # HOME is the sandbox's own folder
    assert "s3cret-value-123" not in r.stdout and "/kvcomm-test-home" not in r.stdout


def test_parent_environment_file_is_closed(monkeypatch):
    monkeypatch.setenv("KVCOMM_TEST_SECRET", "s3cret-value-123")
    r = run_python("import os\nprint(open(f'/proc/{os.getppid()}/environ').read())")
    assert not r.ok and r.reason.startswith("sandbox violation:")
    assert "s3cret-value-123" not in r.stdout


@pytest.mark.parametrize("code, event", [
    ("import subprocess, sys\nsubprocess.run([sys.executable, '-c', 'print(1)'])",
     "_posixsubprocess"),
    ("import os\nfor _ in range(3):\n    os.fork()", "os.fork"),  # bounded if the hook regressed
    ("import os\nos.system('echo hi')", "os.system"),
    ("import os\nos.execv('/bin/echo', ['echo', 'hi'])", "os.exec"),
    ("import socket\nsocket.create_connection(('127.0.0.1', 9))", "socket"),
    ("import os\nopen('f', 'w').close()\nos.remove('f')", "os.remove"),
    ("import os\nopen('f', 'w').close()\nos.rename('f', 'g')", "os.rename"),
    ("import os\nos.chmod('.', 0o777)", "os.chmod"),
    ("import resource\nresource.setrlimit(resource.RLIMIT_CPU, (100, 100))", "resource.setrlimit"),
])
def test_forbidden_operations_are_refused(code, event):
    r = run_python(code)
    assert not r.ok
    assert r.reason.startswith("sandbox violation:") and event in r.reason
    assert r.stdout == ""  # stopped before the operation's effect (the child's or the shell's output)


def test_rejects_bad_limits():
    with pytest.raises(ValueError):
        run_python("pass", timeout_s=0)
    with pytest.raises(ValueError):
        run_python("pass", max_output_bytes=0)
