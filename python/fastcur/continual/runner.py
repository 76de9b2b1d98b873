"""The `fastcur continual` run: every method trained on the same task sequence, evaluated after
each task, its state and results written atomically so `--resume` continues where it stopped.

    if __name__ == "__main__":    # the methods run in spawned worker processes (RunConfig.workers)
        cfg = RunConfig(methods=["lora", "curlora"], quick=True, out="runs/demo")
        results = run(cfg)        # the `results` dict of report.py; also results.json, plots, report.md

Workers: with `workers` > 1 (the default on a CPU with 2 or more threads) each method trains in
its own spawned process, which imports the caller's main module again: call `run` under an
`if __name__ == "__main__":` guard in a script (or pass workers=1).

Fairness: every method starts from the same pretrained base and sees the same batches (drawn
from a generator seeded by the fine-tuning seed and the task index, never by the method's name,
so a resumed run draws what an uninterrupted one would); adapter initializations are seeded by
the fine-tuning seed alone. Each task gets `steps` AdamW steps (a fresh optimizer per task) at
the method's learning rate with linear warm-up, cosine decay and gradient clipping, and every
method is evaluated on the same test sets, probe and held-out text.

Seeds: the base model (world, pretraining), the tasks' data and the probe depend on `seed`;
`seeds = N` repeats the fine-tuning of every method with the seeds seed, seed+1, ... (batches,
adapter initializations, CUR selections, dropout) and reports mean and spread.
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import resource
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch

from . import checkpoint
from .methods import CLIP_NORM, WARMUP_FRACTION, MethodContext, build_method, linear_targets, parse_methods
from .tasks import Example, Task

# Defaults per mode; any of them can be overridden in RunConfig (the CLI's options).
MODES = {
    "quick": dict(size="quick", steps=100, n_train=256, n_test=64, n_probe=96, n_heldout=48, batch_size=16, seeds=1),
    "full": dict(size="full", steps=300, n_train=1024, n_test=128, n_probe=384, n_heldout=96, batch_size=32,
                 seeds=3),
}
EVAL_BATCH = 64          # rows per evaluation forward (generation uses the KV cache)
TIMING_WARMUP = 3        # the first steps of each task are left out of ms/step (allocation, caches)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RUN_FILE = "run.json"    # the run's options, read back by --resume
RUN_FORMAT = "fastcur.continual.run/1"
RESUME_MAY_CHANGE = ("workers",)   # options a resumed run may set anew (they change no result)


def default_cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "fastcur", "continual")


@dataclass
class RunConfig:
    """Everything a run depends on. None fields take the mode's default (MODES)."""
    methods: list[str] = field(default_factory=lambda: parse_methods(None))
    quick: bool = True
    steps: int | None = None
    seed: int = 0
    seeds: int | None = None
    device: str = "cpu"
    dtype: str = "float32"
    out: str = "continual-results"
    cache_dir: str | None = None
    model_dir: str | None = None
    task_files: list[str] | None = None
    probe_file: str | None = None
    heldout_file: str | None = None
    batch_size: int | None = None
    max_len: int = 192
    n_train: int | None = None
    n_test: int | None = None
    n_probe: int | None = None
    n_heldout: int | None = None
    pretrain_steps: int | None = None
    size: str | None = None          # the built-in model's size: "tiny" (tests), "quick", "full"
    workers: int | None = None       # methods trained at once, each in its own process (None: auto)
    resume: bool = False
    progress: bool = True

    def resolved(self) -> "RunConfig":
        mode = MODES["quick" if self.quick else "full"]
        cfg = copy.copy(self)
        for key in ("size", "steps", "n_train", "n_test", "n_probe", "n_heldout", "batch_size", "seeds"):
            if getattr(cfg, key) is None:
                setattr(cfg, key, mode[key])
        cfg.methods = parse_methods(cfg.methods)
        from .pretrain import SIZES

        if cfg.size not in SIZES:
            raise ValueError(f"--size must be one of {', '.join(SIZES)}, got {cfg.size!r}")
        if cfg.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
        for key in ("steps", "batch_size", "max_len", "n_train", "n_test", "n_probe", "n_heldout", "seeds"):
            v = getattr(cfg, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"--{key.replace('_', '-')} must be a positive int, got {v!r}")
        if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or cfg.seed < 0:
            raise ValueError(f"--seed must be an int >= 0, got {cfg.seed!r}")
        if cfg.pretrain_steps is not None and (isinstance(cfg.pretrain_steps, bool)
                                               or not isinstance(cfg.pretrain_steps, int) or cfg.pretrain_steps < 1):
            raise ValueError(f"--pretrain-steps must be a positive int, got {cfg.pretrain_steps!r}")
        cfg.device = check_device(cfg.device)
        if cfg.workers is None:
            cfg.workers = auto_workers(cfg.device, len(cfg.methods))
        elif isinstance(cfg.workers, bool) or not isinstance(cfg.workers, int) or cfg.workers < 1:
            raise ValueError(f"--workers must be a positive int, got {cfg.workers!r}")
        check_out(cfg.out)
        return cfg

    def identity(self) -> dict:
        """The settings a method's results depend on (compared by --resume)."""
        d = asdict(self)
        for key in ("methods", "out", "cache_dir", "resume", "progress", "seeds", "workers"):
            d.pop(key)
        return d

    def options(self) -> dict:
        """Every option but `resume` and `progress` (what run.json keeps for --resume)."""
        d = asdict(self)
        d.pop("resume")
        d.pop("progress")
        return d


