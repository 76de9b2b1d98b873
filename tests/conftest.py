import os

# The Triton interpreter must be switched on before any Triton kernel is imported; without a
# GPU it is the only way Triton kernels run, so the tests turn it on for the whole session.
if os.environ.get("FASTCUR_TEST_NO_INTERPRET") != "1":
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:
        pass

import pytest
import torch

import fastcur
from fastcur import _extension
from fastcur.backend import triton_available, triton_interpreting


def available_backends(op: str) -> list[str]:
    """Backends that can run `op` here, on the device the tests use (CPU, or CUDA if present)."""
    found = ["reference"]
    if _extension.has_kernel(op, "CPU"):
        found.append("cpp")
    if triton_available() and triton_interpreting():
        found.append("triton")
    return found


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


#: Intra-op threads of every test. The C++ kernels split rows or tiles over at::parallel_for
#: workers, which do not inherit the caller's autograd state: a test suite run on one thread
#: would never see bugs of that kind, so every test runs with two (each op's test file has a
#: case with sizes that split across them).
TEST_THREADS = 2


@pytest.fixture(autouse=True)
def _two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(TEST_THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed_and_reset_backend():
    torch.manual_seed(0)
    yield
    fastcur.set_backend("auto")


@pytest.fixture
def cpu_level(request):
    """Runs the test with the C++ CPU kernels at x86-64 level request.param (parametrize it with
    `indirect=True` over cpu_levels.cpu_levels()); restores the level and the schedule after."""
    from fastcur.info import cpu_isa, cpu_schedule, set_cpu_isa, set_cpu_schedule

    before_isa, before_mode = cpu_isa()["active"], cpu_schedule()["mode"]
    assert set_cpu_isa(request.param)
    assert cpu_isa()["active"] == request.param
    yield request.param
    set_cpu_isa(before_isa)
    set_cpu_schedule(before_mode)
