"""Template segmentation (kvcomm/templates.py) and segment layout (kvcomm/layout.py), docs/design.md §2.

Expectations are written independently of the code: rendered prompts are spelled out
literally, token ids are checked by decoding them back to text, and spans are checked
against a per-token ownership list built by walking the segments one token at a time.
"""

from __future__ import annotations

import pytest

from kvcomm_jax.kvcomm.layout import Layout, Span
from kvcomm_jax.kvcomm.templates import (
    AgentPrompt,
    content_header,
    field,
    placeholder_producer,
    segment_template,
)
from kvcomm_jax.model.chat_format import ChatFormat
from kvcomm_jax.testing import CHATML, tiny_tokenizer

TOK = tiny_tokenizer()

# --------------------------------------------------------------------------------------
# Helpers


def _dec(ids) -> str:
    return TOK.decode(ids)


def _owners(layout: Layout) -> list[tuple[str, int]]:
    """Token-by-token owner list, walking the segments in prompt order (no arithmetic on starts)."""
    owners = [("prefix", 0)] * layout.prefix(0).length
    for i in range(len(layout.placeholders)):
        owners += [("content", i)] * layout.content(i).length
        owners += [("prefix", i + 1)] * layout.prefix(i + 1).length
    return owners


def _check_spans_against_owners(layout: Layout):
    """Each non-empty span equals the run of tokens its segment owns in the walk."""
    owners = _owners(layout)
    assert layout.length == len(owners)
    named = [("prefix", 0, layout.prefix(0))]
    for i in range(len(layout.placeholders)):
        named += [("content", i, layout.content(i)), ("prefix", i + 1, layout.prefix(i + 1))]
    for kind, i, span in named:
        idx = [t for t, o in enumerate(owners) if o == (kind, i)]
        if idx:
            assert (span.start, span.end) == (idx[0], idx[-1] + 1), (kind, i, span)
            assert idx == list(range(idx[0], idx[-1] + 1))
        else:
            assert span.length == 0


def _check_tiling(layout: Layout):
    """prefix(0), then after_prefix0() in order, tile [0, length) with no gap or overlap."""
    spans = [layout.prefix(0), *layout.after_prefix0()]
    assert len(spans) == 2 * len(layout.placeholders) + 1
    assert spans[0].start == 0
    for a, b in zip(spans, spans[1:]):
        assert a.end == b.start
    assert spans[-1].end == layout.length
    assert sum(s.length for s in spans) == layout.length
    covered = [t for s in spans for t in range(s.start, s.end)]
    assert covered == list(range(layout.length))
    # after_prefix0 alternates content(i), prefix(i + 1)
    expected = []
    for i in range(len(layout.placeholders)):
        expected += [layout.content(i), layout.prefix(i + 1)]
    assert layout.after_prefix0() == expected


class _BareFormat:
    """A chat format that renders only the user text (lets a template end in a placeholder)."""

    def render(self, messages, add_generation_prompt=True):
        return "".join(content for role, content in messages if role == "user")


# --------------------------------------------------------------------------------------
# field, placeholder_producer, content_header


def test_field_wraps_in_braces():
    assert field("user_question") == "{user_question}"
    assert field("agent_3_current") == "{agent_3_current}"


@pytest.mark.parametrize(
    "name, producer",
    [("user_question", None), ("agent_0_current", 0), ("agent_3_current", 3), ("condition_12_current", 12)],
)
def test_placeholder_producer(name, producer):
    assert placeholder_producer(name) == producer


@pytest.mark.parametrize(
    "name", ["question", "agent_current", "agent_x_current", "agent_1_previous", "condition_1", "user_question2", ""]
)
def test_placeholder_producer_rejects_unknown(name):
    with pytest.raises(ValueError):
        placeholder_producer(name)


def test_content_header():
    assert content_header(CHATML) == "<|im_start|>user\n"
    assert (
        content_header(ChatFormat("chatml", "You are a helpful AI assistant."))
        == "<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n<|im_start|>user\n"
    )
    assert content_header(ChatFormat("llama3")) == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"


# --------------------------------------------------------------------------------------
# AgentPrompt.placeholders


