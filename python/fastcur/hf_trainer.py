"""transformers `Trainer` with adapter-only checkpoints.

    from fastcur.hf_trainer import AdapterTrainer
    model = fastcur.inject(model, fastcur.SecuraConfig(rank=8, target_modules=["q_proj", "v_proj"]))
    trainer = AdapterTrainer(model=model, args=TrainingArguments("out", save_steps=100), train_dataset=data)
    trainer.train()                                   # out/checkpoint-100/: the adapter, no full model
    trainer.train(resume_from_checkpoint=True)        # a new run continues from the last checkpoint
    fastcur.load_adapter(base_model, "out/checkpoint-100")   # the adapter at step 100, exactly

`AdapterTrainer` is a `transformers.Trainer` whose model files are a fastcur adapter folder
(`fastcur.save_adapter`: the active adapter and its modules_to_save, atomically), written in
each checkpoint beside the Trainer's own optimizer, scheduler, RNG and trainer state; resuming
(`resume_from_checkpoint`) and `load_best_model_at_end` read them with `fastcur.load_adapter`
into the injected model. Everything else is Trainer's. The base model is not saved: rebuild it
(`from_pretrained`) and inject the same config before resuming.

Single-process (one CPU or GPU; DDP saves on the main process). Under FSDP2 the adapter's
gather is a collective that Trainer's main-process-only save does not run on every rank.

Imported on its own (`fastcur.hf_trainer`): transformers is loaded only here.
"""
from __future__ import annotations

import os

import torch
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME

from .persistence import load_adapter, save_adapter


class AdapterTrainer(Trainer):
    """`transformers.Trainer` that checkpoints and resumes the model's fastcur adapter only
    (see the module doc). The model must hold a fastcur adapter (`fastcur.inject`)."""

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        save_adapter(self.model, output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))   # as Trainer does

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_adapter(model if model is not None else self.model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        load_adapter(self.model, self.state.best_model_checkpoint)
