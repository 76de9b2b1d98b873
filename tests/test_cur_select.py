"""CUR selection (docs/methods.md, CURLoRA): the inverted probabilities as the released code
computes them (1/(p + 0.001)) and the paper's pure 1/p, each layer's own stream derived from the
seed and its qualified name, and independent draws in same-shape layers after `fastcur.inject`."""
import copy
import hashlib

import numpy as np
import pytest
import torch
from torch import nn

import fastcur
from fastcur.ops.cur_select import cur_select, inverted_probabilities, layer_generator, layer_seed


def released_probabilities(w: np.ndarray, axis: int, e: float) -> np.ndarray:
    """The released code's column (axis 0) / row (axis 1) probabilities, re-derived in float64:
    p = ||.||^2 / ||W||_F^2, p~ = (1/(p + e)) / sum(1/(p + e))."""
    sq = (w.astype(np.float64) ** 2).sum(axis)
    inv = 1.0 / (sq / sq.sum() + e)
    return inv / inv.sum()


@pytest.mark.parametrize("e", [1e-3, 0.0])
def test_inverted_probabilities_match_float64_rederivation(e):
    w = torch.randn(37, 53, dtype=torch.float32) * torch.linspace(0.1, 3, 53)
    for axis in (0, 1):
        sq = (w.double() ** 2).sum(axis)
        got = inverted_probabilities(sq, e)
        np.testing.assert_allclose(got.numpy(), released_probabilities(w.numpy(), axis, e), rtol=1e-12, atol=0)


def test_released_eps_is_much_flatter_than_pure_inverse():
    """On a weight where p is about 1/k, 1/(p + 0.001) is flatter than 1/p (the reason the
    default follows the released code): the spread max/min of p~ shrinks."""
    w = torch.randn(256, 1024) * torch.linspace(0.2, 2.0, 1024)
    sq = (w.double() ** 2).sum(0)
    released, pure = inverted_probabilities(sq), inverted_probabilities(sq, 0.0)
    assert released.max() / released.min() < 0.5 * (pure.max() / pure.min())


def test_sampled_indices_are_the_multinomial_of_the_rederived_probabilities():
    w = torch.randn(40, 60)
    for e in (1e-3, 0.0):
        rows, cols = cur_select(w, 7, "sample", generator=torch.Generator().manual_seed(3), inverse_eps=e)
        g = torch.Generator().manual_seed(3)
        exp_cols = torch.multinomial(torch.from_numpy(released_probabilities(w.numpy(), 0, e)), 7, generator=g)
        exp_rows = torch.multinomial(torch.from_numpy(released_probabilities(w.numpy(), 1, e)), 7, generator=g)
        assert torch.equal(cols, exp_cols) and torch.equal(rows, exp_rows)


def test_layer_seed_is_sha256_of_seed_and_name():
    """Stable across processes and Python's hash salt: re-derived here from the definition."""
    for seed, name in ((0, "model.layers.0.self_attn.q_proj"), (7, "fc1"), (3, None)):
        text = f"fastcur:{seed}:{'' if name is None else name}"
        expected = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1
        assert layer_seed(seed, name) == expected
    assert layer_seed(0, "a.q_proj") != layer_seed(0, "a.k_proj") != layer_seed(1, "a.k_proj")
    a, b = layer_generator(5, "x"), layer_generator(5, "x")
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


class EightSame(nn.Module):
    def __init__(self, n=8, d=128):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_same_shape_layers_draw_independent_columns_and_repeat_across_runs():
    torch.manual_seed(0)
    base = EightSame()
    # the same weight in every layer: only the stream can make the draws differ
    with torch.no_grad():
        for layer in base.layers[1:]:
            layer.weight.copy_(base.layers[0].weight)
    first = fastcur.inject(copy.deepcopy(base), fastcur.CURLoRAConfig(rank=8, seed=0))
    again = fastcur.inject(copy.deepcopy(base), fastcur.CURLoRAConfig(rank=8, seed=0))
    layers = list(fastcur.adapter_modules(first).values())
    shared = [len(set(a.cols.tolist()) & set(b.cols.tolist()))
              for i, a in enumerate(layers) for b in layers[i + 1:]]
    # independent draws of 8 of 128 near-uniform columns share about 8 * 8 / 128 = 0.5
    assert np.mean(shared) < 2.0, shared
    for name, layer in fastcur.adapter_modules(again).items():
        ref = fastcur.adapter_modules(first)[name]
        assert layer.module_name == name
        assert torch.equal(layer.cols, ref.cols) and torch.equal(layer.rows, ref.rows)
        # each layer's draw is the one of its own stream
        rows, cols = cur_select(layer.weight, 8, "sample", generator=layer_generator(0, name))
        assert torch.equal(layer.cols, cols) and torch.equal(layer.rows, rows)


def test_directly_built_layers_fall_back_to_the_seed_alone():
    lin = nn.Linear(64, 48)
    a = fastcur.CURLoRALinear.from_linear(lin, rank=6, seed=4)
    b = fastcur.CURLoRALinear.from_linear(lin, rank=6, seed=4)
    c = fastcur.CURLoRALinear.from_linear(lin, rank=6, seed=4, module_name="fc")
    assert a.module_name is None and torch.equal(a.cols, b.cols)
    rows, cols = cur_select(lin.weight, 6, "sample", generator=layer_generator(4, "fc"))
    assert torch.equal(c.cols, cols) and torch.equal(c.rows, rows)
    built = fastcur.CURLoRALinear(64, 48, rank=6, seed=4, module_name="fc")
    built.load_state_dict(lin.state_dict(), strict=False)
    built.select()
    assert torch.equal(built.cols, cols)


def test_secura_restrain_streams_differ_per_layer():
    torch.manual_seed(0)
    base = EightSame(n=2, d=64)
    with torch.no_grad():
        base.layers[1].weight.copy_(base.layers[0].weight)
    model = fastcur.inject(base, fastcur.SecuraConfig(rank=2, restrain=True, seed=1))
    a, b = fastcur.adapter_modules(model).values()
    ca, cb = a._restrain_channels(), b._restrain_channels()
    assert not torch.equal(ca, cb)
    n, r = 64, 2
    for layer, got in ((a, ca), (b, cb)):
        norms = layer.weight.detach().float().norm(dim=1)
        expected = torch.multinomial(norms, max((n - r) // 2, n // 4), generator=layer_generator(1, layer.module_name))
        assert torch.equal(got, expected)


def test_bad_inverse_eps_is_refused():
    with pytest.raises(ValueError, match="inverse_eps must be a number >= 0"):
        cur_select(torch.randn(5, 5), 2, inverse_eps=-1)
    with pytest.raises(ValueError, match="inverse_eps must be a number >= 0"):
        fastcur.CURLoRALinear(5, 5, rank=2, inverse_eps=-0.1)
    with pytest.raises(ValueError, match="inverse_eps"):
        fastcur.CURLoRAConfig(inverse_eps=-1.0)
