"""JSONL tasks and probes: parsing, deterministic disjoint split, errors that name file and line."""
import json

import pytest

from fastcur.continual import Example, load_jsonl_examples, load_jsonl_task


def write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def rows(n):
    return [json.dumps({"prompt": f"Q{i}:", "answer": f"a{i}"}) for i in range(n)]


def test_examples_with_blank_lines_and_choices(tmp_path):
    f = write(tmp_path / "p.jsonl", [rows(1)[0], "", "   ",
                                     json.dumps({"prompt": "Pick:", "answer": "b", "choices": ["a", "b"]})])
    assert load_jsonl_examples(f) == [Example("Q0:", "a0"), Example("Pick:", "b", ("a", "b"))]


def test_task_split_is_deterministic_disjoint_and_complete(tmp_path):
    f = write(tmp_path / "mytask.jsonl", rows(50))
    t = load_jsonl_task(f, test_fraction=0.2, seed=1)
    assert t.name == "mytask" and (len(t.train), len(t.test)) == (40, 10)
    assert {e.prompt for e in t.train} | {e.prompt for e in t.test} == {f"Q{i}:" for i in range(50)}
    assert not {e.prompt for e in t.train} & {e.prompt for e in t.test}
    assert load_jsonl_task(f, test_fraction=0.2, seed=1).test == t.test
    assert load_jsonl_task(f, test_fraction=0.2, seed=2).test != t.test
    assert load_jsonl_task(f, name="x").name == "x"
    two = load_jsonl_task(write(tmp_path / "two.jsonl", rows(2)), test_fraction=0.9)
    assert (len(two.train), len(two.test)) == (1, 1)


@pytest.mark.parametrize("bad, message", [
    ('{"prompt": "a", "answer": ', "not valid JSON"),
    ('["prompt", "answer"]', "expected a JSON object"),
    ('{"prompt": "a"}', "missing key 'answer'"),
    ('{"prompt": 3, "answer": "b"}', "'prompt' must be a string"),
    ('{"prompt": "a", "answer": "  "}', "'answer' is empty"),
    ('{"prompt": "a", "answer": "b", "choices": "bc"}', "'choices' must be a list of strings"),
    ('{"prompt": "a", "answer": "b", "choices": ["c", "d"]}', "not one of choices"),
])
def test_malformed_lines_name_file_and_line(tmp_path, bad, message):
    f = write(tmp_path / "bad.jsonl", rows(2) + ["", bad])
    with pytest.raises(ValueError, match=message) as info:
        load_jsonl_examples(f)
    assert f"bad.jsonl:4:" in str(info.value)


def test_missing_empty_and_too_small_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_jsonl_task(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="no examples"):
        load_jsonl_examples(write(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(ValueError, match="at least 2 examples"):
        load_jsonl_task(write(tmp_path / "one.jsonl", rows(1)))
    with pytest.raises(ValueError, match="test_fraction"):
        load_jsonl_task(write(tmp_path / "ok.jsonl", rows(5)), test_fraction=1.0)
