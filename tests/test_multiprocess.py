"""Two CPU processes x 4 devices join one 8-device mesh; sharded prefill + KVCOMM offset match one process."""

import jax
import numpy as np
import pytest
from multiprocess_worker import make_case, run_reference
from processes import python, run_job

from kvcomm_jax.scale.distributed import maybe_initialize_distributed

NUM_PROCESSES, LOCAL_DEVICES, TIMEOUT_S = 2, 4, 120


@pytest.mark.parametrize("env, message", [
    ({}, None),  # nothing configured: single process, no-op
    ({"KVCOMM_NUM_PROCESSES": "2"}, "no coordinator"),
    ({"KVCOMM_COORDINATOR": "127.0.0.1:1", "KVCOMM_NUM_PROCESSES": "2"}, "also set the process count and id"),
    ({"KVCOMM_COORDINATOR": "127.0.0.1:1", "KVCOMM_NUM_PROCESSES": "2", "KVCOMM_PROCESS_ID": "2"}, "outside"),
    ({"KVCOMM_COORDINATOR": "127.0.0.1:1", "KVCOMM_NUM_PROCESSES": "two", "KVCOMM_PROCESS_ID": "0"}, "not a valid int"),
    ({"KVCOMM_COORDINATOR": "127.0.0.1:1", "KVCOMM_NUM_PROCESSES": "2", "KVCOMM_PROCESS_ID": "0",
      "KVCOMM_HEARTBEAT_TIMEOUT_S": "-5"}, "at least 1 s"),
])
def test_distributed_settings(monkeypatch, env, message):
    for name in ("KVCOMM_COORDINATOR", "KVCOMM_NUM_PROCESSES", "KVCOMM_PROCESS_ID", "KVCOMM_HEARTBEAT_TIMEOUT_S"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if message is None:
        assert maybe_initialize_distributed() is False
    else:
        with pytest.raises(ValueError, match=message):
            maybe_initialize_distributed()


def test_auto_coordinator_leaves_discovery_to_jax(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(jax.config, "update", lambda *args: None)
    for name in ("KVCOMM_NUM_PROCESSES", "KVCOMM_PROCESS_ID", "KVCOMM_HEARTBEAT_TIMEOUT_S"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KVCOMM_COORDINATOR", "auto")
    assert maybe_initialize_distributed(heartbeat_timeout_s=15) is True
    assert calls == [{"num_processes": None, "process_id": None, "heartbeat_timeout_seconds": 15}]


def test_two_processes_match_single_process(tmp_path):
    job = run_job(python("multiprocess_worker.py", tmp_path), tmp_path, num_processes=NUM_PROCESSES, local_devices=LOCAL_DEVICES,
                  timeout_s=TIMEOUT_S)
    job.check()

    expected = run_reference(make_case())
    for i in range(NUM_PROCESSES):
        got = np.load(tmp_path / f"process_{i}.npz")
        assert (int(got["process_count"]), int(got["local_devices"]), int(got["global_devices"])) == (2, 4, 8)
        for name, want in expected.items():
            np.testing.assert_allclose(got[name], np.asarray(want), rtol=1e-5, atol=1e-5, err_msg=f"process {i}: {name}")
