"""Users' own tasks and probes from JSONL files: one JSON object per line with "prompt" and
"answer" (strings) and optionally "choices" (a list of strings containing the answer). Blank lines
are skipped; every error names the file and the line.
"""
from __future__ import annotations

import json
import os
import random

from .tasks import Example, Task


def load_jsonl_examples(path: str | os.PathLike) -> list[Example]:
    """All examples of a JSONL file, in file order."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path!r}")
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object with \"prompt\" and \"answer\", "
                                 f"got {type(obj).__name__}")
            for key in ("prompt", "answer"):
                if key not in obj:
                    raise ValueError(f"{where}: missing key {key!r} (keys present: {sorted(obj)})")
                if not isinstance(obj[key], str):
                    raise ValueError(f"{where}: {key!r} must be a string, got {type(obj[key]).__name__}")
            if not obj["answer"].strip():
                raise ValueError(f"{where}: 'answer' is empty")
            choices = obj.get("choices")
            if choices is not None:
                if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
                    raise ValueError(f"{where}: 'choices' must be a list of strings, got {choices!r}")
                if len(choices) < 2:
                    raise ValueError(f"{where}: 'choices' needs at least 2 entries, got {len(choices)}")
                if obj["answer"] not in choices:
                    raise ValueError(f"{where}: answer {obj['answer']!r} is not one of choices {choices!r}")
                choices = tuple(choices)
            examples.append(Example(obj["prompt"], obj["answer"], choices))
    if not examples:
        raise ValueError(f"{path}: no examples (the file is empty)")
    return examples


def load_jsonl_task(path: str | os.PathLike, name: str | None = None, test_fraction: float = 0.2,
                    seed: int = 0) -> Task:
    """A task from a JSONL file, split at random (deterministic in `seed`) into train and test;
    both get at least one example. name defaults to the file name without extension."""
    if not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    examples = load_jsonl_examples(path)
    if len(examples) < 2:
        raise ValueError(f"{os.fspath(path)}: a task needs at least 2 examples (1 train, 1 test), "
                         f"got {len(examples)}")
    order = list(range(len(examples)))
    random.Random(f"fastcur-jsonl:{seed}").shuffle(order)
    n_test = min(len(examples) - 1, max(1, round(test_fraction * len(examples))))
    test = [examples[i] for i in sorted(order[:n_test])]
    train = [examples[i] for i in sorted(order[n_test:])]
    if name is None:
        name = os.path.splitext(os.path.basename(os.fspath(path)))[0]
    return Task(name, "jsonl", train, test)
