"""Backend choice, graceful fallback without the extension, `fastcur info`."""
import json
import os
import subprocess
import sys

import pytest
import torch

import fastcur
from fastcur import _extension, backend


def run_python(code, **env):
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=120)


def test_use_backend_restores_on_exit_and_error():
    fastcur.set_backend("reference")
    with pytest.raises(KeyError):
        with fastcur.use_backend("cpp"):
            assert fastcur.get_backend() == "cpp"
            raise KeyError("boom")
    assert fastcur.get_backend() == "reference"


def test_env_variable_sets_default():
    out = run_python("import fastcur; print(fastcur.get_backend())", FASTCUR_BACKEND="reference")
    assert out.stdout.strip() == "reference", out.stderr
    out = run_python("import fastcur", FASTCUR_BACKEND="gpu")
    assert out.returncode != 0 and "FASTCUR_BACKEND='gpu'" in out.stderr


def test_import_without_extension_falls_back_and_says_so_once():
    code = """
import sys, warnings
sys.modules['fastcur._C'] = None          # as if the extension were never built
warnings.simplefilter('always')
import torch, fastcur
x, W, U = torch.randn(3, 8), torch.randn(6, 8), torch.randn(2, 2)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    for _ in range(3):
        y = fastcur.ops.cur_linear(x, W, None, W[:, :2], U, W[:2], 1.0)
ref = fastcur.ops.reference.cur_linear(x, W, None, W[:, :2], U, W[:2], 1.0)
print(len([w for w in caught if 'reference' in str(w.message)]), torch.equal(y, ref))
print(fastcur.info()['backend_active']['cpu'])
"""
    out = run_python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "True", "reference"]


def test_explicit_backend_that_cannot_run_raises(monkeypatch):
    monkeypatch.setattr(_extension, "KERNELS", {})
    with fastcur.use_backend("cpp"), pytest.raises(RuntimeError, match="backend 'cpp' cannot run cur_linear"):
        backend.resolve("cur_linear", torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with fastcur.use_backend("triton"), pytest.raises(RuntimeError, match="Triton needs CUDA tensors"):
        backend.resolve("cur_linear", torch.device("cpu"))


def test_auto_prefers_cpp_on_cpu():
    expected = "cpp" if _extension.has_kernel("cur_linear", "CPU") else "reference"
    assert backend.resolve("cur_linear", torch.device("cpu")) == expected


def test_info_cli_text_and_json():
    text = run_python("from fastcur.cli import main; main(['info'])")
    assert text.returncode == 0 and f"fastcur {fastcur.__version__}" in text.stdout and "backend" in text.stdout
    facts = json.loads(run_python("from fastcur.cli import main; main(['info', '--json'])").stdout)
    assert facts["version"] == fastcur.__version__
    assert facts["extension_loaded"] == _extension.available()
    if _extension.available():
        assert "CPU" in facts["cpp_kernels"]["cur_linear"]


def test_require_cuda_kernels_fails_on_a_cpu_build():
    if _extension.build_info()["cuda"]:
        pytest.skip("this build has CUDA kernels")
    out = run_python("import sys; from fastcur.cli import main; sys.exit(main(['info', '--require-cuda-kernels']))")
    assert out.returncode == 1 and "error:" in out.stderr
