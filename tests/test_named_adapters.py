"""Named adapters (fastcur.named_adapters): several adapters, of different methods, on one model;
only the active one is in the module tree."""
import copy

import pytest
import torch

import fastcur
from fastcur.lalora import find_adapters
from tiny_models import ids, perturb_adapters, tiny_lm

LORA = fastcur.LoRAConfig(rank=2, alpha=4, target_modules=["q_proj", "up_proj"])
CUR = fastcur.CURLoRAConfig(rank=3, target_modules=["q_proj", "v_proj"])


def two_adapters():
    """tiny_lm with "a" (LoRA on q, up) and "b" (CUR-LoRA on q, v), both trained (perturbed);
    returns (model, base copy, outputs of a, outputs of b) with "b" active."""
    model = tiny_lm()
    base = copy.deepcopy(model)
    x = ids()
    fastcur.inject(model, LORA, adapter_name="a")
    perturb_adapters(model, seed=1)
    out_a = model(x)
    fastcur.inject(model, CUR, adapter_name="b")
    perturb_adapters(model, seed=2)           # only b's tensors are trainable parameters now
    out_b = model(x)
    return model, base, out_a, out_b


def test_switching_gives_each_adapters_own_outputs():
    model, base, out_a, out_b = two_adapters()
    x = ids()
    assert fastcur.active_adapter(model) == "b" and fastcur.adapter_names(model) == ["a", "b"]
    assert not torch.allclose(out_a, out_b) and not torch.allclose(out_a, base(x))
    fastcur.set_adapter(model, "a")
    assert fastcur.active_adapter(model) == "a"
    torch.testing.assert_close(model(x), out_a, rtol=0, atol=0)
    assert type(model.layers[0].v_proj) is torch.nn.Linear        # b's layer is gone, the base is back
    fastcur.set_adapter(model, "b")
    torch.testing.assert_close(model(x), out_b, rtol=0, atol=0)
    assert type(model.layers[0].up_proj) is torch.nn.Linear
    with fastcur.disable_adapters(model):
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)


def test_only_the_active_adapter_is_in_the_model():
    model, _, _, _ = two_adapters()
    single = fastcur.inject(tiny_lm(), CUR)
    assert model.state_dict().keys() == single.state_dict().keys()        # the names of one adapter
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in single.named_parameters() if p.requires_grad}
    assert [n for n, _ in find_adapters(model)] == ["layers.0.q_proj", "layers.0.v_proj",
                                                   "layers.1.q_proj", "layers.1.v_proj"]
    # every adapter on a module shares its frozen weight
    store = vars(model)["_fastcur_adapters"]
    assert store.adapters["a"].layers["layers.0.q_proj"].weight is model.layers[0].q_proj.weight
    fastcur.set_adapter(model, "a")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"layers.{i}.{m}.{t}.weight" for i in (0, 1) for m in ("q_proj", "up_proj") for t in ("lora_A", "lora_B")}


def test_delete_adapter():
    model, base, out_a, _ = two_adapters()
    x = ids()
    fastcur.delete_adapter(model, "b")                 # the active one: the first remaining takes over
    assert fastcur.adapter_names(model) == ["a"] and fastcur.active_adapter(model) == "a"
    torch.testing.assert_close(model(x), out_a, rtol=0, atol=0)
    assert type(model.layers[0].v_proj) is torch.nn.Linear
    fastcur.delete_adapter(model, "a")                 # the last one: the base model is back
    assert fastcur.active_adapter(model) is None and not fastcur.adapter_modules(model)
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)
    fastcur.inject(model, LORA, adapter_name="a")      # and takes a fresh adapter again
    assert fastcur.adapter_names(model) == ["a"]


def test_inject_after_the_first_keeps_the_model_on_error():
    model, _, _, out_b = two_adapters()
    with pytest.raises(ValueError, match="in_features=24, out_features=40.*rank"):
        fastcur.inject(model, fastcur.CURLoRAConfig(rank=30, target_modules=["up_proj"]), adapter_name="c")
    assert fastcur.adapter_names(model) == ["a", "b"] and fastcur.active_adapter(model) == "b"
    torch.testing.assert_close(model(ids()), out_b, rtol=0, atol=0)
    assert all(p.requires_grad for n, p in model.named_parameters() if n.endswith(".U"))


def test_errors_name_the_adapter():
    model, _, _, _ = two_adapters()
    with pytest.raises(ValueError, match=r"no adapter named 'c'; its adapters: 'a', 'b'"):
        fastcur.set_adapter(model, "c")
    with pytest.raises(ValueError, match=r"no adapter named 'c'"):
        fastcur.delete_adapter(model, "c")
    with pytest.raises(ValueError, match="adapter_name must be a non-empty str"):
        fastcur.inject(model, LORA, adapter_name="")
    with pytest.raises(ValueError, match="has no fastcur adapter"):
        fastcur.set_adapter(tiny_lm(), "a")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        fastcur.active_adapter("model")
    assert fastcur.active_adapter(tiny_lm()) is None
    fastcur.merge(model)
    with pytest.raises(ValueError, match="active adapter 'b' is merged.*unmerge"):
        fastcur.set_adapter(model, "a")
    with pytest.raises(ValueError, match="active adapter 'b' is merged"):
        fastcur.inject(model, LORA, adapter_name="c")


