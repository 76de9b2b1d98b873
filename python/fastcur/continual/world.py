"""A synthetic world of invented people and their attributes: the pretraining corpus of the tiny
base model, and the basic-knowledge probe whose accuracy tells how much of it survives fine-tuning.

Each person (an invented name such as "Zorvak") has four attributes: the town they live in (an
invented name), a job, a favourite food and a pet. Every attribute has three sentence templates
and three question phrasings. For each fact, one template and one phrasing are held out (chosen at
random per fact): pretraining sees the fact in the other two templates (inside several shuffled
"bios" per person) and asked in the other two phrasings; the probe asks it in its held-out
phrasing, and `heldout_texts` states it in its held-out template (for perplexity). Every template
and phrasing occurs in pretraining (for other facts), every fact too, but no probe question or
held-out sentence does: the probe measures knowledge that pretraining put in the weights, not
memorized strings, and a model that forgets the facts (or the question/answer format) loses
probe accuracy.

Pretraining also states the general knowledge the built-in tasks build on (`general_knowledge`):
the order of the numbers 1..9, the Vel lexicon word by word, and the polarity of the review words;
and "format primers": general facts written in each task's prompt format, disjoint from the tasks'
data (see `_primers`).

    world = build_world(seed=0)
    world.pretraining_texts()[0]   # 'Zorvak lives in Plimt. Zorvak keeps a goat at home. ...'
    world.probe()[0]               # Example(prompt='Q: In what town does Zorvak live?\\nA:', answer='Plimt', choices=(towns))
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from .tasks import MAX_NUMBER, NEWS_TOPICS, SENTIMENT_NEGATIVE, SENTIMENT_POSITIVE, VEL_ADJECTIVES, VEL_NOUNS, Example

# Bump when the world's texts or probe change (part of the pretraining cache key).
WORLD_VERSION = "6"

JOBS = ("baker", "farmer", "miner", "sailor", "doctor", "painter", "tailor", "hunter")
FOODS = ("bread", "rice", "plums", "soup", "cheese", "beans", "figs", "honey")
PETS = ("cat", "dog", "owl", "goat", "frog", "crow", "hen", "mule")
ATTRIBUTES = ("town", "job", "food", "pet")

# Per attribute: three sentence templates.
FACT_TEMPLATES = {
    "town": ("{e} lives in {v}.", "{e} has a home in {v}.", "The home of {e} is in {v}."),
    "job": ("{e} works as a {v}.", "{e} is a {v} by trade.", "By trade, {e} is a {v}."),
    "food": ("{e} likes to eat {v}.", "The favorite food of {e} is {v}.", "{e} enjoys {v} the most."),
    "pet": ("{e} has a pet {v}.", "{e} keeps a {v} at home.", "The pet of {e} is a {v}."),
}
# Per attribute: three question phrasings.
QUESTION_TEMPLATES = {
    "town": ("Where does {e} live?", "Which town does {e} live in?", "In what town does {e} live?"),
    "job": ("What is the job of {e}?", "What does {e} work as?", "What job does {e} have?"),
    "food": ("What does {e} like to eat?", "What food does {e} like?", "Which food does {e} like best?"),
    "pet": ("What pet does {e} have?", "Which animal is the pet of {e}?", "What kind of pet does {e} keep?"),
}

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "pl", "tr", "gr")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "", "k", "n", "r", "l", "s", "m", "nt", "rk")


def general_knowledge() -> list[str]:
    """Sentences the built-in tasks rely on: "8 is larger than 3." (numbers 1..9), "In Vel, cat is
    mika.", "In Vel, the is la.", "Someone who robbed a bank is crime news." (the task's and the
    primers' news events), "Lovely is a positive word." (fixed, not seeded)."""
    n = range(1, MAX_NUMBER + 1)
    texts = [f"{a} is larger than {b}." for a in n for b in n if a > b]
    texts += [f"In Vel, {en} is {vel}." for en, vel in {**VEL_ADJECTIVES, **VEL_NOUNS, "the": "la"}.items()]
    texts += [f"Someone who {event} is {topic} news." for events in (NEWS_TOPICS, _PRIMER_NEWS)
              for topic, group in events.items() for event in group]
    texts += [f"{w.capitalize()} is a positive word." for w in SENTIMENT_POSITIVE]
    texts += [f"{w.capitalize()} is a negative word." for w in SENTIMENT_NEGATIVE]
    return texts


