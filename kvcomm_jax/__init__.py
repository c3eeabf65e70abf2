"""kvcomm-jax: KV-cache communication (KVCOMM) for multi-agent LLM pipelines in JAX."""

from kvcomm_jax.engine import MODES, EngineConfig, KVCommEngine, Request
from kvcomm_jax.model_registry import LoadedModel, load_model
from kvcomm_jax.templates import AgentPrompt

__all__ = ["MODES", "AgentPrompt", "EngineConfig", "KVCommEngine", "LoadedModel", "Request", "load_model"]
