"""kvcomm-jax: KV-cache communication (KVCOMM) for multi-agent LLM pipelines in JAX."""

from kvcomm_jax.kvcomm.engine import MODES, EngineConfig, KVCommEngine, Request
from kvcomm_jax.kvcomm.templates import AgentPrompt
from kvcomm_jax.model.registry import LoadedModel, load_model

__all__ = ["MODES", "AgentPrompt", "EngineConfig", "KVCommEngine", "LoadedModel", "Request", "load_model"]
