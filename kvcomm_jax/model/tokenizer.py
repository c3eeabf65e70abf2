"""Text <-> token ids, backed by a Hugging Face ``tokenizers.Tokenizer``.

Built either from GGUF metadata (byte-level BPE: ``tokenizer.ggml.tokens``,
``.merges``, ``.token_type``, ``.pre``) or from a ``tokenizer.json`` directory.
Special tokens written in the text (``<|im_start|>``) encode to their ids; a BOS
id is prepended only when the checkpoint says ``add_bos_token``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

# Pre-tokenizer regexes of llama.cpp's ``tokenizer.ggml.pre`` types (same as the HF tokenizer.json files).
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _split_then_bytes(regex: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


_PRE_TOKENIZERS = {
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),
    "smollm": lambda: pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    ),
    "qwen2": lambda: _split_then_bytes(_QWEN2_REGEX),
    "llama-bpe": lambda: _split_then_bytes(_LLAMA3_REGEX),
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def _bpe_from_gguf(meta: Mapping[str, Any]) -> tokenizers.Tokenizer:
    """A byte-level BPE ``tokenizers.Tokenizer`` from GGUF ``tokenizer.ggml.*`` metadata."""
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"unsupported GGUF tokenizer model {model!r} (supported: byte-level BPE 'gpt2')")
    pre = meta.get("tokenizer.ggml.pre", "gpt-2")
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r} (supported: {', '.join(_PRE_TOKENIZERS)})")
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    backend = tokenizers.Tokenizer(
        models.BPE({tok: i for i, tok in enumerate(tokens)}, merges, ignore_merges=pre == "llama-bpe")
    )
    backend.pre_tokenizer = _PRE_TOKENIZERS[pre]()
    backend.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type", [])
    backend.add_tokens(
        [AddedToken(tokens[i], special=t == _CONTROL, normalized=False) for i, t in enumerate(types)
         if t in (_CONTROL, _USER_DEFINED)]
    )
    return backend


def _token_text(token: str | Mapping | None) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as {"content": ...}."""
    return token.get("content") if isinstance(token, Mapping) else token


class Tokenizer:
    """Encodes text to ids and back; knows the ids that end a generation (``eos_ids``)."""

    def __init__(self, backend: tokenizers.Tokenizer, eos_ids: Iterable[int], bos_id: int | None = None,
                 add_bos: bool = False):
        self.backend = backend
        self.eos_ids: tuple[int, ...] = tuple(dict.fromkeys(int(i) for i in eos_ids))
        self.bos_id = bos_id
        self.add_bos = add_bos

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], end_tokens: Sequence[str] = ()) -> "Tokenizer":
        """From GGUF metadata; ``end_tokens`` (the chat turn end, e.g. ``<|im_end|>``) join the EOS ids."""
        backend = _bpe_from_gguf(meta)
        eos = [meta["tokenizer.ggml.eos_token_id"]] if "tokenizer.ggml.eos_token_id" in meta else []
        return cls(
            backend,
            eos + _ids_of(backend, end_tokens),
            bos_id=meta.get("tokenizer.ggml.bos_token_id"),
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        )

    @classmethod
    def from_hf_files(cls, tokenizer_json: str, tokenizer_config: Mapping[str, Any], eos_ids: Iterable[int] = (),
                      end_tokens: Sequence[str] = ()) -> "Tokenizer":
        """From a ``tokenizer.json`` file and the parsed ``tokenizer_config.json`` (BOS/EOS tokens).

        ``eos_ids`` (from ``config.json`` / ``generation_config.json``) and ``end_tokens``
        join the config's EOS token.
        """
        if not os.path.isfile(tokenizer_json):
            raise FileNotFoundError(f"tokenizer file not found: {tokenizer_json}")
        backend = tokenizers.Tokenizer.from_file(tokenizer_json)
        eos = _ids_of(backend, [_token_text(tokenizer_config.get("eos_token")), *end_tokens])
        bos = _ids_of(backend, [_token_text(tokenizer_config.get("bos_token"))])
        return cls(
            backend,
            [*eos_ids, *eos],
            bos_id=bos[0] if bos else None,
            add_bos=bool(tokenizer_config.get("add_bos_token", False)),
        )

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; prepends BOS only if ``add_bos`` and the text does not start with it."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if self.add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token_id(self, token: str) -> int:
        """Id of the single token ``token``; KeyError if it is not in the vocabulary."""
        idx = self.backend.token_to_id(token)
        if idx is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return idx


def _ids_of(backend: tokenizers.Tokenizer, tokens: Iterable[str | None]) -> list[int]:
    """Ids of those ``tokens`` that are given and in the vocabulary."""
    return [i for i in (backend.token_to_id(t) for t in tokens if t) if i is not None]