def auto_workers(device: str, n_methods: int) -> int:
    """Methods trained at once: on the CPU one process per two cores' worth of threads, at most
    2 and at most the number of methods (the benchmark's models are small, so a step is bound by
    per-op overhead and two single-threaded processes do nearly twice the work of one process
    with two threads); 1 on a GPU (one device, one process)."""
    if torch.device(device).type != "cpu":
        return 1
    return max(1, min(2, torch.get_num_threads(), n_methods))


def check_device(device) -> str:
    """A device string torch understands and this machine has; ValueError naming --device else."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"--device: not a device: {device!r} (expected cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise ValueError(f"--device: {device!r} is not supported (expected cpu or cuda[:N])")
    return str(device)


def check_out(out) -> None:
    if not isinstance(out, (str, os.PathLike)) or not os.fspath(out):
        raise ValueError(f"--out must be a folder path, got {out!r}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out: {os.fspath(out)} exists and is not a folder")


def _seed(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


def seed_everything(*parts) -> int:
    s = _seed(*parts)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
    return s


# -- run.json (the options --resume reads back) ---------------------------------------------------
def write_run_file(cfg: RunConfig) -> None:
    from .._atomic import atomic_write_text

    atomic_write_text(os.path.join(cfg.out, RUN_FILE),
                      json.dumps({"format": RUN_FORMAT, "options": cfg.options()}, indent=2) + "\n")


def read_run_file(out: str) -> dict:
    """The options of the run in folder `out` (ValueError naming the file when missing or damaged)."""
    path = os.path.join(out, RUN_FILE)
    if not os.path.isdir(out):
        raise ValueError(f"--resume: {out} is not a folder of an earlier run (it does not exist)")
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"--resume: {out} has no {RUN_FILE}: not the folder of a fastcur continual run "
                         f"(or one from an older version); drop --resume to start a new run there") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"--resume: cannot read {path}: {exc}") from None
    names = {f.name for f in fields(RunConfig)}
    options = doc.get("options") if isinstance(doc, dict) and doc.get("format") == RUN_FORMAT else None
    if not isinstance(options, dict) or set(options) - names:
        raise ValueError(f"--resume: {path} is not a fastcur continual run file (format {RUN_FORMAT!r})")
    return options


def resume_config(out: str, given: dict) -> RunConfig:
    """The interrupted run's own RunConfig (from out/run.json), with resume on. `given`: the
    options the user passed explicitly; any that differs from the saved run's is an error."""
    saved = read_run_file(out)
    clash = {k: v for k, v in given.items() if k in saved and saved[k] != v and k not in RESUME_MAY_CHANGE}
    if clash:
        detail = ", ".join(f"{k}: saved {saved[k]!r}, given {v!r}" for k, v in sorted(clash.items()))
        raise ValueError(f"--resume: the run in {out} used other options ({detail}); give only --out and "
                         f"--resume (the run's own options are read from {RUN_FILE}), or drop --resume")
    changed = {k: given[k] for k in RESUME_MAY_CHANGE if k in given}
    cfg = RunConfig(**{**saved, **changed, "out": out, "resume": True, "progress": given.get("progress", True)})
    return cfg.resolved()