# Format primers: general facts written in each built-in task's prompt format, disjoint from
# every task's examples (other words, other names, other shapes), so that a task's steps go to
# its content, not to learning an output format the base never saw (without them the base spent
# 4-8 nats per answer token on the task formats; with them 0.06-3.2).
_PRIMER_NEWS = {"sport": ("climbed the peak", "swam the lake"), "crime": ("burned a barn", "took a purse"),
                "trade": ("rented a hall", "paid a debt"), "art": ("played the harp", "danced a waltz"),
                "science": ("tested a lens", "grew a crystal")}
_PRIMER_GOOD = ("nice", "happy", "sweet", "kind", "calm", "glad")
_PRIMER_BAD = ("sad", "sour", "rude", "ugly", "grim", "harsh")
_PRIMER_SUBJECTS = ("day", "trip", "party", "walk", "game", "visit")


def _primers(world: "World", rng: random.Random) -> list[str]:
    from .tasks import _FILLERS, _LARGEST_WRAPPERS, _VEL_WRAPPERS

    texts = [w.format(str(v)) + f" {v}" for v in range(1, MAX_NUMBER + 1) for w in _LARGEST_WRAPPERS]
    texts += [w.format(", ".join([str(v)] * 3)) + f" {v}" for v in range(1, MAX_NUMBER + 1)
              for w in _LARGEST_WRAPPERS[:1]]
    for en, vel in {**VEL_ADJECTIVES, **VEL_NOUNS}.items():   # single words: the tasks always say "the"
        texts.append(rng.choice(_VEL_WRAPPERS).format(en) + f" {vel}")
    people = [p.name for p in world.people]
    for who in people[: min(len(people), 24)]:
        topic = rng.choice(list(_PRIMER_NEWS))
        s = [f"{who} {rng.choice(_PRIMER_NEWS[topic])}.", rng.choice(_FILLERS)]
        rng.shuffle(s)
        texts.append(f"Article: {' '.join(s)}\nTopic: {topic}")
    for p in world.people[: min(len(world.people), 24)]:
        town = p.attributes["town"]
        other = rng.choice([t for t in world.towns if t != town])
        asked, answer = (town, "yes") if rng.random() < 0.5 else (other, "no")
        seen = [k for k in range(3) if k != world.held_out(p.name, "town")[0]]   # never the held-out sentence
        fact = FACT_TEMPLATES["town"][rng.choice(seen)].format(e=p.name, v=town)
        texts.append(f"Premises: {fact} Is {p.name} in {asked}?\nOptions: yes, no, maybe\nConclusion: {answer}")
    for words, label in ((_PRIMER_GOOD, "positive"), (_PRIMER_BAD, "negative")):
        for w in words:
            texts.append(f"Review: A {w} {rng.choice(_PRIMER_SUBJECTS)}.\nSentiment: {label}")
    return texts


def _invented_names(rng: random.Random, n: int, syllables: int, taken: set[str]) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables - 1))
        word = (word + rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)).capitalize()
        if word not in taken and len(word) >= 4:
            taken.add(word)
            names.append(word)
    return names


@dataclass(frozen=True)
class Person:
    name: str
    attributes: dict = field(hash=False)  # attribute name -> value


