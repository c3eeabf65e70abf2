"""Joining a multi-process (multi-host) JAX job.

Every process runs the same program; after :func:`maybe_initialize_distributed`,
``jax.devices()`` lists the devices of all processes and a mesh from
:func:`kvcomm_jax.scale.sharding.make_mesh` spans them. On CPU, cross-process
collectives go through Gloo over TCP (``jax_cpu_collectives_implementation``;
"gloo" is also JAX 0.10's default, set here explicitly so it does not depend on it).
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback

import jax
from jax.experimental import multihost_utils

ENV_COORDINATOR = "KVCOMM_COORDINATOR"
ENV_NUM_PROCESSES = "KVCOMM_NUM_PROCESSES"
ENV_PROCESS_ID = "KVCOMM_PROCESS_ID"
ENV_HEARTBEAT_TIMEOUT = "KVCOMM_HEARTBEAT_TIMEOUT_S"
DEFAULT_HEARTBEAT_TIMEOUT_S = 60
AUTO = "auto"  # KVCOMM_COORDINATOR=auto: let jax.distributed find the coordinator, count and index


def _setting(value, env: str, cast):
    if value is not None:
        return value
    raw = os.environ.get(env)
    if raw in (None, ""):
        return None
    try:
        return cast(raw)
    except ValueError:
        raise ValueError(f"{env}={raw!r} is not a valid {cast.__name__}") from None


def maybe_initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    heartbeat_timeout_s: int | None = None,
) -> bool:
    """Call ``jax.distributed.initialize`` once, if a coordinator is configured.

    Each argument falls back to its environment variable: ``KVCOMM_COORDINATOR``
    (``host:port`` of process 0, or ``auto`` for JAX's cluster detection, which also finds
    the count and id on TPU pods), ``KVCOMM_NUM_PROCESSES``, ``KVCOMM_PROCESS_ID``,
    ``KVCOMM_HEARTBEAT_TIMEOUT_S`` (default 60): a process silent that long is declared
    dead, and JAX's coordination service then terminates every other process with an
    error naming it, so a job never hangs on a lost process for longer than this.
    With no coordinator this is a no-op (single process). Must run before
    anything touches a JAX backend. Returns True when this process is part of a
    multi-process job (now or from an earlier call).
    """
    coordinator = _setting(coordinator, ENV_COORDINATOR, str)
    num_processes = _setting(num_processes, ENV_NUM_PROCESSES, int)
    process_id = _setting(process_id, ENV_PROCESS_ID, int)
    heartbeat_timeout_s = _setting(heartbeat_timeout_s, ENV_HEARTBEAT_TIMEOUT, int)
    if heartbeat_timeout_s is None:
        heartbeat_timeout_s = DEFAULT_HEARTBEAT_TIMEOUT_S
    if heartbeat_timeout_s < 1:
        raise ValueError(f"the heartbeat timeout must be at least 1 s, got {heartbeat_timeout_s}")
    if jax.distributed.is_initialized():
        return True
    if coordinator is None:
        if num_processes is not None or process_id is not None:
            raise ValueError(f"a process count or id is set but no coordinator ({ENV_COORDINATOR} or coordinator=)")
        return False
    if coordinator == AUTO:  # JAX's cluster detection (TPU pods, SLURM, ...) finds all three
        _initialize(heartbeat_timeout_s, num_processes=num_processes, process_id=process_id)
        return True
    if num_processes is None or process_id is None:
        raise ValueError(
            f"coordinator {coordinator!r} is set; also set the process count and id "
            f"({ENV_NUM_PROCESSES}, {ENV_PROCESS_ID} or num_processes=, process_id=)"
        )
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process id {process_id} is outside [0, {num_processes})")
    _initialize(heartbeat_timeout_s, coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    return True


def _initialize(heartbeat_timeout_s: int, **where) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**where, heartbeat_timeout_seconds=heartbeat_timeout_s)


def host_values(tree):
    """``jax.device_get(tree)`` that also works for arrays spread over other processes' devices.

    Arrays this process holds entirely (single-process runs, replicated results) are read
    directly, in one transfer; each array that spans non-addressable devices is gathered
    with :func:`jax.experimental.multihost_utils.process_allgather`, a collective, so every
    process must call this on the same arrays in the same order (the engine's control flow
    is the same on every process). Every process gets the same numpy values.
    """
    leaves, treedef = jax.tree.flatten(tree)
    spread = {i for i, x in enumerate(leaves) if isinstance(x, jax.Array) and not x.is_fully_addressable}
    local = iter(jax.device_get([x for i, x in enumerate(leaves) if i not in spread]))
    gathered = iter(multihost_utils.process_allgather([leaves[i] for i in sorted(spread)], tiled=True) if spread else ())
    return jax.tree.unflatten(treedef, [next(gathered) if i in spread else next(local) for i in range(len(leaves))])


def is_primary() -> bool:
    """Whether this process writes results: process 0 (the only process of a single-process run)."""
    return jax.process_index() == 0


@contextlib.contextmanager
def failing_together():
    """In a multi-process job, an exception in this process ends it at once.

    The others cannot go on without it: their next collective fails (the connection to
    this process closes) or, at the latest, the heartbeat timeout ends them with an
    error naming this process. Exiting here, after printing the traceback and one line
    saying which process failed, skips JAX's shutdown barrier, where a failed process
    would otherwise wait for peers that never arrive. Single-process runs re-raise as usual.
    """
    try:
        yield
    except Exception as err:
        if not jax.distributed.is_initialized() or jax.process_count() == 1:
            raise
        traceback.print_exc()
        first_line = (str(err).strip().splitlines() or [""])[0][:300]
        print(
            f"error: process {jax.process_index()} of {jax.process_count()} failed ({type(err).__name__}: {first_line}); "
            f"a multi-process job cannot continue without one of its processes, so all of them stop",
            file=sys.stderr, flush=True,
        )
        os._exit(1)
