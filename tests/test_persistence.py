"""save_adapter / load_adapter: exact reload on the CPU, what is stored, atomic writes, errors."""
import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import fastcur
from tiny_models import ids, perturb_adapters, tiny_lm

CONFIGS = {
    "lora": fastcur.LoRAConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "curlora": fastcur.CURLoRAConfig(rank=4, target_modules=["q_proj", "up_proj"]),
    "secura": fastcur.SecuraConfig(rank=4, inner_rank=6, lora_bias=True, target_modules=["q_proj", "down_proj"]),
    "jumplora": fastcur.JumpLoRAConfig(rank=4, f=0.6, target_modules=["q_proj", "v_proj"]),
    "jumplora-rank": fastcur.JumpLoRAConfig(rank=4, gate="rank", target_modules=["q_proj", "up_proj"]),
}


def _trained(method, seed=0):
    model = fastcur.inject(tiny_lm(seed), CONFIGS[method])
    perturb_adapters(model)
    return model


def _adapter_state(model):
    return {k: v for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", list(CONFIGS))
def test_round_trip_is_exact(method, tmp_path):
    model = _trained(method)
    x = ids()
    assert fastcur.save_adapter(model, tmp_path / "a") == str(tmp_path / "a")
    assert sorted(os.listdir(tmp_path / "a")) == ["adapter_config.json", "fastcur_adapter.json",
                                                  "fastcur_adapter.safetensors"]
    loaded = fastcur.load_adapter(tiny_lm(0), tmp_path / "a", method=CONFIGS[method].method)
    assert torch.equal(loaded(x), model(x))
    saved, again = _adapter_state(model), _adapter_state(loaded)
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)
    assert loaded.fastcur_config == CONFIGS[method]
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == \
           [n for n, p in model.named_parameters() if p.requires_grad]
    for name, layer in fastcur.adapter_modules(loaded).items():
        if hasattr(layer, "tied"):
            assert layer.tied == fastcur.adapter_modules(model)[name].tied


@pytest.mark.parametrize("method", list(CONFIGS))
def test_only_adapter_tensors_are_stored(method, tmp_path):
    model = _trained(method)
    fastcur.save_adapter(model, tmp_path)
    keys = set(load_file(tmp_path / "fastcur_adapter.safetensors"))
    names = list(fastcur.adapter_modules(model))
    own = {"lora": ["lora_A.weight", "lora_B.weight"], "jumplora": ["lora_A.weight", "lora_B.weight"],
           "jumplora-rank": ["lora_A.weight", "lora_B.weight"],
           "curlora": ["U", "rows", "cols", "C", "R"],
           "secura": ["A_c", "B_c", "lora_bias", "rows", "cols", "C", "R"]}[method]
    expected = {f"{n}.{k}" for n in names for k in own}
    if method.startswith("jumplora"):
        expected.add("jump_thresholds.0.log_theta")          # one shared threshold, stored once
    assert keys == expected
    doc = json.loads((tmp_path / "fastcur_adapter.json").read_text())
    assert doc["method"] == CONFIGS[method].method and doc["target_modules"] == names
    assert doc["config"] == CONFIGS[method].to_dict() and doc["fastcur_version"] == fastcur.__version__
    assert set(doc["layers"]) == set(names)


def test_curlora_keeps_the_saved_indices(tmp_path):
    model = _trained("curlora")
    fastcur.save_adapter(model, tmp_path)
    # a base with other weights would select other rows/cols: the saved ones must win
    loaded = fastcur.load_adapter(tiny_lm(0), tmp_path)
    for name, layer in fastcur.adapter_modules(loaded).items():
        ref = fastcur.adapter_modules(model)[name]
        assert torch.equal(layer.rows, ref.rows) and torch.equal(layer.cols, ref.cols) and layer.tied


def _secura_model(seed=0, restrain=True):
    config = fastcur.SecuraConfig(rank=3, inner_rank=5, lora_bias=True, restrain=restrain, restrain_ratio=0.0,
                                  merge_every=2, fold_lora_bias=True, target_modules=["v_proj", "up_proj"])
    return fastcur.inject(tiny_lm(seed), config)


def _sgd_steps(model, sched, n, seed):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2)
    if sched is not None:
        handle = opt.register_step_post_hook(lambda *_: sched.step())
    for i in range(n):
        x = ids(seed + i)
        loss = model(x).float().logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    if sched is not None:
        handle.remove()


