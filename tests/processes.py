"""Starting the processes of a local multi-process JAX job from a test."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device_env(local_devices: int, **extra: str) -> dict:
    """This environment without ``KVCOMM_*`` settings, with ``local_devices`` CPU devices and the repository importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVCOMM_")}
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={local_devices}",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.path.join(ROOT, "tests"), env.get("PYTHONPATH")])),
        **extra,
    )
    return env


def job_env(port: int, num_processes: int, process_id: int, local_devices: int, **extra: str) -> dict:
    """The environment of process ``process_id`` of a job coordinated on ``port``."""
    return device_env(
        local_devices, KVCOMM_COORDINATOR=f"127.0.0.1:{port}", KVCOMM_NUM_PROCESSES=str(num_processes),
        KVCOMM_PROCESS_ID=str(process_id), **extra,
    )


@dataclasses.dataclass
class Finished:
    """What each process of a job did: exit statuses, outputs, seconds from the start to each exit and to the kill."""

    returncodes: list[int]
    logs: list[str]
    ended_s: list[float]
    killed_s: float | None = None

    def check(self) -> None:
        for i, (code, log) in enumerate(zip(self.returncodes, self.logs)):
            assert code == 0, f"process {i} exited with {code}:\n{log[-4000:]}"


def run_job(argv: list[str], log_dir, *, num_processes: int = 2, local_devices: int = 4, timeout_s: float = 300,
            kill_when: tuple[int, str] | None = None, **extra_env: str) -> Finished:
    """Run ``argv`` as every process of one job and wait for all of them (at most ``timeout_s``).

    ``kill_when = (i, text)``: SIGKILL process ``i`` as soon as any process has printed
    ``text``. Processes still running at the timeout are killed and the test fails.
    """
    port = free_port()
    logs = [open(os.path.join(log_dir, f"process_{i}.log"), "w+") for i in range(num_processes)]
    procs, start, killed_s = [], time.monotonic(), None
    try:
        for i in range(num_processes):
            procs.append(subprocess.Popen(
                argv, env=job_env(port, num_processes, i, local_devices, **extra_env), cwd=ROOT,
                stdout=logs[i], stderr=subprocess.STDOUT, start_new_session=True,
            ))
        ended = [None] * num_processes
        while any(e is None for e in ended):
            assert time.monotonic() - start < timeout_s, f"the job did not end within {timeout_s} s"
            if kill_when is not None and killed_s is None and any(kill_when[1] in _text(log) for log in logs):
                os.killpg(procs[kill_when[0]].pid, signal.SIGKILL)
                killed_s = time.monotonic() - start
            for i, p in enumerate(procs):
                if ended[i] is None and p.poll() is not None:
                    ended[i] = time.monotonic() - start
            time.sleep(0.05)
        return Finished([p.returncode for p in procs], [_text(log) for log in logs], ended, killed_s)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for log in logs:
            log.close()


def _text(log) -> str:
    log.flush()
    with open(log.name) as f:
        return f.read()


def python(script: str, *args) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "tests", script), *map(str, args)]
