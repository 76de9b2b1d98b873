"""What fastcur was built with and what runs where: `fastcur.info()` and `fastcur info`."""
from __future__ import annotations

import importlib.util
import platform

import torch

from . import _extension, backend


def info() -> dict:
    """A dict of facts: version, torch, devices, extension build, Triton, backends per device."""
    from . import __version__

    build = _extension.build_info()
    triton_version = None
    if backend.triton_available():
        import importlib.metadata as md
        try:
            triton_version = md.version("triton")
        except md.PackageNotFoundError:
            triton_version = "unknown"
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    active = {}
    for dev in devices:
        try:
            active[dev] = backend.resolve("cur_linear", torch.device(dev))
        except RuntimeError as exc:
            active[dev] = f"unavailable ({exc})"
    return {
        "version": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_threads": torch.get_num_threads(),
        "extension_loaded": _extension.available(),
        "extension_error": None if _extension.available() else str(_extension.load_error()),
        "extension_build": build,
        "cpp_kernels": {op: sorted(keys) for op, keys in sorted(_extension.KERNELS.items())},
        "triton": triton_version,
        "triton_interpreter": backend.triton_interpreting(),
        "backend_requested": backend.get_backend(),
        "backend_active": active,
        "cpu_isa": cpu_isa(),
        "cpu_schedule": cpu_schedule(),
    }


# -- CPU row kernels: x86-64 level and per-shape schedule choice -----------------------------------
def cpu_isa() -> dict | None:
    """The x86-64 level the C++ CPU row kernels run at: {"active", "cpu_max", "clones", "env"}.

    Each row kernel is built for AVX-512, AVX2 and the baseline (SSE2); the highest level the
    CPU runs is active unless the environment variable FASTCUR_CPU_ISA (avx512, avx2 or
    baseline, read at the kernels' first use) or `set_cpu_isa` asks for a lower one. None
    without the extension.
    """
    if not _extension.available():
        return None
    return dict(_extension._C.cpu_isa())


def set_cpu_isa(level: str) -> bool:
    """Run the CPU row kernels at `level` ("avx512", "avx2", "baseline") from now on.

    False (nothing changed) when this CPU does not run that level. Measured schedule choices
    are cached per level, so switching levels measures again on first use.
    """
    if not _extension.available():
        return False
    return bool(_extension._C.set_cpu_isa(level))


def cpu_schedule() -> dict | None:
    """The per-shape choices between the row-kernel schedule and the ATen formulation.

    {"mode": "auto" | "kernel" | "aten", "choices": [{"op", "key", "isa", "threads", "choice",
    "kernel_ms", "aten_ms", "how"}, ...]}. In "auto" (the default; FASTCUR_CPU_SCHEDULE sets
    another at first use) the first call of an op at a new (shape, dtype, level, threads) times
    both a few times and keeps the faster; the key lists the shape and dtype.
    """
    if not _extension.available():
        return None
    out = dict(_extension._C.cpu_schedule())
    out["choices"] = [dict(c) for c in out["choices"]]
    return out


def set_cpu_schedule(mode: str) -> None:
    """"auto" (measure per shape), "kernel" or "aten" (force one side); forgets past choices."""
    if _extension.available():
        _extension._C.set_cpu_schedule(mode)


def format_info(facts: dict | None = None) -> str:
    f = facts or info()
    yes = lambda v: "yes" if v else "no"  # noqa: E731
    lines = [
        f"fastcur {f['version']}  (python {f['python']}, torch {f['torch']}"
        + (f", CUDA {f['torch_cuda']}" if f["torch_cuda"] else ", CPU build") + ")",
        f"  devices        : cpu ({f['cpu_threads']} threads)"
        + (f", cuda ({f['gpu']})" if f["cuda_available"] else ", no CUDA device"),
    ]
    if f["extension_loaded"]:
        b = f["extension_build"]
        lines.append(f"  C++ extension  : built ({b['compiler']}, OpenMP {yes(b['openmp'])}, "
                     f"CUDA {'archs ' + b['cuda_archs'] if b['cuda'] else 'no'})")
        for op, keys in f["cpp_kernels"].items():
            lines.append(f"    {op:<22} {', '.join(keys) or 'none'}")
    else:
        lines.append(f"  C++ extension  : not available ({f['extension_error']})")
    lines.append(f"  Triton         : {f['triton'] or 'not installed'}"
                 + (" (interpreter on)" if f["triton_interpreter"] else ""))
    lines.append(f"  backend        : {f['backend_requested']} -> "
                 + ", ".join(f"{dev}: {name}" for dev, name in f["backend_active"].items()))
    isa, sched = f.get("cpu_isa"), f.get("cpu_schedule")
    if isa:
        how = (f"FASTCUR_CPU_ISA={isa['env']}" if isa["env"] else "the CPU's highest") \
            if isa["clones"] else "one build"
        lines.append(f"  CPU row kernels: {isa['active']} clone (CPU runs up to {isa['cpu_max']}; "
                     f"chosen by {how})")
    if sched:
        lines.append(f"  CPU schedules  : {sched['mode']} (kernel vs ATen, "
                     + ("timed on first use per shape" if sched["mode"] == "auto" else "forced")
                     + ")")
        for c in sched["choices"]:
            lines.append(f"    {c['op']:<22} [{c['key']}] {c['isa']}, {c['threads']} threads: "
                         f"{c['choice']} ({c['how']}: kernel {c['kernel_ms']:.3g} ms, "
                         f"ATen {c['aten_ms']:.3g} ms)")
    return "\n".join(lines)


def missing_cuda_kernels() -> list[str]:
    """Ops registered by the extension that have no CUDA kernel (empty when all have one)."""
    return sorted(op for op, keys in _extension.KERNELS.items() if "CUDA" not in keys)
