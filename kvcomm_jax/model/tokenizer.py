"""Text <-> token ids, backed by a Hugging Face ``tokenizers.Tokenizer``.

Built from GGUF metadata (llama.cpp's byte-level BPE, ``tokenizer.ggml.model ==
"gpt2"``, or its SentencePiece vocabulary, ``"llama"``) or from a ``tokenizer.json``
directory. Special tokens written in the text (``<|im_start|>``) encode to their ids.

A prompt is tokenized either whole (:meth:`Tokenizer.encode`: a BOS first when the
checkpoint adds one) or piece by piece: its first piece with ``encode`` and every
later piece with :meth:`Tokenizer.encode_segment` (never a BOS), so a prompt built
from separately tokenized segments holds one BOS, at its start.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

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
# llama.cpp token types. Unknown, control and user-defined tokens are matched whole in the
# text before any merging; the first two are special (dropped by ``decode(skip_special=True)``).
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4
_WHOLE = (_UNKNOWN, _CONTROL, _USER_DEFINED)
_SPACE = "\u2581"  # "▁", how SentencePiece writes a space


def _whole_tokens(tokens: Sequence[str], types: Sequence[int]) -> list[AddedToken]:
    """The tokens matched whole in the raw text (before normalization), as added tokens."""
    return [AddedToken(tokens[i], special=t != _USER_DEFINED, normalized=False) for i, t in enumerate(types)
            if t in _WHOLE]


def _bpe_from_gguf(meta: Mapping[str, Any]) -> tokenizers.Tokenizer:
    """A byte-level BPE ``tokenizers.Tokenizer`` from GGUF ``tokenizer.ggml.*`` metadata."""
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
    backend.add_tokens(_whole_tokens(tokens, meta.get("tokenizer.ggml.token_type", [])))
    return backend


def _merges_by_score(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int]) -> list[tuple[str, str]]:
    """Every split of a mergeable token into two tokens, the splits of higher-scoring tokens first."""
    vocab = set(tokens)
    ranked = sorted(
        (-scores[i], i, cut)
        for i, token in enumerate(tokens) if types[i] not in _WHOLE
        for cut in range(1, len(token)) if token[:cut] in vocab and token[cut:] in vocab
    )
    return [(tokens[i][:cut], tokens[i][cut:]) for _, i, cut in ranked]


def _sentencepiece_from_gguf(meta: Mapping[str, Any]) -> tokenizers.Tokenizer:
    """llama.cpp's SentencePiece tokenizer as a ``tokenizers.Tokenizer``.

    llama.cpp splits the text into characters and repeatedly merges the adjacent pair
    whose concatenation is the highest-scoring token; a BPE whose merges build each
    token from two tokens, ranked by the built token's score, makes the same choices
    (but for ties between two splits of one token, which llama.cpp breaks by position).
    Characters outside the vocabulary become their UTF-8 byte tokens ``<0xNN>``; spaces
    are written "▁", and a "▁" starts the text and follows each special token when
    ``add_space_prefix`` is set.
    """
    if "tokenizer.ggml.scores" not in meta or "tokenizer.ggml.token_type" not in meta:
        raise ValueError("a SentencePiece GGUF vocabulary needs tokenizer.ggml.scores and tokenizer.ggml.token_type")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    unknown = meta.get("tokenizer.ggml.unknown_token_id")
    backend = tokenizers.Tokenizer(models.BPE(
        {tok: i for i, tok in enumerate(tokens)},
        _merges_by_score(tokens, meta["tokenizer.ggml.scores"], types),
        unk_token=None if unknown is None else tokens[unknown],
        byte_fallback=True,
    ))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))  # llama.cpp's default
    escape = normalizers.Replace(" ", _SPACE)
    backend.normalizer = normalizers.Sequence([normalizers.Prepend(_SPACE), escape]) if prefix else escape
    backend.decoder = decoders.Sequence([
        decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
        *([decoders.Strip(" ", 1, 0)] if prefix else []),
    ])
    backend.add_tokens(_whole_tokens(tokens, types))
    return backend


# tokenizer.ggml.model -> (builder, llama.cpp's add_bos_token default)
_GGUF_MODELS = {
    "gpt2": (_bpe_from_gguf, False),
    "llama": (_sentencepiece_from_gguf, True),
}


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
        self.prefixes_space = _prefixes_space(backend)

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], end_tokens: Sequence[str] = ()) -> "Tokenizer":
        """From GGUF metadata; ``end_tokens`` (the chat turn end, e.g. ``<|im_end|>``) join the EOS ids.

        A byte-level BPE (``tokenizer.ggml.model == "gpt2"``) or a SentencePiece
        vocabulary (``"llama"``); ``add_bos_token`` defaults as in llama.cpp (on for
        SentencePiece, off for BPE).
        """
        model = meta.get("tokenizer.ggml.model")
        if model not in _GGUF_MODELS:
            raise ValueError(
                f"unsupported GGUF tokenizer model {model!r} (supported: 'gpt2' byte-level BPE, 'llama' SentencePiece)"
            )
        build, adds_bos = _GGUF_MODELS[model]
        backend = build(meta)
        eos = [meta["tokenizer.ggml.eos_token_id"]] if "tokenizer.ggml.eos_token_id" in meta else []
        return cls(
            backend,
            eos + _ids_of(backend, end_tokens),
            bos_id=meta.get("tokenizer.ggml.bos_token_id"),
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", adds_bos)),
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
        """Token ids of the prompt ``text``: BOS first if ``add_bos`` and the text does not start with it."""
        return self.with_bos(self.backend.encode(text, add_special_tokens=False).ids)

    def with_bos(self, ids: Sequence[int]) -> list[int]:
        """``ids`` as the start of a prompt: BOS first if ``add_bos`` and they do not start with it."""
        if self.add_bos and self.bos_id is not None and list(ids[:1]) != [self.bos_id]:
            return [self.bos_id, *ids]
        return list(ids)

    def encode_segment(self, text: str) -> list[int]:
        """Token ids of ``text`` as a piece that continues a prompt after other text: never a BOS.

        A prompt tokenized piece by piece is ``encode(first) + encode_segment(second) + ...``.
        Raises ValueError for a tokenizer that writes a space before every text
        (SentencePiece ``add_space_prefix``): it would give a piece a space it does not
        have inside the prompt.
        """
        self._check_segmentable()
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_between(self, before: str, text: str, after: str) -> list[int] | None:
        """Token ids of ``text`` where it stands in ``before + text + after`` (no BOS).

        None if a token spans an edge of ``text``. Neighbours can change how a text's
        edges tokenize even when no token crosses them: byte-level BPE keeps a trailing
        "\\n\\n" one token only at the very end of a text.
        """
        self._check_segmentable()
        start, end = len(before), len(before) + len(text)
        encoding = self.backend.encode(before + text + after, add_special_tokens=False)
        inside = []
        for token, (first, last) in zip(encoding.ids, encoding.offsets):
            if first < start < last or first < end < last:
                return None
            if start <= first and last <= end:
                inside.append(token)
        return inside

    def _check_segmentable(self) -> None:
        """Raise ValueError if a piece's ids depend on whether it starts the text (a space prefix)."""
        if self.prefixes_space:
            raise ValueError(
                "this tokenizer writes a space before the start of every text (SentencePiece add_space_prefix), so a "
                "piece tokenized on its own differs from the same text inside a prompt: segment-wise tokenization "
                "is not supported for it"
            )

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token_id(self, token: str) -> int:
        """Id of the single token ``token``; KeyError if it is not in the vocabulary."""
        idx = self.backend.token_to_id(token)
        if idx is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return idx


def _prefixes_space(backend: tokenizers.Tokenizer) -> bool:
    """Whether ``backend`` writes a space before the start of a text (a "▁" or "Ġ" before "a")."""
    text = backend.normalizer.normalize_str("a") if backend.normalizer else "a"
    if backend.pre_tokenizer:
        text = "".join(piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text))
    return text != "a"


def _ids_of(backend: tokenizers.Tokenizer, tokens: Iterable[str | None]) -> list[int]:
    """Ids of those ``tokens`` that are given and in the vocabulary."""
    return [i for i in (backend.token_to_id(t) for t in tokens if t) if i is not None]