def test_secura_after_schedule_merges_reloads_and_trains_on_identically(tmp_path):
    model = _secura_model().train()
    sched = fastcur.MergeSchedule(model)
    _sgd_steps(model, sched, 5, seed=10)                  # 4 layers merge at steps 2 and 4
    assert sched.merges == 8 and all(m.merges == 2 for m in fastcur.adapter_modules(model).values())
    # v_proj has no bias: the merge of a nonzero lora_bias gave it one
    assert model.layers[0].v_proj.bias is not None
    fastcur.save_adapter(model, tmp_path, merge_schedule=sched)
    keys = set(load_file(tmp_path / "fastcur_adapter.safetensors"))
    assert "layers.0.v_proj.weight" in keys and "layers.0.v_proj.bias" in keys       # W changed: stored
    assert "layers.0.v_proj.restrain_generator_state" in keys

    loaded = _secura_model().train()                     # a fresh base with the same config injected
    fastcur.unload(loaded)
    loaded = fastcur.load_adapter(loaded, tmp_path, method="secura")
    sched2 = fastcur.MergeSchedule(loaded)
    sched2.load_state_dict(fastcur.read_adapter_config(tmp_path)["merge_schedule"])
    assert (sched2.steps, sched2.merges) == (5, 8)
    x = ids(99)
    model.eval(), loaded.eval()
    assert torch.equal(loaded(x), model(x))
    model.train(), loaded.train()
    _sgd_steps(model, sched, 3, seed=20)                 # restrain draws + merges at steps 6 and 8
    _sgd_steps(loaded, sched2, 3, seed=20)
    assert sched2.merges == sched.merges == 16
    model.eval(), loaded.eval()
    assert torch.equal(loaded(x), model(x))


def test_resume_into_an_injected_model_restores_the_schedule(tmp_path):
    model = _secura_model(restrain=False)
    sched = fastcur.MergeSchedule(model)
    _sgd_steps(model, sched, 3, seed=1)
    fastcur.save_adapter(model, tmp_path, merge_schedule=sched)
    other = _secura_model(restrain=False)
    sched2 = fastcur.MergeSchedule(other)
    fastcur.load_adapter(other, tmp_path, merge_schedule=sched2)
    assert (sched2.steps, sched2.merges) == (3, 4)
    assert torch.equal(other(ids()), model(ids()))
    different = fastcur.inject(tiny_lm(), fastcur.SecuraConfig(rank=3, inner_rank=5, lora_bias=True, seed=4,
                                                              target_modules=["v_proj", "up_proj"]))
    with pytest.raises(ValueError, match=r"module 'layers.0.v_proj' was built with other options.*'seed': \(0, 4\)"):
        fastcur.load_adapter(different, tmp_path)
    fresh = _secura_model(restrain=False)
    fastcur.save_adapter(fresh, tmp_path / "unmerged")
    with pytest.raises(ValueError, match=r"module 'layers.0.v_proj' has 1 SECURA merge\(s\) folded into its W"):
        fastcur.load_adapter(model, tmp_path / "unmerged")


def test_merged_layers_reload_merged(tmp_path):
    model = _trained("lora")
    fastcur.merge(model)
    fastcur.save_adapter(model, tmp_path)
    loaded = fastcur.load_adapter(tiny_lm(0), tmp_path)
    assert all(m.merged for m in fastcur.adapter_modules(loaded).values())
    assert torch.equal(loaded(ids()), model(ids()))
    fastcur.unmerge(model), fastcur.unmerge(loaded)
    assert torch.equal(loaded(ids()), model(ids()))


