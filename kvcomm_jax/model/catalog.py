"""The models this installation knows by name: where each comes from, its architecture, whether it is here now.

Only checkpoint metadata is read (a GGUF file's key-value header through the memory-mapped
reader, a Hugging Face directory's ``config.json``), never weights. The reader parses every
key-value field, the token list included, so a GGUF file with a large vocabulary still takes
seconds.
"""

from __future__ import annotations

import dataclasses
import json
import os

from kvcomm_jax.model.registry import KNOWN_MODELS, KnownModel
from kvcomm_jax.model.weights.gguf_loader import open_gguf


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """One known model as it stands in this installation.

    source: the command that gets it (or "local path"); path and architecture: its checkpoint
    and the architecture its metadata declares, None when it is not available; problem: why
    it is not available.
    """

    name: str
    source: str
    available: bool
    architecture: str | None = None
    path: str | None = None
    problem: str | None = None


def checkpoint_architecture(path: str) -> str:
    """The architecture a checkpoint declares: a GGUF file's ``general.architecture``, a HF directory's ``model_type``.

    A GGUF file is opened by the loader's own function, so a missing or corrupt one is reported
    as ``load_model`` reports it.
    """
    if path.endswith(".gguf"):
        field = open_gguf(path).fields.get("general.architecture")
        if field is None:
            raise ValueError(f"GGUF file {path} lacks metadata general.architecture")
        return field.contents()
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        raise FileNotFoundError(f"{path} is neither a .gguf file nor a directory with config.json")
    with open(config, encoding="utf-8") as f:
        model_type = json.load(f).get("model_type")
    if model_type is None:
        raise ValueError(f"{config} has no model_type")
    return model_type


def describe_model(name: str, model: KnownModel) -> ModelInfo:
    """``model`` available when its checkpoint exists and its metadata reads; otherwise the reason it is not."""
    try:
        path = model.path()
        architecture = checkpoint_architecture(path)
    except (FileNotFoundError, ValueError) as err:
        return ModelInfo(name, model.source, available=False, problem=str(err))
    return ModelInfo(name, model.source, available=True, architecture=architecture, path=path)


def describe_models() -> list[ModelInfo]:
    """Every model of ``KNOWN_MODELS``, in its order."""
    return [describe_model(name, model) for name, model in KNOWN_MODELS.items()]
