"""Built-in tasks: deterministic in the seed, train/test disjoint, and every answer right by an
independent re-derivation from the prompt."""
import re

import pytest

from fastcur.continual import Example, Task, builtin_task_names, builtin_tasks, make_task
from fastcur.continual import tasks as T

NAMES = ["arithmetic", "translation", "summarization", "logic", "sentiment"]


def test_five_families_in_order():
    assert builtin_task_names() == NAMES
    tasks = builtin_tasks(0, n_train=20, n_test=10)
    assert [t.name for t in tasks] == NAMES
    assert len({t.family for t in tasks}) == 5
    assert all(isinstance(t, Task) and len(t.train) == 20 and len(t.test) == 10 for t in tasks)


def test_same_seed_same_data_different_seed_different_data():
    a, b, c = builtin_tasks(3, 64, 16), builtin_tasks(3, 64, 16), builtin_tasks(4, 64, 16)
    for ta, tb, tc in zip(a, b, c):
        assert ta.train == tb.train and ta.test == tb.test
        assert ta.train != tc.train and ta.test != tc.test


@pytest.mark.parametrize("name", NAMES)
def test_default_sizes_distinct_prompts_train_test_disjoint(name):
    task = make_task(name, seed=0)
    prompts = [e.prompt for e in task.train + task.test]
    assert (len(task.train), len(task.test)) == (256, 64)
    assert len(set(prompts)) == len(prompts)
    for e in task.train + task.test:
        assert isinstance(e, Example) and e.answer and e.answer == e.answer.strip()
        assert not e.prompt[-1].isspace()
        assert len(e.answer) <= 20 and len(e.prompt) <= 120  # short: learnable by a tiny byte model


def test_names_select_and_order():
    assert [t.name for t in builtin_tasks(0, 4, 2, names=["sentiment", "arithmetic"])] == ["sentiment", "arithmetic"]
    with pytest.raises(ValueError, match="unknown task 'poetry'.*arithmetic"):
        make_task("poetry")
    with pytest.raises(ValueError, match="n_train"):
        make_task("logic", n_train=-1)
    with pytest.raises(ValueError, match="cannot draw"):
        make_task("translation", n_train=100_000)


def test_arithmetic_answers():
    for e in make_task("arithmetic", 1).train:
        nums = [int(x) for x in re.findall(r"\d+", e.prompt)]
        assert len(nums) == 2 and all(1 <= n <= 9 for n in nums)
        plus = "more" in e.prompt or "in all" in e.prompt
        assert int(e.answer) == (nums[0] + nums[1] if plus else nums[0] - nums[1])


def test_translation_answers_word_by_word():
    en = {**T.VEL_ADJECTIVES, **T.VEL_NOUNS, **T.VEL_VERBS, "the": "la", "and": "e"}
    for e in make_task("translation", 1).train:
        phrase = re.search(r": (.*)\nVel:$", e.prompt).group(1).split()
        if phrase[1] in T.VEL_ADJECTIVES:       # the ADJ NOUN -> la NOUN ADJ
            expected = ["la", en[phrase[2]], en[phrase[1]]]
        elif phrase[2] == "and":                # the N1 and the N2
            expected = [en[w] for w in phrase]
        else:                                   # the N1 VERB the N2 -> N1 VERB N2
            expected = [en[phrase[1]], en[phrase[2]], en[phrase[4]]]
        assert e.answer.split() == expected


def test_summarization_answer_is_the_news_sentence():
    for e in make_task("summarization", 1).train:
        article = e.prompt.removeprefix("Article: ").removesuffix("\nSummary:")
        news = [s for s in article.split(". ") if s.split()[1:2] and s.split()[1] in T._NEWS_VERBS]
        assert len(news) == 1
        assert e.answer == " ".join(news[0].split()[:2])
        assert 2 <= article.count(".") <= 3


def test_logic_answers():
    for e in make_task("logic", 1).train:
        assert e.choices is not None and e.answer in e.choices
        assert f"Options: {', '.join(e.choices)}." in e.prompt
        m = re.match(r"Q: (All|No|Some) ", e.prompt)
        if m:
            assert e.answer == {"All": "yes", "No": "no", "Some": "maybe"}[m.group(1)]
            continue
        pairs = re.findall(r"(\w+) is \w+ than (\w+)\.", e.prompt)
        bigger = {a for a, _ in pairs}
        smaller = {b for _, b in pairs}
        top = bigger - smaller
        bottom = smaller - bigger
        asks_top = any(f"the {w[1]}?" in e.prompt for w in T._COMPARATIVES)
        assert {e.answer} == (top if asks_top else bottom)


def test_sentiment_labels():
    for e in make_task("sentiment", 1).train:
        words = set(re.findall(r"[a-z]+", e.prompt.split("\n")[0]))
        pos, neg = words & set(T._POSITIVE), words & set(T._NEGATIVE)
        assert bool(pos) != bool(neg)
        label = "positive" if pos else "negative"
        if "not" in words:
            label = {"positive": "negative", "negative": "positive"}[label]
        assert e.answer == label and e.choices == ("positive", "negative")


def test_example_validation():
    with pytest.raises(ValueError, match="not one of choices"):
        Example("p", "c", ("a", "b"))
    with pytest.raises(TypeError, match="prompt and answer must be str"):
        Example("p", 3)
    with pytest.raises(ValueError, match="at least 2"):
        Example("p", "a", ("a",))
