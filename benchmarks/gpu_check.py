"""`make gpu-check`'s Python part: the `cuda` tests, every op benchmark at GPU shapes, the
whole-model step, and one report.

    python benchmarks/gpu_check.py [--out gpu-report] [--skip-tests] [--skip-bench]

With a CUDA device (run by .ci/gpu-check.sh in the CUDA venv, after the CUDA build):
  1. pytest -m cuda tests/ (junit XML), summarized as pass/fail per op (or module) and backend;
  2. every op benchmark at M = 8192, n = k = 4096 in bfloat16 (GPU_CASES below), then
     `fastcur bench model --size gpu`;
  3. <out>/summary.md (tables: tests per op and backend, every ratio of every benchmark) and
     <out>/summary.json, the benchmarks' own JSON and PNG under <out>/bench/.
Exit 0 when every test passed and no benchmark provider failed, 1 otherwise.
Without a CUDA device it checks what it can here: the `cuda` tests collect, every benchmark of
GPU_CASES loads and accepts its GPU shapes; then prints "no CUDA device" and exits 2.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

if __package__ in (None, ""):          # run as a script: use the installed package's runner
    from fastcur.benchmarks import runner
else:
    from . import runner

ROOT = Path(__file__).resolve().parent.parent
# (benchmark, --shapes): M = 8192 tokens, n = k = 4096 wherever the benchmark has those fields.
GPU_CASES = [
    ("cur_linear", ["8192,4096,4096,16"]),
    ("secura", ["8192,4096,4096,16,64"]),
    ("secura:signorm", ["8192,4096"]),
    ("secura:signorm_merge", ["4096,4096,16"]),
    ("jumplora", ["8192,4096,4096,8"]),
    # lalora parts (part,E,T,n,k,r,L): Fisher over E*T = 8192 tokens, the fused penalty over 200
    # tensors of 4096 x 16, a regularized step, K-FAC factors of 8192 rows.
    ("lalora", ["1,64,128,4096,4096,16,0", "2,0,0,4096,0,16,200", "3,64,128,4096,4096,16,0",
                "4,64,128,0,4096,0,0"]),
    ("imsm", ["8,1024,4096,2"]),                     # B*T = 8192 tokens, d = 4096
    ("imsm:generate", ["8,512,4096,2,32"]),
]
MODEL_ARGS = ["model", "--size", "gpu"]
# Names a test is grouped under (the longest that its file, function or id contains).
OPS = ("cur_linear", "secura_linear", "signorm_merge", "signorm", "jump_rank_linear", "jump_linear",
       "ella_penalty", "lora_fisher_diag", "laplace_diag_penalty_grad_", "laplace_diag_penalty", "kfac_penalty",
       "kfac_factor", "imsm_gate", "lalora")
BACKENDS = ("cpp", "triton")
TESTS = ["tests"]                 # pytest -m cuda picks the cuda-marked tests of every file


def log(msg: str) -> None:
    print(f"== gpu-check {time.strftime('%H:%M:%S')} {msg}", flush=True)


def collect_cuda_tests() -> tuple[int, str]:
    """(number of `cuda` tests collected, pytest's output) without running them."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "cuda", *TESTS],
                          cwd=ROOT, capture_output=True, text=True)
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    if proc.returncode not in (0, 5):
        raise RuntimeError(f"collecting the cuda tests failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}"
                           f"{proc.stderr[-2000:]}")
    return len(ids), proc.stdout


def check_benchmarks_load() -> list[str]:
    """Every benchmark of GPU_CASES and the model benchmark load, and accept their GPU shapes."""
    names = []
    for name, shapes in GPU_CASES:
        runner.parse_shapes(runner.load_benchmark(name), shapes)
        names.append(name)
    model = runner.load_benchmark("model")
    if "gpu" not in model.sizes:
        raise RuntimeError("the model benchmark has no 'gpu' size")
    return names + ["model"]


# -- tests --------------------------------------------------------------------------------------------
def group_of(classname: str, name: str) -> tuple[str, str]:
    """(op or module group, backend) of one test case from its junit classname and name."""
    text = f"{classname}.{name}"
    func, _, params = name.partition("[")
    parts = params.rstrip("]").split("-")
    backend = next((b for b in BACKENDS if b in parts), "-")
    if "test_cuda_models" in classname:
        method = next((p for p in parts if p in ("lora", "curlora", "secura", "jumplora", "jumplora-rank",
                                                  "lalora", "imsm")), None)
        method = "jumplora-rank" if "jumplora-rank" in params else method
        kind = "layer" if func.startswith("test_layer") else "tiny llama"
        return f"{kind}: {method}", backend
    if func == "test_strided_and_expanded_inputs":
        op = next((o for o in OPS if o in params), "?")
        return f"{op} (strided/expanded)", backend
    op = next((o for o in OPS if o in func), None) or next((o for o in OPS if o in text), "other")
    return op, backend


