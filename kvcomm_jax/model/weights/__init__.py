"""Checkpoint loading into the params pytree laid out by :func:`param_shapes`.

``gguf_loader.load_gguf`` reads llama.cpp GGUF files and ``hf_loader.load_hf_dir``
reads Hugging Face ``config.json`` + ``*.safetensors`` directories. The parameter table
(:mod:`kvcomm_jax.model.params`) names the checkpoint tensor behind every params leaf;
each loader hands a reader to :func:`assemble_params`, which does the work they share:
transposing ``[out, in]`` matrices to ``[in, out]`` kernels, stacking layers on axis 0,
checking shapes and casting.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import jax.numpy as jnp
import numpy as np

from kvcomm_jax.model.config import ModelConfig
from kvcomm_jax.model.params import Param, params_tree


def assemble_params(
    config: ModelConfig,
    checkpoint: Literal["hf", "gguf"],
    read: Callable[[Param, str], np.ndarray],
    dtype: str,
    source: str,
) -> dict:
    """Build the params pytree of ``config`` from checkpoint tensors.

    Args:
      checkpoint: which name of each :class:`Param` row the checkpoint uses.
      read: (row, tensor name) -> float32 array as stored: ``[out, in]`` for linear
        weights, ``[V, E]`` for the embedding, ``[n]`` for norms and biases; raises
        KeyError for a tensor the checkpoint lacks.
      dtype: "float32" or "bfloat16"; each leaf is cast as it is filled, so a
        float32 copy of a whole stacked leaf never exists.
      source: describes the checkpoint in error messages.

    Returns:
      Nested dict of numpy arrays shaped exactly as ``param_shapes(config)``; layer
      leaves are stacked ``[L, ...]`` and kernels are ``[in, out]``.
    """
    target = jnp.dtype(dtype)

    def fetch(param: Param, name: str, shape: tuple) -> np.ndarray:
        try:
            w = read(param, name)
        except KeyError:
            raise ValueError(f"{source} is missing tensor {name!r}") from None
        if param.transpose:
            w = w.T
        if w.shape != tuple(shape):
            raise ValueError(f"{source}: tensor {name!r} has shape {w.shape}, expected {tuple(shape)}")
        return w

    def leaf(param: Param) -> np.ndarray:
        shape, name = param.shape(config), param.checkpoint_name(checkpoint, config)
        if not param.layered:
            return np.array(fetch(param, name, shape), dtype=target)
        stacked = np.empty(shape, dtype=target)
        for layer in range(shape[0]):
            stacked[layer] = fetch(param, name.format(layer=layer), shape[1:])
        return stacked

    return params_tree(config, leaf)


# The loaders import assemble_params from this package, so they come after it.
from kvcomm_jax.model.weights.gguf_loader import (  # noqa: E402
    SUPPORTED_GGUF_ARCHITECTURES,
    load_gguf,
    load_gguf_params,
)
from kvcomm_jax.model.weights.hf_loader import SUPPORTED_HF_MODEL_TYPES, load_hf_dir  # noqa: E402

__all__ = [
    "SUPPORTED_GGUF_ARCHITECTURES",
    "SUPPORTED_HF_MODEL_TYPES",
    "assemble_params",
    "load_gguf",
    "load_gguf_params",
    "load_hf_dir",
]
