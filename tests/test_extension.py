"""The C++ extension beside the torch that runs it (fastcon/kernels/_extension.py): which library is
loaded, when the sources are compiled here, and what the reason says where neither can be done. The
compile itself runs in .ci/wheel_beside.sh (make test-compat): a wheel built against one torch,
installed beside another."""
import contextlib
import os
import sys
import warnings

import pytest
import torch

from fastcon.kernels import _extension as ext

OTHER = "1.0.0+other"  # a torch that is not the running one


@pytest.fixture
def record(monkeypatch):
    """Set what the installed library's record says (None: no record)."""
    def set_record(value):
        monkeypatch.setattr(ext, "recorded_torch", lambda library_dir=None: value)
    return set_record


@pytest.fixture
def builds(monkeypatch):
    """The calls of build_here, answered as loaded without compiling anything."""
    calls = []

    def fake_build(version, why):
        calls.append((version, why))
        return True, None
    monkeypatch.setattr(ext, "build_here", fake_build)
    return calls


def test_release_drops_the_local_part():
    assert ext.release("2.11.0+cu130") == ext.release("2.11.0+cpu") == ext.release("2.11.0") == "2.11.0"
    assert ext.release("2.11.0") != ext.release("2.11.1")


def test_the_installed_library_is_loaded_where_its_record_names_this_torch(record, builds):
    record(torch.__version__.split("+")[0] + "+anotherbuild")  # the same release, another build of it
    assert ext.load() == (True, None, "installed")
    assert builds == []


def test_a_library_compiled_against_another_torch_is_not_imported_but_compiled_here(record, builds, monkeypatch):
    record(OTHER)
    imported = []
    monkeypatch.setattr("importlib.import_module", lambda name, *a: imported.append(name))
    assert ext.load() == (True, None, "compiled here")
    assert imported == []  # another torch's library could load and misread torch's structures
    (version, why), = builds
    assert version == torch.__version__ and OTHER in why and torch.__version__ in why


def test_an_install_without_the_library_compiles_it_here(record, builds, monkeypatch):
    record(None)  # pip's build isolation: no torch, no library, no record

    def not_built(name, *a):
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    monkeypatch.setattr("importlib.import_module", not_built)
    assert ext.load() == (True, None, "compiled here")
    assert "without its compiled C++ extension" in builds[0][1]


def test_a_library_that_does_not_load_is_compiled_here_with_the_loader_error(record, builds, monkeypatch):
    record(None)  # an older install without a record

    def undefined_symbol(name, *a):
        raise ImportError("fastcon/_C.so: undefined symbol: _ZN5torch8autograd")
    monkeypatch.setattr("importlib.import_module", undefined_symbol)
    assert ext.load() == (True, None, "compiled here")
    assert "undefined symbol" in builds[0][1]


def test_an_install_without_the_extension_on_purpose_compiles_nothing(record, builds):
    record(ext.SKIPPED)
    ok, reason, origin = ext.load()
    assert (ok, origin, builds) == (False, "", [])
    assert "FASTCON_SKIP_EXT=1" in reason


@pytest.mark.parametrize("obstacle", ["disabled", "no sources", "no compiler", "no ninja", "compile error"])
def test_where_it_cannot_compile_the_reason_says_why_and_what_to_run(monkeypatch, tmp_path, obstacle):
    monkeypatch.setenv("FASTCON_EXT_DIR", str(tmp_path))
    monkeypatch.delenv("FASTCON_BUILD_EXT", raising=False)
    from torch.utils import cpp_extension

    compiled = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: compiled.append(kw))
    want = {"disabled": "FASTCON_BUILD_EXT=0", "no sources": "sources are not installed",
            "no compiler": "no C++ compiler", "no ninja": "needs ninja", "compile error": "failed (boom)"}[obstacle]
    if obstacle == "disabled":
        monkeypatch.setenv("FASTCON_BUILD_EXT", "0")
    elif obstacle == "no sources":
        monkeypatch.setattr(ext, "source_dir", lambda: None)
    elif obstacle == "no compiler":
        monkeypatch.setenv("CXX", "no-such-compiler-here")
    elif obstacle == "no ninja":
        def no_ninja():
            raise RuntimeError("Ninja is required to load C++ extensions")
        monkeypatch.setattr(cpp_extension, "verify_ninja_availability", no_ninja)
    else:
        def boom(**kw):
            raise RuntimeError("boom")
        monkeypatch.setattr(cpp_extension, "load", boom)
    with pytest.warns(UserWarning) if obstacle == "compile error" else _no_warning():
        ok, reason = ext.build_here(torch.__version__, "why")
    assert not ok and compiled == []
    assert reason.startswith("why") and want in reason and "--no-build-isolation" in reason


@contextlib.contextmanager
def _no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_a_build_here_uses_the_install_s_flags_and_sources_and_a_folder_per_torch(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTCON_EXT_DIR", str(tmp_path))
    monkeypatch.delenv("FASTCON_BUILD_EXT", raising=False)
    monkeypatch.delenv("FASTCON_CPU_ISA", raising=False)
    from torch.utils import cpp_extension

    calls = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: calls.append(kw))
    monkeypatch.setattr(cpp_extension, "verify_ninja_availability", lambda: None)
    monkeypatch.setattr(ext.shutil, "which", lambda name: "/usr/bin/" + name)
    with pytest.warns(UserWarning, match="compiling it against torch 9.9.9"):
        assert ext.build_here("9.9.9+x", "why") == (True, None)
    kw, = calls
    assert (kw["extra_cflags"], kw["extra_ldflags"]) == ext.compile_flags()
    assert "-ffp-contract=off" in kw["extra_cflags"] or sys.platform in ("win32", "darwin")
    sources = sorted(os.path.basename(p) for p in kw["sources"])
    assert sources == sorted(p for p in os.listdir(ext.source_dir()) if p.endswith(".cpp"))
    tag = f"torch9.9.9-py{sys.version_info[0]}{sys.version_info[1]}"
    assert kw["build_directory"] == os.path.join(str(tmp_path), tag)
    assert kw["is_python_module"] is False  # loaded as a library: its TORCH_LIBRARY blocks register the ops


def test_the_avx2_build_drops_the_avx512_clone():
    cxx, _ = ext.compile_flags(platform="linux", isa="avx2")
    assert "-DFC_ISA_AVX2" in cxx and "-DFC_ISA_AVX2" not in ext.compile_flags(platform="linux", isa="")[0]


def test_this_checkout_s_library_has_a_record_of_this_torch():
    """setup.py writes the record beside the library it compiles (the development build included)."""
    from fastcon.kernels import cpp

    if not cpp.AVAILABLE:
        pytest.skip(f"C++ extension unavailable: {cpp.REASON}")
    assert cpp.ORIGIN == "installed"
    assert ext.release(ext.recorded_torch()) == ext.release(torch.__version__)