def test_jumplora_groups_and_ella_buffer(tmp_path):
    config = fastcur.JumpLoRAConfig(rank=4, f=0.3, threshold_scope="per_block", target_modules=["q_proj", "v_proj"])
    model = fastcur.inject(tiny_lm(), config)
    perturb_adapters(model)
    layer = model.layers[1].v_proj
    layer.set_w_past(torch.randn(layer.weight.shape, generator=torch.Generator().manual_seed(5)))
    fastcur.save_adapter(model, tmp_path)
    assert len(fastcur.read_adapter_config(tmp_path)["jump_thresholds"]) == 2
    loaded = fastcur.load_adapter(tiny_lm(), tmp_path)
    lay = fastcur.adapter_modules(loaded)
    assert lay["layers.0.q_proj"].threshold is lay["layers.0.v_proj"].threshold
    assert lay["layers.0.q_proj"].threshold is not lay["layers.1.q_proj"].threshold
    assert lay["layers.0.q_proj"].f == 0.3 and lay["layers.0.q_proj"].W_past is None
    assert torch.equal(lay["layers.1.v_proj"].W_past, layer.W_past)
    assert torch.equal(fastcur.ella_penalty(loaded), fastcur.ella_penalty(model))
    assert torch.equal(loaded(ids()), model(ids()))


def test_hand_built_adapters_save_too(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 6))
    model[0] = fastcur.LoRALinear.from_linear(model[0], rank=3, alpha=6)
    model[2].requires_grad_(False)
    perturb_adapters(model)
    fastcur.save_adapter(model, tmp_path)
    torch.manual_seed(0)
    fresh = nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 6))
    fastcur.load_adapter(fresh, tmp_path)
    x = torch.randn(4, 10)
    assert torch.equal(fresh(x), model(x)) and fresh.fastcur_config.target_modules == ["0"]


def test_wrappers_are_unwrapped(tmp_path):
    model = _trained("lora")
    fastcur.save_adapter(torch.compile(nn.DataParallel(model)), tmp_path)      # compiled lazily: never run
    assert fastcur.read_adapter_config(tmp_path)["target_modules"][0] == "layers.0.q_proj"
    wrapped = nn.DataParallel(tiny_lm(0))
    assert fastcur.load_adapter(wrapped, tmp_path) is wrapped
    assert torch.equal(wrapped.module(ids()), model(ids()))


