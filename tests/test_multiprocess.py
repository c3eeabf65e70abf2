"""Two CPU processes x 4 devices join one 8-device mesh; sharded prefill + KVCOMM offset match one process."""

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from multiprocess_worker import make_case, run_reference

from kvcomm_jax.scale.distributed import maybe_initialize_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multiprocess_worker.py")
NUM_PROCESSES, LOCAL_DEVICES, TIMEOUT_S = 2, 4, 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(port: int, process_id: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVCOMM_")}
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={LOCAL_DEVICES}",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")])),
        KVCOMM_COORDINATOR=f"127.0.0.1:{port}",
        KVCOMM_NUM_PROCESSES=str(NUM_PROCESSES),
        KVCOMM_PROCESS_ID=str(process_id),
    )
    return env


@pytest.mark.parametrize("env, message", [
    ({}, None),  # nothing configured: single process, no-op
    ({"KVCOMM_NUM_PROCESSES": "2"}, "no coordinator"),
    ({"KVCOMM_COORDINATOR": "127.0.0.1:1", "KVCOMM_NUM_PROCESSES": "2"}, "also set the process count and id"),
    ({"KVCOMM_COORDINATOR": "127.0.0.1:1", "KVCOMM_NUM_PROCESSES": "2", "KVCOMM_PROCESS_ID": "2"}, "outside"),
    ({"KVCOMM_COORDINATOR": "127.0.0.1:1", "KVCOMM_NUM_PROCESSES": "two", "KVCOMM_PROCESS_ID": "0"}, "not a valid int"),
])
def test_distributed_settings(monkeypatch, env, message):
    for name in ("KVCOMM_COORDINATOR", "KVCOMM_NUM_PROCESSES", "KVCOMM_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if message is None:
        assert maybe_initialize_distributed() is False
    else:
        with pytest.raises(ValueError, match=message):
            maybe_initialize_distributed()


def test_two_processes_match_single_process(tmp_path):
    port = _free_port()
    logs = [open(tmp_path / f"process_{i}.log", "w+") for i in range(NUM_PROCESSES)]
    procs = []
    try:
        for i in range(NUM_PROCESSES):
            procs.append(subprocess.Popen(
                [sys.executable, WORKER, str(tmp_path)], env=_env(port, i), cwd=ROOT,
                stdout=logs[i], stderr=subprocess.STDOUT, start_new_session=True,
            ))
        deadline = time.monotonic() + TIMEOUT_S
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        for i, (p, log) in enumerate(zip(procs, logs)):
            log.seek(0)
            assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{log.read()[-4000:]}"
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for log in logs:
            log.close()

    expected = run_reference(make_case())
    for i in range(NUM_PROCESSES):
        got = np.load(tmp_path / f"process_{i}.npz")
        assert (int(got["process_count"]), int(got["local_devices"]), int(got["global_devices"])) == (2, 4, 8)
        for name, want in expected.items():
            np.testing.assert_allclose(got[name], np.asarray(want), rtol=1e-5, atol=1e-5, err_msg=f"process {i}: {name}")
