"""`run.py pipeline` as one program over two processes: the same JSON as one process on one
device, written by process 0 alone; a process killed mid-run stops the other within a bound."""

import json
import os
import subprocess
import sys

import pytest
from processes import ROOT, device_env, run_job
from test_weights import VOCAB, checkpoint_tensors, random_params, write_gguf

from kvcomm_jax.bench.reporting import run_outcome
from kvcomm_jax.model.config import tiny_config

LAUNCHER = os.path.join(ROOT, "scripts", "launch_local.sh")
HEARTBEAT_S = 10
JOB = ["pipeline", "--task", "gsm8k", "--agents", "3", "--mode", "both", "--limit", "4", "--batch-size", "4",
       "--max-new-tokens", "6", "--fidelity-tokens", "4", "--exact-question", "--recompute-ratio", "0.1"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny random llama GGUF with 2 KV heads (split over model=2)."""
    config = tiny_config(vocab_size=VOCAB, max_position_embeddings=4096)
    path = tmp_path_factory.mktemp("model") / "tiny.gguf"
    return write_gguf(path, "llama", config, checkpoint_tensors(config, random_params(config, seed=3), hf=False))


def _launch(num_processes: int, devices: int, args: list[str]) -> subprocess.CompletedProcess:
    """``scripts/launch_local.sh`` running ``run.py args`` on ``num_processes`` processes."""
    return subprocess.run(
        ["bash", LAUNCHER, str(num_processes), "--devices-per-process", str(devices), "--", *args],
        env=device_env(devices, PYTHON=sys.executable), cwd=ROOT, capture_output=True, text=True, timeout=600,
    )


def test_two_processes_write_what_one_device_writes(tmp_path, model):
    one = subprocess.run(
        [sys.executable, "run.py", *JOB, "--model", model, "--json", str(tmp_path / "one.json")],
        env=device_env(1), cwd=ROOT,
        capture_output=True, text=True, timeout=600,
    )
    assert one.returncode == 0, one.stderr[-4000:]
    two = _launch(2, 2, [*JOB, "--model", model, "--mesh", "data=2,model=2", "--json", str(tmp_path / "two.json")])
    assert two.returncode == 0, (two.stdout + two.stderr)[-4000:]
    lines = two.stdout.splitlines()
    assert any(line.startswith(f"[0] wrote {tmp_path / 'two.json'}") for line in lines)
    assert not any(line.startswith("[1]") and ("wrote" in line or "| mode |" in line) for line in lines)  # process 1 reports nothing
    with open(tmp_path / "one.json") as f:
        want = json.load(f)
    with open(tmp_path / "two.json") as f:
        got = json.load(f)
    assert got["mesh"] == "data=2,model=2"
    paths = {r["path"] for q in want["calls"]["kvcomm"] for r in q["records"]}
    assert paths - {"dense"}, f"the case must reuse something to compare reuse, got paths {paths}"
    assert run_outcome(got) == run_outcome(want)


def test_killed_process_stops_the_other(tmp_path, model):
    job = run_job(
        [sys.executable, "run.py", *JOB, "--limit", "16", "--max-new-tokens", "32", "--model", model, "--mesh", "data=2,model=2"],
        tmp_path, local_devices=2, timeout_s=240, kill_when=(1, "gsm8k (dense+kvcomm)"), KVCOMM_HEARTBEAT_TIMEOUT_S=str(HEARTBEAT_S),
    )
    assert job.killed_s is not None, "the run ended before process 1 could be killed"
    assert job.returncodes[1] == -9
    assert job.returncodes[0] != 0, job.logs[0][-3000:]
    assert job.ended_s[0] - job.killed_s < 3 * HEARTBEAT_S + 30, "the survivor took too long to notice"
    assert "process 0 of 2 failed" in job.logs[0] or "heartbeat" in job.logs[0], job.logs[0][-3000:]
