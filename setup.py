"""Build script: adds the optional C++ CPU engine ``fastcon._C`` to the package described in
pyproject.toml (name, version and metadata live there), compiled against the torch of the build
environment, with a record of that torch's version beside it; the extension's sources go into the
package too (``fastcon/_csrc``), so that fastcon can compile them against another torch at first use
(``fastcon/kernels/_extension.py``: a wheel installed beside another torch, or an install under pip's
build isolation, which has no torch to build against).

``FASTCON_SKIP_EXT=1`` gives a pure-Python install (the torch_chunked / Triton backends only).
``FASTCON_CPU_ISA=avx2`` builds the epilogue kernels without their AVX-512 clone, so that an AVX-512
machine runs the AVX2 path (``make test-avx2``).
The build makes no network, git or GPU queries.
"""
import glob
import importlib.util
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc", "cpu")


def _extension_module():
    """fastcon/kernels/_extension.py, loaded by its path (importing the fastcon package needs torch)."""
    path = os.path.join(ROOT, "fastcon", "kernels", "_extension.py")
    spec = importlib.util.spec_from_file_location("_fastcon_extension", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EXT = _extension_module()


def _skip_ext() -> bool:
    return os.environ.get("FASTCON_SKIP_EXT", "").strip().lower() in ("1", "true", "yes", "on")


class BuildPyWithSources(build_py):
    """The package plus the extension's sources (``fastcon/_csrc/cpu``), and, for a pure-Python
    install, the record that says so (``fastcon/_C.torch``: "none")."""

    def run(self):
        super().run()
        dest = os.path.join(self.build_lib, "fastcon", "_csrc", "cpu")
        os.makedirs(dest, exist_ok=True)
        for path in glob.glob(os.path.join(CSRC, "*.cpp")) + glob.glob(os.path.join(CSRC, "*.h")):
            shutil.copy2(path, dest)
        if _skip_ext():
            EXT.write_record(os.path.join(self.build_lib, "fastcon"), EXT.SKIPPED)


def _extensions():
    if _skip_ext():
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        # pip's build isolation (pyproject.toml does not list torch: it would fetch the newest torch,
        # whatever the user runs): fastcon compiles the extension against the user's torch at first use.
        print("fastcon: no torch in this build environment (pip's build isolation?): installing without the "
              "compiled C++ extension, which fastcon compiles against your torch at its first CPU use; "
              "`pip install --no-build-isolation` compiles it now", file=sys.stderr)
        return [], {}

    class BuildExtensionWithRecord(BuildExtension):
        def run(self):
            super().run()  # an in-place build copies the library into the source tree at the end
            for ext in self.extensions:
                EXT.write_record(os.path.dirname(self.get_ext_fullpath(ext.name)), torch.__version__)

    sources = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(CSRC, "*.cpp")))
    cxx_flags, link_flags = EXT.compile_flags()
    ext = CppExtension(
        name="fastcon._C",
        sources=sources,
        include_dirs=[CSRC],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )
    return [ext], {"build_ext": BuildExtensionWithRecord.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithSources, **cmdclass})
