"""Chat formats as data: each format renders a two-turn conversation exactly as its chat template does,
is picked from a checkpoint's template or architecture, and checks the tokenizer has its tokens."""

from __future__ import annotations

import pytest
from test_tokenizer import CHATML_TEMPLATE, byte_level_metadata, spm_metadata

from kvcomm_jax.model.chat_format import FORMATS, ChatFormat
from kvcomm_jax.model.tokenizer import Tokenizer

CONVERSATION = [
    ("system", "You are terse."),
    ("user", "What is 2+2?"),
    ("assistant", "4."),
    {"role": "user", "content": "And 3+3?"},
]
# Each format's chat template, evaluated by hand for CONVERSATION with the generation prompt.
RENDERED = {
    "chatml": (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4.<|im_end|>\n"
        "<|im_start|>user\nAnd 3+3?<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    "llama3": (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n4.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd 3+3?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "gemma": (
        "<bos>"
        "<start_of_turn>user\nYou are terse.\n\nWhat is 2+2?<end_of_turn>\n"
        "<start_of_turn>model\n4.<end_of_turn>\n"
        "<start_of_turn>user\nAnd 3+3?<end_of_turn>\n"
        "<start_of_turn>model\n"
    ),
    "mistral": "<s>[INST] You are terse.\n\nWhat is 2+2? [/INST]4.</s>[INST] And 3+3? [/INST]",
}
END_TOKENS = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>", "mistral": "</s>"}

# Excerpts of real chat templates, with the markers and literal system turns that select a format.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix = messages[0]['content'] + "
    "'\n\n' -%}{%- endif -%}{%- for message in loop_messages -%}{{ '<start_of_turn>' + role + '\n' + "
    "(first_user_prefix if loop.first else \"\") }}{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token}}{% endif %}{% endfor %}"
)
# Qwen2.5 writes its newlines escaped inside the Jinja strings, and opens a system turn twice
# before the literal default one.
QWEN25_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n"
    "{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n"
    "{%- for message in messages %}\n        {{- '<|im_start|>' + message.role + '\\n' + message.content + "
    "'<|im_end|>' + '\\n' }}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)


@pytest.mark.parametrize("name", RENDERED)
def test_two_turn_conversation_renders_as_the_template_does(name):
    chat = ChatFormat(name)
    assert chat.render(CONVERSATION) == RENDERED[name]
    generation_prompt = chat.render([("user", "x")]).removeprefix(chat.render([("user", "x")], False))
    assert RENDERED[name].endswith(generation_prompt)
    assert chat.end_token == END_TOKENS[name]


def test_gemma_strips_contents_but_not_the_folded_system_text():
    chat = ChatFormat("gemma")
    assert chat.render([("system", " Be brief. "), ("user", "  Hi  ")], add_generation_prompt=False) == (
        "<bos><start_of_turn>user\n Be brief. \n\nHi<end_of_turn>\n"
    )
    assert chat.render([("user", "Hi")]) == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"


def test_formats_without_a_system_role_reject_what_they_cannot_write():
    with pytest.raises(ValueError, match="no system role"):
        ChatFormat("gemma").render([("system", "alone")])
    with pytest.raises(ValueError, match="no 'system' role"):
        ChatFormat("mistral").render([("user", "a"), ("assistant", "b"), ("system", "late")])
    with pytest.raises(ValueError, match="no 'tool' role"):
        ChatFormat("mistral").render([("tool", "{}")])


@pytest.mark.parametrize("template, expected", [
    (CHATML_TEMPLATE, ChatFormat("chatml")),
    (GEMMA_TEMPLATE, ChatFormat("gemma")),
    (MISTRAL_TEMPLATE, ChatFormat("mistral")),
    (QWEN25_TEMPLATE, ChatFormat("chatml", "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.")),
])
def test_format_from_template(template, expected):
    assert ChatFormat.from_template(template) == expected
    assert ChatFormat.from_metadata(template, "llama") == expected  # the template wins over the architecture


def test_qwen25_default_system_prompt_is_inserted():
    chat = ChatFormat.from_template(QWEN25_TEMPLATE)
    assert chat.render([("user", "Hi")], add_generation_prompt=False) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
    )


def test_format_from_architecture_without_template():
    for architecture in ("gemma", "gemma2", "gemma3"):
        assert ChatFormat.from_metadata(None, architecture) == ChatFormat("gemma")
    with pytest.raises(ValueError, match="architecture 'llama' implies no chat format"):
        ChatFormat.from_metadata("", "llama")
    with pytest.raises(ValueError, match="unknown chat format 'vicuna'"):
        ChatFormat("vicuna")


def test_each_format_writes_its_marker_and_tokens():
    assert set(FORMATS) == set(RENDERED)
    for name, spec in FORMATS.items():
        assert spec.marker in RENDERED[name] and spec.end_token in spec.special_tokens
        assert all(token in RENDERED[name] for token in spec.special_tokens)


def test_tokenizer_must_have_the_format_tokens():
    spm = Tokenizer.from_gguf_metadata(spm_metadata())  # has <bos>, <start_of_turn>, <end_of_turn>
    ChatFormat("gemma").check_vocabulary(spm)
    with pytest.raises(ValueError, match="writes <bos>, <start_of_turn>, <end_of_turn>, which the tokenizer's vocabulary lacks"):
        ChatFormat("gemma").check_vocabulary(Tokenizer.from_gguf_metadata(byte_level_metadata()))
    with pytest.raises(ValueError, match=r"<\|im_start\|>, <\|im_end\|>"):
        ChatFormat("chatml").check_vocabulary(spm)
