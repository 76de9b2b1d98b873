"""The built-in task sequence of the continual benchmark: five small synthetic tasks, one per family
the continual-learning papers use, generated deterministically from a seed.

| name          | family (paper's data set) | prompt -> answer                                          | scored by |
|---------------|---------------------------|-----------------------------------------------------------|-----------|
| largest       | gsm8k-like                | "Numbers: 4, 9, 2" -> "9" (the largest of three, 1..9)      | exact match |
| translation   | newsde-like               | "the red cat" -> invented language "Vel": "mika zor"       | exact match |
| summarization | cnndm-like                | 2-4 sentence article -> its topic ("crime"), a one-word headline | exact match |
| logic         | logiqa-like               | syllogism (All/No/Some ...) -> yes / no / maybe            | likelihood of each choice |
| sentiment     | sst2-like                 | one-sentence review -> positive / negative                 | likelihood of each choice |

Prompts end in a marker ("Largest:", "Vel:", "Sentiment:", ...) with no trailing space; answers
carry no leading space (`evaluate` joins them with one space). Every task has its own prompt
format, distinct from the probe's "Q: ...\nA:", so forgetting shows as lost knowledge rather than
a hijacked format. Answers are a few bytes and build on what the base model learnt in
pretraining (world.py states the order of the numbers, the Vel lexicon, the topic of every news
event and the polarity of the review words), so a tiny byte-level model learns each task in tens to hundreds of steps, and training on
one disturbs the others (forgetting shows in the accuracy matrix).

Determinism: a task's examples depend only on (seed, task name). Every prompt within a task is
distinct, so train and test never share a prompt.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

# Bump when any generator's output changes (part of cache keys and results' config).
GENERATOR_VERSION = "5"


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


# ---------------------------------------------------------------- largest (GSM8K-like: numeric reasoning)
# Replaces the arithmetic word problems of earlier versions: sums at this scale were memorized
# (training loss 0.27, test 16 %), not learnt. Picking the largest of three numbers is a rule the
# tiny base learns in tens of steps and applies to unseen triples.
MAX_NUMBER = 9
_LARGEST_WRAPPERS = ("Numbers: {}\nLargest:", "Which is largest: {}?\nLargest:", "Pick the largest of {}\nLargest:")


def _largest(rng: random.Random) -> Example:
    values = rng.sample(range(1, MAX_NUMBER + 1), 3)
    return Example(rng.choice(_LARGEST_WRAPPERS).format(", ".join(map(str, values))), str(max(values)))


# ---------------------------------------------------------------- translation (NewsDE-like)
# Fixed invented lexicon "Vel" (the base model's pretraining states it word by word, see world.py):
# adjectives follow the noun; "la" is "the".
VEL_ADJECTIVES = {"red": "zor", "big": "kel", "old": "mav", "small": "tiu", "green": "pra",
                  "happy": "sen", "cold": "dul", "dark": "vok"}
VEL_NOUNS = {"cat": "mika", "dog": "tuno", "house": "bela", "tree": "raku", "boat": "silo",
             "bird": "fena", "king": "gort", "river": "lumi", "stone": "pazo", "child": "neri",
             "horse": "kova", "fish": "udra"}
_VEL_WRAPPERS = ("English: {}\nVel:", "Translate to Vel: {}\nVel:", "Say it in Vel: {}\nVel:",
                 "In Vel, please: {}\nVel:")


def _translation(rng: random.Random) -> Example:
    noun = rng.choice(list(VEL_NOUNS))
    if rng.random() < 0.8:
        adj = rng.choice(list(VEL_ADJECTIVES))
        en, vel = f"the {adj} {noun}", f"{VEL_NOUNS[noun]} {VEL_ADJECTIVES[adj]}"
    else:
        en, vel = f"the {noun}", f"la {VEL_NOUNS[noun]}"
    return Example(rng.choice(_VEL_WRAPPERS).format(en), vel)


# ---------------------------------------------------------------- summarization (CNN/DM-like)
# The article's one-word headline: the topic of its one newsworthy sentence, among filler
# sentences. An earlier version asked who made the news (copying a name out of the article); the
# 2-layer base did not learn that copy in the quick budget (53 % on held-out articles after 100
# full fine-tuning steps at the best rate, 11-56 % with LoRA). Naming the topic is learnt like the
# other tasks: pretraining states each event's topic (world.general_knowledge), the task teaches
# the model to find the event among the fillers and answer in the "Topic:" format.
NEWS_TOPICS = {
    "sport": ("won the race", "lost the match", "scored a goal", "ran the marathon"),
    "crime": ("stole the crown", "robbed a bank", "forged a letter", "broke a window"),
    "trade": ("sold a farm", "bought a wagon", "opened a shop", "lent some gold"),
    "art": ("painted a mural", "sang an opera", "wrote a poem", "carved a statue"),
    "science": ("found a comet", "built a robot", "cured a fever", "mapped a cave"),
}
_FILLERS = ("The weather was mild.", "Many people watched.", "It was a quiet week.",
            "The town was calm.", "Prices stayed the same.", "Nobody expected it.",
            "The market was busy.", "Rain fell all day.", "The news spread fast.",
            "Schools were closed.")


def _summarization(rng: random.Random) -> Example:
    """One newsworthy sentence ("Bo robbed a bank.") among 1-3 fillers; the headline is its topic."""
    topic = rng.choice(list(NEWS_TOPICS))
    sentences = [f"{rng.choice(NAMES)} {rng.choice(NEWS_TOPICS[topic])}."] + rng.sample(_FILLERS, rng.randint(1, 3))
    rng.shuffle(sentences)
    return Example(f"Article: {' '.join(sentences)}\nTopic:", topic)


# ---------------------------------------------------------------- logic (LogiQA-like)
_KINDS = ("blip", "zork", "mib", "trel", "gan", "fop", "lurk", "sim")
# quantifier -> the answer to "Is N a Y?" given "N is a X"
_QUANTIFIERS = (("All", "yes"), ("Every one of the", "yes"), ("No", "no"), ("None of the", "no"),
                ("Some", "maybe"), ("A few", "maybe"))
LOGIC_CHOICES = ("yes", "no", "maybe")


def _logic(rng: random.Random) -> Example:
    x, y = rng.sample(_KINDS, 2)
    who = rng.choice(NAMES)
    quant, answer = rng.choice(_QUANTIFIERS)
    premises = [f"{quant} {x}s are {y}s.", f"{who} is a {x}."]
    rng.shuffle(premises)
    q = f"{' '.join(premises)} Is {who} a {y}?"
    return Example(f"Premises: {q}\nOptions: yes, no, maybe\nConclusion:", answer, LOGIC_CHOICES)


# ---------------------------------------------------------------- sentiment (SST-2-like)
SENTIMENT_POSITIVE = ("good", "great", "lovely", "fun", "warm", "bright", "clever", "charming", "superb",
                      "moving", "fresh", "delightful")
SENTIMENT_NEGATIVE = ("bad", "dull", "boring", "awful", "cold", "weak", "messy", "bland", "tedious",
                      "clumsy", "stale", "painful")
_SUBJECTS = ("film", "plot", "music", "food", "acting", "ending", "story", "show", "book", "cast",
             "script", "service")


def _sentiment(rng: random.Random) -> Example:
    positive = rng.random() < 0.5
    words = SENTIMENT_POSITIVE if positive else SENTIMENT_NEGATIVE
    subject = rng.choice(_SUBJECTS)
    kind = rng.randrange(3)
    if kind == 0:
        text = f"The {subject} was {rng.choice(words)}."
    elif kind == 1:
        w1, w2 = rng.sample(words, 2)
        text = f"The {subject} was {w1} and {w2}."
    else:
        text = f"What a {rng.choice(words)} {subject}!"
    label = "positive" if positive else "negative"
    return Example(f"Review: {text}\nSentiment:", label, ("positive", "negative"))


# name -> (family, generator)
TASK_GENERATORS: dict[str, tuple[str, Callable[[random.Random], Example]]] = {
    "largest": ("gsm8k-like", _largest),
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
