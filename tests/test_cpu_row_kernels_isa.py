"""The CPU row kernels (csrc/cpu/skinny_rows.cpp) at each x86-64 level this machine runs: the
extension carries AVX-512, AVX2 and baseline builds of each kernel and runs one (the CPU's
highest, or the one FASTCUR_CPU_ISA / fastcur.info.set_cpu_isa asks for).

- Each level compiled alone (-march, no run-time pick) and the extension's multi-level build
  (each level forced in turn), against a float64 loop (tests/cpp/row_kernels_check.cpp).
- The ops that run on the row kernels, lora_fisher_diag and jump_rank_linear, in the extension
  at each level, on both sides of their per-shape schedule choice (the row kernels forced, the
  ATen formulation forced) and on the measured choice, against the float64 reference, with 2
  threads at sizes that split across them."""
import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import fastcur
from fastcur import _extension
from fastcur.info import cpu_schedule, set_cpu_isa, set_cpu_schedule
from fastcur.ops import reference
from fastcur.testing import check_against_reference

from cpu_levels import cpu_levels
from jump_inputs import rank_inputs

ROOT = Path(__file__).resolve().parents[1]
CHECK = Path(__file__).with_name("cpp") / "row_kernels_check.cpp"
LEVELS = {"x86-64": None, "x86-64-v3": "avx2", "x86-64-v4": "avx512f"}
ISAS = {"baseline": None, "avx2": "avx2", "avx512": "avx512f"}

x86 = pytest.mark.skipif(platform.machine() != "x86_64" or shutil.which("g++") is None,
                         reason="needs x86-64 and g++")
needs_ext = pytest.mark.skipif(not _extension.available(), reason="C++ extension not built")


def _cpu_flags() -> set:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def _build_and_run(tmp_path, name, flags):
    exe = tmp_path / name
    build = subprocess.run(["g++", "-O2", "-std=c++17", *flags, "-Wno-psabi", f"-I{ROOT / 'csrc'}",
                            str(CHECK), "-o", str(exe)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


@x86
@pytest.mark.parametrize("level", list(LEVELS))
def test_row_kernels_match_float64_loop(level, tmp_path):
    flag = LEVELS[level]
    if flag is not None and flag not in _cpu_flags():
        pytest.skip(f"this CPU does not run {level} code ({flag} missing)")
    _build_and_run(tmp_path, f"row_kernels_{level}", [f"-march={level}", "-DFASTCUR_NO_CPU_CLONES"])


@x86
def test_row_kernels_every_level_of_the_multilevel_build(tmp_path):
    out = _build_and_run(tmp_path, "row_kernels_clones", [])
    ran = {line.split(":")[0] for line in out.splitlines()}
    want = {isa for isa, flag in ISAS.items() if flag is None or flag in _cpu_flags()}
    assert want <= ran, out


# -- the ops at each level, both schedules ---------------------------------------------------------
def _fisher(x, go, A, B):
    with fastcur.use_backend("cpp"):
        FA, FB = fastcur.ops.lora_fisher_diag(x, go, A, B, 0.5)
    return torch.cat([FA.flatten(), FB.flatten()])


def _fisher_ref(x, go, A, B):
    return torch.cat([t.flatten() for t in reference.lora_fisher_diag(x, go, A, B, 0.5)])


def _fisher_inputs(E, T, k, n, r, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(E, T, k, generator=g, dtype=torch.float64),
            torch.randn(E, T, n, generator=g, dtype=torch.float64),
            torch.randn(r, k, generator=g, dtype=torch.float64) * k ** -0.5,
            torch.randn(n, r, generator=g, dtype=torch.float64))


def _rank(bw):
    def fn(x, W, b, A, B, lt):
        with fastcur.use_backend("cpp"):
            return fastcur.ops.jump_rank_linear(x, W, b, A, B, lt, 1.5, bw)
    return fn


def _rank_ref(bw):
    return lambda x, W, b, A, B, lt: reference.jump_rank_linear(x, W, b, A, B, lt, 1.5, bw)


# Fisher: 5 examples over 2 threads; r = 16 and 32 (the narrow kernels: one, two or four vectors
# of channels per group, by level and dtype) and 13 (rows_dot and the strips); T = 150 rows at
# k + n = 1010 make two row blocks in float32, three in float64; 37 rows one block.
FISHER = [(5, 37, 45, 33, 16), (3, 150, 520, 490, 13), (2, 150, 520, 490, 32), (4, 19, 20, 18, 21)]


@needs_ext
@pytest.mark.parametrize("cpu_level", cpu_levels(), indirect=True)
@pytest.mark.parametrize("mode", ["kernel", "aten", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", FISHER, ids=str)
def test_fisher_each_level_each_schedule(cpu_level, mode, dtype, shape):
    set_cpu_schedule(mode)
    inputs = _fisher_inputs(*shape, seed=sum(shape))
    with torch.no_grad():
        check_against_reference(_fisher, _fisher_ref, inputs, dtype)
    chosen = [c for c in cpu_schedule()["choices"] if c["op"] == "lora_fisher_diag"]
    if mode == "auto":   # one measured choice for this shape, level and thread count
        assert len(chosen) == 1 and chosen[0]["isa"] == cpu_level and chosen[0]["threads"] == 2
        assert chosen[0]["choice"] in ("kernel", "aten") and chosen[0]["how"] == "measured"
        assert chosen[0]["kernel_ms"] > 0 and chosen[0]["aten_ms"] > 0
    else:                # forced: nothing measured
        assert chosen == []


@needs_ext
@pytest.mark.parametrize("cpu_level", cpu_levels(), indirect=True)
@pytest.mark.parametrize("mode", ["kernel", "aten", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("rank", [6, 13])
def test_jump_rank_linear_each_level_each_schedule(cpu_level, mode, dtype, rank):
    # 303 rows at n + k = 2100: blocks of 124 rows, the last ragged, split between 2 threads;
    # ranks 6 = 4 + 1 + 1 and 13 = 8 + 4 + 1 (4 + 4 + 4 + 1 below AVX-512) reach every channel
    # tile of rows_dot / outer_acc at each level.
    set_cpu_schedule(mode)
    inputs, bw = rank_inputs((303,), 1000, 1100, rank, gap=False, grads="all", seed=rank)
    check_against_reference(_rank(bw), _rank_ref(bw), inputs, dtype, names="x W b A B t".split())
    ops = {c["op"] for c in cpu_schedule()["choices"]}
    assert ops == ({"jump_rank_linear", "jump_rank_linear_bwd"} if mode == "auto" else set())


@needs_ext
def test_env_var_picks_the_level_at_first_use(tmp_path):
    levels = cpu_levels()
    lowest = levels[0]
    code = ("import fastcur, torch\nfrom fastcur.info import cpu_isa\n"
            "x = torch.randn(2, 3, 16); g = torch.randn(2, 3, 8)\n"
            "fastcur.ops.lora_fisher_diag(x, g, torch.randn(16, 16), torch.randn(8, 16))\n"
            "print(cpu_isa()['active'], cpu_isa()['env'])\n")
    env = dict(os.environ, FASTCUR_CPU_ISA=lowest)
    out = subprocess.run([str(Path(os.sys.executable)), "-c", code], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [lowest, lowest]


@needs_ext
def test_unknown_level_and_mode_are_errors():
    with pytest.raises(RuntimeError, match="avx512, avx2 or baseline"):
        set_cpu_isa("avx9000")
    with pytest.raises(RuntimeError, match="auto, kernel or aten"):
        set_cpu_schedule("fastest")
