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
    }


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
    return "\n".join(lines)


def missing_cuda_kernels() -> list[str]:
    """Ops registered by the extension that have no CUDA kernel (empty when all have one)."""
    return sorted(op for op, keys in _extension.KERNELS.items() if "CUDA" not in keys)