def test_hand_built_adapters_are_adopted_as_default():
    model = tiny_lm()
    model.layers[0].q_proj = fastcur.LoRALinear.from_linear(model.layers[0].q_proj, rank=2)
    assert fastcur.active_adapter(model) == "default"
    fastcur.inject(model, CUR, adapter_name="b")
    fastcur.set_adapter(model, "default")
    assert list(fastcur.adapter_modules(model)) == ["layers.0.q_proj"]


def test_set_adapter_moves_an_adapter_that_waited_to_the_models_dtype():
    model, _, out_a, _ = two_adapters()
    model.to(torch.float64)
    fastcur.set_adapter(model, "a")
    assert model.layers[0].q_proj.lora_A.weight.dtype == torch.float64
    torch.testing.assert_close(model(ids()).float(), out_a, rtol=1e-5, atol=1e-5)


# -- modules_to_save ---------------------------------------------------------------------------
def test_modules_to_save_train_a_copy_and_the_original_stays():
    model = tiny_lm()
    base = copy.deepcopy(model)
    head = model.lm_head
    fastcur.inject(model, fastcur.LoRAConfig(rank=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert model.lm_head is not head and model.lm_head.weight.requires_grad and not head.weight.requires_grad
    assert {n for n, p in model.named_parameters() if p.requires_grad} >= {"lm_head.weight"}
    perturb_adapters(model)
    x = ids()
    torch.testing.assert_close(head.weight, base.lm_head.weight, rtol=0, atol=0)
    with fastcur.disable_adapters(model):
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)
    assert model.lm_head is not head
    trained = model.lm_head
    with pytest.raises(KeyError):
        with fastcur.disable_adapters(model):
            assert model.lm_head is head
            raise KeyError("inside")
    assert model.lm_head is trained
    fastcur.inject(model, CUR, adapter_name="b")           # b has no modules_to_save: the original is shown
    assert model.lm_head is head
    fastcur.set_adapter(model, "default")
    assert model.lm_head is trained
    unloaded = fastcur.unload(copy.deepcopy(model))
    torch.testing.assert_close(unloaded(x), base(x), rtol=0, atol=0)
    merged = fastcur.merge_and_unload(model)
    assert merged.lm_head is trained and fastcur.active_adapter(merged) is None


def test_modules_to_save_errors():
    with pytest.raises(ValueError, match="no module of the model matches modules_to_save=\\['head'\\]"):
        fastcur.inject(tiny_lm(), fastcur.LoRAConfig(target_modules=["q_proj"], modules_to_save=["head"]))
    with pytest.raises(ValueError, match="modules_to_save module 'layers.0' contains the adapter target"):
        fastcur.inject(tiny_lm(), fastcur.LoRAConfig(target_modules=["q_proj"], modules_to_save=["layers.0"]))
    with pytest.raises(ValueError, match="modules_to_save='all-linear' would train the whole model"):
        fastcur.LoRAConfig(modules_to_save="all-linear")
    with pytest.raises(ValueError, match="modules_to_save must be a non-empty list"):
        fastcur.SecuraConfig(modules_to_save=[3])
    model = tiny_lm()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="no module of the model matches"):
        fastcur.inject(model, fastcur.LoRAConfig(target_modules=["q_proj"], modules_to_save=["nope"]))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before and not fastcur.adapter_modules(model)


def test_a_compiled_model_follows_set_adapter():
    model, _, out_a, out_b = two_adapters()
    compiled = torch.compile(model, backend="eager")        # Dynamo guards see the swapped modules
    x = ids()
    torch.testing.assert_close(compiled(x), out_b)         # up to rounding (the graph's op order)
    fastcur.set_adapter(compiled, "a")
    assert fastcur.active_adapter(compiled) == "a"
    torch.testing.assert_close(compiled(x), out_a)


def test_switching_a_sharded_model_is_refused():
    model, _, _, out_b = two_adapters()
    weight = model.layers[0].q_proj.weight
    weight.full_tensor = lambda: weight                      # what FSDP2's DTensor weights offer
    with pytest.raises(ValueError, match="sharded \\(FSDP2 DTensor weights\\).*before fully_shard"):
        fastcur.set_adapter(model, "a")
    del weight.full_tensor
    assert fastcur.active_adapter(model) == "b"
    torch.testing.assert_close(model(ids()), out_b, rtol=0, atol=0)


def test_modules_swapped_outside_the_api_are_described_afresh(tmp_path):
    # IncLoRA swaps its task layers itself: the adapters then are what the model holds
    model, _, _, _ = two_adapters()
    layer = fastcur.LoRALinear.from_linear(torch.nn.Linear(24, 24), rank=2)
    model.layers[0].q_proj = layer
    for name in ("layers.0.v_proj", "layers.1.q_proj", "layers.1.v_proj"):
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, torch.nn.Linear(24, 24).requires_grad_(False))
    assert fastcur.adapter_names(model) == ["default"]
    assert fastcur.named_adapters.store_of(model).adapters["default"].layers == {"layers.0.q_proj": layer}
    fastcur.save_adapter(model, tmp_path)
    assert list(fastcur.read_adapter_config(tmp_path)["layers"]) == ["layers.0.q_proj"]