# -- atomic writes -------------------------------------------------------------------------------
def test_a_crash_while_writing_tensors_leaves_the_old_adapter(tmp_path, monkeypatch):
    model = _trained("lora")
    fastcur.save_adapter(model, tmp_path / "a")
    before = {f: (tmp_path / "a" / f).read_bytes() for f in os.listdir(tmp_path / "a")}
    perturb_adapters(model, seed=9)

    def crash(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr("safetensors.torch.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        fastcur.save_adapter(model, tmp_path / "a")
    assert {f: (tmp_path / "a" / f).read_bytes() for f in os.listdir(tmp_path / "a")} == before
    assert os.listdir(tmp_path) == ["a"]                     # no staging folder left
    fastcur.load_adapter(tiny_lm(0), tmp_path / "a")


def test_a_save_keeps_other_files_and_replaces_an_older_layout(tmp_path):
    model = _trained("lora")
    (tmp_path / "optimizer.pt").write_bytes(b"trainer state")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"an older save's tensors")
    fastcur.save_adapter(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "fastcur_adapter.json",
                                            "fastcur_adapter.safetensors", "optimizer.pt"]
    assert (tmp_path / "optimizer.pt").read_bytes() == b"trainer state"


# -- errors ---------------------------------------------------------------------------------------
def _refused_unchanged(model, saved, match):
    """load_adapter(model, saved) raises ValueError(match) and leaves the model as it was."""
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=match):
        fastcur.load_adapter(model, saved)
    assert not fastcur.adapter_modules(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads


def _rehash(saved) -> dict:
    """Record the weights file's current SHA-256 in the saved config, as a careful hand edit
    would; returns the config written."""
    config = saved / "fastcur_adapter.json"
    doc = json.loads(config.read_text())
    doc["weights_sha256"] = hashlib.sha256((saved / "fastcur_adapter.safetensors").read_bytes()).hexdigest()
    config.write_text(json.dumps(doc))
    return doc


def _rewrite_by_hand(saved, tensors):
    """Write `tensors` over the saved weights, as a hand edit would (and rehash)."""
    save_file(tensors, saved / "fastcur_adapter.safetensors")
    _rehash(saved)


@pytest.fixture
def saved(tmp_path):
    fastcur.save_adapter(_trained("lora"), tmp_path)
    return tmp_path


def test_wrong_base_names_each_module_and_shapes(saved):
    _refused_unchanged(tiny_lm(d=32), saved, r"not the base.*module 'layers.0.q_proj' has weight shape "
                                             r"\[out, in\] = \[32, 32\], the adapter was saved for \[24, 24\]")
    with pytest.raises(ValueError, match=r"module 'layers.1.q_proj' does not exist"):
        fastcur.load_adapter(tiny_lm(n=1), saved)
    with pytest.raises(ValueError, match=r"module 'layers.0.q_proj' is a CURLoRALinear, the adapter has a LoRALinear"):
        fastcur.load_adapter(fastcur.inject(tiny_lm(), fastcur.CURLoRAConfig(rank=2)), saved)


def test_another_methods_adapter_is_refused(saved):
    with pytest.raises(ValueError, match=r"holds a 'lora' adapter, but method='secura' was asked for"):
        fastcur.load_adapter(tiny_lm(), saved, method="secura")
    with pytest.raises(ValueError, match="unknown adapter method 'dora'"):
        fastcur.load_adapter(tiny_lm(), saved, method="dora")


def test_missing_and_extra_keys_are_listed(saved):
    tensors = load_file(saved / "fastcur_adapter.safetensors")
    del tensors["layers.0.q_proj.lora_B.weight"]
    tensors["layers.0.q_proj.lora_C.weight"] = torch.zeros(2)
    _rewrite_by_hand(saved, tensors)
    _refused_unchanged(tiny_lm(), saved, r"missing keys: layers.0.q_proj.lora_B.weight; unexpected keys: "
                                         r"layers.0.q_proj.lora_C.weight")


def test_a_tensor_of_the_wrong_shape_names_it(saved):
    tensors = load_file(saved / "fastcur_adapter.safetensors")
    tensors["layers.1.v_proj.lora_A.weight"] = torch.zeros(4, 23)
    _rewrite_by_hand(saved, tensors)
    _refused_unchanged(tiny_lm(), saved, r"tensor layers.1.v_proj.lora_A.weight has shape \[4, 23\], module "
                                         r"'layers.1.v_proj' needs \[4, 24\]")


def test_corrupt_files_are_named(saved):
    weights, config = saved / "fastcur_adapter.safetensors", saved / "fastcur_adapter.json"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"fastcur_adapter.safetensors does not match fastcur_adapter.json.*corrupt or truncated"):
        fastcur.load_adapter(tiny_lm(), saved)
    doc = _rehash(saved)
    with pytest.raises(ValueError, match=r"fastcur_adapter.safetensors is not a readable safetensors file"):
        fastcur.load_adapter(tiny_lm(), saved)
    config.write_text(json.dumps(doc)[:-20])
    with pytest.raises(ValueError, match=r"fastcur_adapter.json is not valid JSON"):
        fastcur.load_adapter(tiny_lm(), saved)
    weights.unlink()
    config.write_text(json.dumps(doc))
    with pytest.raises(FileNotFoundError, match="fastcur_adapter.safetensors is missing"):
        fastcur.load_adapter(tiny_lm(), saved)
    config.unlink()
    with pytest.raises(FileNotFoundError, match="fastcur_adapter.json is missing beside the fastcur signpost"):
        fastcur.load_adapter(tiny_lm(), saved)
    (saved / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="fastcur_adapter.json is missing"):
        fastcur.load_adapter(tiny_lm(), saved)
    with pytest.raises(FileNotFoundError, match="no adapter directory"):
        fastcur.load_adapter(tiny_lm(), saved / "nope")


def test_other_directories_and_bad_arguments(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    with pytest.raises(ValueError, match="PEFT adapter config.*fastcur.load_peft_adapter"):
        fastcur.load_adapter(tiny_lm(), tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="exists and is not a folder"):
        fastcur.save_adapter(_trained("lora"), tmp_path / "file")
    with pytest.raises(ValueError, match="no fastcur adapter layer"):
        fastcur.save_adapter(tiny_lm(), tmp_path / "b")
    with pytest.raises(TypeError, match="merge_schedule must be a fastcur.MergeSchedule"):
        fastcur.save_adapter(_trained("lora"), tmp_path / "b", merge_schedule=3)
    fastcur.save_adapter(_trained("lora"), tmp_path / "b")
    with pytest.raises(ValueError, match="saved without one"):
        fastcur.load_adapter(_secura_model(), tmp_path / "b", merge_schedule=fastcur.MergeSchedule(_secura_model()))