def test_placeholders_in_order_system_first():
    prompt = AgentPrompt(2, "System {condition_1_current} here.", "Q: {user_question} A: {agent_0_current}.")
    assert prompt.placeholders() == ("condition_1_current", "user_question", "agent_0_current")


@pytest.mark.parametrize(
    "system, user",
    [
        ("sys", "What is {foo}?"),
        ("sys", "Agent {agent_x_current}."),
        ("sys", "Agent {agent_1_previous}."),
        ("sys", "Empty {} field."),
        ("Unknown {bar} in system", "fine {user_question} text"),
    ],
)
def test_unknown_placeholder_raises(system, user):
    prompt = AgentPrompt(0, system, user)
    with pytest.raises(ValueError, match="unknown placeholder"):
        prompt.placeholders()
    with pytest.raises(ValueError):
        segment_template(prompt, TOK, CHATML)


@pytest.mark.parametrize(
    "system, user",
    [
        ("sys", "{user_question} and again {user_question}."),
        ("See {agent_1_current}.", "Also {agent_1_current}."),
    ],
)
def test_repeated_placeholder_raises(system, user):
    prompt = AgentPrompt(0, system, user)
    with pytest.raises(ValueError, match="twice"):
        prompt.placeholders()
    with pytest.raises(ValueError):
        segment_template(prompt, TOK, CHATML)


def test_template_ending_in_placeholder_raises():
    prompt = AgentPrompt(0, "sys", "Solve this: {user_question}")
    with pytest.raises(ValueError, match="end with text"):
        segment_template(prompt, TOK, _BareFormat())
    # The same prompt with a trailing constant is accepted and starts with an empty prefix(0)
    # when the placeholder opens the text.
    ok = segment_template(AgentPrompt(0, "sys", "{user_question} is the task."), TOK, _BareFormat())
    assert ok.prefixes[0] == ()
    assert _dec(ok.prefixes[1]) == " is the task."
    assert ok.layout().prefix(0) == Span(0, 0)


# --------------------------------------------------------------------------------------
# segment_template: 0, 1 and 3 placeholders