# -- peak memory --------------------------------------------------------------------------------
def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: "5" resets the process's peak RSS (VmHWM)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_kind(device: torch.device) -> str:
    return ("CUDA max_memory_allocated" if device.type == "cuda"
            else "peak RSS of the process (includes PyTorch itself)")


# -- data and model -----------------------------------------------------------------------------
@dataclass
class Bench:
    """What every method shares: the base model, tokenizer, tasks, the probe (ranked by likelihood
    and, the same questions, answered by generation), held-out text and pretraining examples."""
    model: torch.nn.Module
    tokenizer: object
    tasks: list[Task]
    probe: list[Example]
    probe_generation: list[Example]
    heldout: list[str]
    pretraining: list[Example]


def _read_heldout(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            texts = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--heldout: cannot read {path}: {exc}") from None
    if not texts:
        raise ValueError(f"--heldout: {path} has no text (one passage per line)")
    return texts


def load_bench(cfg: RunConfig) -> Bench:
    from . import data_files, pretrain, tasks as tasks_mod

    # User files first: a typo should fail before minutes of pretraining.
    if cfg.task_files:
        tasks = [data_files.load_jsonl_task(p, seed=cfg.seed) for p in cfg.task_files]
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"--tasks: task names must be distinct, got {names} (named after the files)")
    else:
        tasks = tasks_mod.builtin_tasks(seed=cfg.seed, n_train=cfg.n_train, n_test=cfg.n_test)
    user_probe = data_files.load_jsonl_examples(cfg.probe_file) if cfg.probe_file else None
    user_heldout = _read_heldout(cfg.heldout_file) if cfg.heldout_file else None
    device, dtype = torch.device(cfg.device), DTYPES[cfg.dtype]
    world = pretrain.base_world(cfg.seed, cfg.size)     # the world the built-in base was pretrained on
    if cfg.model_dir is not None:
        from .tokenizer import load_tokenizer

        model = _load_hf_model(cfg.model_dir)
        if any(m != "seq" for m in cfg.methods):
            linear_targets(model)  # fail before anything slow for a model without layers to adapt
        tokenizer = load_tokenizer(cfg.model_dir)
    else:
        model, tokenizer = pretrain.pretrained_base(cfg.cache_dir or default_cache_dir(), seed=cfg.seed,
                                                    size=cfg.size, steps=cfg.pretrain_steps, progress=cfg.progress)
    probe = user_probe if user_probe is not None else world.probe()
    if len(probe) > cfg.n_probe:   # a seeded sample, not the first entities only
        probe = random.Random(_seed(cfg.seed, "probe")).sample(probe, cfg.n_probe)
    generation = [Example(e.prompt, e.answer) for e in probe]
    if user_heldout is not None:
        heldout = user_heldout
    elif cfg.model_dir is not None and user_probe is not None:   # the user's own facts, as text
        heldout = [e.prompt + " " + e.answer for e in user_probe]
    else:
        heldout = world.heldout_texts()
    heldout = heldout[: cfg.n_heldout]
    rng = random.Random(_seed(cfg.seed, "pretraining-sample"))
    texts = world.pretraining_texts()
    pretraining = [Example("", t) for t in rng.sample(texts, min(len(texts), 256))]
    model = model.to(device=device, dtype=dtype)
    model.eval()
    return Bench(model, tokenizer, tasks, probe, generation, heldout, pretraining)


