"""The time a `fastcur continual` run will take, printed before it starts.

Measured in the session that built the quick mode, on a 2-core machine shared with other
builds (load average 5-18): pretraining the quick base took 19 CPU-minutes for 2000 steps
(0.57 CPU-s per step; on 2 idle cores about 0.35 s of wall time per step). The full base's
costs are the quick ones scaled by its compute per step (8x the layers' parameters; twice the
batch when fine-tuning): about 6x per pretraining step and 16x per training step; the small
models are overhead-bound, so this errs long. A cached base model costs no pretraining.
"""
from __future__ import annotations

# seconds of wall time on 2 idle CPU cores: per pretraining step, per training step of a
# LoRA-style method (batch 16 for quick), per evaluation after a task (64 test examples per
# task, the probe twice over 192 facts, perplexity)
COSTS = {
    "tiny": {"pretrain_step": 0.01, "train_step": 0.01, "evaluation": 0.2},
    "quick": {"pretrain_step": 0.35, "train_step": 0.06, "evaluation": 3.0},
    "full": {"pretrain_step": 2.1, "train_step": 1.0, "evaluation": 36.0},
}
# cost of a training step relative to LoRA's (measured in the quick run)
METHOD_FACTOR = {"seq": 1.1, "imsm-lora": 1.8, "secura-released": 1.6, "lora-ewc": 1.2, "jumplora-ella": 1.3}
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
    train = share * cfg.seeds * n_tasks * cfg.steps * c["train_step"] * batch * sum(
        METHOD_FACTOR.get(m, 1.0) for m in cfg.methods)
    evaluation = c["evaluation"] * (cfg.n_test / 64) * cfg.seeds * n_tasks * (1 + share * len(cfg.methods))
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
