"""save_adapter / load_adapter with named adapters and modules_to_save, on a tiny Llama."""
import json

import pytest
import torch

import fastcur
from tiny_models import perturb_adapters, tiny_llama

pytest.importorskip("transformers")

SECURA = fastcur.SecuraConfig(rank=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
JUMP = fastcur.JumpLoRAConfig(rank=4, alpha=16.0, f=0.5, target_modules=["q_proj", "o_proj"])
X = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(4))


def logits(model):
    with torch.no_grad():
        return model(X).logits


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """A tiny Llama with "task1" (SECURA + a trained lm_head) and "task2" (JumpLoRA) on shared
    q_proj layers, both saved; returns (model, folder, {name: logits})."""
    model = tiny_llama()
    fastcur.inject(model, SECURA, adapter_name="task1")
    perturb_adapters(model, seed=1)
    out = {"task1": logits(model)}
    fastcur.inject(model, JUMP, adapter_name="task2")
    perturb_adapters(model, seed=2)
    out["task2"] = logits(model)
    folder = tmp_path_factory.mktemp("named")
    fastcur.save_adapter(model, folder / "task1", adapter_name="task1")     # inactive: saved by name
    fastcur.save_adapter(model, folder / "task2")                           # the active one
    return model, folder, out


def test_two_methods_switch_save_and_reload_exactly(two):
    model, folder, out = two
    assert json.loads((folder / "task1" / "fastcur_adapter.json").read_text())["adapter_name"] == "task1"
    fresh = tiny_llama()
    fastcur.load_adapter(fresh, folder / "task1", adapter_name="task1")
    fastcur.load_adapter(fresh, folder / "task2", adapter_name="task2")
    assert fastcur.adapter_names(fresh) == ["task1", "task2"] and fastcur.active_adapter(fresh) == "task2"
    assert torch.equal(logits(fresh), out["task2"])
    fastcur.set_adapter(fresh, "task1")
    assert torch.equal(logits(fresh), out["task1"])
    fastcur.set_adapter(model, "task1")
    assert torch.equal(logits(model), out["task1"])
    fastcur.set_adapter(model, "task2")


def test_a_trained_lm_head_survives_save_and_load(two):
    model, folder, out = two
    fresh = tiny_llama()
    head = fresh.lm_head
    fastcur.load_adapter(fresh, folder / "task1")
    assert fastcur.active_adapter(fresh) == "default" and fresh.lm_head is not head
    assert fresh.lm_head.weight.requires_grad and not head.weight.requires_grad
    trained = fastcur.named_adapters.store_of(model).adapters["task1"].saved["lm_head"]
    assert torch.equal(fresh.lm_head.weight, trained.weight)
    assert torch.equal(head.weight, tiny_llama().lm_head.weight)          # the base's head is untouched
    assert torch.equal(logits(fresh), out["task1"])
    # in place: a further load restores the saved head over a changed one
    with torch.no_grad():
        fresh.lm_head.weight.add_(1.0)
    fastcur.load_adapter(fresh, folder / "task1")
    assert torch.equal(logits(fresh), out["task1"])


def test_loading_into_an_inactive_adapter_activates_it(two):
    _, folder, out = two
    fresh = tiny_llama()
    fastcur.load_adapter(fresh, folder / "task1", adapter_name="a")
    fastcur.load_adapter(fresh, folder / "task2", adapter_name="b")
    fastcur.load_adapter(fresh, folder / "task1", adapter_name="a")        # in place into the waiting "a"
    assert fastcur.active_adapter(fresh) == "a" and torch.equal(logits(fresh), out["task1"])
    with pytest.raises(ValueError, match="is not the base"):
        fastcur.load_adapter(fresh, folder / "task2", adapter_name="a")    # another method into "a"
    assert fastcur.active_adapter(fresh) == "a" and fastcur.adapter_names(fresh) == ["a", "b"]
    assert torch.equal(logits(fresh), out["task1"])


def test_a_failed_load_of_a_new_adapter_keeps_the_active_one(two, tmp_path):
    _, folder, out = two
    fresh = tiny_llama()
    fastcur.load_adapter(fresh, folder / "task2")
    (tmp_path / "bad").mkdir()
    for f in (folder / "task1").iterdir():
        (tmp_path / "bad" / f.name).write_bytes(f.read_bytes())
    doc = json.loads((tmp_path / "bad" / "fastcur_adapter.json").read_text())
    doc["modules_to_save"]["lm_head"]["class"] = "Embedding"
    (tmp_path / "bad" / "fastcur_adapter.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="modules_to_save module 'lm_head' is a Linear, the adapter saved a Embedding"):
        fastcur.load_adapter(fresh, tmp_path / "bad", adapter_name="other")
    assert fastcur.adapter_names(fresh) == ["default"] and torch.equal(logits(fresh), out["task2"])


def test_save_never_drops_a_trainable_tensor(tmp_path):
    model = fastcur.inject(tiny_llama(), fastcur.LoRAConfig(rank=2, target_modules=["q_proj"]))
    model.model.embed_tokens.weight.requires_grad_(True)
    model.model.norm.weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"trainable tensor\(s\) model.embed_tokens.weight, model.norm.weight are "
                                         r"neither adapter tensors nor in the config's modules_to_save"):
        fastcur.save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    with pytest.raises(ValueError, match=r"no adapter named 'x'"):
        fastcur.save_adapter(model, tmp_path / "a", adapter_name="x")