def _load_hf_model(model_dir: str) -> torch.nn.Module:
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"--model: {model_dir!r} is not a directory (expected a Hugging Face "
                                f"causal LM folder with config.json and its tokenizer)")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"--model: {model_dir!r} has no config.json (expected a Hugging Face "
                                f"causal LM folder saved with save_pretrained)")
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(model_dir)
    except Exception as exc:  # noqa: BLE001 - say which folder failed and why
        raise ValueError(f"--model: cannot load a causal LM from {model_dir!r}: {exc}") from exc


# -- evaluation ---------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_model(model, bench: Bench, batch_size: int) -> dict:
    """Accuracy on every task's test split, the probe (likelihood ranking and generation) and
    held-out perplexity."""
    from . import evaluate

    was_training = model.training
    model.eval()
    try:
        row = [evaluate.accuracy(model, t.test, bench.tokenizer, batch_size=batch_size) for t in bench.tasks]
        probe = evaluate.accuracy(model, bench.probe, bench.tokenizer, batch_size=batch_size)
        generation = evaluate.accuracy(model, bench.probe_generation, bench.tokenizer, batch_size=batch_size)
        ppl = evaluate.perplexity(model, bench.heldout, bench.tokenizer, batch_size=batch_size)
    finally:
        model.train(was_training)
    return {"accuracy": [float(a) for a in row], "probe": float(probe), "probe_generation": float(generation),
            "perplexity": float(ppl)}


def base_metrics(bench: Bench, cfg: RunConfig) -> dict:
    """The base model's metrics, cached in the out folder (same settings only; JSON)."""
    from .._atomic import atomic_write_text

    path = os.path.join(cfg.out, "state", "_base.json")
    ident = cfg.identity()
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        if isinstance(saved, dict) and saved.get("config") == ident and isinstance(saved.get("metrics"), dict):
            return saved["metrics"]
    except (OSError, ValueError):
        pass
    m = evaluate_model(bench.model, bench, EVAL_BATCH)
    atomic_write_text(path, json.dumps({"config": ident, "metrics": m}))
    return m


# -- one method ---------------------------------------------------------------------------------
def _batch_stream(examples: list[Example], batch_size: int, rng: random.Random):
    """Endless batches: epochs over a seeded permutation of the examples."""
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            perm = list(range(len(examples)))
            rng.shuffle(perm)
            order.extend(perm)
        yield [examples[i] for i in order[:batch_size]]
        del order[:batch_size]


def lr_factor(step: int, steps: int) -> float:
    """Linear warm-up over the first WARMUP_FRACTION of the steps, then cosine decay to 0."""
    warm = max(1, round(WARMUP_FRACTION * steps))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def _empty_result(n_tasks: int) -> dict:
    return {"acc_matrix": [], "probe": [], "probe_generation": [], "perplexity": [], "train_loss": [],
            "trainable_params": 0, "timed_train_s": 0.0, "timed_steps": 0, "train_steps": 0, "peak_memory_mb": 0.0,
            "completed_tasks": 0, "n_tasks": n_tasks}


