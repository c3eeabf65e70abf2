"""Segment-wise tokenization equals whole-prompt tokenization (docs/design.md §2).

A template's prefixes with its contents filled in must be the token ids of the rendered
prompt text: one BOS at the start when the checkpoint adds one, nothing special inside.
Checked on the task templates with real questions for the SmolLM2 byte-level BPE (as
shipped, and with a BOS), and for Gemma 3's SentencePiece vocabulary; a token across a
placeholder boundary is an error naming the placeholder.
"""

from __future__ import annotations

import functools

import pytest
from test_tokenizer import (
    gemma3_metadata,
    gemma3_tokenizer,
    gguf_metadata,
    spm_metadata,
)

from kvcomm_jax.agents.graphs import make_graph
from kvcomm_jax.agents.pipeline import agent_prompts
from kvcomm_jax.agents.tasks import get_task
from kvcomm_jax.kvcomm.config import EngineConfig
from kvcomm_jax.kvcomm.engine import KVCommEngine
from kvcomm_jax.kvcomm.templates import (
    QUESTION,
    AgentPrompt,
    SegmentBoundaryError,
    SegmentBoundaryWarning,
    encode_content,
    field,
    is_condition,
    placeholder_producer,
    segment_template,
)
from kvcomm_jax.model.chat_format import ChatFormat
from kvcomm_jax.model.registry import DEFAULT_MODEL, KNOWN_MODELS
from kvcomm_jax.model.tokenizer import Tokenizer
from kvcomm_jax.testing import CHATML, tiny_loaded_model, tiny_tokenizer

RESPONSES = {
    "gsm8k": "She has 16 - 3 - 4 = 9 eggs left.\nShe makes 9 * 2 = $18 a day.\nThe answer is 18.",
    "mmlu": "Suggested amounts anchor what donors give.\n\nThe answer is (A).",
}
PROGRAM_OUTPUT = "18"  # a condition: what the programming expert's code printed


def prompt_text(prompt: AgentPrompt, chat: ChatFormat, texts: dict[str, str]) -> str:
    """The rendered prompt with each placeholder's text written in."""
    system, user = prompt.system, prompt.user
    for name, text in texts.items():
        system, user = system.replace(field(name), text), user.replace(field(name), text)
    return chat.render([("system", system), ("user", user)])


def assert_segments_are_the_prompt(tokenizer: Tokenizer, chat: ChatFormat, prompt: AgentPrompt, texts: dict):
    template = segment_template(prompt, tokenizer, chat)
    contents = {name: encode_content(tokenizer, name, texts[name], [template]) for name in template.placeholders}
    ids = template.ids(contents)
    assert ids == tokenizer.encode(prompt_text(prompt, chat, texts))
    if tokenizer.add_bos:
        assert ids[0] == tokenizer.bos_id


# ---- the task templates with real questions, on real vocabularies ----


def smollm2(add_bos: bool = False) -> tuple[Tokenizer, ChatFormat]:
    meta = {**gguf_metadata(KNOWN_MODELS[DEFAULT_MODEL].path()), "tokenizer.ggml.add_bos_token": add_bos}
    chat = ChatFormat.from_metadata(meta.get("tokenizer.chat_template"), meta["general.architecture"])
    return Tokenizer.from_gguf_metadata(meta, end_tokens=(chat.end_token,)), chat


def gemma3() -> tuple[Tokenizer, ChatFormat]:
    meta = gemma3_metadata()
    return gemma3_tokenizer(), ChatFormat.from_metadata(meta.get("tokenizer.chat_template"), meta["general.architecture"])


VOCABULARIES = {"smollm2": smollm2, "smollm2_with_bos": functools.partial(smollm2, add_bos=True), "gemma3": gemma3}


@pytest.mark.real_model
@pytest.mark.parametrize("task_name", ["gsm8k", "mmlu"])
@pytest.mark.parametrize("vocabulary", VOCABULARIES)
def test_task_prompts_tokenize_the_same_whole_and_by_segments(vocabulary, task_name):
    tokenizer, chat = VOCABULARIES[vocabulary]()
    chat.check_vocabulary(tokenizer)
    task = get_task(task_name)
    prompts = agent_prompts(task, make_graph("full_connected", 4, task.worker_roles, task.decision_role))
    for example in task.load(limit=8):
        texts = {QUESTION: task.question_text(example)}
        for prompt in prompts:
            texts.update({name: PROGRAM_OUTPUT if is_condition(name) else RESPONSES[task_name]
                          for name in prompt.placeholders() if placeholder_producer(name) is not None})
            assert_segments_are_the_prompt(tokenizer, chat, prompt, texts)


