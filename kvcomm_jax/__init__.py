"""kvcomm-jax: KV-cache communication (KVCOMM) for multi-agent LLM pipelines in JAX.

Sub-packages, top-down: ``agents`` (graphs, tasks, sandbox, pipelines) and ``bench``
(TTFT, fidelity, reporting) sit on ``kvcomm`` (the method: templates, segments,
anchor pools, matching, the reuse path, strategies, the engine), which sits on
``scale`` (mesh and sharding rules) and ``model`` (the transformer, caches,
generation, tokenizers, weights). The Pallas kernels are the top-level
``pallas_kernels`` package.

The names below are imported on first use: ``pallas_kernels`` imports
``kvcomm_jax.model.rope``, and the engine imports ``pallas_kernels``, so an eager import
of the engine here would make ``import pallas_kernels`` (before ``kvcomm_jax``) circular.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "MODES": "kvcomm_jax.kvcomm.engine",
    "EngineConfig": "kvcomm_jax.kvcomm.engine",
    "KVCommEngine": "kvcomm_jax.kvcomm.engine",
    "Request": "kvcomm_jax.kvcomm.engine",
    "STRATEGIES": "kvcomm_jax.kvcomm.strategies",
    "Dense": "kvcomm_jax.kvcomm.strategies",
    "KVComm": "kvcomm_jax.kvcomm.strategies",
    "RotateOnly": "kvcomm_jax.kvcomm.strategies",
    "AgentPrompt": "kvcomm_jax.kvcomm.templates",
    "LoadedModel": "kvcomm_jax.model.registry",
    "load_model": "kvcomm_jax.model.registry",
    "make_mesh": "kvcomm_jax.scale.sharding",
}

__all__ = [
    "MODES", "STRATEGIES", "AgentPrompt", "Dense", "EngineConfig", "KVComm", "KVCommEngine", "LoadedModel",
    "Request", "RotateOnly", "load_model", "make_mesh",
]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kvcomm_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
