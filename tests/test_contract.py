"""The backend contract (fastcon/kernels/contract.py): every backend defines every engine operation
with the torch backend's parameters, or declares it missing with a reason that backend_info reports."""
import inspect
import sys
import types

import pytest

import fastcon
from fastcon.kernels import contract


def _public(fn):
    """The contract's parameters of an operation: the torch backend's, but for its private ones (a
    leading underscore, with a default). A backend may add parameters with defaults after them."""
    return [p for p in inspect.signature(fn).parameters if not p.startswith("_")]


def _importable(name):
    try:
        return contract.backend(name)
    except ImportError as exc:  # triton not installed
        pytest.skip(f"backend {name} does not import here: {exc}")


@pytest.mark.parametrize("name", list(contract.BACKEND_MODULES))
def test_every_backend_defines_every_operation_with_the_spec_parameters(name):
    spec = contract.backend("torch")
    impl = _importable(name)
    assert impl.name == name
    missing = contract.missing_operations(name)
    for op in contract.OPERATIONS:
        if op in missing:
            continue
        want = _public(getattr(spec, op))
        params = list(inspect.signature(getattr(impl, op)).parameters.values())
        got = [p.name for p in params[:len(want)]]
        assert got == want, f"{name}.{op}{got} differs from the torch backend's {want}"
        assert all(p.default is not p.empty for p in params[len(want):]), \
            f"{name}.{op}: parameters beyond the contract's need defaults"


def test_the_torch_backend_is_complete_and_backend_info_lists_operations():
    assert contract.missing_operations("torch") == {}
    info = fastcon.backend_info()
    for name in ("torch", "cpp"):
        entry = info["backends"][name]
        if entry["available"]:
            assert entry["operations"] == list(contract.OPERATIONS)
            assert entry["missing_operations"] == {}


def test_a_missing_operation_is_declared_or_refused(monkeypatch):
    """A backend module that lacks an operation must say why (MISSING); the lookup then gives a
    function that raises NotImplementedError with the reason, and backend_info lists it."""
    full = contract.backend("torch")
    partial = types.ModuleType("fastcon_test_partial")
    for op in contract.OPERATIONS:
        if op != "late_grad":
            setattr(partial, op, getattr(full, op))
    monkeypatch.setitem(sys.modules, "fastcon_test_partial", partial)
    monkeypatch.setitem(contract.BACKEND_MODULES, "partial", ("fastcon_test_partial",))
    contract.backend.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="neither defines late_grad nor declares it missing"):
            contract.backend("partial")
        partial.MISSING = {"late_grad": "not written yet"}
        impl = contract.backend("partial")
        with pytest.raises(NotImplementedError, match="not written yet"):
            impl.late_grad()
        assert contract.missing_operations("partial") == {"late_grad": "not written yet"}
    finally:
        contract.backend.cache_clear()
    with pytest.raises(ValueError, match="not an engine backend"):
        contract.backend("nope")