@pytest.mark.real_model
def test_template_text_is_tokenized_as_it_stands_before_content():
    tokenizer, chat = smollm2()
    template = segment_template(AgentPrompt(0, "s", "The task is:\n\n{user_question}\nGo."), tokenizer, chat)
    newline = tokenizer.token_id("\u010a")  # byte-level "\n"
    assert tokenizer.encode_segment("is:\n\n")[-1] != newline  # at the end of a text "\n\n" is one token...
    assert template.prefixes[0][-2:] == (newline, newline)  # ...before a word it is two, as in the prompt


@pytest.mark.real_model
def test_gemma3_template_is_chosen_by_architecture_and_opens_with_one_bos():
    tokenizer, chat = gemma3()
    assert chat == ChatFormat("gemma")
    template = segment_template(AgentPrompt(0, "Be brief.", "Q:\n{user_question}\nAnswer."), tokenizer, chat)
    assert tokenizer.decode(template.prefixes[0]) == "<bos><start_of_turn>user\nBe brief.\n\nQ:\n"
    assert template.prefixes[0].count(tokenizer.bos_id) == 1
    assert tokenizer.decode(template.prefixes[1]) == "\nAnswer.<end_of_turn>\n<start_of_turn>model\n"


# ---- small vocabularies: BOS placement, and the boundary error ----


def test_bos_starts_the_first_segment_only():
    tokenizer = Tokenizer.from_gguf_metadata(spm_metadata())  # SentencePiece, adds <bos>
    prompt = AgentPrompt(0, "the world", "hello\n{user_question}\nthe\n{agent_1_current}\nworld")
    template = segment_template(prompt, tokenizer, ChatFormat("gemma"))
    assert template.prefixes[0][0] == tokenizer.bos_id
    assert all(tokenizer.bos_id not in ids for ids in (*template.prefixes[1:], *template.dummies))
    assert_segments_are_the_prompt(tokenizer, ChatFormat("gemma"), prompt, {QUESTION: "hello", "agent_1_current": "the"})


def test_a_token_across_a_placeholder_boundary_is_an_error():
    tok = tiny_tokenizer()
    template = segment_template(AgentPrompt(3, "Count.", "The result is {condition_1_current}s now.\nGo."), tok, CHATML)
    name = "condition_1_current"
    assert encode_content(tok, name, "42", [template]) == tuple(tok.encode_segment("42"))  # digits stand alone
    with pytest.raises(SegmentBoundaryError, match=r"agent 3, placeholder \{condition_1_current\}: .*together: "
                                                   r"' result' ' is' ' the'.*; apart: ' result' ' is' ' ' 't'"):
        encode_content(tok, name, "the cat", [template])  # " the" is one token in the prompt
    with pytest.raises(SegmentBoundaryError, match=r"together: .*' cats'.*; apart: .*' cat' 's'"):
        encode_content(tok, name, " cat", [template])  # " cat" + "s" is " cats"


def test_engine_checks_a_question_against_every_agent_that_reads_it():
    fine = AgentPrompt(0, "You are a solver.", "Q:\n{user_question}\nSolve it.")
    merging = AgentPrompt(1, "You are a checker.", "The task is: {user_question}\nCheck it.")
    strict = KVCommEngine(tiny_loaded_model(), [fine, merging], EngineConfig(strict_segments=True))
    with pytest.raises(SegmentBoundaryError, match=r"agent 1, placeholder \{user_question\}"):
        strict.new_request("Mary has three pens.")  # " Mary" is one token after "The task is:"
    # by default: one warning per placeholder, every mismatch counted, the segment-wise ids used
    engine = KVCommEngine(tiny_loaded_model(), [fine, merging], EngineConfig())
    with pytest.warns(SegmentBoundaryWarning, match=r"agent 1, placeholder \{user_question\}") as caught:
        request = engine.new_request("Mary has three pens.")
        engine.new_request("Tom has two cats.")
    assert len(caught) == 1 and engine.boundary_mismatches == {"user_question": 2}
    tok = engine.model.tokenizer
    assert request.contents["user_question"].ids == tuple(tok.encode_segment("Mary has three pens."))
    engine.new_request("\nMary has three pens.")  # a newline after the colon: no token spans the boundary
    assert engine.boundary_mismatches == {"user_question": 2}
