"""fastcur.continual runner: a two-task, two-method run end to end (tiny sizes, a temporary
cache), and a run interrupted after a task then resumed gives the same results as an
uninterrupted one; atomic state files."""
import json
import math
import os

import pytest
import torch

pytest.importorskip("transformers")
from fastcur.continual import checkpoint  # noqa: E402
from fastcur.continual.runner import RunConfig, run  # noqa: E402

METHODS = ["lora", "curlora"]


def write_task(path, op, seed):
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(20):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            f.write(json.dumps({"prompt": f"{a} {op} {b} =", "answer": str(eval(f"{a} {op} {b}") % 10)}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("continual")
    files = [write_task(root / "plus.jsonl", "+", 0), write_task(root / "times.jsonl", "*", 1)]
    return root, files


def config(root, files, out, **kw):
    opts = dict(methods=METHODS, task_files=files, out=str(root / out), cache_dir=str(root / "cache"), steps=3,
                batch_size=4, n_probe=4, n_heldout=4, pretrain_steps=2, size="tiny", max_len=48, progress=False)
    opts.update(kw)
    return RunConfig(**opts)


@pytest.fixture(scope="module")
def uninterrupted(setup):
    root, files = setup
    return run(config(root, files, "a"), stdout=False)


def test_two_tasks_two_methods_end_to_end(setup, uninterrupted):
    root, _ = setup
    out = root / "a"
    for name in ("results.json", "report.md", "curves.png", "accuracy_matrices.png"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "results.json").read_text())
    assert saved["tasks"] == ["plus", "times"] and list(saved["methods"]) == METHODS
    assert 0.0 <= saved["base"]["probe_accuracy"] <= 1.0 and saved["base"]["perplexity"] > 1.0
    for name in METHODS:
        r = saved["methods"][name]
        acc = r["acc_matrix"]
        assert len(acc) == 2 and all(len(row) == 2 and all(0.0 <= a <= 1.0 for a in row) for row in acc)
        assert r["average_accuracy"] == pytest.approx((acc[1][0] + acc[1][1]) / 2)
        assert r["backward_transfer"] == pytest.approx(acc[1][0] - acc[0][0])
        assert len(r["probe_accuracy"]) == len(r["perplexity"]) == len(r["retention"]) == 2
        assert all(math.isfinite(p) and p > 1.0 for p in r["perplexity"])
        assert r["time_per_step_s"] > 0 and r["peak_memory_mb"] > 0 and r["train_steps"] == 6
    # LoRA trains A and B on 7 layers; CUR-LoRA an r x r core per layer.
    assert saved["methods"]["lora"]["trainable_params"] > saved["methods"]["curlora"]["trainable_params"] > 0
    assert saved == json.loads(json.dumps(uninterrupted))


class Interrupted(Exception):
    pass


def test_resume_after_an_interruption_gives_the_same_results(setup, uninterrupted):
    root, files = setup

    def stop(name, index):
        if (name, index) == ("curlora", 0):
            raise Interrupted

    with pytest.raises(Interrupted):
        run(config(root, files, "b"), on_task_end=stop, stdout=False)
    partial = json.loads((root / "b" / "results.json").read_text())["methods"]
    assert len(partial["lora"]["acc_matrix"]) == 2 and len(partial["curlora"]["acc_matrix"]) == 1
    assert partial["curlora"]["average_accuracy"] is None          # not finished
    trained = []
    resumed = run(config(root, files, "b", resume=True), on_task_end=lambda n, i: trained.append((n, i)),
                  stdout=False)
    assert trained == [("curlora", 1)]                  # only what was left
    for name in METHODS:
        a, b = uninterrupted["methods"][name], resumed["methods"][name]
        for key in ("acc_matrix", "probe_accuracy", "perplexity", "retention", "train_loss",
                    "average_accuracy", "backward_transfer", "trainable_params", "train_steps"):
            assert a[key] == b[key], (name, key)

    with pytest.raises(ValueError, match="--resume: the run in .* used other settings.*steps"):
        run(config(root, files, "b", resume=True, steps=4), stdout=False)


def test_state_files_are_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "state" / "m.pt"
    checkpoint.atomic_torch_save({"x": 1}, path)

    def broken(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.atomic_torch_save({"x": 2}, path)
    monkeypatch.undo()
    assert torch.load(path) == {"x": 1}
    assert os.listdir(path.parent) == ["m.pt"]
