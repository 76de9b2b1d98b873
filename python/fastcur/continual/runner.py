"""The `fastcur continual` run: every method trained on the same task sequence, evaluated after
each task, its state and results written atomically so `--resume` continues where it stopped.

    cfg = RunConfig(methods=["lora", "curlora"], quick=True, out="runs/demo")
    results = run(cfg)            # the `results` dict of report.py; also results.json, plots, report.md

Fairness: every method starts from the same pretrained base, sees the same batches (seeded by
run seed, method name and task index, so a resumed run draws what an uninterrupted one would),
trains `steps` AdamW steps per task at its family's constant learning rate (a fresh optimizer
per task, so a task boundary holds no optimizer state), and is evaluated on the same test sets.
"""
from __future__ import annotations

import copy
import os
import random
import resource
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from . import checkpoint
from .methods import MethodContext, build_method, linear_targets, parse_methods
from .tasks import Example, Task

# Defaults per mode; any of them can be overridden in RunConfig (the CLI's options).
MODES = {
    "quick": dict(size="quick", steps=100, n_train=256, n_test=32, n_probe=64, n_heldout=64, batch_size=16),
    "full": dict(size="full", steps=300, n_train=1024, n_test=128, n_probe=256, n_heldout=256, batch_size=32),
}
EVAL_BATCH = 64    # rows per evaluation forward (generation uses the KV cache)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    device: str = "cpu"
    dtype: str = "float32"
    out: str = "continual-results"
    cache_dir: str | None = None
    model_dir: str | None = None
    task_files: list[str] | None = None
    probe_file: str | None = None
    batch_size: int | None = None
    max_len: int = 192
    n_train: int | None = None
    n_test: int | None = None
    n_probe: int | None = None
    n_heldout: int | None = None
    pretrain_steps: int | None = None
    size: str | None = None          # the built-in model's size: "tiny" (tests), "quick", "full"
    resume: bool = False
    progress: bool = True

    def resolved(self) -> "RunConfig":
        mode = MODES["quick" if self.quick else "full"]
        cfg = copy.copy(self)
        for key in ("size", "steps", "n_train", "n_test", "n_probe", "n_heldout", "batch_size"):
            if getattr(cfg, key) is None:
                setattr(cfg, key, mode[key])
        cfg.methods = parse_methods(cfg.methods)
        from .pretrain import SIZES

        if cfg.size not in SIZES:
            raise ValueError(f"--size must be one of {', '.join(SIZES)}, got {cfg.size!r}")
        if cfg.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
        for key in ("steps", "batch_size", "max_len", "n_train", "n_test", "n_probe", "n_heldout"):
            v = getattr(cfg, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"--{key.replace('_', '-')} must be a positive int, got {v!r}")
        return cfg

    def identity(self) -> dict:
        """The settings a method's results depend on (compared by --resume)."""
        d = asdict(self)
        for key in ("methods", "out", "cache_dir", "resume", "progress"):
            d.pop(key)
        return d


