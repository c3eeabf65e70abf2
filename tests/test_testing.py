"""The tiny test model and its in-memory ChatML tokenizer."""

import random
import string

import gguf
import pytest

from kvcomm_jax.model import registry
from kvcomm_jax.testing import (
    CAPITALIZED,
    CHATML,
    ROLES,
    SPECIAL_TOKENS,
    VOCAB_MULTIPLE,
    WORDS,
    tiny_loaded_model,
    tiny_tokenizer,
)

TEXTS = [
    "Tom has 3 apples and buys 5 more. How many apples does he have?",
    "Zebras quickly jumped over 12,345 lazy dogs; why?! (x+y)^2 = x^2 + 2xy + y^2",
    "  leading spaces,\ttabs\t\tand   runs   \n\n\nnewlines\r\n",
    "unicode: héllo ñandú 日本語 🙂",
    "",
]


def _random_ascii(seed: int, length: int = 200) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(string.printable) for _ in range(length))


@pytest.mark.parametrize("text", TEXTS + [_random_ascii(seed) for seed in range(5)])
def test_text_round_trips(text):
    tok = tiny_tokenizer()
    assert tok.decode(tok.encode(text)) == text


def test_chat_prompt_round_trips_with_special_tokens_as_single_ids():
    tok = tiny_tokenizer()
    assert [tok.token_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    for token in SPECIAL_TOKENS:
        assert tok.encode(token) == [tok.token_id(token)]
    prompt = CHATML.render([("system", "You are a careful math solver."), ("user", "How many apples?")])
    ids = tok.encode(prompt)
    assert tok.decode(ids) == prompt
    assert ids.count(tok.token_id("<|im_start|>")) == 3 and ids.count(tok.token_id("<|im_end|>")) == 2
    assert tok.decode(ids, skip_special=True) == prompt.replace("<|im_start|>", "").replace("<|im_end|>", "")


def test_generation_ends_at_the_chat_turn_end():
    tok = tiny_tokenizer()
    assert CHATML.end_token == "<|im_end|>"
    assert tok.eos_ids == (tok.token_id("<|im_end|>"),)
    assert tok.bos_id == tok.token_id("<|im_start|>") and not tok.add_bos
    assert tok.encode("hi")[0] != tok.bos_id


def test_vocabulary_words_are_single_tokens_and_others_split_into_pieces():
    tok = tiny_tokenizer()
    for word in WORDS + CAPITALIZED:
        assert len(tok.encode(" " + word)) == 1, word
    for word in CAPITALIZED + list(ROLES):
        assert len(tok.encode(word)) == 1, word
    assert len(tok.encode(" Tom has 3 apples.")) == 6  # " Tom", " has", " ", "3", " apples", "."
    assert len(tok.encode(" xylophone")) > 1


def test_vocabulary_is_small_and_padded_for_sharding():
    size = tiny_tokenizer().vocab_size
    assert 256 < size <= 1024 and size % VOCAB_MULTIPLE == 0


def test_tiny_model_reads_no_checkpoint(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint was read")

    monkeypatch.setattr(gguf, "GGUFReader", refuse)
    monkeypatch.setattr(registry, "_load", refuse)
    monkeypatch.setattr(registry, "_load_known", refuse)
    tiny_tokenizer.cache_clear()
    model = tiny_loaded_model(seed=1)
    assert model.config.vocab_size == model.tokenizer.vocab_size
    assert model.params["embed"]["embedding"].shape == (model.config.vocab_size, model.config.hidden_size)
    assert model.chat_format == CHATML and model.source == "tiny-random-1"
