"""The generic benchmark runner behind `fastcur bench` and `make bench`.

    fastcur bench [NAMES...] [--device cpu|cuda] [--dtype float32 bfloat16 ...]
                  [--shapes M,n,k,r ...] [--modes fwd fwd+bwd] [--quick] [--threads 2]
                  [--reps N] [--out DIR] [--no-plot] [--providers NAME ...]

A benchmark is a module `benchmarks/bench_<name>.py` that defines `BENCHMARK`, a `Benchmark`:
its providers (name -> factory building a `Prepared` workload for one `Case`), the floor
provider, the named baselines, and its default and `--quick` case grids. The runner owns the
timing, so every benchmark is measured the same way:

- threads fixed (`torch.set_num_threads`, default 2);
- every provider of a case is built first and timed in the same run; on the CPU the reps are
  interleaved round-robin (rep i times every provider once, the order rotating each rep), so
  drift of the machine (clock, neighbours) hits all providers alike;
- warm-up (at least 3 calls and 0.25 s per provider), then the median of `--reps` samples
  (at least 5). A CPU sample is one call, or the mean of several back-to-back calls when one
  call is shorter than 2 ms (timer noise); on CUDA `triton.testing.do_bench` (median) when
  Triton is there, else CUDA events around each call;
- ratios: `time / time(floor)` and `time / time(baseline)` for each named baseline; the JSON
  also has `paired_ratios`: the median over reps of the ratio of samples taken in the same rep;
- CPU cases are timed under a machine-wide file lock (`<tmp>/fastcur-bench-cpu.lock`), so
  fastcur runners started from several checkouts take turns; `--wait-idle` / `--retry-busy`
  deal with everything else that runs on a shared machine;
- peak memory of one call, next to its time. CUDA: `torch.cuda.max_memory_allocated()` after
  `reset_peak_memory_stats()`, minus what was allocated before the call. CPU: one call runs
  under `torch.profiler` with `profile_memory=True`; every allocation and free that c10's CPU
  allocator reports (all tensors, including temporaries inside C++ kernels, but not scratch
  memory a BLAS library takes from malloc itself) is replayed in time order, and the peak of
  the running sum is reported: the most bytes live at once above what was live when the call
  began. Both are "peak extra bytes of one call"; gradients of the previous call are freed
  before it.

A workload is a zero-argument `forward()` returning the output. Mode "fwd" runs it with
autograd recording (the input requires grad, as in training) and drops the result; "fwd+bwd"
runs it and `y.backward(grad_out)` with a fixed random `grad_out`, after setting `.grad = None`
on every leaf it declares (input and trainable parameters), so gradients never accumulate;
"infer" runs it under `torch.no_grad()` with an input that does not require grad; "train" calls it
as it is: the workload is one whole training step (its own forward, backward and optimizer step).
A benchmark may declare a throughput unit (`Benchmark.throughput`, e.g. tokens per call): the
table and JSON then carry `<unit>/s`. Named presets (`Benchmark.sizes`, picked with `--size`) set
the default shapes, dtypes and device at once (e.g. `fastcur bench model --size gpu`).

Output: a table on stdout, `<out>/<name>.json`, and `<out>/<name>.png` (time ratio against the
floor, per provider per case; matplotlib, Agg backend).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
MODES = ("fwd", "fwd+bwd", "infer", "train")
MIN_REPS = 5
DEFAULT_REPS = 10
WARMUP_CALLS = 3
WARMUP_SECONDS = 0.25
MIN_SAMPLE_SECONDS = 2e-3
BUSY_THRESHOLD = 0.1        # other processes using more than this share of the cores: a noisy case


class Skip(Exception):
    """Raised by a provider factory when it cannot run here; the message is the reason."""


@dataclass(frozen=True)
class Case:
    """One point of a benchmark's grid."""
    shape: dict                 # e.g. {"M": 2048, "n": 2048, "k": 2048, "r": 16}
    dtype: torch.dtype
    device: torch.device
    mode: str                   # "fwd", "fwd+bwd", "infer" or "train"
    seed: int = 0

    @property
    def requires_grad(self) -> bool:
        """Whether the input should require grad (every mode but "infer")."""
        return self.mode != "infer"

    def label(self) -> str:
        return f"{self.mode} {dtype_name(self.dtype)} " + " ".join(f"{k}={v}" for k, v in self.shape.items())

    def to_json(self) -> dict:
        return {**self.shape, "dtype": dtype_name(self.dtype), "device": str(self.device), "mode": self.mode}


