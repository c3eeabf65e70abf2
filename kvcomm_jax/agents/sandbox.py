"""Run untrusted, model-written Python in a separate, restricted process.

`run_python` never executes code in the calling process. Each call:

* creates a fresh temporary directory (the snippet's cwd, HOME and TMPDIR), removed after;
* starts ``sys.executable -I -B`` (isolated mode, no bytecode writes) in a new session, with
  an environment holding only locale/PATH basics and single-threaded BLAS settings, so no
  secret of the caller is inherited;
* runs a small prelude in the child that sets resource limits (CPU seconds, address space,
  file size, no core dumps) and installs an audit hook (`sys.addaudithook`) before the
  snippet starts. The hook refuses writes outside the temporary directory, reads outside it
  and the Python installation (so e.g. ``/proc/<parent>/environ`` stays closed), deleting,
  renaming or re-permissioning files, starting processes, sockets and raising resource
  limits. A refused event ends the child at once (it cannot be caught by the snippet);
* reads stdout and stderr with a cap and kills the whole process group on timeout or when
  the output passes the cap.

The limits are set by the child rather than through ``preexec_fn``: the caller is usually a
multi-threaded JAX process, where running Python between fork and exec can deadlock.

This guards against accidents and careless code, the kind a model writes. Audit hooks are
not a security boundary against code written to escape them (e.g. through ``ctypes``).
"""

from __future__ import annotations

import dataclasses
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time

_VIOLATION_EXIT = 86
_VIOLATION_MARK = "kvcomm-sandbox-violation: "
_SNIPPET = "snippet.py"
_STDIN = "stdin.txt"
_FILE_SIZE_LIMIT = 16 << 20

# Runs in the child as `python -I -B -c _PRELUDE <sandbox dir> <cpu s> <memory MiB> <fsize>`.
_PRELUDE = r'''
import os, resource, sys

def _limit(kind, value):
    resource.setrlimit(kind, (value, value))

_root = os.path.realpath(sys.argv[1])
_limit(resource.RLIMIT_CPU, int(sys.argv[2]))
_limit(resource.RLIMIT_AS, int(sys.argv[3]) << 20)
_limit(resource.RLIMIT_FSIZE, int(sys.argv[4]))
_limit(resource.RLIMIT_CORE, 0)

_DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")
_WRITE_ROOTS = (_root,)
_READ_ROOTS = _WRITE_ROOTS + tuple({os.path.realpath(p) for p in (
    sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix, *sys.path) if p})
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
_FORBIDDEN = frozenset((
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
    "subprocess.Popen", "os.kill", "os.killpg",
    "os.remove", "os.rename", "os.rmdir", "shutil.rmtree", "os.link", "os.symlink",
    "os.chmod", "os.chown", "os.chflags", "os.lchflags",
    "socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.getaddrinfo",
    "resource.setrlimit", "resource.prlimit",
))
# Importing these would reach a forbidden operation without its audit event.
_FORBIDDEN_IMPORTS = frozenset(("_posixsubprocess",))


def _inside(path, roots):
    if isinstance(path, int):
        return True  # an already open descriptor
    real = os.path.realpath(os.fsdecode(os.fspath(path)))
    return real in _DEVICES or any(real == r or real.startswith(r + os.sep) for r in roots)


def _refuse(what):
    try:
        sys.stdout.flush()
    finally:
        os.write(2, ("\n" + %(mark)r + what + "\n").encode("utf-8", "backslashreplace"))
        os._exit(%(code)d)


def _hook(event, args):
    if event == "open":
        path, _, flags = args
        writing = bool(flags & _WRITE_FLAGS)
        if not _inside(path, _WRITE_ROOTS if writing else _READ_ROOTS):
            action = "writing" if writing else "reading"
            _refuse("open(%%r) for %%s outside the sandbox" %% (path, action))
    elif event in ("os.mkdir", "os.truncate"):
        if not _inside(args[0], _WRITE_ROOTS):
            _refuse("%%s(%%r) outside the sandbox" %% (event, args[0]))
    elif event in _FORBIDDEN:
        _refuse(event + " is not allowed")
    elif event == "import" and args[0] in _FORBIDDEN_IMPORTS:
        _refuse("import of " + args[0] + " is not allowed")


sys.addaudithook(_hook)
sys.argv = [%(snippet)r]
import runpy
runpy.run_path(%(snippet)r, run_name="__main__")
''' % {"mark": _VIOLATION_MARK, "code": _VIOLATION_EXIT, "snippet": _SNIPPET}


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """Outcome of one `run_python` call.

    `returncode` is the snippet's exit status, or None when the sandbox killed it (timeout,
    output cap). `reason` is "ok" on success, otherwise a one-line explanation: the timeout,
    the output cap, the refused operation, or the last line of stderr (the exception).
    """

    ok: bool
    stdout: str
    stderr: str
    returncode: int | None
    timed_out: bool
    reason: str


