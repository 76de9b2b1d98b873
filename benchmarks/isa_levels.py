"""The CPU ops at each x86-64 level this machine runs: paired benchmark runs per level.

    python benchmarks/isa_levels.py [--runs 5] [--levels avx512 avx2 baseline] [--out DIR]

The C++ row kernels are built for AVX-512, AVX2 and the baseline (SSE2) and run the level
FASTCUR_CPU_ISA names (csrc/cpu/simd.h), so an AVX-512 machine can run every level's code.
Each run is a fresh `fastcur bench` process per level and benchmark, with FASTCUR_CPU_ISA set
and, unless --no-emulate, the libraries the baselines run on held to the same level
(ATEN_CPU_CAPABILITY for ATen's vectorized loops, MKL_ENABLE_INSTRUCTIONS for MKL's GEMMs,
ONEDNN_MAX_CPU_ISA for oneDNN; at the baseline also MKL_CBWR=COMPATIBLE, MKL's SSE2 code
path): on a real AVX2 machine torch.func and nn.Linear run AVX2 code too, and the ratios below
are what such a machine would see, up to its memory system. On AMD CPUs MKL ignores
MKL_ENABLE_INSTRUCTIONS and runs its AVX2 ("zen") kernels at every setting (a 2048^3 SGEMM
on 2 EPYC threads: 127.8 / 127.8 / 128.4 ms at SSE4_2 / AVX2 / AVX512); only MKL_CBWR=
COMPATIBLE holds it to SSE2 there (338 ms), so without it the baseline level would pit
fastcur's SSE2 code against AVX2 GEMMs.
Levels run interleaved (run 1 of every level, then run 2, ...), so a load change on the shared
machine hits every level alike. Cases (the targets of issue 18, benchmarks/README.md):
  lalora part 1   lora_fisher_diag vs torch.func, E 32, T 128, n = k = 1024, r 16, float32
                  (target: fastcur at most 1/3 of torch.func's time)
  jumplora        JumpLoRALinear (rank) vs frozen nn.Linear, fwd+bwd, M = n = k = 2048, r 8
                  (target: at most 1.05x)
Prints per level the median and range over the runs of each ratio, and the schedule each op
chose (kernel or ATen, measured on first use; FASTCUR_CPU_SCHEDULE=kernel|aten forces one).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

EMULATE = {
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "MKL_ENABLE_INSTRUCTIONS": "AVX512",
               "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
             "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "baseline": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
                 "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "SSE41"},
}

CASES = {
    "fisher": dict(bench="lalora", args=["--shapes", "1,32,128,1024,1024,16,0", "--dtype", "float32"],
                   focus="fastcur", floor="baseline", what="lora_fisher_diag / torch.func",
                   target=1 / 3),
    "rank": dict(bench="jumplora", args=["--shapes", "2048,2048,2048,8", "--dtype", "float32",
                                         "--modes", "fwd+bwd", "--providers", "rank"],
                 focus="JumpLoRALinear (rank)", floor="nn.Linear (frozen)",
                 what="jump_rank_linear / nn.Linear", target=1.05),
}


def _cpu_levels() -> list[str]:
    try:
        flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines()
                     if ln.startswith("flags")).split()
    except (OSError, StopIteration):
        return ["baseline"]
    out = ["baseline"]
    if "avx2" in flags and "fma" in flags:
        out.append("avx2")
        if "avx512f" in flags and "avx512bw" in flags:
            out.append("avx512")
    return out


def _run_one(level: str, case: str, out: Path, reps: int, wait_idle: int, emulate: bool) -> dict:
    spec = CASES[case]
    env = dict(os.environ, FASTCUR_CPU_ISA=level)
    if emulate:
        env.update(EMULATE[level])
    folder = out / f"{case}-{level}"
    cmd = [sys.executable, "-c", "import sys; from fastcur.cli import main; sys.exit(main())",
           "bench", spec["bench"], *spec["args"], "--reps",
           str(reps), "--no-plot", "--no-progress", "--out", str(folder), "--wait-idle",
           str(wait_idle), "--threads", "2"]
    probe = ("from fastcur.info import cpu_schedule, cpu_isa; import json; "
             "print(json.dumps([cpu_isa(), cpu_schedule()]))")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stdout}\n{res.stderr}")
    data = json.loads((folder / f"{spec['bench']}.json").read_text())
    row = data["results"][0]["providers"]
    isa = json.loads(subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                                    text=True).stdout)[0]
    return {"focus_ms": row[spec["focus"]]["time_ms"], "floor_ms": row[spec["floor"]]["time_ms"],
            "ratio": row[spec["focus"]]["time_ms"] / row[spec["floor"]]["time_ms"],
            "active": isa["active"], "load": data.get("load_average_before")}


def _choices(level: str, emulate: bool) -> list[dict]:
    """The schedule each op picks at this level (a fresh process: one call per op at the case's
    shape)."""
    env = dict(os.environ, FASTCUR_CPU_ISA=level)
    if emulate:
        env.update(EMULATE[level])
    code = r"""
