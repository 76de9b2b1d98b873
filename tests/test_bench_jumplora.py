"""benchmarks/bench_jumplora.py runs end to end through the runner on a tiny case, and every
provider computes the same layer (the seed-code-style and reference providers are the
baselines the README's ratios divide by, so they must compute what JumpLoRALinear does)."""
import importlib.util
import json

import torch

from fastcur.benchmarks import runner
from fastcur.benchmarks.bench_jumplora import BENCHMARK, ELLA_FUSED, ELLA_SEPARATE, PEFT_LORA, RANK_GATE
from fastcur.benchmarks.runner import Case

HAS_PEFT = importlib.util.find_spec("peft") is not None


def test_runner_tiny_case(tmp_path, capsys):
    code = runner.main(["jumplora", "--shapes", "64,32,48,4", "--reps", "5", "--warmup", "0",
                        "--dtype", "float32", "--modes", "fwd+bwd", "--threads", "1",
                        "--out", str(tmp_path), "--no-progress", "--no-plot"])
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads((tmp_path / "jumplora.json").read_text())
    (res,) = report["results"]
    assert set(res["providers"]) == set(BENCHMARK.providers)
    for name, r in res["providers"].items():
        if name == PEFT_LORA and not HAS_PEFT:
            continue
        assert r["status"] == "ok", (name, r)


def _agree(names):
    case = Case(dict(M=40, n=24, k=36, r=4), torch.float64, torch.device("cpu"), "fwd+bwd")
    outs, grads = {}, {}
    for name in names:
        prepared = BENCHMARK.providers[name](case)
        y = prepared.forward()
        outs[name] = y.detach()
        grads[name] = torch.autograd.grad(y.square().sum(), list(prepared.leaves))
    first = next(iter(outs))
    for name in outs:
        torch.testing.assert_close(outs[name], outs[first])
        for a, b in zip(grads[name], grads[first]):
            torch.testing.assert_close(a, b)


def test_weight_gated_providers_agree():
    _agree([name for name in BENCHMARK.providers
            if name not in (PEFT_LORA, RANK_GATE, ELLA_FUSED, ELLA_SEPARATE, BENCHMARK.floor)])


def test_ella_providers_agree():
    """The fused and the separate ELLA providers compute the same y + penalty and gradients."""
    _agree([ELLA_FUSED, ELLA_SEPARATE])