def _clean_env(workdir: str) -> dict[str, str]:
    """The child's whole environment: nothing is inherited from the caller."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": workdir,
        "TMPDIR": workdir,
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_capped(proc: subprocess.Popen, deadline: float, cap: int):
    """Reads both pipes until EOF, the deadline or `cap` bytes on one of them.

    Returns (stdout bytes, stderr bytes, timed_out, overflow).
    """
    out, err = bytearray(), bytearray()
    bufs = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
    timed_out = overflow = False
    with selectors.DefaultSelector() as sel:
        for fd in bufs:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map() and not overflow:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            for key, _ in sel.select(remaining):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                buf = bufs[key.fd]
                buf += chunk[: cap + 1 - len(buf)]
                if len(buf) > cap:
                    del buf[cap:]
                    overflow = True
                    break
    return bytes(out), bytes(err), timed_out, overflow


def _failure_reason(returncode: int, stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    if lines and lines[-1].startswith(_VIOLATION_MARK):
        return "sandbox violation: " + lines[-1][len(_VIOLATION_MARK):]
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return lines[-1].strip() if lines else f"exit code {returncode}"


def run_python(
    code: str,
    *,
    stdin: str = "",
    timeout_s: float = 5.0,
    max_output_bytes: int = 64_000,
    memory_mb: int = 512,
) -> SandboxResult:
    """Runs `code` as a script in a restricted child process; see the module docstring.

    Args:
      code: Python source, run as ``__main__``.
      stdin: text fed to the snippet's standard input.
      timeout_s: wall-clock limit; the process group is killed when it passes.
      max_output_bytes: at most this many bytes are kept per stream; more kills the child.
      memory_mb: address-space limit of the child.
    """
    if timeout_s <= 0 or max_output_bytes <= 0 or memory_mb <= 0:
        raise ValueError("timeout_s, max_output_bytes and memory_mb must be positive")
    workdir = tempfile.mkdtemp(prefix="kvcomm_sandbox_")
    try:
        with open(os.path.join(workdir, _SNIPPET), "w", encoding="utf-8") as f:
            f.write(code)
        with open(os.path.join(workdir, _STDIN), "w", encoding="utf-8") as f:
            f.write(stdin)
        cpu_s = int(timeout_s) + 1
        argv = [sys.executable, "-I", "-B", "-c", _PRELUDE, workdir, str(cpu_s), str(memory_mb),
                str(_FILE_SIZE_LIMIT)]
        deadline = time.monotonic() + timeout_s
        with open(os.path.join(workdir, _STDIN), "rb") as stdin_file:
            proc = subprocess.Popen(
                argv, stdin=stdin_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                cwd=workdir, env=_clean_env(workdir), start_new_session=True)
        try:
            out, err, timed_out, overflow = _read_capped(proc, deadline, max_output_bytes)
            if not (timed_out or overflow):
                try:
                    proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    timed_out = True
        finally:
            _kill_group(proc)
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    stdout = out.decode("utf-8", "replace")
    stderr = err.decode("utf-8", "replace")
    if timed_out:
        return SandboxResult(False, stdout, stderr, None, True, f"timed out after {timeout_s:g} s")
    if overflow:
        return SandboxResult(False, stdout, stderr, None, False,
                             f"output exceeded {max_output_bytes} bytes")
    if proc.returncode == 0:
        return SandboxResult(True, stdout, stderr, 0, False, "ok")
    return SandboxResult(False, stdout, stderr, proc.returncode, False,
                         _failure_reason(proc.returncode, stderr))
