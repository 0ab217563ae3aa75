"""fastcon's C++ CPU engine, ``fastcon._C``: how it is compiled, and how it is loaded beside the torch
that runs it.

A compiled extension loads only beside the torch it was compiled against: LibTorch's C++ ABI changes
between releases, so a library built for one torch fails to load beside another (undefined symbols),
or worse, loads and misreads its structures. So:

- ``setup.py`` compiles the extension at install time against the torch of the build environment
  (``compile_flags`` are its flags) and records that torch's version beside the library
  (``RECORD``). ``pip install --no-build-isolation`` builds against the user's own torch. Under pip's
  build isolation there is no torch to build against (``pyproject.toml`` does not ask for one, which
  would fetch the newest torch whatever the user runs): the package is installed without the library,
  and with its sources.
- ``load()``, at the engine's first CPU use, loads the installed library only when its record names
  the running torch. Otherwise (a wheel built for another torch, an isolated build, a torch upgraded
  since) it compiles the same sources with the same flags against the running torch, once per torch,
  into a cache folder (``FASTCON_EXT_DIR``, default ``~/.cache/fastcon``), and loads that. A build by
  several processes at once (one per rank) is serialised by torch's build lock.
- Where that cannot be done (``FASTCON_BUILD_EXT=0``, no C++ compiler or ninja, no sources, a failed
  build) the C++ backend is unavailable, the other backends run, and the reason says what to do.

This module imports nothing but the standard library at its top: setup.py loads it by its path,
before torch can be assumed.
"""
from __future__ import annotations

import glob
import os
import shutil
import sys
from typing import List, Optional, Tuple

RECORD = "_C.torch"  # beside the library: the version of the torch it was compiled against
SKIPPED = "none"  # the record of an install without the extension (FASTCON_SKIP_EXT=1)
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # fastcon/


def compile_flags(platform: str = sys.platform, isa: Optional[str] = None) -> Tuple[List[str], List[str]]:
    """(compiler flags, linker flags) of the extension on ``platform``. ``isa="avx2"`` (default: the
    ``FASTCON_CPU_ISA`` variable) builds the epilogue kernels without their AVX-512 clone."""
    if isa is None:
        isa = os.environ.get("FASTCON_CPU_ISA", "")
    if platform == "win32":
        return ["/O2", "/openmp"], []
    if platform == "darwin":
        # Apple clang has no -fopenmp; the loops then run on one thread (ATen's GEMMs stay parallel).
        return ["-O3"], []
    # No -march=native: kernels.cpp is multi-versioned (target_clones) instead.
    # -ffp-contract=off: S = s·dot + b must round identically in every pass and code path (the
    # statistics, the positives and the gradient epilogue); an FMA in one place and not in another
    # shifts P = exp(S − LSE) by an ulp of S, which the cancellation in P − 1 amplifies.
    # -fno-trapping-math: the kernels never read the floating-point exception flags. Without it gcc
    # keeps a branch for each float compare-and-select (`x < lo ? lo : x` may raise "invalid" on a
    # NaN), and that leaves the AVX2 clones of the epilogue loops scalar (AVX-512's masked compares
    # are exempt). It changes no value: the rounding and the order of operations stay as written.
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math"]
    if isa.strip().lower() == "avx2":
        cxx.append("-DFC_ISA_AVX2")  # the kernels without their AVX-512 clone (make test-avx2)
    return cxx, ["-fopenmp"]


def source_dir() -> Optional[str]:
    """The extension's sources: inside the installed package (``fastcon/_csrc/cpu``, where setup.py puts
    them) or in the source tree beside it (``csrc/cpu``); None where neither has them."""
    for d in (os.path.join(_PACKAGE, "_csrc", "cpu"), os.path.join(os.path.dirname(_PACKAGE), "csrc", "cpu")):
        if glob.glob(os.path.join(d, "*.cpp")):
            return d
    return None


def write_record(library_dir: str, torch_version: str) -> None:
    with open(os.path.join(library_dir, RECORD), "w") as f:
        f.write(torch_version + "\n")


