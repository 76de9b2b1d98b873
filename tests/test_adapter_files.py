"""The files of an adapter folder (fastcur.adapter_files): PEFT's loader names fastcur, older
folders still load, unsafe or damaged files are refused with one line naming the file, and a
refused load leaves the model as it was."""
import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastcur
from tiny_models import ids, perturb_adapters, tiny_lm

CUR = fastcur.CURLoRAConfig(rank=3, target_modules=["q_proj", "up_proj"])
JUMP = fastcur.JumpLoRAConfig(rank=2, f=0.5, target_modules=["q_proj", "v_proj"])


def _saved(path, config=CUR):
    model = fastcur.inject(tiny_lm(), config)
    perturb_adapters(model)
    fastcur.save_adapter(model, path)
    return model


def _edit(folder, change):
    """Apply `change(document)` to fastcur_adapter.json (a hand edit)."""
    path = folder / "fastcur_adapter.json"
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def _rewrite_tensors(folder, change):
    """Apply `change(tensors)` to the weights and record their new hash (a careful hand edit)."""
    weights = folder / "fastcur_adapter.safetensors"
    tensors = load_file(weights)
    change(tensors)
    save_file(tensors, weights)
    _edit(folder, lambda d: d.update(weights_sha256=hashlib.sha256(weights.read_bytes()).hexdigest()))


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: type(m) for n, m in model.named_modules()},
            {n: p.requires_grad for n, p in model.named_parameters()}, fastcur.active_adapter(model))


def _unchanged(model, before):
    state, kinds, grads, active = _snapshot(model)
    assert kinds == before[1] and grads == before[2] and active == before[3]
    assert state.keys() == before[0].keys() and all(torch.equal(state[k], before[0][k]) for k in state)


def test_peft_loader_names_fastcur(tmp_path):
    peft = pytest.importorskip("peft")
    _saved(tmp_path)
    with pytest.raises(KeyError, match=r"fastcur adapter, not a PEFT adapter.*fastcur.load_adapter\(model, folder\)"):
        peft.PeftModel.from_pretrained(tiny_lm(), str(tmp_path))
    with pytest.raises(ValueError, match="a fastcur adapter: use fastcur.load_adapter"):
        fastcur.load_peft_adapter(tiny_lm(), tmp_path)


def test_transformers_peft_integration_names_fastcur(tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from tiny_models import tiny_llama
    fastcur.save_adapter(fastcur.inject(tiny_llama(), fastcur.LoRAConfig(rank=2, target_modules=["q_proj"])), tmp_path)
    with pytest.raises(KeyError, match=r"fastcur adapter, not a PEFT adapter.*fastcur.load_adapter"):
        tiny_llama().load_adapter(str(tmp_path))            # transformers' own PEFT loader


def test_a_folder_in_the_first_layout_still_loads(tmp_path):
    model = _saved(tmp_path)
    # the layout of format_version 1: adapter_config.json + adapter_model.safetensors
    doc = json.loads((tmp_path / "fastcur_adapter.json").read_text())
    doc.update(format_version=1, weights_file="adapter_model.safetensors")
    del doc["adapter_name"], doc["modules_to_save"]
    (tmp_path / "fastcur_adapter.safetensors").rename(tmp_path / "adapter_model.safetensors")
    (tmp_path / "fastcur_adapter.json").unlink()
    (tmp_path / "adapter_config.json").write_text(json.dumps(doc))
    loaded = fastcur.load_adapter(tiny_lm(), tmp_path)
    assert torch.equal(loaded(ids()), model(ids()))
    fastcur.save_adapter(loaded, tmp_path)            # a new save replaces the old layout
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "fastcur_adapter.json",
                                            "fastcur_adapter.safetensors"]


@pytest.mark.parametrize("weights_file", ["../elsewhere.safetensors", "/etc/passwd", "sub/x.safetensors", "..", ""])
def test_a_weights_file_outside_the_folder_is_refused(tmp_path, weights_file):
    _saved(tmp_path)
    _edit(tmp_path, lambda d: d.update(weights_file=weights_file))
    model = tiny_lm()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"fastcur_adapter.json: weights_file must be a file name inside the "
                                         r"adapter folder"):
        fastcur.load_adapter(model, tmp_path)
    _unchanged(model, before)


@pytest.mark.parametrize("digest", [None, "", "0" * 63, "yes"])
def test_the_integrity_check_cannot_be_turned_off(tmp_path, digest):
    _saved(tmp_path)
    _edit(tmp_path, lambda d: d.update(weights_sha256=digest))
    with pytest.raises(ValueError, match=r"weights_sha256 must be the weights file's SHA-256.*cannot be turned off"):
        fastcur.load_adapter(tiny_lm(), tmp_path)
    _edit(tmp_path, lambda d: d.pop("weights_sha256"))
    with pytest.raises(ValueError, match=r"weights_sha256 must be"):
        fastcur.read_adapter_config(tmp_path)