def _seed(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


def seed_everything(*parts) -> int:
    s = _seed(*parts)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
    return s


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
    """What every method shares: the base model, tokenizer, tasks, probe and held-out text."""
    model: torch.nn.Module
    tokenizer: object
    tasks: list[Task]
    probe: list[Example]
    heldout: list[str]
    pretraining: list[Example]


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
    device, dtype = torch.device(cfg.device), DTYPES[cfg.dtype]
    if cfg.model_dir is not None:
        from .tokenizer import load_tokenizer

        model = _load_hf_model(cfg.model_dir)
        if any(m != "seq" for m in cfg.methods):
            linear_targets(model)  # fail before anything slow for a model without layers to adapt
        tokenizer = load_tokenizer(cfg.model_dir)
    else:
        model, tokenizer = pretrain.pretrained_base(cfg.cache_dir or default_cache_dir(), seed=cfg.seed,
                                                    size=cfg.size, steps=cfg.pretrain_steps, progress=cfg.progress)
    # The world the built-in base was pretrained on (its size depends on the mode).
    world = pretrain.base_world(cfg.seed, cfg.size)
    probe = user_probe if user_probe is not None else world.probe()
    if len(probe) > cfg.n_probe:   # a seeded sample, not the first entities only
        probe = random.Random(_seed(cfg.seed, "probe")).sample(probe, cfg.n_probe)
    heldout = world.heldout_texts()[: cfg.n_heldout]
    rng = random.Random(_seed(cfg.seed, "pretraining-sample"))
    texts = world.pretraining_texts()
    pretraining = [Example("", t) for t in rng.sample(texts, min(len(texts), 256))]
    model = model.to(device=device, dtype=dtype)
    model.eval()
    return Bench(model, tokenizer, tasks, probe, heldout, pretraining)


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
    """Accuracy on every task's test split, probe accuracy and held-out perplexity."""
    from . import evaluate

    was_training = model.training
    model.eval()
    try:
        row = [evaluate.accuracy(model, t.test, bench.tokenizer, batch_size=batch_size) for t in bench.tasks]
        probe = evaluate.accuracy(model, bench.probe, bench.tokenizer, batch_size=batch_size)
        ppl = evaluate.perplexity(model, bench.heldout, bench.tokenizer, batch_size=batch_size)
    finally:
        model.train(was_training)
    return {"accuracy": [float(a) for a in row], "probe_accuracy": float(probe), "perplexity": float(ppl)}


def base_metrics(bench: Bench, cfg: RunConfig) -> dict:
    """The base model's metrics, cached in the out folder's state (same config only)."""
    path = checkpoint.state_path(cfg.out, "_base")
    ident = cfg.identity()
    if os.path.exists(path):
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("config") == ident:
            return state["metrics"]
    m = evaluate_model(bench.model, bench, EVAL_BATCH)
    checkpoint.atomic_torch_save({"config": ident, "metrics": m}, path)
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


def _empty_result(n_tasks: int) -> dict:
    return {"acc_matrix": [], "probe_accuracy": [], "perplexity": [], "retention": [], "train_loss": [],
            "trainable_params": 0, "train_time_s": 0.0, "train_steps": 0, "peak_memory_mb": 0.0,
            "completed_tasks": 0, "n_tasks": n_tasks}


def _finish(res: dict) -> dict:
    from . import metrics

    acc = np.array(res["acc_matrix"], dtype=float)
    done = res["completed_tasks"] == res["n_tasks"]
    res["average_accuracy"] = float(metrics.average_accuracy(acc)) if done else None
    res["backward_transfer"] = float(metrics.backward_transfer(acc)) if done and len(acc) > 1 else (0.0 if done else None)
    res["time_per_step_s"] = res["train_time_s"] / max(res["train_steps"], 1)
    return res


def train_task(method, model, task: Task, index: int, ctx: MethodContext, *, name: str,
               device: torch.device, progress: bool = False, desc: str = "") -> tuple[list[float], float, int]:
    """Train `method` on one task: before_task, `ctx.steps` AdamW steps on seeded batches,
    after_task. Returns (losses per step, training seconds, trainable parameter count).
    Everything random is seeded by (ctx.seed, name, index), so the result depends only on the
    model and method state at the start of the task."""
    from tqdm.auto import tqdm

    seed_everything(ctx.seed, name, index)
    method.before_task(index, task)
    params = method.parameters()
    n_params = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=method.lr, weight_decay=0.0)
    rng = random.Random(_seed(ctx.seed, name, index, "batches"))
    stream = _batch_stream(task.train, ctx.batch_size, rng)
    method.evaluation_model().train()   # the model, or its wrapper (IMSM) with it
    losses, t_train = [], 0.0
    bar = tqdm(range(ctx.steps), desc=desc, leave=False, disable=not progress, file=sys.stderr)
    for _ in bar:
        batch = ctx.make_batch(method.mix_batch(next(stream), rng))
        t0 = time.perf_counter()
        loss = method.loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.after_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t_train += time.perf_counter() - t0
        losses.append(float(loss.detach()))
        if progress:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    method.after_task(index, task)
    return losses, t_train, n_params


