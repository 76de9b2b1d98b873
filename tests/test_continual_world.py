"""The synthetic world: deterministic, every probe fact stated in pretraining, probe phrasings and
held-out texts absent from pretraining."""
import pytest

from fastcur.continual import Example, build_world
from fastcur.continual import world as W


def test_same_seed_same_world_different_seed_differs():
    a, b, c = build_world(5), build_world(5), build_world(6)
    assert a.pretraining_texts() == b.pretraining_texts()
    assert a.heldout_texts() == b.heldout_texts() and a.probe() == b.probe()
    assert a.pretraining_texts() != c.pretraining_texts() and a.probe() != c.probe()


def test_sizes_and_names():
    w = build_world(0, n_entities=10, n_towns=3, bios_per_person=2)
    names = [p.name for p in w.people]
    assert len(set(names)) == 10 and len(set(w.towns)) == 3 and not set(names) & set(w.towns)
    primers = len(W._primers(w, __import__("random").Random(0)))
    assert len(w.pretraining_texts()) == 10 * (2 + 2 * len(W.ATTRIBUTES)) + len(W.general_knowledge()) + primers
    bare = build_world(0, n_entities=10, n_towns=3, bios_per_person=2, general_knowledge=False)
    assert len(bare.pretraining_texts()) == 10 * (2 + 2 * len(W.ATTRIBUTES))
    assert len(w.heldout_texts()) == 10 and len(w.probe()) == 10 * len(W.ATTRIBUTES)
    assert all(p.attributes["town"] in w.towns for p in w.people)
    with pytest.raises(ValueError, match="n_entities"):
        build_world(0, n_entities=0)


def test_probe_asks_facts_that_pretraining_states_in_other_words():
    w = build_world(1, n_entities=12)
    texts = w.pretraining_texts()
    corpus = "\n".join(texts)
    attrs = {p.name: p.attributes for p in w.people}
    phrasings_used = set()
    for ex, (name, attr, value) in zip(w.probe(), w.facts()):
        assert isinstance(ex, Example) and ex.choices == tuple(w.values(attr))
        assert ex.answer == value == attrs[name][attr]
        assert name in ex.prompt and ex.prompt.startswith("Q: ") and ex.prompt.endswith("\nA:")
        assert ex.prompt not in corpus  # this question is held out...
        fact_k, question_k = w.held_out(name, attr)
        assert ex.prompt == f"Q: {W.QUESTION_TEMPLATES[attr][question_k].format(e=name)}\nA:"
        phrasings_used.add((attr, question_k))
        asked = [f"Q: {q.format(e=name)}\nA: {value}" for k, q in enumerate(W.QUESTION_TEMPLATES[attr]) if k != question_k]
        assert len(asked) == 2 and all(a in texts for a in asked)  # ...the fact is asked in the other two
        stated = [t.format(e=name, v=value) for k, t in enumerate(W.FACT_TEMPLATES[attr]) if k != fact_k]
        assert any(s in corpus for s in stated)
        assert W.FACT_TEMPLATES[attr][fact_k].format(e=name, v=value) not in corpus
    assert len(phrasings_used) > len(W.ATTRIBUTES)  # held-out phrasings vary from fact to fact
    for person, text in zip(w.people, w.heldout_texts()):
        held_out = [W.FACT_TEMPLATES[a][w.held_out(person.name, a)[0]].format(e=person.name, v=person.attributes[a])
                    for a in W.ATTRIBUTES]
        assert sorted(held_out) == sorted(s if s.endswith(".") else s + "." for s in text.split(". "))
        assert not any(s in corpus for s in held_out)


def test_general_knowledge_states_what_the_tasks_use():
    from fastcur.continual import tasks as T

    texts = W.general_knowledge()
    assert set(texts) <= set(build_world(0).pretraining_texts())
    assert "9 is larger than 1." in texts and "2 is larger than 1." in texts
    for sentence in (t for t in texts if " larger than " in t):
        a, *_, b = sentence.rstrip(".").split()
        assert int(a) > int(b)
    assert sum(" larger than " in t for t in texts) == 36
    for en, vel in {**T.VEL_NOUNS, **T.VEL_ADJECTIVES}.items():
        assert f"In Vel, {en} is {vel}." in texts
    for topic, events in T.NEWS_TOPICS.items():
        assert all(f"Someone who {event} is {topic} news." in texts for event in events)
    assert all(f"{w.capitalize()} is a positive word." in texts for w in T.SENTIMENT_POSITIVE)
    assert all(f"{w.capitalize()} is a negative word." in texts for w in T.SENTIMENT_NEGATIVE)


def test_primers_teach_the_task_formats_without_the_tasks_data():
    from fastcur.continual import tasks as T

    w = build_world(0)
    corpus = w.pretraining_texts()
    tasks = T.builtin_tasks(0, n_train=256, n_test=64)
    for task in tasks:
        marker = task.test[0].prompt.rsplit("\n", 1)[-1]       # "Largest:", "Vel:", "Sentiment:", ...
        primed = [t for t in corpus if "\n" + marker + " " in t]
        assert len(primed) >= 6, task.name
        if task.name == "summarization":                      # the primers' events are not the task's
            task_events = {e for events in T.NEWS_TOPICS.values() for e in events}
            assert not any(event in t for t in primed for event in task_events)
        for ex in task.train + task.test:                     # no task example is in pretraining
            assert ex.prompt + " " + ex.answer not in primed, (task.name, ex)
            assert not any(t.startswith(ex.prompt) for t in primed), (task.name, ex)


def test_ranked_probe_offers_the_attributes_values():
    w = build_world(0, n_entities=10, n_towns=3)
    for ex, (_, attr, value) in zip(w.probe(), w.facts()):
        assert ex.choices == tuple(w.values(attr)) and ex.answer == value
    assert all(ex.choices is None for ex in w.probe(ranked=False))