@dataclass
class Prepared:
    """What a provider factory returns: a workload ready to be timed."""
    forward: Callable[[], torch.Tensor]
    leaves: Sequence[torch.Tensor] = ()   # tensors whose .grad is reset before each fwd+bwd call
    note: str = ""                        # shown in the JSON (e.g. which backend ran)


@dataclass
class Benchmark:
    """The declaration a `bench_<name>.py` module exposes as `BENCHMARK`."""
    name: str
    description: str
    providers: dict                       # provider name -> factory(Case) -> Prepared
    floor: str                            # provider every time is divided by
    shape_fields: tuple                   # names of the comma-separated --shapes fields
    shapes: list                          # default grid: list of tuples in shape_fields order
    quick_shapes: list
    baselines: tuple = ()                 # providers that get their own ratio column
    focus: str | None = None              # the provider under test (listed first after the floor)
    dtypes: tuple = ("float32", "bfloat16")
    quick_dtypes: tuple = ("float32",)
    modes: tuple = ("fwd", "fwd+bwd")
    flops: Callable[[Case], float] | None = None  # useful work of one call (of the floor), for TFLOP/s
    details: dict = field(default_factory=dict)   # free-form facts written into the JSON
    throughput: tuple[str, Callable[[Case], float]] | None = None  # (unit, units per call), e.g. tokens
    sizes: dict = field(default_factory=dict)     # --size presets: name -> {"shapes", "dtypes", "device"}


# ---------------------------------------------------------------------------------------------
# helpers


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def benchmark_dir() -> Path:
    return Path(__file__).resolve().parent


def available_benchmarks() -> list[str]:
    """Names of the bench_*.py modules next to this file (`bench_cur_linear.py` -> `cur_linear`)."""
    return sorted(p.stem[len("bench_"):] for p in benchmark_dir().glob("bench_*.py"))


def load_benchmark(name: str) -> Benchmark:
    """`name` is a module's name (its BENCHMARK), or `module:part` for one of the extra
    benchmarks a module lists in `BENCHMARKS = {part: Benchmark(...)}` (e.g. `secura:signorm`)."""
    module_name, _, part = name.partition(":")
    if module_name not in available_benchmarks():
        raise LookupError(f"unknown benchmark {name!r}; available: {', '.join(available_benchmarks()) or 'none'}")
    module = importlib.import_module(f"{__package__ or 'fastcur.benchmarks'}.bench_{module_name}")
    if part:
        extra = getattr(module, "BENCHMARKS", {})
        if part not in extra:
            raise LookupError(f"benchmark module bench_{module_name}.py has no part {part!r}; "
                              f"parts: {', '.join(extra) or 'none'}")
        return extra[part]
    bench = getattr(module, "BENCHMARK", None)
    if not isinstance(bench, Benchmark):
        raise LookupError(f"benchmark module bench_{module_name}.py defines no BENCHMARK = Benchmark(...)")
    return bench


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_facts(device: torch.device) -> dict:
    facts = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    try:
        import fastcur
        from fastcur.backend import get_backend, resolve

        facts["fastcur"] = fastcur.__version__
        facts["fastcur_backend"] = f"{get_backend()} -> {resolve('cur_linear', device)}"
    except Exception as exc:  # noqa: BLE001 - facts only
        facts["fastcur"] = f"unavailable: {exc}"
    if device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
        facts["cuda"] = torch.version.cuda
    return facts


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _dtype_supported(dtype: torch.dtype, device: torch.device) -> str | None:
    """None if a matmul in `dtype` runs on `device`, else the reason it does not."""
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        return "bfloat16 is not supported on this GPU"
    try:
        a = torch.ones(4, 4, dtype=dtype, device=device)
        (a @ a).sum().item()
    except Exception as exc:  # noqa: BLE001
        return f"{dtype_name(dtype)} matmul fails on {device}: {exc}"
    return None