def run_tests(out: Path) -> dict:
    xml = out / "junit.xml"
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                           f"--junitxml={xml}", *TESTS], cwd=ROOT, capture_output=True, text=True)
    (out / "pytest.log").write_text(proc.stdout + proc.stderr)
    groups: dict = {}
    failures = []
    if xml.exists():
        for case in ET.parse(xml).getroot().iter("testcase"):
            group, backend = group_of(case.get("classname", ""), case.get("name", ""))
            status = ("failed" if case.find("failure") is not None or case.find("error") is not None
                      else "skipped" if case.find("skipped") is not None else "passed")
            counts = groups.setdefault(group, {}).setdefault(backend, {"passed": 0, "failed": 0, "skipped": 0})
            counts[status] += 1
            if status == "failed":
                failures.append(f"{case.get('classname')}::{case.get('name')}")
    return {"exit_code": proc.returncode, "seconds": round(time.time() - t0, 1), "groups": groups,
            "failures": failures, "tail": proc.stdout[-2000:]}


# -- benchmarks ------------------------------------------------------------------------------------------
def run_benchmarks(out: Path, reps: int) -> list[dict]:
    bench_out = out / "bench"
    common = ["--device", "cuda", "--reps", str(reps), "--out", str(bench_out), "--no-progress"]
    runs = [([name, "--dtype", "bfloat16", "--shapes", *shapes], name) for name, shapes in GPU_CASES]
    runs.append((MODEL_ARGS, "model"))
    results = []
    for args, name in runs:
        log(f"fastcur bench {' '.join(args)}")
        t0 = time.time()
        try:
            code = runner.main([*args, *common])
        except Exception as exc:  # noqa: BLE001 - one broken benchmark must not end the check
            code, err = 1, f"{type(exc).__name__}: {exc}"
        else:
            err = None
        bench = runner.load_benchmark(name)
        path = bench_out / f"{bench.name}.json"
        report = json.loads(path.read_text()) if path.exists() and err is None else None
        results.append({"benchmark": name, "args": args, "exit_code": code, "error": err,
                        "seconds": round(time.time() - t0, 1), "report": report})
    return results


# -- summary -------------------------------------------------------------------------------------------
def _ratio(x) -> str:
    return "-" if x is None else f"{x:.3f}x"


def summary_markdown(facts: dict, tests: dict | None, benches: list[dict]) -> str:
    lines = ["# gpu-check", "", f"- created: {facts['created']}", f"- device: {facts.get('gpu')}",
             f"- torch {facts['torch']}, CUDA {facts.get('cuda')}, fastcur {facts.get('fastcur')}",
             f"- command: `make gpu-check`", ""]
    if tests is not None:
        verdict = "PASS" if tests["exit_code"] == 0 else "FAIL"
        lines += [f"## Tests (`pytest -m cuda tests`): {verdict} in {tests['seconds']} s", "",
                  "| op or module | backend | passed | failed | skipped | result |", "|---|---|---|---|---|---|"]
        for group in sorted(tests["groups"]):
            for backend, c in sorted(tests["groups"][group].items()):
                result = "FAIL" if c["failed"] else ("pass" if c["passed"] else "skipped")
                lines.append(f"| {group} | {backend} | {c['passed']} | {c['failed']} | {c['skipped']} | {result} |")
        if tests["failures"]:
            lines += ["", "Failed:", *[f"- `{f}`" for f in tests["failures"][:200]]]
        lines.append("")
    for b in benches:
        rep = b["report"]
        head = f"## `fastcur bench {' '.join(b['args'])}` ({b['seconds']} s)"
        if rep is None:
            lines += [head, "", f"no report: exit {b['exit_code']} {b['error'] or ''}", ""]
            continue
        lines += [head, "", runner.format_markdown(rep), ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "gpu-report"))
    p.add_argument("--reps", type=int, default=runner.MIN_REPS)
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-bench", action="store_true")
    args = p.parse_args(argv)
    import torch

    out = Path(args.out).resolve()
    if not torch.cuda.is_available():
        log("no CUDA device: checking what runs here")
        n, _ = collect_cuda_tests()
        log(f"{n} cuda tests collect")
        names = check_benchmarks_load()
        log(f"benchmarks load with their GPU shapes: {', '.join(names)}")
        print("gpu-check: no CUDA device", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    facts = {**runner.machine_facts(device),
             "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cwd": os.getcwd()}
    tests = None
    if not args.skip_tests:
        log("pytest -m cuda tests")
        tests = run_tests(out)
        log(f"tests: exit {tests['exit_code']}, {len(tests['failures'])} failed, {tests['seconds']} s")
    benches = [] if args.skip_bench else run_benchmarks(out, args.reps)
    (out / "summary.json").write_text(json.dumps({"facts": facts, "tests": tests, "benchmarks": benches},
                                                 indent=2, default=str) + "\n")
    (out / "summary.md").write_text(summary_markdown(facts, tests, benches))
    log(f"wrote {out / 'summary.md'} and {out / 'summary.json'}")
    failed = (tests is not None and tests["exit_code"] != 0) or any(b["exit_code"] != 0 for b in benches)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
