"""The README runs as written: every ```python block, top to bottom, in a fresh process (tiny
models built from configs, no download); `python -m fastcur` works; and no file of the project
cites a document outside the repository (the math is docs/methods.md)."""
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def python_blocks(text: str) -> list[tuple[str, str]]:
    """(id, code) of every ```python fence, the id naming the section it sits in."""
    blocks, section, counts = [], "top", {}
    for match in re.finditer(r"^(#{2,3} [^\n]*)$|^```python\n(.*?)^```$", text, re.M | re.S):
        if match.group(1):
            section = re.sub(r"[^a-z0-9]+", "-", match.group(1).lstrip("# ").lower()).strip("-")
            continue
        counts[section] = counts.get(section, 0) + 1
        blocks.append((f"{section}-{counts[section]}", match.group(2)))
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def run_fresh(args: list[str], cwd) -> subprocess.CompletedProcess:
    """`python *args` in a fresh interpreter, offline (a block that would download fails)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_readme_has_the_examples():
    codes = "\n".join(code for _, code in BLOCKS)
    for needle in ('target_modules=["q_proj", "v_proj"]', "fastcur.IncLoRA(", "fastcur.LaplaceRegularizer(",
                   "fastcur.MergeSchedule(", "fastcur.IMSM(", "LlamaConfig("):
        assert needle in codes, f"no README python block uses {needle}"


@pytest.mark.slow  # each block is a fresh interpreter importing torch and transformers
@pytest.mark.parametrize("code", [code for _, code in BLOCKS], ids=[name for name, _ in BLOCKS])
def test_readme_block_runs(code, tmp_path):
    script = tmp_path / "block.py"
    script.write_text(code, encoding="utf-8")
    out = run_fresh([str(script)], tmp_path)
    assert out.returncode == 0, f"README block failed:\n{code}\n--- stderr ---\n{out.stderr[-3000:]}"


def test_python_dash_m_fastcur(tmp_path):
    out = run_fresh(["-m", "fastcur", "info"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("fastcur ")
    assert run_fresh(["-m", "fastcur", "no-such-command"], tmp_path).returncode == 2


def test_no_citation_outside_the_repository():
    """README.md and the sources cite docs/methods.md, never the design notes kept outside the
    repository (this file names their patterns, so it is skipped)."""
    outside = re.compile(r"\bSPEC\b|ARCHITECTURE\.md|\.\./shared")
    found = []
    files = [README] + [p for d in ("python", "csrc", "triton_kernels", "benchmarks", "tests", "docs")
                        for p in (ROOT / d).rglob("*") if p.is_file() and p.suffix in
                        {".py", ".md", ".cpp", ".h", ".cu", ".cuh", ".txt", ".toml", ".json"}]
    for path in files:
        if path.resolve() == pathlib.Path(__file__).resolve():
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if outside.search(line):
                found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:100]}")
    assert not found, "citations of documents outside the repository:\n" + "\n".join(found[:40])