def make_step(prepared: Prepared, case: Case) -> Callable[[], None]:
    """The function the runner times: one call of the workload in the case's mode."""
    forward = prepared.forward
    if case.mode == "infer":
        def step():
            with torch.no_grad():
                forward()
        return step
    if case.mode in ("fwd", "train"):
        def step():
            forward()
        return step
    if case.mode != "fwd+bwd":
        raise ValueError(f"unknown mode {case.mode!r}; expected one of {', '.join(MODES)}")
    leaves = list(prepared.leaves)
    y = forward()
    if not y.requires_grad:
        raise RuntimeError("fwd+bwd: the output does not require grad (no input or parameter requires grad)")
    gen = torch.Generator().manual_seed(case.seed + 1)
    grad_out = torch.randn(y.shape, generator=gen).to(device=y.device, dtype=y.dtype)
    del y
    for t in leaves:
        t.grad = None

    def step():
        for t in leaves:
            t.grad = None
        forward().backward(grad_out)
    return step


def build_step(bench: Benchmark, provider: str, case: Case) -> tuple[Callable[[], None], Prepared]:
    """Build one provider's workload and its timed step (used by the runner and pytest suite)."""
    prepared = bench.providers[provider](case)
    return make_step(prepared, case), prepared


# ---------------------------------------------------------------------------------------------
# timing and memory


def load_average() -> list | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _cpu_jiffies() -> tuple[int, int] | None:
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)     # idle + iowait
    return sum(fields) - idle, sum(fields)


class OthersMonitor:
    """Share of the machine's cores used by *other* processes between `start()` and `stop()`:
    all busy CPU time from /proc/stat minus this process's own (os.times). Recorded next to
    each case's timings, so a sample taken while the shared machine was loaded can be told
    apart (Linux only; None elsewhere)."""

    def start(self) -> "OthersMonitor":
        self._sys, self._own = _cpu_jiffies(), os.times()
        return self

    def stop(self) -> float | None:
        sys_now, own_now = _cpu_jiffies(), os.times()
        if self._sys is None or sys_now is None or sys_now[1] == self._sys[1]:
            return None
        hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        busy = (sys_now[0] - self._sys[0]) / hz
        own = (own_now.user - self._own.user) + (own_now.system - self._own.system)
        total = (sys_now[1] - self._sys[1]) / hz
        return max(0.0, min(1.0, (busy - own) / total))


class machine_lock:
    """An exclusive lock (flock on a file in the temp dir) held while a case is timed, so that
    fastcur runners on one machine (several checkouts, several sessions) take turns instead of
    timing each other's load. Blocks until it is free; a no-op where flock is missing."""

    def __init__(self, enabled: bool = True, name: str = "fastcur-bench-cpu.lock"):
        self.enabled, self.path, self._fd = enabled, Path(tempfile.gettempdir()) / name, None

    def __enter__(self):
        if not self.enabled:
            return self
        try:
            import fcntl

            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except (ImportError, OSError):
            if self._fd is not None:
                os.close(self._fd)
            self._fd = None
        return self

    def __exit__(self, *exc):
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        return False


def busy_fraction(interval: float = 0.5) -> float | None:
    """Share of all cores busy over `interval` seconds while this process sleeps (Linux only)."""
    a = _cpu_jiffies()
    time.sleep(interval)
    b = _cpu_jiffies()
    if a is None or b is None or b[1] == a[1]:
        return None
    return (b[0] - a[0]) / (b[1] - a[1])


def wait_until_idle(max_wait: float, threshold: float = BUSY_THRESHOLD) -> float | None:
    """Sleep until other processes use under `threshold` of the cores (or `max_wait` s passed);
    returns the last busy fraction seen. Timings on a shared machine are only worth it then."""
    deadline = time.monotonic() + max_wait
    busy = busy_fraction()
    while busy is not None and busy > threshold and time.monotonic() < deadline:
        busy = busy_fraction(1.0)
    return busy


def _time_calls(step: Callable[[], None], calls: int, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        step()
    _sync(device)
    return (time.perf_counter() - t0) / calls


def time_cpu(steps: dict, reps: int, device: torch.device, warmup: float = WARMUP_SECONDS) -> dict:
    """Median seconds per call for each step, reps interleaved round-robin. {name: (median, samples, inner)}"""
    inner = {}
    for name, step in steps.items():
        t0 = time.perf_counter()
        calls = 0
        while calls < WARMUP_CALLS or time.perf_counter() - t0 < warmup:
            step()
            calls += 1
        _sync(device)
        # Estimated from one more call alone (the warm-up loop's mean includes first-call costs).
        per_call = min(_time_calls(step, 1, device), (time.perf_counter() - t0) / calls)
        inner[name] = max(1, math.ceil(MIN_SAMPLE_SECONDS / max(per_call, 1e-9)))
    samples = {name: [] for name in steps}
    names = list(steps)
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for rep in range(reps):
            shift = rep % len(names)
            for name in names[shift:] + names[:shift]:
                samples[name].append(_time_calls(steps[name], inner[name], device))
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: (statistics.median(s), s, inner[name]) for name, s in samples.items()}


