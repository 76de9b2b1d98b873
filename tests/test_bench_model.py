"""`fastcur bench model` runs end to end on a tiny config: every method's training step, the
table, the JSON (ratios, tokens/s) and the size presets. No assertion on speed."""
from __future__ import annotations

import json

import pytest
import torch

from fastcur.benchmarks import runner

pytest.importorskip("transformers")
pytest.importorskip("peft")

from fastcur.benchmarks.bench_model import BENCHMARK, FLOOR  # noqa: E402
from fastcur.benchmarks.providers import PEFT_LORA  # noqa: E402

TINY = "2,16,64,1,4,97"


def test_every_method_trains_one_step(tmp_path, capsys):
    code = runner.main(["model", "--shapes", TINY, "--reps", "5", "--warmup", "0", "--threads", "1",
                        "--out", str(tmp_path), "--no-progress", "--no-memory", "--no-lock"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "tokens/s" in out and "vs PEFT LoRA" in out
    report = json.loads((tmp_path / "model.json").read_text())
    assert report["throughput_unit"] == "tokens"
    assert (tmp_path / "model.png").stat().st_size > 0
    (res,) = report["results"]
    assert res["case"]["mode"] == "train"
    assert set(res["providers"]) == set(BENCHMARK.providers)
    for name, r in res["providers"].items():
        assert r["status"] == "ok", (name, r)
        assert r["throughput_per_s"] == pytest.approx(2 * 16 / (r["time_ms"] / 1e3))
        assert r["ratios"][PEFT_LORA] == pytest.approx(r["time_ms"] / res["providers"][PEFT_LORA]["time_ms"])
        pairs = [a / b for a, b in zip(r["samples_ms"], res["providers"][PEFT_LORA]["samples_ms"])]
        assert r["paired_ratios"][PEFT_LORA] == pytest.approx(sorted(pairs)[len(pairs) // 2])
    assert res["providers"][FLOOR]["ratio_vs_floor"] == pytest.approx(1.0)


@pytest.mark.parametrize("name", [n for n in BENCHMARK.providers if n != FLOOR])
def test_a_step_changes_only_the_adapter(name):
    """One timed call is a real training step: the trained tensors move, the base stays frozen."""
    case = runner.Case({"B": 2, "T": 8, "d": 64, "L": 1, "r": 4, "V": 53}, torch.float32, torch.device("cpu"),
                       "train")
    prepared = BENCHMARK.providers[name](case)
    before = [p.detach().clone() for p in prepared.leaves]
    loss = prepared.forward()
    assert torch.isfinite(loss)
    assert prepared.leaves and all(p.grad is not None for p in prepared.leaves)
    assert any(not torch.equal(b, p) for b, p in zip(before, prepared.leaves))


def test_floor_backward_reaches_every_block():
    """The floor trains nothing, yet its backward runs through the first block's projections."""
    case = runner.Case({"B": 1, "T": 6, "d": 64, "L": 2, "r": 4, "V": 53}, torch.float32, torch.device("cpu"),
                       "train")
    prepared = BENCHMARK.providers[FLOOR](case)
    assert not prepared.leaves
    reached = []
    handle = torch.nn.modules.module.register_module_full_backward_hook(
        lambda m, gi, go: reached.append(type(m).__name__))
    try:
        prepared.forward()
    finally:
        handle.remove()
    assert reached.count("Linear") == 2 * 7 + 1        # every projection of both blocks, and the head
    assert "LlamaDecoderLayer" in reached


def test_size_presets(tmp_path, capsys):
    assert BENCHMARK.sizes["gpu"]["device"] == "cuda" and BENCHMARK.sizes["gpu"]["dtypes"] == ("bfloat16",)
    assert runner.main(["cur_linear", "--size", "cpu", "--out", str(tmp_path)]) == 2
    assert "no such preset" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert runner.main(["model", "--size", "gpu", "--out", str(tmp_path)]) == 2
        assert "no CUDA GPU" in capsys.readouterr().err
