"""A tiny random-weight model with a tiny in-memory ChatML tokenizer, for fast tests and examples.

Nothing here reads a checkpoint. The tokenizer is a byte-level BPE built from
GGUF-style metadata and loaded by :meth:`Tokenizer.from_gguf_metadata`, exactly as
a GGUF file's tokenizer is: 256 byte tokens (so any text round-trips), the ChatML
special tokens at SmolLM2's ids, and merges that make each word of a small English
vocabulary one token, so prompts have word-level lengths like a real tokenizer's.
"""

from __future__ import annotations

import functools

from tokenizers import pre_tokenizers

from kvcomm_jax.model.chat_format import ChatFormat
from kvcomm_jax.model.config import tiny_config
from kvcomm_jax.model.registry import LoadedModel
from kvcomm_jax.model.tokenizer import Tokenizer
from kvcomm_jax.model.transformer import init_params

CHATML = ChatFormat("chatml")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2, as in SmolLM2
VOCAB_MULTIPLE = 64  # reserved control tokens pad the vocabulary so a sharded vocabulary axis divides evenly

# One token each after a space (" apples").
WORDS = """
a about after again all also am an and answer answered any apples are as at ate away be because been before
best big birds buy buys by can candies careful cat cats check correct cost could day decision did do does
dollars each eat far final first fly for four from further give go good had has have he her here his hour
hours how if in is it its just last left legs less let like loses many math maker may miles minutes money
more most much must my new next no not now number of on one only or other our out over pens per question
remain result should so solve solver some step task tell than that the their them then there these they
think this three time times to total train travels tree two up us use was we were what when which who will
with would year you your
""".split()
# One token each at the start of a line and after a space.
CAPITALIZED = """
A Agent Ann Answer Ben Give How If In It John Let Lisa Mary Question Sara Solve So The There This Tom What When You
""".split()
# One token each after <|im_start|>.
ROLES = ("system", "user", "assistant")

_CONTROL, _NORMAL = 3, 1  # llama.cpp token types
_BYTES = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)


def _byte_level(text: str) -> str:
    """``text`` in the byte-level alphabet (" the" -> "Ġthe")."""
    return _BYTES.pre_tokenize_str(text)[0][0]


def _chain_merges(pieces: list[str]) -> list[tuple[str, str]]:
    """Merges building each piece left to right (``Ġt h``, ``Ġth e``), in order, without repeats.

    A merge's result is its left part plus one character, so distinct merges make
    distinct tokens.
    """
    merges: dict[tuple[str, str], None] = {}
    for piece in pieces:
        for end in range(2, len(piece) + 1):
            merges.setdefault((piece[: end - 1], piece[end - 1]), None)
    return list(merges)


def tiny_tokenizer_metadata() -> dict:
    """GGUF ``tokenizer.ggml.*`` metadata of the tiny tokenizer (a SmolLM2-style byte-level BPE).

    Merges of pieces that start with a space rank first, so BPE finishes such a
    chain before any other merge can cut into it; and as a space only starts a
    pre-tokenized piece, those merges apply nowhere else.
    """
    spaced = [_byte_level(" " + w) for w in [*WORDS, *CAPITALIZED]]
    bare = [_byte_level(w) for w in [*CAPITALIZED, *ROLES]]
    merges = _chain_merges(spaced + bare)
    tokens = [*SPECIAL_TOKENS, *sorted(pre_tokenizers.ByteLevel.alphabet()), *(a + b for a, b in merges)]
    padding = -len(tokens) % VOCAB_MULTIPLE
    reserved = [f"<|reserved_{i}|>" for i in range(padding)]
    specials = {*SPECIAL_TOKENS, *reserved}
    tokens += reserved
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": [f"{a} {b}" for a, b in merges],
        "tokenizer.ggml.token_type": [_CONTROL if t in specials else _NORMAL for t in tokens],
        "tokenizer.ggml.bos_token_id": tokens.index("<|im_start|>"),
        "tokenizer.ggml.eos_token_id": tokens.index("<|im_end|>"),
        "tokenizer.ggml.add_bos_token": False,
    }


@functools.cache
def tiny_tokenizer() -> Tokenizer:
    """The tiny ChatML tokenizer (a few hundred ids); generation ends at ``<|im_end|>``."""
    return Tokenizer.from_gguf_metadata(tiny_tokenizer_metadata(), end_tokens=(CHATML.end_token,))


def tiny_loaded_model(seed: int = 0, **config_overrides) -> LoadedModel:
    """A 3-layer random model with the tiny tokenizer and the ChatML format; reads no checkpoint."""
    tokenizer = tiny_tokenizer()
    overrides = {"vocab_size": tokenizer.vocab_size, "max_position_embeddings": 4096}
    overrides.update(config_overrides)
    config = tiny_config(**overrides)
    return LoadedModel(config, init_params(config, seed), tokenizer, CHATML, source=f"tiny-random-{seed}")
