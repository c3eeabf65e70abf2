"""Joining a multi-process (multi-host) JAX job.

Every process runs the same program; after :func:`maybe_initialize_distributed`,
``jax.devices()`` lists the devices of all processes and a mesh from
:func:`kvcomm_jax.scale.sharding.make_mesh` spans them. On CPU, cross-process
collectives go through Gloo over TCP (``jax_cpu_collectives_implementation``;
"gloo" is also JAX 0.10's default, set here explicitly so it does not depend on it).
"""

from __future__ import annotations

import os

import jax

ENV_COORDINATOR = "KVCOMM_COORDINATOR"
ENV_NUM_PROCESSES = "KVCOMM_NUM_PROCESSES"
ENV_PROCESS_ID = "KVCOMM_PROCESS_ID"


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


def maybe_initialize_distributed(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None) -> bool:
    """Call ``jax.distributed.initialize`` once, if a coordinator is configured.

    Each argument falls back to its environment variable: ``KVCOMM_COORDINATOR``
    (``host:port`` of process 0), ``KVCOMM_NUM_PROCESSES``, ``KVCOMM_PROCESS_ID``.
    With no coordinator this is a no-op (single process). Must run before
    anything touches a JAX backend. Returns True when this process is part of a
    multi-process job (now or from an earlier call).
    """
    coordinator = _setting(coordinator, ENV_COORDINATOR, str)
    num_processes = _setting(num_processes, ENV_NUM_PROCESSES, int)
    process_id = _setting(process_id, ENV_PROCESS_ID, int)
    if jax.distributed.is_initialized():
        return True
    if coordinator is None:
        if num_processes is not None or process_id is not None:
            raise ValueError(f"a process count or id is set but no coordinator ({ENV_COORDINATOR} or coordinator=)")
        return False
    if num_processes is None or process_id is None:
        raise ValueError(
            f"coordinator {coordinator!r} is set; also set the process count and id "
            f"({ENV_NUM_PROCESSES}, {ENV_PROCESS_ID} or num_processes=, process_id=)"
        )
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process id {process_id} is outside [0, {num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    return True
