"""HumanEval: complete a Python function from its signature and docstring; Pass@1.

Roles cycle project manager -> algorithm designer -> programming expert -> test analyst ->
bug fixer. The code roles' responses are run against the prompt's doctest examples
(``>>>`` lines); the outcome is the condition that follows their answers ("Whether it
passes internal testing? ...").
"""

from __future__ import annotations

import ast
import re
from typing import ClassVar

from kvcomm_jax.agents.tasks.base import Example, Role, Task, clip, extract_code

_EXAMPLE_MARK = "KVCOMM_EXAMPLE "
_QUOTES = ('"""', "'''")
_WRITE_FUNCTION = "Write the complete Python function in a ```python block."

# Runs after the candidate; `_ns` is its namespace, `_cases` the (source, expected) pairs.
_EXAMPLE_HARNESS = """
def _matches(got, want):
    if isinstance(got, float) and isinstance(want, float):
        return abs(got - want) <= 1e-6 * max(1.0, abs(want))
    return got == want

for _source, _want in _cases:
    try:
        _got = eval(_source, _ns)
    except Exception as _e:
        _verdict = "FAIL %s raised %s: %s" % (_source, type(_e).__name__, _e)
    else:
        try:
            _ok = _matches(_got, eval(_want, {}))
        except Exception:
            _ok = repr(_got) == _want
        _verdict = "%s %s returned %r, expected %s" % (
            "PASS" if _ok else "FAIL", _source, _got, _want)
    print(MARK + _verdict[:300])
""".replace("MARK", repr(_EXAMPLE_MARK))


def doctest_examples(prompt: str) -> list[tuple[str, str]]:
    """(expression, expected output) pairs from the ``>>>`` lines of `prompt`.

    The expected output is the text up to the next blank line, ``>>>`` line or end of the
    docstring; no output means None (doctest's convention), except after an equality
    ``f(x) == y``, which is read as an assertion (expected True). Statements are skipped.
    """
    lines = prompt.splitlines()
    examples = []
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line.startswith(">>>"):
            continue
        source = line[3:].strip()
        while i < len(lines) and lines[i].strip().startswith("..."):
            source += "\n" + lines[i].strip()[3:].strip()
            i += 1
        want = []
        while i < len(lines):
            text = lines[i].strip()
            if not text or text.startswith(">>>") or text.startswith(_QUOTES):
                break
            i += 1
            if text.endswith(_QUOTES):
                want.append(text[:-3].rstrip())
                break
            want.append(text)
        try:
            expression = ast.parse(source, mode="eval").body
        except SyntaxError:
            continue
        if not want and isinstance(expression, ast.Compare) and all(
                isinstance(op, ast.Eq) for op in expression.ops):
            want = ["True"]  # written as an assertion: ">>> f(x) == y"
        examples.append((source, "\n".join(want) or "None"))
    return examples


def _namespace_script(program: str, after: str = "") -> str:
    """A script that executes `program` in a fresh namespace ``_ns`` as module "candidate"
    (so its ``if __name__ == "__main__"`` block does not run), then `after`."""
    return (f"_ns = {{'__name__': 'candidate'}}\n"
            f"exec(compile({program!r}, 'candidate.py', 'exec'), _ns)\n{after}")


class HumanEvalTask(Task):
    """HumanEval: the decision agent's function must pass the official tests."""

    name = "humaneval"
    context_lead_in = "The task is:\n\n"
    worker_roles = ("project manager", "algorithm designer", "programming expert",
                    "test analyst", "bug fixer")
    decision_role = "final decision maker"
    roles: ClassVar = {
        "project manager": Role(
            "You are a project manager. You break a coding task into clear parts.",
            "Describe what the function must do: its inputs, its output and the main steps. "
            "Do not write code."),
        "algorithm designer": Role(
            "You are an algorithm designer. You design simple, correct algorithms.",
            "Describe an algorithm for the function in a few numbered steps."),
        "programming expert": Role(
            "You are a programming expert. You write correct, simple Python code.",
            _WRITE_FUNCTION),
        "test analyst": Role(
            "You are a test analyst. You find the cases where code can go wrong.",
            "List the edge cases the function must handle, and point out bugs in the code above."),
        "bug fixer": Role(
            "You are a bug fixer. You read code and test results and fix the bugs.",
            f"Fix the bugs in the code above. {_WRITE_FUNCTION}"),
        "final decision maker": Role(
            "You are the final decision maker. You read the work of other agents and "
            "write the final code.",
            f"Write the best solution. {_WRITE_FUNCTION}"),
    }
    agent_header = "Agent {agent_id}, role is {role}, output is:"
    condition_lead_in = "Whether it passes internal testing? "
    code_roles = frozenset({"programming expert", "bug fixer"})
    sandbox_timeout_s = 10.0

    def candidate_program(self, example: Example, text: str) -> str:
        """The prompt completed by the code in `text`.

        A code block that defines the entry point is appended to the prompt as a whole
        function (it replaces the prompt's stub; helpers in the prompt stay available);
        anything else is taken as the function body and appended directly.
        """
        code = extract_code(text)
        prompt, entry_point = example.extra["prompt"], example.extra["entry_point"]
        if re.search(rf"^def\s+{re.escape(entry_point)}\s*\(", code, re.M):
            return f"{prompt}\n\n{code}\n"
        return f"{prompt}{code}\n"

    def _condition(self, response: str, example: Example) -> str:
        cases = doctest_examples(example.extra["prompt"])
        script = _namespace_script(self.candidate_program(example, response),
                                   f"_cases = {cases!r}\n{_EXAMPLE_HARNESS}")
        result = self.run_code(script)
        if not result.ok:
            return clip(f"No. The code fails: {result.reason}.")
        if not cases:
            return "The code runs, but the task gives no examples to test it on."
        verdicts = [line[len(_EXAMPLE_MARK):] for line in result.stdout.splitlines()
                    if line.startswith(_EXAMPLE_MARK)]
        failures = [v for v in verdicts if not v.startswith("PASS")]
        if not failures:
            return f"Yes. It passes all {len(cases)} examples."
        passed = len(verdicts) - len(failures)
        return clip(f"No. It passes {passed} of {len(cases)} examples. " + " ".join(failures[:2]))

    def extract_answer(self, text: str) -> str | None:
        """The code in `text` (see `extract_code`); None if there is none."""
        return extract_code(text) or None

    def is_correct(self, example: Example, final_text: str) -> bool:
        """Pass@1: the completed function passes the official ``check`` in the sandbox."""
        program = (self.candidate_program(example, final_text) + example.extra["test"]
                   + f"\n\ncheck({example.extra['entry_point']})\n")
        return self.run_code(_namespace_script(program)).ok
