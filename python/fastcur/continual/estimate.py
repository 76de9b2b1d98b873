"""The time a `fastcur continual` run will take, printed before it starts.

Measured on a 2-core AMD EPYC VM, idle, with the cold `--quick` run committed in
benchmarks/results/continual-quick/ (2026-12-07, 585 s in all): pretraining the quick base took
168 s for 2400 steps on 2 threads (0.070 s per step); a LoRA training step 0.072 s and an
evaluation after a task 1.6 s in a worker process on 1 thread; the methods ran in 2 such
workers. The full base's costs are the quick ones scaled by its compute per step (8x the
layers' parameters; twice the batch when fine-tuning): about 6x per pretraining step and 16x
per training step; the small models are overhead-bound, so this errs long. A cached base model
costs no pretraining.
"""
from __future__ import annotations

# seconds of wall time: per pretraining step (2 threads), per training step of LoRA (batch 16
# for quick) and per evaluation after a task (64 test examples per task, the probe twice,
# perplexity), both in one worker on 1 thread; `fixed`: once per run (starting the workers,
# the base model's evaluation, the report and plots)
COSTS = {
    "tiny": {"pretrain_step": 0.01, "train_step": 0.01, "evaluation": 0.2, "fixed": 2.0},
    "quick": {"pretrain_step": 0.070, "train_step": 0.072, "evaluation": 1.6, "fixed": 20.0},
    "full": {"pretrain_step": 0.42, "train_step": 1.15, "evaluation": 19.0, "fixed": 20.0},
}
# a method's time per task (training + evaluation) relative to LoRA's, measured in the quick run
METHOD_FACTOR = {"seq": 0.94, "lora-er": 1.16, "lora-ewc": 1.14, "curlora": 0.91, "secura": 0.96,
                 "secura-released": 1.10, "inclora": 0.85, "ella": 1.08, "jumplora-inclora": 1.09,
                 "jumplora-ella": 1.08, "lalora-diag-1e2": 1.07, "lalora-diag-1e3": 1.07,
                 "lalora-diag-1e4": 1.11, "lalora-kfac-1e3": 1.26, "imsm-lora": 1.72}
REFERENCE_BATCH = {"tiny": 4, "quick": 16, "full": 32}


def seconds(cfg) -> dict:
    """{"pretraining": s, "training": s, "evaluation": s, "total": s} for a resolved RunConfig."""
    from .pretrain import SIZES, pretrain_info

    c = COSTS[cfg.size]
    pre = 0.0
    if cfg.model_dir is None:
        steps = cfg.pretrain_steps or SIZES[cfg.size]["steps"]
        cached = pretrain_info(cfg.cache_dir, seed=cfg.seed, size=cfg.size, steps=cfg.pretrain_steps) is not None
        pre = 0.0 if cached else steps * c["pretrain_step"]
    n_tasks = len(cfg.task_files) if cfg.task_files else 5
    batch = cfg.batch_size / REFERENCE_BATCH[cfg.size]
    # the methods run in `workers` processes, each on its share of the cores
    share = 1.0 / max(1, min(getattr(cfg, "workers", 1) or 1, len(cfg.methods)))
    factor = sum(METHOD_FACTOR.get(m, 1.0) for m in cfg.methods)
    train = share * cfg.seeds * n_tasks * cfg.steps * c["train_step"] * batch * factor
    evaluation = c["evaluation"] * (cfg.n_test / 64) * cfg.seeds * n_tasks * (1 + share * factor)
    evaluation += c["fixed"]
    return {"pretraining": pre, "training": train, "evaluation": evaluation, "total": pre + train + evaluation}


def _minutes(s: float) -> str:
    if s >= 7200:
        return f"{s / 3600:.0f} h"
    return f"{s / 60:.0f} min" if s >= 90 else f"{s:.0f} s"


def describe(cfg) -> str:
    """One line: the estimate and what it counts."""
    t = seconds(cfg)
    where = "2 CPU cores" if cfg.device == "cpu" else f"2 CPU cores (a {cfg.device} device is usually faster)"
    return (f"fastcur continual: {len(cfg.methods)} methods x {cfg.seeds} seed(s) x {cfg.steps} steps per task; "
            f"estimated time on {where}: about {_minutes(t['total'])} (pretraining {_minutes(t['pretraining'])}, "
            f"training {_minutes(t['training'])}, evaluation {_minutes(t['evaluation'])})")
