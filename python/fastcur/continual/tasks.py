"""The built-in task sequence of the continual benchmark: five small synthetic tasks, one per family
the continual-learning papers use, generated deterministically from a seed.

| name          | family (paper's data set) | what the model does                                   | scored by |
|---------------|---------------------------|-------------------------------------------------------|-----------|
| arithmetic    | gsm8k-like                | one-step word problem, numbers 1..9 -> "7"             | exact match |
| translation   | newsde-like               | short English phrase -> invented language "Vel"        | exact match |
| summarization | cnndm-like                | 2-3 sentence article -> "Name verb" of the key sentence | exact match |
| logic         | logiqa-like               | syllogism / ordering question with 3 options           | likelihood of each choice |
| sentiment     | sst2-like                 | one-sentence review -> positive / negative             | likelihood of each choice |

Prompts end in a marker ("A:", "Vel:", "Summary:", ...) with no trailing space; answers carry no
leading space (`evaluate` joins them with one space). Answers are a few bytes so that a tiny
byte-level model learns each task in tens to hundreds of steps, and the tasks share no format, so
training on one disturbs the others (forgetting shows in the accuracy matrix).

Determinism: a task's examples depend only on (seed, task name). Every prompt within a task is
distinct, so train and test never share a prompt.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

# Bump when any generator's output changes (part of cache keys and results' config).
GENERATOR_VERSION = "1"


@dataclass(frozen=True)
class Example:
    """One prompt with its reference answer. With `choices`, the prediction is the choice of
    highest summed log-likelihood and `answer` must be one of them; else greedy generation is
    compared with `answer` (both stripped, generation cut at EOS or newline)."""

    prompt: str
    answer: str
    choices: tuple[str, ...] | None = None

    def __post_init__(self):
        if not isinstance(self.prompt, str) or not isinstance(self.answer, str):
            raise TypeError(f"Example: prompt and answer must be str, got {type(self.prompt).__name__} "
                            f"and {type(self.answer).__name__}")
        if self.choices is not None:
            if not isinstance(self.choices, tuple) or not all(isinstance(c, str) for c in self.choices):
                raise TypeError(f"Example: choices must be a tuple of str or None, got {self.choices!r}")
            if len(self.choices) < 2:
                raise ValueError(f"Example: choices needs at least 2 entries, got {self.choices!r}")
            if self.answer not in self.choices:
                raise ValueError(f"Example: answer {self.answer!r} is not one of choices {self.choices!r}")


@dataclass
class Task:
    """A named task with its train and test examples (disjoint prompts)."""

    name: str
    family: str
    train: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"Task({self.name!r}, family={self.family!r}, train={len(self.train)}, test={len(self.test)})"


NAMES = ("Ava", "Bo", "Cy", "Dax", "Eli", "Fay", "Gus", "Hal", "Ivy", "Jon", "Kit", "Lu", "Max",
         "Ned", "Oli", "Pam", "Quin", "Rex", "Sue", "Tom", "Uma", "Val", "Wes", "Zoe")


def _sample_distinct(name: str, seed: int, n_train: int, n_test: int,
                     draw: Callable[[random.Random], Example]) -> tuple[list[Example], list[Example]]:
    """Draw examples until n_train + n_test distinct prompts exist; the first n_train are train."""
    for arg, value in (("n_train", n_train), ("n_test", n_test)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{arg} must be an int >= 0, got {value!r}")
    rng = random.Random(f"fastcur-task:{name}:{seed}")
    want = n_train + n_test
    seen: dict[str, Example] = {}
    misses = 0  # consecutive draws that found nothing new: the space is (nearly) exhausted
    while len(seen) < want:
        ex = draw(rng)
        if ex.prompt in seen:
            misses += 1
        else:
            seen[ex.prompt], misses = ex, 0
        if misses > 5000:
            raise ValueError(f"task {name!r}: cannot draw {want} distinct examples (n_train={n_train}, "
                             f"n_test={n_test}); found only {len(seen)}")
    examples = list(seen.values())
    return examples[:n_train], examples[n_train:]


# ---------------------------------------------------------------- arithmetic (GSM8K-like)
_ITEMS = ("apple", "pen", "coin", "book", "egg", "card", "shell", "stamp", "cup", "toy")


def _arithmetic(rng: random.Random) -> Example:
    a_name, b_name = rng.sample(NAMES, 2)
    item = rng.choice(_ITEMS)
    kind = rng.randrange(4)
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    if kind == 0:
        q, ans = f"{a_name} has {a} {item}s and gets {b} more. How many {item}s now?", a + b
    elif kind == 1:
        q, ans = f"{a_name} has {a} {item}s. {b_name} has {b}. How many in all?", a + b
    else:
        a, b = max(a, b), min(a, b)
        if kind == 2:
            q, ans = f"{a_name} has {a} {item}s and gives {b} to {b_name}. How many are left?", a - b
        else:
            q, ans = f"{a_name} had {a} {item}s and lost {b}. How many are left?", a - b
    return Example(f"Q: {q}\nA:", str(ans))


# ---------------------------------------------------------------- translation (NewsDE-like)
# Fixed invented lexicon "Vel": adjectives follow the noun; "la" is "the", "e" is "and".
VEL_ADJECTIVES = {"red": "zor", "big": "kel", "old": "mav", "small": "tiu", "green": "pra",
                  "happy": "sen", "cold": "dul", "dark": "vok"}
VEL_NOUNS = {"cat": "mika", "dog": "tuno", "house": "bela", "tree": "raku", "boat": "silo",
             "bird": "fena", "king": "gort", "river": "lumi", "stone": "pazo", "child": "neri",
             "horse": "kova", "fish": "udra"}
VEL_VERBS = {"sees": "vi", "likes": "amo", "finds": "tro"}


def _translation(rng: random.Random) -> Example:
    kind = rng.randrange(3)
    if kind == 0:
        adj, noun = rng.choice(list(VEL_ADJECTIVES)), rng.choice(list(VEL_NOUNS))
        en, vel = f"the {adj} {noun}", f"la {VEL_NOUNS[noun]} {VEL_ADJECTIVES[adj]}"
    elif kind == 1:
        n1, n2 = rng.sample(list(VEL_NOUNS), 2)
        en, vel = f"the {n1} and the {n2}", f"la {VEL_NOUNS[n1]} e la {VEL_NOUNS[n2]}"
    else:
        n1, n2 = rng.sample(list(VEL_NOUNS), 2)
        verb = rng.choice(list(VEL_VERBS))
        en, vel = f"the {n1} {verb} the {n2}", f"{VEL_NOUNS[n1]} {VEL_VERBS[verb]} {VEL_NOUNS[n2]}"
    wrapper = rng.randrange(2)
    prompt = f"English: {en}\nVel:" if wrapper == 0 else f"Translate to Vel: {en}\nVel:"
    return Example(prompt, vel)


# ---------------------------------------------------------------- summarization (CNN/DM-like)
_NEWS_VERBS = ("won", "lost", "sold", "built", "found", "fixed", "painted", "stole")
_NEWS_OBJECTS = ("the race", "a boat", "the old mill", "a prize", "the map", "a bridge", "the crown",
                 "a wagon", "the bell", "a farm")
_FILLERS = ("The weather was mild.", "Many people watched.", "It was a quiet week.",
            "The town was calm.", "Prices stayed the same.", "Nobody expected it.",
            "The market was busy.", "Rain fell all day.", "The news spread fast.",
            "Schools were closed.")


def _summarization(rng: random.Random) -> Example:
    who, other = rng.sample(NAMES, 2)
    verb, obj = rng.choice(_NEWS_VERBS), rng.choice(_NEWS_OBJECTS)
    sentences = [f"{who} {verb} {obj}."]
    n_filler = rng.randint(1, 2)
    sentences += rng.sample(_FILLERS, n_filler)
    if n_filler == 1 and rng.random() < 0.5:  # a distractor name that did nothing newsworthy
        sentences.append(f"{other} was there too.")
    rng.shuffle(sentences)
    return Example(f"Article: {' '.join(sentences)}\nSummary:", f"{who} {verb}")


# ---------------------------------------------------------------- logic (LogiQA-like)
_KINDS = ("blip", "zork", "mib", "trel", "gan", "fop", "lurk", "sim")
_COMPARATIVES = (("taller", "tallest", "shortest"), ("older", "oldest", "youngest"),
                 ("faster", "fastest", "slowest"))


def _logic(rng: random.Random) -> Example:
    if rng.random() < 0.5:
        x, y = rng.sample(_KINDS, 2)
        who = rng.choice(NAMES)
        quant, answer = rng.choice((("All", "yes"), ("No", "no"), ("Some", "maybe")))
        q = f"{quant} {x}s are {y}s. {who} is a {x}. Is {who} a {y}?"
        choices = ("yes", "no", "maybe")
    else:
        a, b, c = rng.sample(NAMES, 3)  # a > b > c
        comp, top, bottom = rng.choice(_COMPARATIVES)
        facts = [f"{a} is {comp} than {b}.", f"{b} is {comp} than {c}."]
        rng.shuffle(facts)
        if rng.random() < 0.5:
            q, answer = f"{' '.join(facts)} Who is the {top}?", a
        else:
            q, answer = f"{' '.join(facts)} Who is the {bottom}?", c
        shown = [a, b, c]
        rng.shuffle(shown)
        choices = tuple(shown)
    return Example(f"Q: {q} Options: {', '.join(choices)}.\nA:", answer, choices)


# ---------------------------------------------------------------- sentiment (SST-2-like)
_POSITIVE = ("good", "great", "lovely", "fun", "warm", "bright", "clever", "charming", "superb",
             "moving", "fresh", "delightful")
_NEGATIVE = ("bad", "dull", "boring", "awful", "cold", "weak", "messy", "bland", "tedious",
             "clumsy", "stale", "painful")
_SUBJECTS = ("film", "plot", "music", "food", "acting", "ending", "story", "show", "book", "cast",
             "script", "service")


def _sentiment(rng: random.Random) -> Example:
    positive = rng.random() < 0.5
    words = _POSITIVE if positive else _NEGATIVE
    subject = rng.choice(_SUBJECTS)
    kind = rng.randrange(4)
    if kind == 0:
        text = f"The {subject} was {rng.choice(words)}."
    elif kind == 1:
        w1, w2 = rng.sample(words, 2)
        text = f"The {subject} was {w1} and {w2}."
    elif kind == 2:
        text = f"What a {rng.choice(words)} {subject}!"
    else:  # negation flips the label
        flipped = _NEGATIVE if positive else _POSITIVE
        text = f"The {subject} was not {rng.choice(flipped)}."
    label = "positive" if positive else "negative"
    return Example(f"Review: {text}\nSentiment:", label, ("positive", "negative"))


# name -> (family, generator)
TASK_GENERATORS: dict[str, tuple[str, Callable[[random.Random], Example]]] = {
    "arithmetic": ("gsm8k-like", _arithmetic),
    "translation": ("newsde-like", _translation),
    "summarization": ("cnndm-like", _summarization),
    "logic": ("logiqa-like", _logic),
    "sentiment": ("sst2-like", _sentiment),
}


def builtin_task_names() -> list[str]:
    """Names of the built-in tasks, in the default sequence order."""
    return list(TASK_GENERATORS)


def make_task(name: str, seed: int = 0, n_train: int = 256, n_test: int = 64) -> Task:
    """One built-in task: n_train + n_test distinct examples, deterministic in (seed, name)."""
    if name not in TASK_GENERATORS:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {', '.join(TASK_GENERATORS)}")
    family, draw = TASK_GENERATORS[name]
    train, test = _sample_distinct(name, seed, n_train, n_test, draw)
    return Task(name, family, train, test)


def builtin_tasks(seed: int = 0, n_train: int = 256, n_test: int = 64,
                  names: Sequence[str] | None = None) -> list[Task]:
    """The built-in task sequence (all five, or `names` in the given order)."""
    return [make_task(n, seed, n_train, n_test) for n in (builtin_task_names() if names is None else names)]