DAMAGE = {
    "layers not an object": (lambda d: d.update(layers=[1]), r"'layers' must be a JSON dict"),
    "no layers": (lambda d: d.update(layers={}), r"'layers' is empty"),
    "no method": (lambda d: d.pop("method"), r"the key 'method' is missing"),
    "layer tensors": (lambda d: d["layers"]["layers.0.q_proj"].pop("tensors"),
                      r"layers\['layers.0.q_proj'\]\['tensors'\] is missing"),
    "layer options": (lambda d: d["layers"]["layers.0.q_proj"].update(options=3),
                      r"layers\['layers.0.q_proj'\]\['options'\] is missing or of the wrong type"),
    "in_features": (lambda d: d["layers"]["layers.0.q_proj"].update(in_features="24"), r"\['in_features'\]"),
    "format_version": (lambda d: d.update(format_version="2"), r"format_version must be an int"),
    "merges": (lambda d: d["layers"]["layers.1.up_proj"]["state"].update(merges="many"),
               r"layers\['layers.1.up_proj'\]\['state'\] needs a bool 'merged' and an int 'merges'"),
    "config": (lambda d: d["config"].update(rank="x"), r"'method' / 'config' do not describe"),
    "unknown method": (lambda d: d.update(method="dora"), r"'method' / 'config' do not describe"),
    "modules_to_save": (lambda d: d.update(modules_to_save={"lm_head": 3}), r"modules_to_save\['lm_head'\]"),
    "merge_schedule": (lambda d: d.update(merge_schedule=[]), r"'merge_schedule' must be an object"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_config_gives_one_line_naming_the_file(tmp_path, damage):
    change, match = DAMAGE[damage]
    _saved(tmp_path)
    _edit(tmp_path, change)
    model = tiny_lm()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=match) as info:
        fastcur.load_adapter(model, tmp_path)
    assert "fastcur_adapter.json" in str(info.value) and "\n" not in str(info.value)
    _unchanged(model, before)


@pytest.mark.parametrize("damage, match", [
    (lambda d: d["layers"]["layers.0.q_proj"]["state"].update(threshold="jump_thresholds.7.log_theta"),
     r"\['threshold'\] = 'jump_thresholds.7.log_theta' names no jump_thresholds group"),
    (lambda d: d.update(jump_thresholds=[{"key": 1}]), r"jump_thresholds\[0\] must be"),
    (lambda d: d["layers"]["layers.1.v_proj"]["options"].update(f=2.0), r"'layers.1.v_proj'.*f must be .*\[0, 1\], got 2.0"),
])
def test_a_damaged_jumplora_config_is_refused(tmp_path, damage, match):
    _saved(tmp_path, JUMP)
    _edit(tmp_path, damage)
    model = tiny_lm()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        fastcur.load_adapter(model, tmp_path)
    _unchanged(model, before)


def test_a_bad_index_leaves_a_trained_model_unchanged(tmp_path):
    _saved(tmp_path)
    # the last layer's column index points past W: found before any layer is written
    _rewrite_tensors(tmp_path, lambda t: t["layers.1.up_proj.cols"].__setitem__(0, 24))
    model = fastcur.inject(tiny_lm(), CUR)          # loaded in place: its adapter holds other values
    perturb_adapters(model, seed=5)
    model(ids())
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"tensor layers.1.up_proj.cols holds indices in \[\d+, 24\], module "
                                         r"'layers.1.up_proj' has 24 columns"):
        fastcur.load_adapter(model, tmp_path)
    _unchanged(model, before)
    fresh = tiny_lm()
    before = _snapshot(fresh)
    with pytest.raises(ValueError, match="holds indices"):
        fastcur.load_adapter(fresh, tmp_path)
    _unchanged(fresh, before)


def test_a_failure_while_filling_rolls_back(tmp_path, monkeypatch):
    _saved(tmp_path)
    model = fastcur.inject(tiny_lm(), CUR)
    perturb_adapters(model, seed=5)
    before = _snapshot(model)
    calls = []
    real = torch.nn.Module.load_state_dict

    def fail_second(self, *args, **kwargs):       # the second layer's fill fails after the first was written
        calls.append(self)
        if len(calls) == 2:
            raise RuntimeError("surprise")
        return real(self, *args, **kwargs)
    monkeypatch.setattr(torch.nn.Module, "load_state_dict", fail_second)
    with pytest.raises(RuntimeError, match="surprise"):
        fastcur.load_adapter(model, tmp_path)
    monkeypatch.undo()
    _unchanged(model, before)
