"""Atomic saves under kill -9: a forked writer saving in a loop is killed at random instants;
after every kill the folder loads (the old adapter or a new one, never a mix), and the next
save leaves no staging folder behind. Also IMSM.save_adapter under a crash and a bad gate file."""
import multiprocessing
import os
import random
import signal
import time

import pytest
import torch

import fastcur
from tiny_models import perturb_adapters, tiny_lm

CONFIG = fastcur.LoRAConfig(rank=4, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])


def _writer(kind: str, folder: str) -> None:
    """The killed process: save new versions of the adapter into `folder`, forever."""
    torch.set_num_threads(1)
    model = fastcur.inject(tiny_lm(), CONFIG)
    seed = os.getpid()
    while True:
        perturb_adapters(model, seed=seed)
        seed += 1
        if kind == "save_adapter":
            fastcur.save_adapter(model, folder)
        else:
            fastcur.export_peft_adapter(model, folder)


def _load(kind: str, folder) -> None:
    if kind == "save_adapter":
        fastcur.load_adapter(tiny_lm(), folder)
    else:
        fastcur.load_peft_adapter(tiny_lm(), folder)


@pytest.mark.slow
@pytest.mark.parametrize("kind, kills", [("save_adapter", 16), ("export_peft_adapter", 8)])
def test_kill_9_at_any_instant_leaves_a_loadable_adapter(tmp_path, kind, kills):
    folder = tmp_path / "adapter"
    model = fastcur.inject(tiny_lm(), CONFIG)
    (fastcur.save_adapter if kind == "save_adapter" else fastcur.export_peft_adapter)(model, folder)
    fork = multiprocessing.get_context("fork")
    rng = random.Random(0)
    interrupted = 0
    for _ in range(kills):
        proc = fork.Process(target=_writer, args=(kind, str(folder)), daemon=True)
        proc.start()
        time.sleep(rng.uniform(0.05, 0.4))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        assert proc.exitcode == -signal.SIGKILL
        interrupted += any(".fastcur-staging-" in name for name in os.listdir(tmp_path))
        _load(kind, folder)                         # the old or a new version, complete
    assert interrupted > 0                          # some kills did land inside a save (16/16 and 7/8 seen)
    (fastcur.save_adapter if kind == "save_adapter" else fastcur.export_peft_adapter)(model, folder)
    assert os.listdir(tmp_path) == ["adapter"]      # the dead writers' staging folders are gone
    assert not any(name.endswith(".tmp") for name in os.listdir(folder))
    _load(kind, folder)


# -- IMSM ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def imsm_folder(tmp_path_factory):
    pytest.importorskip("transformers")
    from tiny_models import tiny_llama
    model = fastcur.inject(tiny_llama(), fastcur.LoRAConfig(rank=2, target_modules=["q_proj", "v_proj"]))
    perturb_adapters(model)
    imsm = fastcur.IMSM(model, gate_rank=4)
    folder = tmp_path_factory.mktemp("imsm") / "adapter"
    imsm.save_adapter(folder)
    return imsm, folder


def test_imsm_save_crashing_midway_leaves_the_old_folder(imsm_folder, monkeypatch):
    imsm, folder = imsm_folder
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    import safetensors.torch
    real = safetensors.torch.save_file

    def crash_on_gate(tensors, path, metadata=None):      # the adapter is written, the gate is not
        if "W_A" in tensors:
            raise OSError("disk full")
        return real(tensors, path, metadata=metadata)
    monkeypatch.setattr(safetensors.torch, "save_file", crash_on_gate)
    with torch.no_grad():
        imsm.W_B.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        imsm.save_adapter(folder)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert os.listdir(folder.parent) == ["adapter"]
    with torch.no_grad():
        imsm.W_B.sub_(1.0)


def test_imsm_bad_gate_file_leaves_the_model_unchanged(imsm_folder, tmp_path):
    from safetensors.torch import save_file
    from tiny_models import tiny_llama
    _, folder = imsm_folder
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in folder.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    save_file({"W_A": torch.zeros(3, 3), "W_B": torch.zeros(4, 32)}, bad / "imsm_gate.safetensors")
    base = tiny_llama()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=r"imsm_gate.safetensors: W_A must have shape \(128, 4\)"):
        fastcur.IMSM.load_adapter(base, bad)
    assert not fastcur.adapter_modules(base) and base.state_dict().keys() == state.keys()
    (bad / "imsm_config.json").write_text("{")
    with pytest.raises(ValueError, match=r"imsm_config.json is not valid JSON"):
        fastcur.IMSM.load_adapter(base, bad)
    assert not fastcur.adapter_modules(base)
