"""`fastcur continual` from the command line: a small run prints the table and writes the
results; clear errors (exit 2, one line naming the problem) for unknown methods, missing
files, malformed JSONL, a bad --model folder and a model without linear layers to adapt."""
import json

import pytest

pytest.importorskip("transformers")
from fastcur.cli import main  # noqa: E402

TINY = ["--steps", "2", "--batch-size", "4", "--n-probe", "4", "--n-heldout", "4", "--pretrain-steps", "2", "--size", "tiny",
        "--max-len", "48", "--no-progress"]


def task_file(path, n=12):
    path.write_text("".join(json.dumps({"prompt": f"{i} + 1 =", "answer": str((i + 1) % 10)}) + "\n"
                            for i in range(n)))
    return str(path)


def fail(capsys, argv, *needles):
    assert main(["continual", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]   # after any progress output of transformers
    assert err.startswith("fastcur continual: error:"), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def test_unknown_method_lists_the_valid_ones(capsys):
    fail(capsys, ["--methods", "lora,ewc-typo"], "'ewc-typo'", "seq", "lora-ewc", "lalora-kfac")


def test_missing_files(tmp_path, capsys):
    fail(capsys, ["--tasks", str(tmp_path / "nope.jsonl")], "--tasks", "nope.jsonl")
    fail(capsys, ["--probe", str(tmp_path / "probe.jsonl")], "--probe", "probe.jsonl")
    fail(capsys, ["--model", str(tmp_path / "model")], "--model", "model")


def test_malformed_jsonl_names_file_and_line(tmp_path, capsys):
    good = task_file(tmp_path / "good.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "c", "answer": \n')
    fail(capsys, ["--tasks", good, str(bad), "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "o"),
                  *TINY], "bad.jsonl", "2")


def test_bad_sizes(capsys):
    fail(capsys, ["--steps", "0"], "--steps", "0")


def test_model_folder_errors(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    (tmp_path / "empty").mkdir()
    fail(capsys, ["--model", str(tmp_path / "empty")], "--model", "config.json")
    # GPT-2 computes with Conv1D, not nn.Linear: nothing for the adapters to wrap.
    cfg = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    fail(capsys, ["--model", str(tmp_path / "gpt2"), "--methods", "lora", "--out", str(tmp_path / "o")],
         "no nn.Linear layer to adapt", "Conv1D")


def test_small_run_prints_the_table_and_writes_results(tmp_path, capsys):
    files = [task_file(tmp_path / "one.jsonl"), task_file(tmp_path / "two.jsonl")]
    out = tmp_path / "out"
    assert main(["continual", "--methods", "lora", "--tasks", *files, "--cache-dir", str(tmp_path / "cache"),
                 "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "lora" in printed and str(out) in printed
    results = json.loads((out / "results.json").read_text())
    assert results["tasks"] == ["one", "two"] and list(results["methods"]) == ["lora"]
    assert (out / "report.md").exists()


def test_bad_options_give_one_line_errors(tmp_path, capsys):
    fail(capsys, ["--device", "banana"], "--device", "banana")
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    fail(capsys, ["--out", str(afile)], "--out", "not a folder")
    fail(capsys, ["--seeds", "0"], "--seeds", "0")
    fail(capsys, ["--resume"], "--resume needs --out")


def test_resume_of_a_damaged_or_foreign_folder(tmp_path, capsys):
    fail(capsys, ["--out", str(tmp_path / "none"), "--resume"], "--resume", "does not exist")
    fail(capsys, ["--out", str(tmp_path), "--resume"], "--resume", "has no run.json")
    (tmp_path / "run.json").write_text('{"format": "fastcur.continual.run/1", "options": {"bogus": 1}}')
    fail(capsys, ["--out", str(tmp_path), "--resume"], "--resume", "not a fastcur continual run file")


def test_demo_bad_options(capsys):
    for argv, needle in ((["--steps", "0"], "--steps"), (["--device", "banana"], "--device")):
        assert main(["demo", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("fastcur demo: error:") and needle in err[0], err
