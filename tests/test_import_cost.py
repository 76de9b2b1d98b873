"""`import fastcur` stays cheap: the heavy optional parts of torch (FSDP, dynamo), Triton,
transformers and PEFT are imported only when used. Checked in a fresh process by what is in
sys.modules, never by time (measured figures: README, "Installation")."""
import subprocess
import sys

import pytest

HEAVY = ("torch.distributed.fsdp", "torch._dynamo", "triton", "transformers", "peft")


def fresh(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_import_leaves_heavy_modules_unloaded():
    loaded = fresh(f"import sys, fastcur; print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    assert loaded == "[]", f"import fastcur loaded {loaded}"


@pytest.mark.parametrize("cls", ["CURLoRALinear", "SecuraLinear"])
def test_compile_guards_install_at_the_first_layer(cls):
    """The CUR layers' graph breaks (torch.compiler.disable) are in place once a layer exists,
    before anything can compile it: dynamo is imported then, not at `import fastcur`."""
    code = (f"import sys, torch, fastcur; assert 'torch._dynamo' not in sys.modules; "
            f"layer = fastcur.{cls}(8, 6, rank=2); "
            f"print('torch._dynamo' in sys.modules)")
    assert fresh(code) == "True"  # what the guards do: tests/test_compile.py
