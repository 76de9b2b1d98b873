"""PEFT interop: PEFT LoRA dirs load into LoRALinear with PEFT's outputs; exports load in PEFT."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastcur
from tiny_models import ids, perturb_adapters, tiny_llama, tiny_lm

peft = pytest.importorskip("peft")


def _peft_dir(tmp_path, base, seed=3, **lora):
    """A PEFT LoRA adapter of `base` (a deep copy is wrapped) with random B, saved to tmp_path."""
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**lora))
    perturb_adapters(model, seed=seed)
    model.save_pretrained(tmp_path)
    return model.eval()


@pytest.mark.parametrize("lora", [
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]),
    dict(r=4, lora_alpha=16, use_rslora=True, lora_dropout=0.1,
         target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]),
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
         rank_pattern={"layers.1.q_proj": 2, "up_proj": 3}, alpha_pattern={"v_proj": 5}),
], ids=["suffixes", "rslora-dropout", "patterns"])
def test_peft_dir_loads_with_peft_outputs(lora, tmp_path):
    base = tiny_lm()
    peft_model = _peft_dir(tmp_path, base, **lora)
    ours = fastcur.load_peft_adapter(copy.deepcopy(base), tmp_path).eval()
    x = ids()
    assert torch.equal(ours(x), peft_model(x))
    layers = fastcur.adapter_modules(ours)
    assert set(layers) == {n.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                           for n in load_file(tmp_path / "adapter_model.safetensors") if n.endswith("lora_A.weight")}
    if "rank_pattern" in lora:
        assert layers["layers.1.q_proj"].rank == 2 and layers["layers.0.q_proj"].rank == 4
        assert layers["layers.0.up_proj"].rank == 3 and layers["layers.1.v_proj"].scaling == 5 / 4
    assert all(type(m) is fastcur.LoRALinear for m in layers.values())
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == \
           {f"{n}.lora_{ab}.weight" for n in layers for ab in "AB"}
    # a fastcur save of the imported adapter reloads exactly
    fastcur.save_adapter(ours, tmp_path / "fc")
    assert torch.equal(fastcur.load_adapter(copy.deepcopy(base), tmp_path / "fc").eval()(x), ours(x))


def test_peft_llama_adapter_loads_with_peft_outputs(tmp_path):
    pytest.importorskip("transformers")
    base = tiny_llama()
    peft_model = _peft_dir(tmp_path, base, r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    ours = fastcur.load_peft_adapter(tiny_llama(), tmp_path)
    assert len(fastcur.adapter_modules(ours)) == 14 and "lm_head" not in fastcur.adapter_modules(ours)
    x = ids(shape=(2, 9), vocab=61)
    assert torch.equal(ours(x).logits, peft_model(x).logits)


@pytest.mark.parametrize("patterns", [False, True])
def test_export_loads_in_peft(patterns, tmp_path):
    base = tiny_lm()
    ours = fastcur.inject(copy.deepcopy(base), fastcur.LoRAConfig(rank=4, alpha=6, target_modules=["q_proj", "up_proj"]))
    if patterns:                                   # heterogeneous layers: rank_pattern / alpha_pattern
        layer = ours.layers[1].up_proj
        ours.layers[1].up_proj = fastcur.LoRALinear.from_linear(
            torch.nn.Linear(layer.in_features, layer.out_features).requires_grad_(False), rank=2, alpha=3)
        ours.layers[1].up_proj.weight, ours.layers[1].up_proj.bias = layer.weight, layer.bias
        ours.layers[0].q_proj.alpha = 10.0
        ours.layers[0].q_proj.scaling = 10.0 / 4
    perturb_adapters(ours)
    ours.eval()
    fastcur.export_peft_adapter(ours, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["target_modules"] == list(fastcur.adapter_modules(ours))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    x = ids()
    assert torch.equal(loaded(x), ours(x))
    if patterns:
        assert loaded.base_model.model.layers[1].up_proj.r["default"] == 2
    # and back into fastcur
    again = fastcur.load_peft_adapter(copy.deepcopy(base), tmp_path)
    assert torch.equal(again.eval()(x), ours(x))


def test_export_llama_loads_in_peft(tmp_path):
    pytest.importorskip("transformers")
    ours = fastcur.inject(tiny_llama(), fastcur.LoRAConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    perturb_adapters(ours)
    fastcur.export_peft_adapter(ours, tmp_path, task_type="CAUSAL_LM")
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert isinstance(loaded, peft.PeftModelForCausalLM)
    x = ids(shape=(2, 9), vocab=61)
    assert torch.equal(loaded(x).logits, ours(x).logits)


def test_unsupported_peft_features_are_refused(tmp_path):
    base = tiny_lm()
    _peft_dir(tmp_path / "dora", base, r=2, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(ValueError, match="PEFT features fastcur's LoRALinear does not compute: use_dora"):
        fastcur.load_peft_adapter(tiny_lm(), tmp_path / "dora")
    _peft_dir(tmp_path / "emb", base, r=2, target_modules=["embed", "q_proj"])
    with pytest.raises(ValueError, match=r"holds tensors other than.*base_model.model.embed.lora_embedding_A"):
        fastcur.load_peft_adapter(tiny_lm(), tmp_path / "emb")
    _peft_dir(tmp_path / "bias", base, r=2, target_modules=["q_proj"], bias="lora_only")
    with pytest.raises(ValueError, match="bias='lora_only'"):
        fastcur.load_peft_adapter(tiny_lm(), tmp_path / "bias")


def test_load_peft_errors(tmp_path):
    base = tiny_lm()
    _peft_dir(tmp_path, base, r=2, target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"module 'layers.0.q_proj' \(in_features=32, out_features=32, rank 2\) "
                                         r"needs lora_A \[2, 32\] and lora_B \[32, 2\], got \[2, 24\] and \[24, 2\]"):
        fastcur.load_peft_adapter(tiny_lm(d=32), tmp_path)
    with pytest.raises(ValueError, match="module 'layers.1.q_proj' does not exist"):
        fastcur.load_peft_adapter(tiny_lm(n=1), tmp_path)
    with pytest.raises(ValueError, match="already holds"):
        fastcur.load_peft_adapter(fastcur.inject(tiny_lm(), fastcur.LoRAConfig(rank=2)), tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    del tensors["base_model.model.layers.0.q_proj.lora_B.weight"]
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    model = tiny_lm()
    with pytest.raises(ValueError, match="module 'layers.0.q_proj' lacks lora_B.weight"):
        fastcur.load_peft_adapter(model, tmp_path)
    assert not fastcur.adapter_modules(model) and all(p.requires_grad for p in model.parameters())
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x10\x00garbage")
    with pytest.raises(ValueError, match="adapter_model.safetensors cannot be read"):
        fastcur.load_peft_adapter(tiny_lm(), tmp_path)
    fastcur.save_adapter(fastcur.inject(tiny_lm(), fastcur.LoRAConfig(rank=2)), tmp_path / "fc")
    with pytest.raises(ValueError, match="a fastcur adapter: use fastcur.load_adapter"):
        fastcur.load_peft_adapter(tiny_lm(), tmp_path / "fc")


def test_export_errors(tmp_path):
    with pytest.raises(ValueError, match="only LoRALinear layers export to PEFT.*module 'layers.0.q_proj' is a CURLoRALinear"):
        fastcur.export_peft_adapter(fastcur.inject(tiny_lm(), fastcur.CURLoRAConfig(rank=2)), tmp_path)
    merged = fastcur.merge(fastcur.inject(tiny_lm(), fastcur.LoRAConfig(rank=2, target_modules=["q_proj"])))
    with pytest.raises(ValueError, match="are merged.*fastcur.unmerge"):
        fastcur.export_peft_adapter(merged, tmp_path)
    with pytest.raises(ValueError, match="no fastcur adapter layer"):
        fastcur.export_peft_adapter(tiny_lm(), tmp_path)


def test_a_peft_adapter_loads_as_a_named_adapter_beside_others(tmp_path):
    base = tiny_lm()
    peft_model = _peft_dir(tmp_path, base, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    model = fastcur.inject(copy.deepcopy(base), fastcur.CURLoRAConfig(rank=3, target_modules=["q_proj"]),
                           adapter_name="cur")
    perturb_adapters(model, seed=8)
    x = ids()
    cur_out = model(x)
    other = fastcur.inject(tiny_lm(n=1), fastcur.LoRAConfig(rank=2), adapter_name="a")
    with pytest.raises(ValueError, match="module 'layers.1.q_proj' does not exist"):
        fastcur.load_peft_adapter(other, tmp_path, adapter_name="peft")
    assert fastcur.adapter_names(other) == ["a"] and type(other.layers[0].q_proj) is fastcur.LoRALinear
    fastcur.load_peft_adapter(model, tmp_path, adapter_name="peft")
    assert fastcur.adapter_names(model) == ["cur", "peft"] and fastcur.active_adapter(model) == "peft"
    with torch.no_grad():
        torch.testing.assert_close(model(x), peft_model(x))
    fastcur.set_adapter(model, "cur")
    torch.testing.assert_close(model(x), cur_out, rtol=0, atol=0)
    with pytest.raises(ValueError, match="already holds an adapter named 'peft'"):
        fastcur.load_peft_adapter(model, tmp_path, adapter_name="peft")
    assert fastcur.active_adapter(model) == "cur"