import json, torch, fastcur
from fastcur.info import cpu_schedule
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
x = torch.randn(32, 128, 1024, generator=g); go = torch.randn(32, 128, 1024, generator=g)
fastcur.ops.lora_fisher_diag(x, go, torch.randn(16, 1024, generator=g) / 32, torch.randn(1024, 16, generator=g) / 50)
W = torch.randn(2048, 2048, generator=g) / 45; b = torch.zeros(2048)
A = (torch.randn(8, 2048, generator=g) / 45).requires_grad_()
B = (torch.randn(2048, 8, generator=g) * 0.02).requires_grad_()
lt = torch.zeros(8).requires_grad_()   # theta = 1: some rows pass each channel's gate
xx = torch.randn(2048, 2048, generator=g, requires_grad=True)
fastcur.ops.jump_rank_linear(xx, W, b, A, B, lt, 4.0, 1e-3).sum().backward()
print(json.dumps(cpu_schedule()["choices"]))
"""
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if res.returncode != 0:
        return [{"op": "?", "error": res.stderr[-500:]}]
    return json.loads(res.stdout)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="paired runs per level and case")
    ap.add_argument("--reps", type=int, default=11, help="samples per provider in each run")
    ap.add_argument("--levels", nargs="+", default=None, help="default: every level the CPU runs")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--wait-idle", type=int, default=10)
    ap.add_argument("--no-emulate", action="store_true",
                    help="leave ATen / MKL / oneDNN at the CPU's own level")
    ap.add_argument("--out", default=None, help="folder for the runs' JSON and isa_levels.json")
    args = ap.parse_args(argv)
    levels = args.levels or _cpu_levels()
    out = Path(args.out or tempfile.mkdtemp(prefix="fastcur-isa-"))
    out.mkdir(parents=True, exist_ok=True)
    emulate = not args.no_emulate
    runs: dict = {case: {lvl: [] for lvl in levels} for case in args.cases}
    for i in range(args.runs):
        for case in args.cases:
            for lvl in levels:
                r = _run_one(lvl, case, out, args.reps, args.wait_idle, emulate)
                runs[case][lvl].append(r)
                print(f"run {i + 1} {case:<6} {lvl:<8} {CASES[case]['what']}: {r['ratio']:.3f}x "
                      f"({r['focus_ms']:.2f} / {r['floor_ms']:.2f} ms, load {r['load']})", flush=True)
    choices = {lvl: _choices(lvl, emulate) for lvl in levels}
    print("\n| level | case | fastcur ms (median) | baseline ms (median) | ratio median | ratio range | target | runs |")
    print("|---|---|---|---|---|---|---|---|")
    summary = {}
    for case in args.cases:
        for lvl in levels:
            rs = runs[case][lvl]
            ratios = [r["ratio"] for r in rs]
            med = statistics.median(ratios)
            summary[f"{case}/{lvl}"] = {"ratio_median": med, "ratio_min": min(ratios),
                                        "ratio_max": max(ratios), "runs": rs}
            print(f"| {lvl} | {CASES[case]['what']} | {statistics.median(r['focus_ms'] for r in rs):.2f} | "
                  f"{statistics.median(r['floor_ms'] for r in rs):.2f} | {med:.3f}x | "
                  f"{min(ratios):.3f}-{max(ratios):.3f}x | <= {CASES[case]['target']:.3g}x | {len(rs)} |")
    print("\nschedule choices (one fresh process per level, the cases' shapes):")
    for lvl, cs in choices.items():
        for c in cs:
            if "error" in c:
                print(f"  {lvl}: error {c['error']}")
                continue
            print(f"  {lvl}: {c['op']} [{c['key']}] -> {c['choice']} "
                  f"(kernel {c['kernel_ms']:.2f} ms, ATen {c['aten_ms']:.2f} ms)")
    (out / "isa_levels.json").write_text(json.dumps({"emulate": emulate, "summary": summary,
                                                     "choices": choices}, indent=1))
    print(f"\nwrote {out / 'isa_levels.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
