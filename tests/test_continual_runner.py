"""fastcur.continual runner: a two-task, two-method run end to end (tiny sizes, a temporary
cache; the methods in two worker processes); a run interrupted after a task then resumed (in
this process) gives the same results as an uninterrupted one; --resume reads the run's own options; state files are safetensors + JSON (nothing is
unpickled) and a damaged one gives a one-line error; every method sees the same batches."""
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
    opts = dict(methods=METHODS, task_files=files, out=str(root / out), cache_dir=str(root / "cache"), steps=5,
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
    # two methods on 2 threads: each in its own worker process (the resume test below reruns
    # them in this process and must get the same results)
    assert torch.get_num_threads() < 2 or saved["config"]["workers"] == 2
    assert 0.0 <= saved["base"]["probe"] <= 1.0 and saved["base"]["perplexity"] > 1.0
    for name in METHODS:
        r = saved["methods"][name]
        acc = r["acc_matrix"]
        assert len(acc) == 2 and all(len(row) == 2 and all(0.0 <= a <= 1.0 for a in row) for row in acc)
        assert r["average_accuracy"] == pytest.approx((acc[1][0] + acc[1][1]) / 2)
        assert r["bwt"] == pytest.approx(acc[1][0] - acc[0][0])
        assert r["plasticity"] == pytest.approx((acc[0][0] + acc[1][1]) / 2)
        for key in ("retention", "plasticity", "average_accuracy", "bwt", "perplexity"):
            assert key in r
        assert len(r["probe"]) == len(r["probe_generation"]) == len(r["perplexity_curve"]) == 2
        assert all(math.isfinite(p) and p > 1.0 for p in r["perplexity_curve"]) and r["perplexity"] > 1.0
        # 5 steps per task, the first 3 of each untimed
        assert r["timed_steps"] == 4 and r["ms_per_step"] > 0 and r["peak_memory_mb"] > 0 and r["train_steps"] == 10
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
        for key in ("acc_matrix", "probe", "probe_generation", "perplexity_curve", "retention_curve", "train_loss",
                    "average_accuracy", "bwt", "plasticity", "retention", "trainable_params", "train_steps"):
            assert a[key] == b[key], (name, key)

    with pytest.raises(ValueError, match="--resume: the run in .* used other settings.*steps"):
        run(config(root, files, "b", resume=True, steps=6), stdout=False)


def test_resume_reads_the_runs_own_options(setup, uninterrupted):
    from fastcur.continual.runner import RUN_FILE, resume_config

    root, files = setup
    cfg = resume_config(str(root / "a"), {})
    assert cfg.methods == METHODS and cfg.steps == 5 and cfg.task_files == files and cfg.resume
    assert resume_config(str(root / "a"), {"steps": 5}).steps == 5          # the same value is fine
    with pytest.raises(ValueError, match=r"--resume: the run in .* used other options \(methods: saved"):
        resume_config(str(root / "a"), {"methods": ["seq"]})
    with pytest.raises(ValueError, match="has no run.json"):
        resume_config(str(root), {})
    (root / "broken").mkdir()
    (root / "broken" / RUN_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="cannot read .*run.json"):
        resume_config(str(root / "broken"), {})


def test_state_files_are_safetensors_and_json_and_never_unpickled(tmp_path):
    import numpy as np

    path = str(tmp_path / "state" / "m.json")
    tree = {"w": torch.arange(6.0).reshape(2, 3), "pair": (1, "a"), "n": [np.arange(3, dtype=np.uint32)],
            "rng": checkpoint.rng_state()}
    checkpoint.write_state(path, tree, tag="1")
    checkpoint.write_state(path, {**tree, "w": torch.ones(2)}, tag="2")
    assert sorted(os.listdir(tmp_path / "state")) == ["m-2.safetensors", "m.json"]   # the old tensors removed
    back = checkpoint.read_state(path)
    assert torch.equal(back["w"], torch.ones(2)) and back["pair"] == (1, "a")
    assert back["n"][0].dtype == np.uint32 and back["n"][0].tolist() == [0, 1, 2]
    checkpoint.set_rng_state(back["rng"])
    json.loads((tmp_path / "state" / "m.json").read_text())   # plain JSON
    # damaged: bad JSON, a tensor file that is gone, a tensor file named outside the folder
    (tmp_path / "state" / "m.json").write_text("{")
    with pytest.raises(ValueError, match="cannot read the state file .*m.json"):
        checkpoint.read_state(path)
    checkpoint.write_state(path, tree, tag="3")
    os.remove(tmp_path / "state" / "m-3.safetensors")
    with pytest.raises(ValueError, match="cannot read the tensor file .*m-3.safetensors"):
        checkpoint.read_state(path)
    doc = {"format": checkpoint.FORMAT, "tensors": "../evil.safetensors", "state": {}}
    (tmp_path / "state" / "m.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="outside its folder"):
        checkpoint.read_state(path)


def test_every_method_sees_the_same_batches():
    from fastcur.continual.methods import MethodContext, build_method
    from fastcur.continual.pretrain import tiny_llama_config
    from fastcur.continual.runner import train_task
    from fastcur.continual.tasks import make_task

    transformers = pytest.importorskip("transformers")
    task = make_task("sentiment", 0, n_train=20, n_test=2)
    seen = {}
    for name in ("lora", "curlora", "seq"):
        drawn = []

        def make_batch(examples, drawn=drawn):
            from fastcur.continual.evaluate import training_batch
            from fastcur.continual.tokenizer import ByteTokenizer

            drawn.append([e.prompt for e in examples])
            return training_batch(examples, ByteTokenizer(), 64)

        model = transformers.LlamaForCausalLM(tiny_llama_config(size="tiny"))
        method = build_method(name)
        ctx = MethodContext(make_batch=make_batch, steps=4, batch_size=4, seed=7)
        method.setup(model, ctx)
        train_task(method, model, task, 1, ctx, device=torch.device("cpu"))
        seen[name] = drawn
    assert seen["lora"] == seen["curlora"] == seen["seq"] and len(seen["lora"]) == 4


def test_seeds_run_in_their_own_folders_and_report_mean_and_spread(setup):
    root, files = setup
    results = run(config(root, files, "seeds", methods=["lora"], seeds=2, steps=4), stdout=False)
    lora = results["methods"]["lora"]
    per_seed = [json.loads((root / "seeds" / f"seed-{s}" / "results.json").read_text())["methods"]["lora"]
                for s in (0, 1)]
    assert lora["per_seed"]["plasticity"] == [r["plasticity"] for r in per_seed]
    assert lora["plasticity"] == pytest.approx(sum(r["plasticity"] for r in per_seed) / 2)
    assert set(lora["spread"]) >= {"retention", "plasticity", "average_accuracy", "bwt", "perplexity"}
    saved = json.loads((root / "seeds" / "results.json").read_text())
    assert saved["fine_tuning_seeds"] == [0, 1] and "probe" in saved["base"]
