"""Built-in tasks: deterministic in the seed, train/test disjoint, and every answer right by an
independent re-derivation from the prompt."""
import re

import pytest

from fastcur.continual import Example, Task, builtin_task_names, builtin_tasks, make_task
from fastcur.continual import tasks as T

NAMES = ["largest", "translation", "summarization", "logic", "sentiment"]


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
    assert [t.name for t in builtin_tasks(0, 4, 2, names=["sentiment", "largest"])] == ["sentiment", "largest"]
    with pytest.raises(ValueError, match="unknown task 'poetry'.*largest"):
        make_task("poetry")
    with pytest.raises(ValueError, match="n_train"):
        make_task("logic", n_train=-1)
    with pytest.raises(ValueError, match="cannot draw"):
        make_task("translation", n_train=100_000)


def test_largest_answers():
    task = make_task("largest", 1, n_train=256, n_test=64)
    assert len(task.test) == 64
    for e in task.train + task.test:
        nums = [int(x) for x in re.findall(r"\d+", e.prompt)]
        assert len(nums) == 3 and len(set(nums)) == 3 and all(1 <= n <= 9 for n in nums)
        assert e.prompt.endswith("\nLargest:") and e.answer == str(sorted(nums)[-1])


def test_translation_answers_word_by_word():
    for e in make_task("translation", 1).train:
        phrase = re.search(r": (.*)\nVel:$", e.prompt).group(1).split()
        if len(phrase) == 3:  # the ADJ NOUN -> NOUN' ADJ'
            assert phrase[0] == "the" and e.answer.split() == [T.VEL_NOUNS[phrase[2]], T.VEL_ADJECTIVES[phrase[1]]]
        else:                 # the NOUN -> la NOUN'
            assert phrase[0] == "the" and e.answer.split() == ["la", T.VEL_NOUNS[phrase[1]]]


def test_summarization_answer_is_the_topic_of_the_one_news_event():
    topic_of = {event: topic for topic, events in T.NEWS_TOPICS.items() for event in events}
    answers = set()
    for e in make_task("summarization", 1).train:
        article = e.prompt.removeprefix("Article: ").removesuffix("\nTopic:")
        sentences = [s.strip().rstrip(".") for s in article.split(".") if s.strip()]
        news = [s for s in sentences if s.split(" ", 1)[0] in T.NAMES]
        assert len(news) == 1 and 2 <= len(sentences) <= 4
        assert e.answer == topic_of[news[0].split(" ", 1)[1]]
        answers.add(e.answer)
    assert answers == set(T.NEWS_TOPICS)


def test_logic_answers():
    expected = {"All": "yes", "Every": "yes", "No": "no", "None": "no", "Some": "maybe", "A": "maybe"}
    for e in make_task("logic", 1).train:
        assert e.choices == ("yes", "no", "maybe") and e.answer in e.choices
        premises = e.prompt.removeprefix("Premises: ").split("\n")[0]
        quantified = [s for s in premises.split(". ") if s.split()[0] in expected]
        assert len(quantified) == 1
        assert e.answer == expected[quantified[0].split()[0]]


def test_sentiment_labels():
    for e in make_task("sentiment", 1).train:
        words = set(re.findall(r"[a-z]+", e.prompt.split("\n")[0]))
        pos, neg = words & set(T.SENTIMENT_POSITIVE), words & set(T.SENTIMENT_NEGATIVE)
        assert bool(pos) != bool(neg)
        assert e.answer == ("positive" if pos else "negative") and e.choices == ("positive", "negative")


def test_every_task_has_its_own_prompt_format():
    markers = {t.name: t.train[0].prompt.split("\n")[-1] for t in builtin_tasks(0, 1, 1)}
    assert len(set(markers.values())) == 5 and "A:" not in markers.values()  # "A:" is the probe's
    for t in builtin_tasks(0, 40, 10):
        assert {e.prompt.split("\n")[-1] for e in t.train + t.test} == {markers[t.name]}


def test_example_validation():
    with pytest.raises(ValueError, match="not one of choices"):
        Example("p", "c", ("a", "b"))
    with pytest.raises(TypeError, match="prompt and answer must be str"):
        Example("p", 3)
    with pytest.raises(ValueError, match="at least 2"):
        Example("p", "a", ("a",))
