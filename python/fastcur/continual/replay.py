"""Experience replay for `fastcur continual`: a buffer of past tasks' training examples that
the `lora-er` method mixes into each training batch."""
from __future__ import annotations

import random

from .tasks import Example


def _to_dict(e: Example) -> dict:
    return {"prompt": e.prompt, "answer": e.answer, "choices": None if e.choices is None else list(e.choices)}


def _from_dict(d: dict) -> Example:
    return Example(d["prompt"], d["answer"], None if d.get("choices") is None else tuple(d["choices"]))


class ReplayBuffer:
    """Keeps up to `per_task` training examples of every finished task (drawn without
    replacement with a seeded RNG), and replaces a `ratio` share of a batch by draws from them.

    Args:
        per_task: examples kept per finished task (all of them when the task has fewer).
        ratio: share of each batch replaced by replayed examples, in [0, 1).
        seed: seed of the draws into the buffer.
    """

    def __init__(self, per_task: int = 64, ratio: float = 0.25, seed: int = 0):
        if isinstance(per_task, bool) or not isinstance(per_task, int) or per_task < 1:
            raise ValueError(f"ReplayBuffer: per_task must be a positive int, got {per_task!r}")
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"ReplayBuffer: ratio must be in [0, 1), got {ratio!r}")
        self.per_task, self.ratio, self.seed = per_task, float(ratio), seed
        self.examples: list[Example] = []

    def __len__(self) -> int:
        return len(self.examples)

    def add_task(self, index: int, examples: list[Example]) -> None:
        """Store up to `per_task` of a finished task's training examples (seeded by task index)."""
        rng = random.Random(self.seed * 1_000_003 + index)
        k = min(self.per_task, len(examples))
        self.examples.extend(rng.sample(list(examples), k))

    def mix(self, batch: list[Example], rng: random.Random) -> list[Example]:
        """The batch with its last round(ratio * len) examples replaced by buffer draws
        (unchanged while the buffer is empty). Same length as `batch`."""
        n = round(self.ratio * len(batch)) if self.examples else 0
        if n == 0:
            return list(batch)
        return list(batch[: len(batch) - n]) + [self.examples[rng.randrange(len(self.examples))] for _ in range(n)]

    def state_dict(self) -> dict:
        return {"per_task": self.per_task, "ratio": self.ratio, "seed": self.seed,
                "examples": [_to_dict(e) for e in self.examples]}

    def load_state_dict(self, state: dict) -> None:
        self.per_task, self.ratio, self.seed = int(state["per_task"]), float(state["ratio"]), int(state["seed"])
        self.examples = [_from_dict(d) for d in state["examples"]]