def summarize(res: dict, base: dict) -> dict:
    """The method's summary figures from its per-task lists (None while unfinished)."""
    from . import metrics

    out = dict(res)
    out["perplexity_curve"] = list(res["perplexity"])
    done = res["completed_tasks"] == res["n_tasks"] and res["n_tasks"] > 0
    acc = np.array(res["acc_matrix"], dtype=float)
    out["retention_curve"] = metrics.retention_curve(res["probe"], base["probe"])
    out["format_retention_curve"] = metrics.retention_curve(res["probe_generation"], base["probe_generation"])
    out["ms_per_step"] = 1000 * res["timed_train_s"] / res["timed_steps"] if res["timed_steps"] else None
    keys = ("retention", "format_retention", "plasticity", "average_accuracy", "bwt", "gain_over_base",
            "perplexity")
    if not done:
        out.update({k: None for k in keys})
        return out
    base_avg = float(np.mean(base["accuracy"]))
    out["retention"] = out["retention_curve"][-1]
    out["format_retention"] = out["format_retention_curve"][-1]
    out["plasticity"] = float(np.mean(np.diag(acc)))
    out["average_accuracy"] = float(metrics.average_accuracy(acc))
    out["bwt"] = float(metrics.backward_transfer(acc))
    out["gain_over_base"] = out["average_accuracy"] - base_avg
    out["perplexity"] = res["perplexity"][-1]
    return out


def train_task(method, model, task: Task, index: int, ctx: MethodContext, *, device: torch.device,
               progress: bool = False, desc: str = "") -> dict:
    """Train `method` on one task: before_task, `ctx.steps` AdamW steps on seeded batches (warm-up,
    cosine decay, clipping), after_task. Returns the losses, the timed seconds and steps (the
    first TIMING_WARMUP steps untimed) and the trainable parameter count. Everything random is
    seeded by (ctx.seed, index): the batches are the same for every method."""
    from tqdm.auto import tqdm

    seed_everything(ctx.seed, index)
    method.before_task(index, task)
    params = method.parameters()
    n_params = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=method.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, ctx.steps))
    rng = random.Random(_seed(ctx.seed, index, "batches"))
    stream = _batch_stream(task.train, ctx.batch_size, rng)
    method.evaluation_model().train()   # the model, or its wrapper (IMSM) with it
    losses, timed_s, timed = [], 0.0, 0
    bar = tqdm(range(ctx.steps), desc=desc, leave=False, disable=not progress, file=sys.stderr, mininterval=1.0)
    for step in bar:
        batch = ctx.make_batch(method.mix_batch(next(stream), rng))
        t0 = time.perf_counter()
        loss = method.loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP_NORM)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        method.after_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= TIMING_WARMUP:
            timed_s += time.perf_counter() - t0
            timed += 1
        losses.append(float(loss.detach()))
        if progress:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    method.after_task(index, task)
    return {"losses": losses, "timed_s": timed_s, "timed_steps": timed, "n_params": n_params}