def time_cuda(steps: dict, reps: int, device: torch.device, warmup: float = WARMUP_SECONDS) -> dict:
    """Median seconds per call for each step on CUDA: do_bench if Triton is there, else events."""
    try:
        from triton.testing import do_bench
    except Exception:  # noqa: BLE001 - Triton missing or broken: CUDA events
        do_bench = None
    out = {}
    for name, step in steps.items():
        if do_bench is not None:
            ms = do_bench(step, warmup=max(1, int(warmup * 1000)), rep=max(100, 20 * reps), return_mode="median")
            out[name] = (ms / 1e3, [ms / 1e3], 1)
            continue
        for _ in range(WARMUP_CALLS + 2):
            step()
        torch.cuda.synchronize(device)
        times = []
        for _ in range(max(reps, MIN_REPS)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        out[name] = (statistics.median(times), times, 1)
    return out


def peak_memory_cpu(step: Callable[[], None]) -> tuple[int | None, str]:
    """Peak bytes live at once above the start, over one call, from the profiler's allocation events."""
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile
    except Exception as exc:  # noqa: BLE001
        return None, f"torch.profiler unavailable: {exc}"
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    try:
        tree = prof.profiler.kineto_results.experimental_event_tree()
    except Exception as exc:  # noqa: BLE001 - private API moved
        return None, f"profiler event tree unavailable: {exc}"
    events = []
    stack = list(tree)
    while stack:
        ev = stack.pop()
        if ev.tag == _EventType.Allocation and getattr(ev.extra_fields, "device", torch.device("cpu")).type == "cpu":
            events.append((ev.start_time_ns, ev.extra_fields.alloc_size))
        stack.extend(ev.children)
    events.sort()
    live = peak = 0
    for _, size in events:
        live += size
        peak = max(peak, live)
    return peak, "profiler (c10 CPU allocator)"


def peak_memory_cuda(step: Callable[[], None], device: torch.device) -> tuple[int | None, str]:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before, "torch.cuda.max_memory_allocated"


class _quiet_stderr:
    """Silence the C-level stderr lines (Kineto's "profiler_start/stop") during a profile."""

    def __enter__(self):
        try:
            sys.stderr.flush()
            self._saved = os.dup(2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
        except OSError:
            self._saved = None
        return self

    def __exit__(self, *exc):
        if self._saved is not None:
            os.dup2(self._saved, 2)
            os.close(self._saved)
        return False


# ---------------------------------------------------------------------------------------------
# running one benchmark


def provider_order(bench: Benchmark, selected: Sequence[str] | None) -> list[str]:
    names = list(bench.providers)
    if selected:
        unknown = [s for s in selected if not any(s.lower() in n.lower() for n in names)]
        if unknown:
            raise LookupError(f"benchmark {bench.name!r} has no provider matching {', '.join(map(repr, unknown))}; "
                              f"providers: {', '.join(names)}")
        names = [n for n in names if n == bench.floor or any(s.lower() in n.lower() for s in selected)]
    first = [bench.floor] + ([bench.focus] if bench.focus and bench.focus in names else [])
    return [n for n in first if n in names] + [n for n in names if n not in first]


def run_case(bench: Benchmark, case: Case, providers: list[str], reps: int, measure_memory: bool,
             warmup: float = WARMUP_SECONDS) -> dict:
    """Build every provider of the case, time them together, measure memory; one result dict."""
    results: dict = {}
    steps: dict = {}
    keep: dict = {}
    unsupported = _dtype_supported(case.dtype, case.device)
    for name in providers:
        if unsupported:
            results[name] = {"status": "skipped", "reason": unsupported}
            continue
        try:
            step, prepared = build_step(bench, name, case)
            step()                      # first call outside the timing: errors surface here
            _sync(case.device)
        except Skip as exc:
            results[name] = {"status": "skipped", "reason": str(exc)}
            continue
        except ImportError as exc:
            missing = getattr(exc, "name", None) or str(exc)
            results[name] = {"status": "skipped", "reason": f"{missing} is not installed ({exc})"}
            continue
        except Exception as exc:  # noqa: BLE001 - one broken provider must not end the run
            results[name] = {"status": "error", "reason": f"{type(exc).__name__}: {exc}"}
            continue
        steps[name] = step
        keep[name] = prepared
        results[name] = {"status": "ok", "note": prepared.note}

    steps_timed, others = bool(steps), None
    if steps:
        timer = time_cuda if case.device.type == "cuda" else time_cpu
        monitor = OthersMonitor().start()
        timings = timer(steps, reps, case.device, warmup)
        others = monitor.stop()
        flops = bench.flops(case) if bench.flops else None
        for name, (median, samples, inner) in timings.items():
            r = results[name]
            r["time_ms"] = median * 1e3
            r["samples_ms"] = [s * 1e3 for s in samples]
            r["calls_per_sample"] = inner
            if flops:
                r["tflops"] = flops / median / 1e12
            if bench.throughput:
                r["throughput_per_s"] = bench.throughput[1](case) / median
        if measure_memory:
            for name, step in steps.items():
                for t in keep[name].leaves:
                    t.grad = None
                gc.collect()
                try:
                    if case.device.type == "cuda":
                        peak, method = peak_memory_cuda(step, case.device)
                    else:
                        peak, method = peak_memory_cpu(step)
                except Exception as exc:  # noqa: BLE001
                    peak, method = None, f"failed: {exc}"
                results[name]["peak_mem_bytes"] = peak
                results[name]["peak_mem_method"] = method

    floor = results.get(bench.floor, {})
    floor_time = floor.get("time_ms")
    for name, r in results.items():
        if r.get("status") != "ok":
            continue
        r["ratio_vs_floor"] = r["time_ms"] / floor_time if floor_time else None
        r["ratios"] = {}
        # Paired: the median over reps of (this sample / the other provider's sample of the same
        # rep), so a load change between reps cancels out (CPU: samples are interleaved per rep).
        r["paired_ratios"] = {}
        for base in (bench.floor, *bench.baselines):
            other = results.get(base, {}).get("samples_ms")
            if other and len(other) == len(r["samples_ms"]):
                r["paired_ratios"][base] = statistics.median(a / b for a, b in zip(r["samples_ms"], other))
        for base in bench.baselines:
            bt = results.get(base, {}).get("time_ms")
            r["ratios"][base] = r["time_ms"] / bt if bt else None
    steps.clear()
    keep.clear()
    gc.collect()
    if case.device.type == "cuda":
        torch.cuda.empty_cache()
    out = {"case": case.to_json(), "label": case.label(), "providers": results}
    if steps_timed:
        out["others_busy_during"] = None if others is None else round(others, 3)
    return out


def parse_shapes(bench: Benchmark, specs: Sequence[str]) -> list[tuple]:
    out = []
    for spec in specs:
        parts = [p for p in spec.replace("x", ",").split(",") if p.strip()]
        if len(parts) != len(bench.shape_fields):
            raise ValueError(f"--shapes {spec!r}: benchmark {bench.name!r} expects "
                             f"{len(bench.shape_fields)} comma-separated integers "
                             f"({','.join(bench.shape_fields)})")
        try:
            out.append(tuple(int(p) for p in parts))
        except ValueError:
            raise ValueError(f"--shapes {spec!r}: not integers ({','.join(bench.shape_fields)})") from None
    return out


def make_cases(bench: Benchmark, args, device: torch.device) -> list[Case]:
    size = bench.sizes.get(getattr(args, "size", None) or "", {})
    shapes = (parse_shapes(bench, args.shapes) if args.shapes else size.get("shapes")
              or (bench.quick_shapes if args.quick else bench.shapes))
    dtypes = args.dtype or size.get("dtypes") or (bench.quick_dtypes if args.quick else bench.dtypes)
    modes = args.modes or bench.modes
    return [Case(dict(zip(bench.shape_fields, shape)), DTYPES[d], device, mode, args.seed)
            for mode in modes for d in dtypes for shape in shapes]


def _fmt_ratio(x) -> str:
    return "-" if x is None else f"{x:.3f}x"


def _fmt_rate(x) -> str:
    return "-" if x is None else f"{x:,.0f}"


def _short(name: str) -> str:
    return name if len(name) <= 18 else name[:17] + "…"


def format_table(bench: Benchmark, report: dict) -> str:
    """A plain-text table: one block per case, one row per provider."""
    ratio_cols = [f"vs {_short(b)}" for b in bench.baselines]
    unit = [f"{bench.throughput[0]}/s"] if bench.throughput else []
    head = ["provider", "time ms", *unit, "vs floor", *ratio_cols, "peak MiB", "note"]
    lines = []
    for res in report["results"]:
        rows = []
        for name, r in res["providers"].items():
            if r["status"] != "ok":
                rows.append([name, r["status"], *["" for _ in unit], "", *["" for _ in ratio_cols], "",
                             r.get("reason", "")])
                continue
            mem = r.get("peak_mem_bytes")
            rows.append([name, f"{r['time_ms']:.3f}", *[_fmt_rate(r.get("throughput_per_s")) for _ in unit],
                         _fmt_ratio(r.get("ratio_vs_floor")),
                         *[_fmt_ratio(r["ratios"].get(b)) for b in bench.baselines],
                         "-" if mem is None else f"{mem / 2**20:.1f}", r.get("note", "")])
        widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
        busy = res.get("others_busy_during")
        warn = (f"  (other processes used {busy:.0%} of the cores meanwhile: noisy)"
                if busy and busy > BUSY_THRESHOLD else "")
        lines.append(f"== {bench.name}: {res['label']}{warn}")
        lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip())
        for row in rows:
            lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        lines.append("")
    return "\n".join(lines)


def format_markdown(report: dict, cases: Sequence[dict] | None = None) -> str:
    """One markdown table for a report (or the chosen results): a row per case and provider."""
    baselines = report["baselines"]
    unit = [f"{report['throughput_unit']}/s"] if report.get("throughput_unit") else []
    head = ["case", "provider", "time ms", *unit, "x floor", *[f"x {b}" for b in baselines], "peak MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in cases if cases is not None else report["results"]:
        for name, r in res["providers"].items():
            if r["status"] != "ok":
                lines.append(f"| {res['label']} | {name} | {r['status']}: {r.get('reason', '')} |"
                             + " |" * (len(head) - 3))
                continue
            mem = r.get("peak_mem_bytes")
            cells = [res["label"], name, f"{r['time_ms']:.2f}", *[_fmt_rate(r.get("throughput_per_s")) for _ in unit],
                     _fmt_ratio(r.get("ratio_vs_floor")),
                     *[_fmt_ratio(r["ratios"].get(b)) for b in baselines],
                     "-" if mem is None else f"{mem / 2**20:.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_markdown_wide(report: dict) -> str:
    """One markdown row per case: the floor's time, then every other provider's time / floor."""
    providers = [p for p in report["providers"] if p != report["floor"]]
    fields = report.get("shape_fields") or [k for k in report["results"][0]["case"]
                                            if k not in ("dtype", "device", "mode")]
    head = ["mode", "dtype", *fields, f"{report['floor']} ms", *providers]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in report["results"]:
        c, prov = res["case"], res["providers"]
        floor = prov.get(report["floor"], {})
        cells = [c["mode"], c["dtype"], *[str(c[k]) for k in fields],
                 f"{floor['time_ms']:.2f}" if floor.get("status") == "ok" else floor.get("status", "-")]
        for p in providers:
            r = prov.get(p, {})
            cells.append(_fmt_ratio(r.get("ratio_vs_floor")) if r.get("status") == "ok" else r.get("status", "-"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(bench: Benchmark, report: dict, path: Path) -> None:
    """Bar chart: time ratio against the floor, per provider per case, one panel per (mode, dtype)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    groups: dict = {}
    for res in report["results"]:
        c = res["case"]
        groups.setdefault((c["mode"], c["dtype"]), []).append(res)
    providers = [p for p in report["providers"] if p != bench.floor]
    n_cases = max(len(v) for v in groups.values())
    fig, axes = plt.subplots(len(groups), 1, squeeze=False,
                             figsize=(max(6.0, 1.1 + n_cases * (0.35 * len(providers) + 0.5)), 3.6 * len(groups)))
    width = 0.8 / max(1, len(providers))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, ((mode, dtype), results) in zip(axes[:, 0], groups.items()):
        xs = range(len(results))
        for j, name in enumerate(providers):
            vals = [res["providers"].get(name, {}).get("ratio_vs_floor") or 0.0 for res in results]
            bars = ax.bar([x + (j - (len(providers) - 1) / 2) * width for x in xs], vals, width,
                          label=name, color=colors[j % len(colors)])
            if len(results) * len(providers) <= 40:
                ax.bar_label(bars, labels=[f"{v:.2f}" if v else "skip" for v in vals], fontsize=6, rotation=90,
                             padding=2)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([" ".join(f"{k}={res['case'][k]}" for k in bench.shape_fields)
                            + (" (noisy)" if (res.get("others_busy_during") or 0) > BUSY_THRESHOLD else "")
                            for res in results],
                           rotation=30, ha="right", fontsize=7)
        ax.set_ylabel(f"time / {bench.floor}")
        ax.set_title(f"{bench.name}: {mode}, {dtype}, {report['settings']['device']}, "
                     f"{report['settings']['threads']} threads (lower is better; floor = 1)", fontsize=9)
        ax.set_ylim(0, max([1.2] + [res["providers"].get(p, {}).get("ratio_vs_floor") or 0 for res in results
                                    for p in providers]) * 1.18)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    height = fig.get_size_inches()[1]
    fig.legend(handles, labels, loc="upper center", ncol=min(5, len(providers)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / height))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_benchmark(bench: Benchmark, args, device: torch.device, partial_path: Path | None = None) -> dict:
    providers = provider_order(bench, args.providers)
    cases = make_cases(bench, args, device)
    load_before = load_average()
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency; stay usable without it
        def tqdm(it, **_):
            return it
    header = {
        "benchmark": bench.name,
        "load_average_before": load_before,
        "description": bench.description,
        "floor": bench.floor,
        "focus": bench.focus,
        "shape_fields": list(bench.shape_fields),
        "baselines": list(bench.baselines),
        "throughput_unit": bench.throughput[0] if bench.throughput else None,
        "providers": providers,
        "details": bench.details,
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "fastcur bench " + " ".join(args.argv),
        "settings": {"device": str(device), "threads": torch.get_num_threads(), "reps": args.reps,
                     "quick": args.quick, "size": getattr(args, "size", None), "warmup": f">= {WARMUP_CALLS} calls and {args.warmup} s",
                     "timer": "triton.testing.do_bench (median)" if device.type == "cuda"
                     else "time.perf_counter, median, round-robin over providers",
                     "min_sample_s": MIN_SAMPLE_SECONDS},
        "machine": machine_facts(device),
    }
    results = []
    bar = tqdm(cases, desc=bench.name, unit="case", file=sys.stderr, dynamic_ncols=True,
               disable=args.no_progress)
    for case in bar:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(case.label())
        best = None
        for attempt in range(1 + max(0, args.retry_busy)):
            with machine_lock(enabled=device.type == "cpu" and not args.no_lock):
                busy = wait_until_idle(args.wait_idle) if args.wait_idle > 0 and device.type == "cpu" else None
                result = run_case(bench, case, providers, args.reps, not args.no_memory, args.warmup)
            result["attempts"] = attempt + 1
            if busy is not None:
                result["others_busy_before"] = round(busy, 3)
            others = result.get("others_busy_during")
            if best is None or (others or 0) < (best.get("others_busy_during") or 0):
                best = result
            if not others or others <= BUSY_THRESHOLD:
                break
        results.append(best)
        if partial_path is not None:   # an interrupted run keeps what it measured
            partial_path.parent.mkdir(parents=True, exist_ok=True)
            partial_path.write_text(json.dumps({**header, "complete": False, "results": results}, indent=2,
                                               default=str) + "\n")
    return {**header, "load_average_after": load_average(), "complete": True, "results": results}


# ---------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastcur bench", description="Run fastcur benchmarks (see benchmarks/README.md).")
    p.add_argument("names", nargs="*", metavar="NAME",
                   help=f"benchmarks to run (default: all; available: {', '.join(available_benchmarks())})")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="cpu or cuda (default: cuda when available, else cpu)")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=None,
                   help="dtypes (default: the benchmark's; --quick: float32)")
    p.add_argument("--shapes", nargs="+", default=None, metavar="M,n,k,r",
                   help="shapes as comma-separated integers in the benchmark's order (default: its grid)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=None, help="modes (default: the benchmark's, e.g. fwd fwd+bwd)")
    p.add_argument("--quick", action="store_true", help="the small grid (about a minute on 2 cores)")
    p.add_argument("--size", default=None, metavar="NAME",
                   help="a benchmark's named preset of shapes, dtypes and device (e.g. `model --size cpu|gpu`)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--reps", type=int, default=DEFAULT_REPS, help=f"timed samples per provider (>= {MIN_REPS})")
    p.add_argument("--warmup", type=float, default=WARMUP_SECONDS, metavar="SECONDS",
                   help=f"warm-up time per provider and case, after at least {WARMUP_CALLS} calls (default {WARMUP_SECONDS})")
    p.add_argument("--providers", nargs="+", default=None, metavar="NAME",
                   help="only providers whose name contains one of these (the floor is always run)")
    p.add_argument("--out", default="bench-results", help="folder for <name>.json and <name>.png")
    p.add_argument("--no-plot", action="store_true", help="write no PNG")
    p.add_argument("--markdown", action="store_true",
                   help="print markdown instead of the plain table: one row per case and provider")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="before each CPU case, wait up to this long until other processes use under 10%% "
                        "of the cores (shared machines); the busy share seen is written to the JSON")
    p.add_argument("--retry-busy", type=int, default=0, metavar="N",
                   help="re-run a case up to N times when other processes used over 10%% of the cores "
                        "while it was timed; the quietest attempt is kept")
    p.add_argument("--no-lock", action="store_true",
                   help="do not take the machine-wide lock that makes fastcur runners on one machine "
                        "time their CPU cases one at a time")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """`fastcur bench` entry point; returns the exit code (0 ok, 1 a provider failed, 2 bad usage)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:          # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    args.argv = argv
    if args.reps < MIN_REPS:
        print(f"fastcur bench: error: --reps must be at least {MIN_REPS} (medians of fewer runs are not "
              f"reported), got {args.reps}", file=sys.stderr)
        return 2
    if args.threads < 1:
        print(f"fastcur bench: error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
        return 2
    if args.size:
        try:
            sized = [load_benchmark(n) for n in (args.names or available_benchmarks())]
        except LookupError as exc:
            print(f"fastcur bench: error: {exc.args[0]}", file=sys.stderr)
            return 2
        lacking = [b.name for b in sized if args.size not in b.sizes]
        if lacking:
            print(f"fastcur bench: error: --size {args.size}: benchmark(s) {', '.join(lacking)} have no such "
                  f"preset" + "".join(f"; {b.name}: {', '.join(b.sizes) or 'none'}" for b in sized), file=sys.stderr)
            return 2
        devices = {b.sizes[args.size].get("device") for b in sized} - {None}
        if args.device == "auto" and len(devices) == 1:
            args.device = devices.pop()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("fastcur bench: error: --device cuda but torch sees no CUDA GPU "
              f"(torch {torch.__version__}, built with CUDA {torch.version.cuda})", file=sys.stderr)
        return 2
    device = torch.device(args.device)

    names = args.names or available_benchmarks()
    try:
        benches = [load_benchmark(n) for n in names]
        for b in benches:
            provider_order(b, args.providers)
            if args.shapes:
                parse_shapes(b, args.shapes)
    except (LookupError, ValueError) as exc:
        print(f"fastcur bench: error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2

    busy = busy_fraction(0.3) if device.type == "cpu" else None
    if busy is not None and busy > BUSY_THRESHOLD:
        print(f"fastcur bench: warning: other processes are using {busy:.0%} of the {os.cpu_count()} cores; "
              "CPU timings will be noisy and may be inflated (see --wait-idle, --retry-busy)", file=sys.stderr)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    failed = False
    try:
        for bench in benches:
            report = run_benchmark(bench, args, device, partial_path=out / f"{bench.name}.json")
            print(format_markdown(report) if args.markdown else format_table(bench, report), flush=True)
            out.mkdir(parents=True, exist_ok=True)
            json_path = out / f"{bench.name}.json"
            json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
            written = [str(json_path)]
            if not args.no_plot:
                png = out / f"{bench.name}.png"
                plot(bench, report, png)
                written.append(str(png))
            print(f"wrote {', '.join(written)}", flush=True)
            failed |= any(r["status"] == "error" for res in report["results"] for r in res["providers"].values())
    finally:
        torch.set_num_threads(threads_before)
    if failed:
        print("fastcur bench: some providers failed (status 'error' above)", file=sys.stderr)
    return 1 if failed else 0


def run_script(name: str, parts: dict | None = None) -> int:
    """What `python benchmarks/bench_<name>.py [PART] [ARGS...]` runs: `main` on the benchmark
    `name`, or on `name:PART` when the first argument is one of `parts` (the module's BENCHMARKS)."""
    args = sys.argv[1:]
    part = args.pop(0) if args and parts and args[0] in parts else None
    return main([f"{name}:{part}" if part else name, *args])


if __name__ == "__main__":
    sys.exit(main())