def recorded_torch(library_dir: str = _PACKAGE) -> Optional[str]:
    """The torch the installed library was compiled against (None: no record, an older build)."""
    try:
        with open(os.path.join(library_dir, RECORD)) as f:
            return f.read().strip() or None
    except OSError:
        return None


def release(version: str) -> str:
    """A torch version without its local part ("2.11.0+cu130" → "2.11.0"): CPU and CUDA builds of one
    release share the C++ ABI the CPU extension uses."""
    return version.split("+")[0]


def cache_dir(torch_version: str) -> str:
    root = os.environ.get("FASTCON_EXT_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "fastcon")
    # torch's build compares the sources with the last build's, so one folder serves every fastcon version
    tag = f"torch{release(torch_version)}-py{sys.version_info[0]}{sys.version_info[1]}"
    return os.path.join(root, tag)


def _build_disabled() -> bool:
    return os.environ.get("FASTCON_BUILD_EXT", "").strip().lower() in ("0", "false", "no", "off")


def _reinstall_hint() -> str:
    return ("install fastcon against this torch: pip install --no-build-isolation --no-deps --force-reinstall "
            "fastcon (or from its source tree: pip install --no-build-isolation -e .)")


def build_here(torch_version: str, why: str) -> Tuple[bool, Optional[str]]:
    """Compile the sources against the running torch into ``cache_dir`` and load the library there
    (a cached build is reused: torch rebuilds only what changed). Returns (loaded, reason if not)."""
    if _build_disabled():
        return False, f"{why}; FASTCON_BUILD_EXT=0 forbids compiling it here: {_reinstall_hint()}"
    src = source_dir()
    if src is None:
        return False, f"{why}, and its C++ sources are not installed to compile it here: {_reinstall_hint()}"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return False, f"{why}, and there is no C++ compiler ({compiler}) to compile it here: {_reinstall_hint()}"
    import warnings

    from torch.utils import cpp_extension

    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        return False, f"{why}, and compiling it here needs ninja (pip install ninja), or: {_reinstall_hint()}"
    build = cache_dir(torch_version)
    os.makedirs(build, exist_ok=True)
    if not glob.glob(os.path.join(build, "fastcon_C*.so")):  # the first build here (later: a quick check)
        warnings.warn(f"{why}; compiling it against torch {torch_version} once (half a minute on two cores), "
                      f"into {build}", stacklevel=3)
    cxx, link = compile_flags()
    try:
        cpp_extension.load(name="fastcon_C", sources=sorted(glob.glob(os.path.join(src, "*.cpp"))),
                           extra_cflags=cxx, extra_ldflags=link, extra_include_paths=[src],
                           build_directory=build, is_python_module=False, verbose=False)
    except Exception as exc:  # a compiler error, a link error: the other backends still run
        return False, (f"{why}; compiling it against torch {torch_version} in {build} failed ({exc}): "
                       f"{_reinstall_hint()}")
    return True, None


def load() -> Tuple[bool, Optional[str], str]:
    """Load the C++ engine beside the running torch. Returns (available, reason where not, origin): the
    origin is "installed" (the library the install built), "compiled here" (``build_here``) or ""."""
    import importlib

    import torch

    running = torch.__version__
    built = recorded_torch()
    if built == SKIPPED:
        return False, ("fastcon was installed without its C++ extension fastcon._C (FASTCON_SKIP_EXT=1): the "
                       "torch and Triton backends run"), ""
    if built is not None and release(built) != release(running):
        why = f"fastcon._C was compiled against torch {built}, and this is torch {running}"
    else:
        try:
            importlib.import_module("fastcon._C")
            return True, None, "installed"
        except ModuleNotFoundError as exc:
            if exc.name not in ("fastcon._C", "fastcon"):
                return False, f"importing fastcon._C failed: {exc}", ""
            why = "fastcon was installed without its compiled C++ extension fastcon._C"
        except (ImportError, OSError) as exc:  # built, but does not load: another torch's library
            why = (f"fastcon._C does not load beside torch {running} (compiled against "
                   f"{built or 'another torch'}: {type(exc).__name__}: {exc})")
    ok, reason = build_here(running, why)
    return ok, reason, "compiled here" if ok else ""
