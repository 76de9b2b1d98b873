"""Adapter configs: defaults, validation, dict round trip, layer options, name matching."""
import pytest
from torch import nn

import fastcur
from fastcur.config import matches

CONFIGS = [
    fastcur.LoRAConfig(rank=4, alpha=16.0, dropout=0.1, use_rslora=True, target_modules=["q_proj"]),
    fastcur.CURLoRAConfig(rank=3, scale=0.5, select="lowest", replace=True, inverse_eps=0.0, seed=7,
                          target_modules=r".*\.up_proj"),
    fastcur.SecuraConfig(rank=2, inner_rank=5, init="kaiming", lora_bias=True, norm="raw", scope="tensor",
                         merge_mode="signorm", merge_every=3, reselect_on_merge=True, fold_lora_bias=True,
                         restrain_rule="released", seed=2),
    fastcur.JumpLoRAConfig(rank=4, alpha=8.0, gate="rank", f=0.5, reduction="sum", threshold_scope="per_block"),
]


def test_defaults_follow_the_papers_and_peft():
    lora = fastcur.LoRAConfig()
    assert (lora.rank, lora.alpha, lora.dropout, lora.use_rslora, lora.target_modules) == (8, 8.0, 0.0, False, "all-linear")
    cur = fastcur.CURLoRAConfig()
    assert (cur.rank, cur.scale, cur.select, cur.replace, cur.seed) == (8, 1.0, "sample", False, 0)
    assert cur.inverse_eps == 1e-3  # the released code's 1 / (p + 0.001)
    sec = fastcur.SecuraConfig()
    assert (sec.inner_rank, sec.init, sec.signorm, sec.k, sec.merge_mode) == (None, "svd", "output", 6.0, "plain")
    # the released code: C, R selected once, lora_bias kept in Δ at a merge; SigNorm normalized
    # (a recorded Decision) and the restrain rule's fastcur form (the released one an option)
    assert (sec.reselect_on_merge, sec.fold_lora_bias, sec.norm, sec.restrain_rule) == (False, False, "max", "fastcur")
    jump = fastcur.JumpLoRAConfig()
    assert (jump.rank, jump.alpha, jump.gate, jump.threshold_scope) == (8, 32.0, "weight", "global")
    assert [c.method for c in CONFIGS] == ["lora", "curlora", "secura", "jumplora"]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.method)
def test_dict_round_trip(config):
    d = config.to_dict()
    assert d["method"] == config.method
    again = fastcur.AdapterConfig.from_dict(d)
    assert type(again) is type(config) and again == config


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.method)
def test_layer_options_build_the_layer_and_read_back(config):
    layer = config.layer_class.from_linear(nn.Linear(12, 10), **config.layer_options())
    options = type(config).options_of(layer)
    assert options == {k: v for k, v in config.layer_options().items() if k in options}
    assert "target_modules" not in options and "rank" in options


def test_from_dict_errors():
    with pytest.raises(ValueError, match="unknown method 'dora'"):
        fastcur.AdapterConfig.from_dict({"method": "dora", "rank": 4})
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['rnak'\]"):
        fastcur.AdapterConfig.from_dict({"method": "lora", "rnak": 4})


@pytest.mark.parametrize("make, message", [
    (lambda: fastcur.LoRAConfig(rank=0), "rank must be an int >= 1, got 0"),
    (lambda: fastcur.LoRAConfig(rank=2.0), "rank must be an int"),
    (lambda: fastcur.LoRAConfig(dropout=1.0), "dropout must be a number in"),
    (lambda: fastcur.CURLoRAConfig(select="top"), "select must be one of 'sample', 'lowest', got 'top'"),
    (lambda: fastcur.SecuraConfig(merge_every=0), "merge_every must be an int >= 1 or None"),
    (lambda: fastcur.SecuraConfig(signorm="input"), "signorm must be one of"),
    (lambda: fastcur.SecuraConfig(restrain_rule="paper"), "restrain_rule must be one of 'fastcur', 'released'"),
    (lambda: fastcur.SecuraConfig(fold_lora_bias=1), "fold_lora_bias must be a bool"),
    (lambda: fastcur.CURLoRAConfig(inverse_eps=-0.5), "inverse_eps must be a number in"),
    (lambda: fastcur.JumpLoRAConfig(f=1.5), "f must be a number in"),
    (lambda: fastcur.JumpLoRAConfig(threshold_scope="block"), "threshold_scope must be one of"),
    (lambda: fastcur.LoRAConfig(target_modules=[]), "target_modules must be a non-empty list"),
    (lambda: fastcur.LoRAConfig(target_modules=["q", 3]), "target_modules must be"),
    (lambda: fastcur.LoRAConfig(target_modules="q_proj("), "regular expression, but it does not compile"),
])
def test_validation_names_the_option(make, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make()


def test_suffixes_match_whole_name_components_and_regex_the_whole_name():
    assert matches("layers.0.q_proj", ["q_proj"]) and matches("q_proj", ["q_proj"])
    assert not matches("layers.0.q_proj", ["proj"]) and not matches("layers.0.xq_proj", ["q_proj"])
    assert matches("layers.0.self_attn.q_proj", ["self_attn.q_proj"])
    assert matches("layers.0.q_proj", r"layers\.\d+\.q_proj")
    assert not matches("layers.0.q_proj", r"q_proj")           # fullmatch, not search
    assert matches("anything", "all-linear")
