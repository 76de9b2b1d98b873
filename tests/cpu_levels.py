"""The x86-64 levels (ISA clones of the C++ CPU kernels) this machine can run, for tests that
parametrize over them with the `cpu_level` fixture of conftest.py."""
from fastcur import _extension
from fastcur.info import cpu_isa

ORDER = ["baseline", "avx2", "avx512"]


def cpu_levels() -> list[str]:
    """Every level up to the CPU's highest ([] without the extension; only the built level when
    the extension was built without clones)."""
    isa = cpu_isa() if _extension.available() else None
    if not isa:
        return []
    if not isa["clones"]:
        return [isa["active"]]
    return ORDER[: ORDER.index(isa["cpu_max"]) + 1]