def run_method(name: str, bench: Bench, cfg: RunConfig, base: dict, out: str, ft_seed: int, *,
               on_task_end: Callable[[str, int], None] | None = None,
               publish: Callable[[dict], None] | None = None) -> dict:
    """Train `name` on every task in turn (fine-tuning seed `ft_seed`, state files in `out`);
    returns its results entry (see report.py). `publish(partial results)` is called after each
    task; `on_task_end(name, index)` after the task's state is saved (a test hook: raising
    there simulates an interruption)."""
    from . import evaluate

    device = torch.device(cfg.device)
    n_tasks = len(bench.tasks)
    ident = {**cfg.identity(), "fine_tuning_seed": ft_seed}
    state = checkpoint.load_state(out, name, ident) if cfg.resume else None
    if state is not None and state["completed_tasks"] >= n_tasks:
        return summarize(state["results"], base)

    def make_batch(examples):
        batch = evaluate.training_batch(examples, bench.tokenizer, cfg.max_len)
        return {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels", "prompt_lengths")}

    seed_everything(ft_seed, "setup")     # adapter inits: the same draws for every method
    model = copy.deepcopy(bench.model)
    ctx = MethodContext(make_batch=make_batch, pretraining=bench.pretraining, steps=cfg.steps,
                        batch_size=cfg.batch_size, seed=ft_seed)
    method = build_method(name)
    method.setup(model, ctx)
    res, start = _empty_result(n_tasks), 0
    if state is not None:
        model.load_state_dict(state["model"])
        method.load_state_dict(state["method_state"])
        checkpoint.set_rng_state(state["rng"])
        res, start = state["results"], state["completed_tasks"]

    _reset_peak(device)
    for i in range(start, n_tasks):
        task = bench.tasks[i]
        t_task, cpu_task = time.perf_counter(), time.process_time()
        log = train_task(method, model, task, i, ctx, device=device, progress=cfg.progress,
                         desc=f"{name} [{i + 1}/{n_tasks}] {task.name}")
        res["trainable_params"] = max(res["trainable_params"], log["n_params"])
        m = evaluate_model(method.evaluation_model(), bench, EVAL_BATCH)
        res["acc_matrix"].append(m["accuracy"])
        for key in ("probe", "probe_generation", "perplexity"):
            res[key].append(m[key])
        tail = log["losses"][-max(1, len(log["losses"]) // 5):]
        res["train_loss"].append(float(np.mean(tail)))
        res["timed_train_s"] += log["timed_s"]
        res["timed_steps"] += log["timed_steps"]
        res["train_steps"] += cfg.steps
        res["peak_memory_mb"] = max(res["peak_memory_mb"], _peak_mb(device))
        res["completed_tasks"] = i + 1
        res["wall_time_s"] = res.get("wall_time_s", 0.0) + time.perf_counter() - t_task    # training + evaluation
        res["cpu_time_s"] = res.get("cpu_time_s", 0.0) + time.process_time() - cpu_task
        checkpoint.save_state(out, name, config=ident, completed_tasks=i + 1, model_state=model.state_dict(),
                              method_state=method.state_dict(), results=res)
        if publish is not None:
            publish(summarize(res, base))
        if on_task_end is not None:
            on_task_end(name, i)
    return summarize(res, base)


# -- the whole run ------------------------------------------------------------------------------
def _run_seed(cfg: RunConfig, bench: Bench, base: dict, out: str, ft_seed: int, header: dict,
              on_task_end, progress_bar=None) -> dict:
    from . import report

    os.makedirs(out, exist_ok=True)
    results = {**header, "fine_tuning_seed": ft_seed, "methods": {}}
    results_path = os.path.join(out, "results.json")

    def publish(name, res):   # results.json follows the run task by task, methods in cfg's order
        done = {**results["methods"], name: res}
        results["methods"] = {m: done[m] for m in cfg.methods if m in done}
        report.write_results_json(results_path, results)

    if cfg.workers == 1 or on_task_end is not None:   # the test hook needs the method in this process
        for name in cfg.methods:
            publish(name, run_method(name, bench, cfg, base, out, ft_seed, on_task_end=on_task_end,
                                     publish=lambda res, name=name: publish(name, res)))
    else:
        _run_methods_in_workers(cfg, base, out, ft_seed, publish, progress_bar)
    return results


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _worker_run_method(cfg: RunConfig, name: str, base: dict, out: str, ft_seed: int, updates) -> dict:
    """One method in a worker process: its own copy of the bench (the base model from the cache
    the main process filled), partial results sent to the main process through `updates`."""
    bench = load_bench(cfg)
    return run_method(name, bench, cfg, base, out, ft_seed, publish=lambda res: updates.put((name, res)))


def _run_methods_in_workers(cfg: RunConfig, base: dict, out: str, ft_seed: int, publish, progress_bar) -> None:
    """Every method of cfg in `cfg.workers` spawned processes (each with its share of the threads),
    publishing each method's results as its tasks finish. An error in a method is raised here
    after the other workers were stopped."""
    import multiprocessing
    import queue as queue_mod
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    ctx = multiprocessing.get_context("spawn")
    threads = max(1, torch.get_num_threads() // cfg.workers)
    worker_cfg = copy.copy(cfg)
    worker_cfg.progress = False
    with ctx.Manager() as manager:
        updates = manager.Queue()

        def drain():
            while True:
                try:
                    name, res = updates.get_nowait()
                except queue_mod.Empty:
                    return
                publish(name, res)
                if progress_bar is not None:
                    progress_bar.update(1)
                    progress_bar.set_postfix_str(f"{name}: {res['completed_tasks']}/{res['n_tasks']} tasks",
                                                 refresh=False)

        with ProcessPoolExecutor(cfg.workers, mp_context=ctx, initializer=_worker_init,
                                 initargs=(threads,)) as pool:
            from .estimate import METHOD_FACTOR

            # the longest first, so no long method starts last while the other workers idle
            order = sorted(cfg.methods, key=lambda m: -METHOD_FACTOR.get(m, 1.0))
            pending = {pool.submit(_worker_run_method, worker_cfg, name, base, out, ft_seed, updates): name
                       for name in order}
            try:
                while pending:
                    done, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                    drain()
                    for future in done:
                        name = pending.pop(future)
                        publish(name, future.result())
            except BaseException:
                for future in pending:
                    future.cancel()
                raise
            drain()


def run(cfg: RunConfig, *, on_task_end: Callable[[str, int], None] | None = None,
        stdout=None) -> dict:
    """Run every method of `cfg` (for each fine-tuning seed) and write results.json, the plots
    and report.md to cfg.out (with `seeds > 1`, each seed's own results in `cfg.out/seed-<s>/`
    and the mean and spread in cfg.out). Prints the time estimate first and the final table
    last to `stdout` (sys.stdout; stdout=False prints nothing)."""
    from . import estimate, report

    cfg = cfg.resolved()
    say = (lambda *a: None) if stdout is False else (lambda *a: print(*a, file=stdout or sys.stdout, flush=True))
    os.makedirs(cfg.out, exist_ok=True)
    seeds = [cfg.seed + k for k in range(cfg.seeds)]
    folders = {s: cfg.out if len(seeds) == 1 else os.path.join(cfg.out, f"seed-{s}") for s in seeds}
    if cfg.resume:    # damaged or foreign state files fail here, before any pretraining
        for s, folder in folders.items():
            for name in cfg.methods:
                checkpoint.load_state(folder, name, {**cfg.identity(), "fine_tuning_seed": s})
    write_run_file(cfg)
    say(estimate.describe(cfg))
    torch.manual_seed(cfg.seed)
    bench = load_bench(cfg)
    base = base_metrics(bench, cfg)
    header = {"config": {**cfg.identity(), "methods": cfg.methods, "seeds": cfg.seeds,
                         "memory": memory_kind(torch.device(cfg.device)), "workers": cfg.workers,
                         "torch_threads": torch.get_num_threads() // cfg.workers if cfg.workers > 1
                         else torch.get_num_threads()},
              "base": {"probe": base["probe"], "probe_generation": base["probe_generation"],
                       "perplexity": base["perplexity"], "task_accuracy": base["accuracy"],
                       "average_accuracy": float(np.mean(base["accuracy"]))},
              "tasks": [t.name for t in bench.tasks]}
    from tqdm.auto import tqdm

    in_workers = cfg.workers > 1 and on_task_end is None
    with tqdm(total=len(seeds) * len(cfg.methods) * len(bench.tasks), desc="methods x tasks", unit="task",
              disable=not (cfg.progress and in_workers), file=sys.stderr, mininterval=1.0) as bar:
        per_seed = [_run_seed(cfg, bench, base, folders[s], s, header, on_task_end, bar) for s in seeds]
    if len(seeds) == 1:
        results = per_seed[0]
    else:
        for s, r in zip(seeds, per_seed):
            report.write_markdown_report(r, folders[s])
        results = report.aggregate_seeds(per_seed, header)
        report.write_results_json(os.path.join(cfg.out, "results.json"), results)
    report.write_markdown_report(results, cfg.out)   # with the PNG plots
    say(report.format_table(results))
    return results