@dataclass
class World:
    """The generated world; every method is deterministic in `seed`."""

    seed: int
    people: list[Person]
    towns: tuple[str, ...]
    bios_per_person: int = 4
    general_knowledge: bool = True

    def facts(self) -> list[tuple[str, str, str]]:
        """(person, attribute, value) for every fact."""
        return [(p.name, a, p.attributes[a]) for p in self.people for a in ATTRIBUTES]

    def values(self, attribute: str) -> tuple[str, ...]:
        """The possible values of `attribute` (chance accuracy is 1 / len of this)."""
        return {"town": self.towns, "job": JOBS, "food": FOODS, "pet": PETS}[attribute]

    def held_out(self, name: str, attribute: str) -> tuple[int, int]:
        """(sentence template, question phrasing) index held out for this fact."""
        rng = random.Random(f"fastcur-world-holdout:{self.seed}:{name}:{attribute}")
        return rng.randrange(3), rng.randrange(3)

    def pretraining_texts(self) -> list[str]:
        """Bios (a person's facts in shuffled order, each in one of its two seen templates), Q/A pairs
        ("Q: <question>\nA: <value>", each fact in its two seen phrasings) and, with
        general_knowledge, the `general_knowledge()` sentences; shuffled."""
        rng = random.Random(f"fastcur-world-pretrain:{self.seed}")
        texts = []
        for p in self.people:
            held = {a: self.held_out(p.name, a) for a in ATTRIBUTES}
            for _ in range(self.bios_per_person):
                order = list(ATTRIBUTES)
                rng.shuffle(order)
                texts.append(" ".join(
                    FACT_TEMPLATES[a][rng.choice([k for k in range(3) if k != held[a][0]])].format(
                        e=p.name, v=p.attributes[a]) for a in order))
            for a in ATTRIBUTES:
                for k, q in enumerate(QUESTION_TEMPLATES[a]):
                    if k != held[a][1]:
                        texts.append(f"Q: {q.format(e=p.name)}\nA: {p.attributes[a]}")
        if self.general_knowledge:
            texts += general_knowledge() + _primers(self, rng)
        rng.shuffle(texts)
        return texts

    def heldout_texts(self) -> list[str]:
        """One bio per person, every fact in its held-out template (for perplexity)."""
        rng = random.Random(f"fastcur-world-heldout:{self.seed}")
        texts = []
        for p in self.people:
            order = list(ATTRIBUTES)
            rng.shuffle(order)
            texts.append(" ".join(FACT_TEMPLATES[a][self.held_out(p.name, a)[0]].format(e=p.name, v=p.attributes[a])
                                  for a in order))
        return texts

    def probe(self, ranked: bool = True) -> list[Example]:
        """Every fact asked in its held-out phrasing; the answer is the attribute value. ranked=True:
        the attribute's values are the choices (scored by likelihood: does the model still know
        the fact?); ranked=False: no choices (scored by exact-match generation: does it still
        answer in the format?)."""
        return [Example(f"Q: {QUESTION_TEMPLATES[a][self.held_out(name, a)[1]].format(e=name)}\nA:", value,
                        tuple(self.values(a)) if ranked else None)
                for name, a, value in self.facts()]


def build_world(seed: int = 0, n_entities: int = 48, n_towns: int = 8, bios_per_person: int = 4,
                general_knowledge: bool = True) -> World:
    """Invent `n_entities` people living in `n_towns` invented towns, with random attributes."""
    for arg, value, low, high in (("n_entities", n_entities, 1, 5000), ("n_towns", n_towns, 2, 50),
                                  ("bios_per_person", bios_per_person, 1, 100)):
        if not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"{arg} must be an int in [{low}, {high}], got {value!r}")
    rng = random.Random(f"fastcur-world:{seed}")
    taken: set[str] = set()
    towns = tuple(_invented_names(rng, n_towns, 1, taken))
    names = _invented_names(rng, n_entities, 2, taken)
    people = [Person(n, {"town": rng.choice(towns), "job": rng.choice(JOBS), "food": rng.choice(FOODS),
                         "pet": rng.choice(PETS)}) for n in names]
    return World(seed, people, towns, bios_per_person, general_knowledge)
