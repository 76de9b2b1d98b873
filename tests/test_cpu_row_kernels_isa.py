"""The CPU row kernels (csrc/cpu/skinny_rows.cpp) compiled for each x86-64 level this machine
runs: the extension carries AVX-512, AVX2 and baseline clones and runs only the one the CPU
picks, so the others are checked here, each against a float64 loop (tests/cpp/row_kernels_check.cpp)."""
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = Path(__file__).with_name("cpp") / "row_kernels_check.cpp"
LEVELS = {"x86-64": None, "x86-64-v3": "avx2", "x86-64-v4": "avx512f"}

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64" or shutil.which("g++") is None,
                                reason="needs x86-64 and g++")


def _cpu_flags() -> set:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


@pytest.mark.parametrize("level", list(LEVELS))
def test_row_kernels_match_float64_loop(level, tmp_path):
    flag = LEVELS[level]
    if flag is not None and flag not in _cpu_flags():
        pytest.skip(f"this CPU does not run {level} code ({flag} missing)")
    exe = tmp_path / f"row_kernels_{level}"
    build = subprocess.run(["g++", "-O2", "-std=c++17", f"-march={level}", "-DFASTCUR_NO_CPU_CLONES",
                            "-Wno-psabi", f"-I{ROOT / 'csrc'}", str(CHECK), "-o", str(exe)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
