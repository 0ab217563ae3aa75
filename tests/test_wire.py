"""The target's wire format (``fastcon.targets.wire``): one definition of its columns, which the C++
operators declare again (``fastcon::target_format``), and ``pack``/``unpack`` giving the description
back."""
import pytest
import torch

from fastcon.kernels import cpp
from fastcon.targets import wire
from fastcon.targets import Target, Teacher


@pytest.mark.skipif(not cpp.AVAILABLE, reason=f"C++ extension unavailable: {cpp.REASON}")
def test_cpp_declares_the_python_indices():
    assert list(torch.ops.fastcon.target_format()) == wire.format_indices()


def _same(t, u):
    for f in t._fields:
        a, b = getattr(t, f), getattr(u, f)
        assert (a is None) == (b is None), f
        if isinstance(a, Teacher):
            _same(a, b)
        elif isinstance(a, torch.Tensor):
            assert torch.equal(a, b), f
        else:
            assert a == b, f


def test_pack_fills_defaults_and_unpack_gives_the_target_back():
    ids = torch.arange(5)
    plain = Target(ids, torch.arange(7))
    p = wire.pack(plain, 5, 7)
    assert p.rows.shape == (5, wire.ROW_FIELDS) and p.cols.shape == (7, wire.COL_FIELDS)
    assert (p.rows[:, wire.ROW_EXCLUDE] == -1).all() and (p.rows[:, wire.ROW_HI] == 7).all()
    assert torch.equal(p.rows[:, wire.ROW_GROUP], ids) and (p.cols[:, wire.COL_KEEP] == 1).all()
    assert p.numbers[wire.NUM_FLAGS] == 0 and p.numbers[wire.NUM_MARGIN] != p.numbers[wire.NUM_MARGIN]
    _same(plain, wire.unpack(p))
    full = Target(ids, torch.tensor([0, 1, 2, 3, 4, -1, -1]), exclude_col=torch.tensor([1, -1, 0, 2, 3]),
                  col_keep=torch.tensor([True] * 6 + [False]), pair_offset=1, margin=0.25,
                  row_owner=torch.tensor([0, 0, 1, 1, 2]), col_owner=torch.tensor([0, 1, 1, 2, 2, -1, 0]),
                  own_rule=torch.tensor([0, 1, 2, 0, 1]), col_range=torch.tensor([[0, 7]] * 5),
                  penalty=0.5, penalty_cols=torch.tensor([True, False] * 3 + [True]), penalty_mode=2,
                  penalty_rows=torch.tensor([True, False, True, True, False]), hard=0.5)
    _same(full, wire.unpack(wire.pack(full, 5, 7)))
    grouped = Target(ids, ids, row_group=torch.tensor([0, 0, 1, 1, 2]))
    _same(grouped, wire.unpack(wire.pack(grouped, 5, 5)))
    ta, tb = torch.randn(5, 3), torch.randn(5, 3)
    for teacher in (Teacher(ta, tb, torch.tensor(9.0)), Teacher(ta, tb, kind=1, c0=0.5, c1=0.25, eps=1e-3)):
        soft = Target(ids, ids, teacher=teacher, soft=0.6, hard=0.4, entropy=True)
        _same(soft, wire.unpack(wire.pack(soft, 5, 5)))


def test_from_wire_rejects_a_malformed_target():
    rows, cols, mask, teacher, numbers = wire.wire_args(Target(torch.arange(3), torch.arange(3)), 3, 3)
    with pytest.raises(ValueError, match="numbers"):
        wire.from_wire(rows, cols, mask, teacher, numbers[:-1])


def test_a_carried_target_is_not_packed_again():
    ids = torch.arange(4)
    p = wire.pack(Target(ids, ids, margin=0.1), 4, 4)
    carried = wire.unpack(p)
    assert wire.pack(carried, 4, 4) is p
    changed = carried._replace(margin=0.2)  # a changed copy carries nothing: its own arrays
    assert changed.wire is None and wire.pack(changed, 4, 4).numbers[wire.NUM_MARGIN] == pytest.approx(0.2)


@pytest.mark.parametrize("backend", ["torch", "cpp", pytest.param("triton", marks=pytest.mark.interpreter),
                                     pytest.param("triton_fused", marks=pytest.mark.interpreter)])
def test_one_call_packs_its_target_once(backend, monkeypatch):
    """A general-target loss, forward and backward, builds the wire arrays once: the operator carries
    them and every backend reads them (the C++ operators as they are, the Triton host its columns)."""
    if backend == "cpp" and not cpp.AVAILABLE:
        pytest.skip(f"C++ extension unavailable: {cpp.REASON}")
    import fastcon.functional as FC

    built = []
    build = wire._build

    def counting(target, na, nb):
        built.append((na, nb))
        return build(target, na, nb)

    monkeypatch.setattr(wire, "_build", counting)
    torch.manual_seed(0)
    a, b = torch.randn(12, 8, requires_grad=True), torch.randn(12, 8, requires_grad=True)
    ids = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7])
    FC.clip_loss(a, b, torch.tensor(5.0), labels=ids, backend=backend).backward()
    assert built == [(12, 12)]
