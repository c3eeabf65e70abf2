"""Tokenizer and chat format: a tiny byte-level vocabulary, plus the real SmolLM2 tokenizer."""

from __future__ import annotations

import pytest
from tokenizers import pre_tokenizers

from kvcomm_jax.model.chat_format import ChatFormat
from kvcomm_jax.model.tokenizer import Tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>"]
MERGES = ["Ġ t", "h e"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
)
TEXTS = [
    "Hello world",
    "digits 12345 and 3.14159",
    "unicode: héllo ñandú 日本語 Ελληνικά",
    "emoji 🙂👍🏽 and zwj 👨‍👩‍👧",
    "  leading spaces,\ttabs\t\tand   runs   \n\n\nnewlines\r\n",
    "",
]


def byte_level_metadata(pre: str = "smollm") -> dict:
    """GGUF tokenizer metadata for a 265-token byte-level BPE: 7 specials, 256 bytes, 2 merges."""
    tokens = SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()) + [m.replace(" ", "") for m in MERGES]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": MERGES,
        "tokenizer.ggml.token_type": [3 if t in SPECIALS else 1 for t in tokens],
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 0,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": CHATML_TEMPLATE,
    }


@pytest.mark.parametrize("pre", ["smollm", "qwen2", "llama-bpe", "gpt-2"])
def test_byte_level_round_trip(pre):
    tok = Tokenizer.from_gguf_metadata(byte_level_metadata(pre))
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text


def test_special_tokens_merges_and_eos():
    tok = Tokenizer.from_gguf_metadata(byte_level_metadata(), end_tokens=("<|im_end|>",))
    assert tok.vocab_size == 265
    assert tok.encode("<|im_start|>user") == [tok.token_id("<|im_start|>"), *tok.encode("user")]
    assert tok.encode(" the") == [tok.token_id("Ġt"), tok.token_id("he")]
    assert tok.eos_ids == (0, tok.token_id("<|im_end|>"))
    ids = tok.encode("<|im_start|>hi<|im_end|>")
    assert tok.decode(ids, skip_special=True) == "hi"
    with pytest.raises(KeyError, match="not in the vocabulary"):
        tok.token_id("<|nope|>")


@pytest.mark.parametrize("pre, pieces", [
    ("smollm", ["1", "2", "3", "4", "5"]),  # digits one by one, so the merge "1 2" never applies
    ("qwen2", ["1", "2", "3", "4", "5"]),
    ("llama-bpe", ["12", "3", "4", "5"]),  # groups of three: "123" "45"
    ("gpt-2", ["12", "3", "4", "5"]),  # one run of digits
])
def test_digits_are_split_as_the_pre_tokenizer_says(pre, pieces):
    meta = byte_level_metadata(pre)
    meta = {
        **meta,
        "tokenizer.ggml.tokens": [*meta["tokenizer.ggml.tokens"], "12"],
        "tokenizer.ggml.merges": [*meta["tokenizer.ggml.merges"], "1 2"],
        "tokenizer.ggml.token_type": [*meta["tokenizer.ggml.token_type"], 1],
    }
    tok = Tokenizer.from_gguf_metadata(meta)
    assert tok.encode("12345") == [tok.token_id(p) for p in pieces]


def test_bos_only_when_metadata_asks_and_never_twice():
    meta = byte_level_metadata()
    assert Tokenizer.from_gguf_metadata(meta).encode("a")[0] != 0
    tok = Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.add_bos_token": True})
    assert tok.encode("a") == [0, tok.token_id("a")]
    assert tok.encode("<|endoftext|>a") == [0, tok.token_id("a")]


def test_unsupported_tokenizers_are_rejected():
    with pytest.raises(ValueError, match="pre-tokenizer 'mystery'"):
        Tokenizer.from_gguf_metadata(byte_level_metadata("mystery"))
    with pytest.raises(ValueError, match="tokenizer model 'llama'"):
        Tokenizer.from_gguf_metadata({**byte_level_metadata(), "tokenizer.ggml.model": "llama"})


def test_chat_format_detection():
    assert ChatFormat.from_template(CHATML_TEMPLATE) == ChatFormat("chatml")
    assert ChatFormat.from_template(LLAMA3_TEMPLATE) == ChatFormat("llama3")
    assert ChatFormat("chatml").end_token == "<|im_end|>" and ChatFormat("llama3").end_token == "<|eot_id|>"
    with pytest.raises(ValueError, match="neither ChatML"):
        ChatFormat.from_template("{{ '[INST] ' + message['content'] + ' [/INST]' }}")
    with pytest.raises(ValueError, match="no chat template"):
        ChatFormat.from_template(None)


def test_render_chatml_and_llama3():
    messages = [("system", "Be brief."), {"role": "user", "content": "Hi?"}]
    assert ChatFormat("chatml").render(messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert ChatFormat("chatml").render(messages, add_generation_prompt=False).endswith("Hi?<|im_end|>\n")
    assert ChatFormat("llama3").render(messages) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_default_system_prompt_from_template():
    template = "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nBe kind.<|im_end|>\n' }}{% endif %}"
    chat = ChatFormat.from_template(template + CHATML_TEMPLATE)
    assert chat.default_system == "Be kind."
    assert chat.render([("user", "x")], add_generation_prompt=False) == (
        "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nx<|im_end|>\n"
    )
    assert chat.render([("system", "s"), ("user", "x")]).startswith("<|im_start|>system\ns<|im_end|>")


# ---- the real SmolLM2-135M-Instruct tokenizer ----


@pytest.fixture(scope="module")
def smollm2():
    from kvcomm_jax.model.registry import load_model

    return load_model()


@pytest.mark.real_model
def test_real_round_trip(smollm2):
    tok = smollm2.tokenizer
    for text in [*TEXTS, "<|im_start|>user\nWhat is 12*34?<|im_end|>\n<|im_start|>assistant\n"]:
        assert tok.decode(tok.encode(text)) == text


@pytest.mark.real_model
def test_real_special_tokens_and_digits(smollm2):
    tok = smollm2.tokenizer
    assert tok.vocab_size == 49152
    assert tok.encode("<|im_start|>") == [tok.token_id("<|im_start|>")] == [1]
    assert tok.encode("12345") == [tok.token_id(d) for d in "12345"]
    assert tok.token_id("<|im_end|>") in tok.eos_ids
    assert tok.encode("Hello")[0] != tok.bos_id  # SmolLM2 does not add BOS


@pytest.mark.real_model
def test_real_chatml_render_matches_template(smollm2):
    chat = smollm2.chat_format
    assert chat.name == "chatml"
    # The GGUF's tokenizer.chat_template, evaluated by hand for these messages.
    expected = (
        "<|im_start|>system\nYou are a pirate.<|im_end|>\n"
        "<|im_start|>user\nWhere is the treasure?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert chat.render([("system", "You are a pirate."), ("user", "Where is the treasure?")]) == expected
    # Without a system turn the template inserts its default one.
    assert chat.render([("user", "Hi")], add_generation_prompt=False) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
    )