def test_zero_placeholders():
    prompt = AgentPrompt(4, "You are a math solver.", "Solve the task step by step.")
    seg = segment_template(prompt, TOK, CHATML)
    expected = (
        "<|im_start|>system\nYou are a math solver.<|im_end|>\n"
        "<|im_start|>user\nSolve the task step by step.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert seg.agent_id == 4
    assert seg.placeholders == () and seg.dummies == ()
    assert len(seg.prefixes) == 1
    assert _dec(seg.prefixes[0]) == expected
    assert seg.ids() == list(seg.prefixes[0]) == seg.ids({})
    layout = seg.layout()
    assert layout.placeholders == ()
    assert layout.prefix(0) == Span(0, len(seg.prefixes[0]))
    assert layout.length == len(seg.ids())
    assert layout.after_prefix0() == []
    assert layout.contents == ()
    _check_tiling(layout)


def test_one_placeholder():
    prompt = AgentPrompt(1, "You are a math solver.", "Question: {user_question}\nGive the answer.")
    seg = segment_template(prompt, TOK, CHATML)
    assert seg.placeholders == ("user_question",)
    assert _dec(seg.prefixes[0]) == (
        "<|im_start|>system\nYou are a math solver.<|im_end|>\n<|im_start|>user\nQuestion: "
    )
    assert _dec(seg.prefixes[1]) == "\nGive the answer.<|im_end|>\n<|im_start|>assistant\n"
    assert _dec(seg.dummies[0]) == "user question"

    content = TOK.encode("Tom has four apples.")
    ids = seg.ids({"user_question": content})
    assert _dec(ids) == (
        "<|im_start|>system\nYou are a math solver.<|im_end|>\n<|im_start|>user\nQuestion: "
        "Tom has four apples.\nGive the answer.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert ids == [*seg.prefixes[0], *content, *seg.prefixes[1]]

    layout = seg.layout({"user_question": len(content)})
    assert layout.placeholders == ("user_question",)
    assert ids[layout.prefix(0).start : layout.prefix(0).end] == list(seg.prefixes[0])
    assert ids[layout.content(0).start : layout.content(0).end] == content
    assert ids[layout.prefix(1).start : layout.prefix(1).end] == list(seg.prefixes[1])
    assert layout.length == len(ids)
    _check_tiling(layout)
    _check_spans_against_owners(layout)


THREE = AgentPrompt(
    7,
    "You are the decision maker. Agent said: {agent_0_current}",
    "The task is: {user_question}\nCheck: {condition_3_current}. What is the final answer?",
)
THREE_NAMES = ("agent_0_current", "user_question", "condition_3_current")
THREE_PIECES = (
    "<|im_start|>system\nYou are the decision maker. Agent said: ",
    "<|im_end|>\n<|im_start|>user\nThe task is: ",
    "\nCheck: ",
    ". What is the final answer?<|im_end|>\n<|im_start|>assistant\n",
)
THREE_CONTENTS = {
    "agent_0_current": "The answer is 12 dollars.",
    "user_question": "Mary has three pens and buys two more. How many pens?",
    "condition_3_current": "result = 5",
}


@pytest.fixture(scope="module")
def three():
    return segment_template(THREE, TOK, CHATML)


def test_three_placeholders_segmentation(three):
    assert three.agent_id == 7
    assert three.placeholders == THREE_NAMES
    assert len(three.prefixes) == 4 and len(three.dummies) == 3
    assert tuple(_dec(p) for p in three.prefixes) == THREE_PIECES
    assert tuple(_dec(d) for d in three.dummies) == ("agent 0 current", "user question", "condition 3 current")
    # Every piece is tokenized on its own: each prefix is what the tokenizer makes of its text alone.
    for piece, ids in zip(THREE_PIECES, three.prefixes):
        assert list(ids) == TOK.encode(piece)


def test_three_placeholders_ids_and_real_layout(three):
    contents = {name: TOK.encode(text) for name, text in THREE_CONTENTS.items()}
    ids = three.ids(contents)
    expected_text = THREE_PIECES[0]
    expected_ids = list(three.prefixes[0])
    for i, name in enumerate(THREE_NAMES):
        expected_text += THREE_CONTENTS[name] + THREE_PIECES[i + 1]
        expected_ids += contents[name] + list(three.prefixes[i + 1])
    assert _dec(ids) == expected_text
    assert ids == expected_ids

    layout = three.layout({name: len(c) for name, c in contents.items()})
    assert layout.placeholders == THREE_NAMES
    assert layout.length == len(ids)
    for i, name in enumerate(THREE_NAMES):
        span = layout.content(i)
        assert ids[span.start : span.end] == contents[name]
        assert _dec(ids[span.start : span.end]) == THREE_CONTENTS[name]
    for i in range(4):
        span = layout.prefix(i)
        assert ids[span.start : span.end] == list(three.prefixes[i])
        assert _dec(ids[span.start : span.end]) == THREE_PIECES[i]
    _check_tiling(layout)
    _check_spans_against_owners(layout)


def test_three_placeholders_dummies_by_default(three):
    ids = three.ids()
    assert ids == three.ids({})
    text = THREE_PIECES[0]
    for i, name in enumerate(THREE_NAMES):
        text += name.replace("_", " ") + THREE_PIECES[i + 1]
    assert _dec(ids) == text

    layout = three.layout()
    assert layout == three.layout({})
    assert layout == three.layout({name: len(d) for name, d in zip(THREE_NAMES, three.dummies)})
    assert layout.length == len(ids)
    for i in range(3):
        span = layout.content(i)
        assert ids[span.start : span.end] == list(three.dummies[i])
    for i in range(4):
        span = layout.prefix(i)
        assert ids[span.start : span.end] == list(three.prefixes[i])
    _check_tiling(layout)
    _check_spans_against_owners(layout)


def test_three_placeholders_partial_contents(three):
    """Placeholders absent from ``contents`` / ``lengths`` fall back to their dummies."""
    content = TOK.encode("Ben ate two candies.")
    ids = three.ids({"user_question": content})
    layout = three.layout({"user_question": len(content)})
    assert layout.length == len(ids)
    for i, expected in enumerate([three.dummies[0], content, three.dummies[2]]):
        span = layout.content(i)
        assert ids[span.start : span.end] == list(expected)
    for i in range(4):
        span = layout.prefix(i)
        assert ids[span.start : span.end] == list(three.prefixes[i])
    _check_tiling(layout)


def test_empty_contents_and_adjacent_placeholders():
    """Adjacent placeholders leave an empty prefix between them; empty contents are allowed."""
    prompt = AgentPrompt(0, "sys", "A {user_question}{agent_1_current} B")
    seg = segment_template(prompt, TOK, CHATML)
    assert seg.prefixes[1] == ()
    contents = {"user_question": [], "agent_1_current": TOK.encode(" the cat")}
    ids = seg.ids(contents)
    assert ids == [*seg.prefixes[0], *contents["agent_1_current"], *seg.prefixes[2]]
    layout = seg.layout({"user_question": 0, "agent_1_current": len(contents["agent_1_current"])})
    assert layout.content(0).length == 0 and layout.prefix(1).length == 0
    assert layout.content(0).start == layout.prefix(1).start == layout.content(1).start == len(seg.prefixes[0])
    assert ids[layout.content(1).start : layout.content(1).end] == contents["agent_1_current"]
    assert layout.length == len(ids)
    _check_tiling(layout)
    _check_spans_against_owners(layout)


def test_llama3_format_segmentation():
    prompt = AgentPrompt(0, "  You are a solver.  ", "  Question: {user_question} Now solve.  ")
    seg = segment_template(prompt, TOK, ChatFormat("llama3"))
    assert _dec(seg.prefixes[0]) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a solver.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nQuestion: "
    )
    assert _dec(seg.prefixes[1]) == " Now solve.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"


# --------------------------------------------------------------------------------------
# Layout.build and Span


def test_span():
    span = Span(3, 4)
    assert span.end == 7
    assert Span(5, 0).end == 5


@pytest.mark.parametrize(
    "names, prefix_lengths, content_lengths",
    [
        ((), [7], []),
        (("a",), [4, 2], [5]),
        (("a", "b", "c"), [3, 1, 0, 6], [2, 0, 9]),
        (("a", "b"), [0, 0, 1], [0, 0]),
    ],
)
def test_build(names, prefix_lengths, content_lengths):
    layout = Layout.build(names, prefix_lengths, content_lengths)
    assert layout.placeholders == tuple(names)
    assert [layout.prefix(i).length for i in range(len(names) + 1)] == list(prefix_lengths)
    assert [layout.content(i).length for i in range(len(names))] == list(content_lengths)
    assert layout.length == sum(prefix_lengths) + sum(content_lengths)
    assert layout.prefix(0).start == 0
    _check_tiling(layout)
    _check_spans_against_owners(layout)


def test_build_explicit_positions():
    layout = Layout.build(("x", "y"), [10, 3, 4], [5, 7])
    assert layout.prefix(0) == Span(0, 10)
    assert layout.content(0) == Span(10, 5)
    assert layout.prefix(1) == Span(15, 3)
    assert layout.content(1) == Span(18, 7)
    assert layout.prefix(2) == Span(25, 4)
    assert layout.length == 29
    assert layout.after_prefix0() == [Span(10, 5), Span(15, 3), Span(18, 7), Span(25, 4)]


@pytest.mark.parametrize(
    "names, prefix_lengths, content_lengths",
    [
        ((), [1, 2], []),  # too many prefixes
        ((), [], []),  # no prefix at all
        ((), [3], [1]),  # content without placeholder
        (("a",), [1], [2]),  # too few prefixes
        (("a",), [1, 2], []),  # too few contents
        (("a",), [1, 2], [3, 4]),  # too many contents
        (("a", "b"), [1, 2, 3], [1]),
        (("a", "b"), [1, 2], [1, 2]),
    ],
)
def test_build_rejects_wrong_counts(names, prefix_lengths, content_lengths):
    with pytest.raises(ValueError):
        Layout.build(names, prefix_lengths, content_lengths)
