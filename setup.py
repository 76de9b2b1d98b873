"""Build logic of the extension `fastcur._C` (metadata lives in pyproject.toml).

Environment:
  FASTCUR_BUILD_EXT=0        skip the C++ extension entirely (pure Python + Triton install)
  FASTCUR_BUILD_CUDA=auto|0|1  compile csrc/cuda/*.cu; `auto` does so when torch is a CUDA
                             build and a CUDA toolkit is found
  TORCH_CUDA_ARCH_LIST       CUDA architectures (default "8.0;9.0")
  MAX_JOBS                   parallel compile jobs (honoured by torch's ninja build)
"""
import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name, default):
    return os.environ.get(name, default).strip().lower()


def _want_cuda():
    mode = _flag("FASTCUR_BUILD_CUDA", "auto")
    if mode in ("0", "false", "no", "off"):
        return False
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    available = torch.version.cuda is not None and CUDA_HOME is not None
    if mode in ("1", "true", "yes", "on"):
        if not available:
            raise RuntimeError(
                "FASTCUR_BUILD_CUDA=1 but torch is not a CUDA build "
                f"(torch.version.cuda={torch.version.cuda}) or no CUDA toolkit was found "
                f"(CUDA_HOME={CUDA_HOME})"
            )
        return True
    return available


def _extensions():
    if _flag("FASTCUR_BUILD_EXT", "1") in ("0", "false", "no", "off"):
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = [os.path.relpath(p, ROOT) for p in
               sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
               + sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))]
    # No -std flag: torch.utils.cpp_extension adds the standard its headers need (C++20 for
    # torch 2.13/2.14, whose ATen headers refuse C++17); a flag here would override it.
    cxx = ["-O3", "-fopenmp"]
    macros = []
    if _want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += [os.path.relpath(p, ROOT)
                    for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))]
        macros.append(("FASTCUR_WITH_CUDA", "1"))
        macros.append(("FASTCUR_CUDA_ARCHS", '"' + os.environ["TORCH_CUDA_ARCH_LIST"] + '"'))
        ext = CUDAExtension(
            "fastcur._C", sources, define_macros=macros,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "fastcur._C", sources, define_macros=macros,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