def run_method(name: str, bench: Bench, cfg: RunConfig, base: dict, *,
               on_task_end: Callable[[str, int], None] | None = None,
               publish: Callable[[dict], None] | None = None) -> dict:
    """Train `name` on every task in turn; returns its results entry (see report.py).
    `publish(partial results)` is called after each task; `on_task_end(name, index)` after the
    task's state is saved (a test hook: raising there simulates an interruption)."""
    from . import evaluate, metrics

    device = torch.device(cfg.device)
    n_tasks = len(bench.tasks)
    ident = cfg.identity()
    state = checkpoint.load_state(cfg.out, name, ident) if cfg.resume else None
    if state is not None and state["completed_tasks"] >= n_tasks:
        return _finish(state["results"])

    def make_batch(examples):
        batch = evaluate.training_batch(examples, bench.tokenizer, cfg.max_len)
        return {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels", "prompt_lengths")}

    seed_everything(cfg.seed, name, "setup")
    model = copy.deepcopy(bench.model)
    ctx = MethodContext(make_batch=make_batch, pretraining=bench.pretraining, steps=cfg.steps,
                        batch_size=cfg.batch_size, seed=cfg.seed)
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
        losses, t_train, n_params = train_task(method, model, task, i, ctx, name=name, device=device,
                                               progress=cfg.progress, desc=f"{name} [{i + 1}/{n_tasks}] {task.name}")
        res["trainable_params"] = max(res["trainable_params"], n_params)
        m = evaluate_model(method.evaluation_model(), bench, EVAL_BATCH)
        res["acc_matrix"].append(m["accuracy"])
        res["probe_accuracy"].append(m["probe_accuracy"])
        res["perplexity"].append(m["perplexity"])
        res["retention"].append(float(metrics.retention(m["probe_accuracy"], base["probe_accuracy"])))
        tail = losses[-max(1, len(losses) // 5):]
        res["train_loss"].append(float(np.mean(tail)))
        res["train_time_s"] += t_train
        res["train_steps"] += cfg.steps
        res["peak_memory_mb"] = max(res["peak_memory_mb"], _peak_mb(device))
        res["completed_tasks"] = i + 1
        res["wall_time_s"] = res.get("wall_time_s", 0.0) + time.perf_counter() - t_task    # training + evaluation
        res["cpu_time_s"] = res.get("cpu_time_s", 0.0) + time.process_time() - cpu_task
        checkpoint.save_state(cfg.out, name, config=ident, completed_tasks=i + 1, model_state=model.state_dict(),
                              method_state=method.state_dict(), results=res)
        if publish is not None:
            publish(_finish(dict(res)))
        if on_task_end is not None:
            on_task_end(name, i)
    return _finish(res)


# -- the whole run ------------------------------------------------------------------------------
def run(cfg: RunConfig, *, on_task_end: Callable[[str, int], None] | None = None,
        stdout=None) -> dict:
    """Run every method of `cfg` and write results.json, the plots and report.md to cfg.out.
    Prints the final table to `stdout` (sys.stdout; None-able via stdout=False)."""
    from . import report

    cfg = cfg.resolved()
    torch.manual_seed(cfg.seed)
    os.makedirs(cfg.out, exist_ok=True)
    bench = load_bench(cfg)
    base = base_metrics(bench, cfg)
    results = {"config": {**cfg.identity(), "methods": cfg.methods, "memory": memory_kind(torch.device(cfg.device)),
                          "torch_threads": torch.get_num_threads()},
               "base": {"probe_accuracy": base["probe_accuracy"], "perplexity": base["perplexity"],
                        "task_accuracy": base["accuracy"]},
               "tasks": [t.name for t in bench.tasks], "methods": {}}
    results_path = os.path.join(cfg.out, "results.json")
    for name in cfg.methods:
        def publish(res, name=name):   # results.json follows the run task by task
            results["methods"][name] = res
            report.write_results_json(results_path, results)

        publish(run_method(name, bench, cfg, base, on_task_end=on_task_end, publish=publish))
    report.write_markdown_report(results, cfg.out)   # with the two PNG plots
    if stdout is not False:
        print(report.format_table(results), file=stdout or sys.stdout)
    return results
