"""fastcur.hf_trainer.AdapterTrainer: adapter-only checkpoints of a tiny Llama that
load_adapter restores exactly, and a resumed run that continues from one."""
import os

import pytest
import torch

import fastcur
from tiny_models import tiny_llama

transformers = pytest.importorskip("transformers")
from fastcur.hf_trainer import AdapterTrainer  # noqa: E402

CONFIG = fastcur.LoRAConfig(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])


def _data(n=12, t=10):
    g = torch.Generator().manual_seed(7)
    return [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 61, (n, t), generator=g)]


def _trainer(out, steps):
    torch.manual_seed(0)
    model = fastcur.inject(tiny_llama(), CONFIG)
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=steps, save_steps=3, save_strategy="steps", per_device_train_batch_size=2,
        learning_rate=5e-2, lr_scheduler_type="linear", logging_steps=100, report_to=[], use_cpu=True, seed=0,
        data_seed=0, disable_tqdm=True, dataloader_num_workers=0)
    return AdapterTrainer(model=model, args=args, train_dataset=_data())


def _adapter(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_checkpoints_hold_the_adapter_and_a_resumed_run_continues(tmp_path):
    full = _trainer(tmp_path / "full", 6)
    full.train()
    want = _adapter(full.model)
    ckpt = tmp_path / "full" / "checkpoint-3"
    files = set(os.listdir(ckpt))
    assert {"fastcur_adapter.json", "fastcur_adapter.safetensors", "optimizer.pt", "trainer_state.json"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}           # adapter-only
    # the last checkpoint restores the trained adapter (and its lm_head) exactly
    restored = fastcur.load_adapter(tiny_llama(), tmp_path / "full" / "checkpoint-6")
    got = _adapter(restored)
    assert got.keys() == want.keys() and "lm_head.weight" in got
    assert all(torch.equal(got[k], want[k]) for k in want)
    # a new run resumed at step 3 ends where the uninterrupted one did
    resumed = _trainer(tmp_path / "resumed", 6)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.state.global_step == 6
    again = _adapter(resumed.model)
    for k in want:
        torch.testing.assert_close(again[k], want[k], rtol=1e-5, atol=1e-6)
    start = _adapter(fastcur.load_adapter(tiny_llama(), ckpt))
    assert any(not torch.equal(start[k], want[k]) for k in want)            # steps 4-6 did change it


def test_load_best_model_at_end_reads_the_best_adapter(tmp_path):
    torch.manual_seed(0)
    model = fastcur.inject(tiny_llama(), CONFIG)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=6, save_steps=3, eval_steps=3, eval_strategy="steps",
        save_strategy="steps", load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True,
        per_device_train_batch_size=2, per_device_eval_batch_size=2, learning_rate=5e-2, report_to=[],
        use_cpu=True, seed=0, disable_tqdm=True)
    trainer = AdapterTrainer(model=model, args=args, train_dataset=_data(), eval_dataset=_data(4, 10))
    trainer.train()
    # "best" = the highest eval loss, the earlier checkpoint: the final adapter must be replaced by it
    best = trainer.state.best_model_checkpoint
    assert best is not None and os.path.basename(best) == "checkpoint-3"
    want = _adapter(fastcur.load_adapter(tiny_llama(), best))
    got = _adapter(trainer.model)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    last = _adapter(fastcur.load_adapter(tiny_llama(), tmp_path / "checkpoint-6"))
    assert any(not torch.equal(last[k], want[k]) for k in want)
