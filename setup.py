"""Build script: adds the optional C++ CPU engine ``fastcon._C`` to the package described in
pyproject.toml (name, version and metadata live there).

``FASTCON_SKIP_EXT=1`` gives a pure-Python install (the torch_chunked / Triton backends only).
``FASTCON_CPU_ISA=avx2`` builds the epilogue kernels without their AVX-512 clone, so that an AVX-512
machine runs the AVX2 path (``make test-avx2``).
The build makes no network, git or GPU queries.
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _skip_ext() -> bool:
    return os.environ.get("FASTCON_SKIP_EXT", "").strip().lower() in ("1", "true", "yes", "on")


def _extensions():
    if _skip_ext():
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    sources = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    if sys.platform == "win32":
        cxx_flags, link_flags = ["/O2", "/openmp"], []
    elif sys.platform == "darwin":
        # Apple clang has no -fopenmp; the loops then run on one thread (ATen's GEMMs stay parallel).
        cxx_flags, link_flags = ["-O3"], []
    else:
        # No -march=native: kernels.cpp is multi-versioned (target_clones) instead.
        # -ffp-contract=off: S = s·dot + b must round identically in every pass and code path (the
        # statistics, the positives and the gradient epilogue); an FMA in one place and not in another
        # shifts P = exp(S − LSE) by an ulp of S, which the cancellation in P − 1 amplifies.
        # -fno-trapping-math: the kernels never read the floating-point exception flags. Without it gcc
        # keeps a branch for each float compare-and-select (`x < lo ? lo : x` may raise "invalid" on a
        # NaN), and that leaves the AVX2 clones of the epilogue loops scalar (AVX-512's masked compares
        # are exempt). It changes no value: the rounding and the order of operations stay as written.
        cxx_flags, link_flags = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math"], ["-fopenmp"]
        if os.environ.get("FASTCON_CPU_ISA", "").strip().lower() == "avx2":
            cxx_flags.append("-DFC_ISA_AVX2")  # the kernels without their AVX-512 clone (make test-avx2)
    ext = CppExtension(
        name="fastcon._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc", "cpu")],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
