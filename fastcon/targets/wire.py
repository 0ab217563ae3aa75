"""The wire format of a general target (``targets.Target``): built once by ``pack`` and read by every
backend (the custom ops carry it, the C++ operators and the Triton kernels read its columns).

* ``rows`` (Na, ROW_FIELDS) int64, one line per row: ROW_ID (−1: no positive of its own),
  ROW_EXCLUDE (−1: none), ROW_LO and ROW_HI (the kept column range, [0, Nb) without one), ROW_OWNER
  (−1: nobody's), ROW_RULE (0 none, 1 drop own item, 2 drop other items; 0 unless both owners are
  given), ROW_GROUP (the row's
  softmax group, its own index without groups), ROW_PENALTY (1: the row's negatives may be penalised),
  ROW_PAIR (the column of the row's own pair, the margin rule's threshold: i + pair offset by default);
* ``cols`` (Nb, COL_FIELDS) int64: COL_ID (−1: never a positive), COL_OWNER (−1: nobody's), COL_KEEP
  (0: dropped from every row), COL_PENALTY (1: may be penalised);
* ``numbers`` (NUMBER_COUNT floats): the pair offset, the margin (NaN: none) and whether it is
  relative, the penalty and its mode, the soft targets' numbers (soft, hard with NaN for none, teacher kind, c0, c1, eps, entropy),
  the debiased loss's class prior τ⁺ (0: the plain loss) and FLAGS, a bitmask of the fields the description gave (so that readers may skip absent work and
  ``unpack`` gives the description back);
* the optional dense ``mask`` and the teacher (``teacher_a``, ``teacher_b``, ``teacher_scale``).

Absent fields hold their defaults, so a reader needs no presence check where it does not skip work.
The C++ side declares the same indices (csrc/cpu/target_format.h, ``fastcon::target_format``).
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional

import torch

from .definition import TEACHER_GUIDE, TEACHER_LINEAR, Target, Teacher

ROW_ID, ROW_EXCLUDE, ROW_LO, ROW_HI, ROW_OWNER, ROW_RULE, ROW_GROUP, ROW_PENALTY, ROW_PAIR = range(9)
ROW_FIELDS = 9
COL_ID, COL_OWNER, COL_KEEP, COL_PENALTY = range(4)
COL_FIELDS = 4
(NUM_PAIR_OFFSET, NUM_MARGIN, NUM_PENALTY, NUM_PENALTY_MODE, NUM_SOFT, NUM_HARD, NUM_TEACHER_KIND, NUM_C0, NUM_C1,
 NUM_EPS, NUM_ENTROPY, NUM_DEBIAS, NUM_MARGIN_RELATIVE, NUM_FLAGS) = range(14)
NUMBER_COUNT = 14
# FLAGS bits: which optional fields the description gave
(HAS_EXCLUDE, HAS_KEEP, HAS_RANGE, HAS_ROW_OWNER, HAS_COL_OWNER, HAS_RULE, HAS_GROUP, HAS_PENALTY_COLS,
 HAS_PENALTY_ROWS, HAS_PAIR_COL) = (1 << k for k in range(10))

_FLAG_FIELDS = ((HAS_EXCLUDE, "exclude_col"), (HAS_KEEP, "col_keep"), (HAS_RANGE, "col_range"),
                (HAS_ROW_OWNER, "row_owner"), (HAS_COL_OWNER, "col_owner"), (HAS_RULE, "own_rule"),
                (HAS_GROUP, "row_group"), (HAS_PENALTY_COLS, "penalty_cols"), (HAS_PENALTY_ROWS, "penalty_rows"),
                (HAS_PAIR_COL, "pair_col"))


def format_indices() -> List[int]:
    """The format's constants in the order ``fastcon::target_format`` returns them (a test compares)."""
    return [ROW_ID, ROW_EXCLUDE, ROW_LO, ROW_HI, ROW_OWNER, ROW_RULE, ROW_GROUP, ROW_PENALTY, ROW_PAIR, ROW_FIELDS,
            COL_ID, COL_OWNER, COL_KEEP, COL_PENALTY, COL_FIELDS,
            NUM_PAIR_OFFSET, NUM_MARGIN, NUM_PENALTY, NUM_PENALTY_MODE, NUM_SOFT, NUM_HARD, NUM_TEACHER_KIND, NUM_C0,
            NUM_C1, NUM_EPS, NUM_ENTROPY, NUM_DEBIAS, NUM_MARGIN_RELATIVE, NUM_FLAGS, NUMBER_COUNT,
            HAS_EXCLUDE, HAS_KEEP, HAS_RANGE, HAS_ROW_OWNER, HAS_COL_OWNER, HAS_RULE, HAS_GROUP, HAS_PENALTY_COLS,
            HAS_PENALTY_ROWS, HAS_PAIR_COL, TEACHER_LINEAR, TEACHER_GUIDE]


class WireTarget(NamedTuple):
    rows: torch.Tensor
    cols: torch.Tensor
    numbers: List[float]
    mask: Optional[torch.Tensor] = None
    teacher_a: Optional[torch.Tensor] = None
    teacher_b: Optional[torch.Tensor] = None
    teacher_scale: Optional[torch.Tensor] = None

    def has(self, flag: int) -> bool:
        return bool(int(self.numbers[NUM_FLAGS]) & flag)


def _nan(v) -> float:
    return float("nan") if v is None else float(v)


class _Unpacked(Target):
    """A ``Target`` that ``unpack`` gave back, holding the arrays it came from, so that ``pack``
    hands them on instead of building them again: a target is packed once per call, by the
    operator's caller. A changed copy (``_replace``) is a plain instance of this class without them."""
    wire: Optional[WireTarget] = None


def pack(target, na: int, nb: int) -> WireTarget:
    """The wire format of ``target`` (a ``targets.Target``) for Na rows and Nb columns, on the device of
    its ids (the arrays it was unpacked from, where it was)."""
    carried = target.wire if isinstance(target, _Unpacked) else None
    if carried is not None and carried.rows.shape[0] == na and carried.cols.shape[0] == nb:
        return carried
    return _build(target, na, nb)


def _build(target, na: int, nb: int) -> WireTarget:
    dev = target.row_ids.device
    rows = torch.empty((na, ROW_FIELDS), dtype=torch.int64, device=dev)
    rows[:, ROW_ID] = target.row_ids
    rows[:, ROW_EXCLUDE] = -1 if target.exclude_col is None else target.exclude_col
    if target.col_range is None:
        rows[:, ROW_LO], rows[:, ROW_HI] = 0, nb
    else:
        rows[:, ROW_LO:ROW_HI + 1] = target.col_range
    rows[:, ROW_OWNER] = -1 if target.row_owner is None else target.row_owner
    owners = target.row_owner is not None and target.col_owner is not None
    rows[:, ROW_RULE] = target.own_rule if owners and target.own_rule is not None else 0  # a rule needs both owners
    if target.row_group is None:
        rows[:, ROW_GROUP] = torch.arange(na, device=dev)
    else:
        rows[:, ROW_GROUP] = target.row_group
    rows[:, ROW_PENALTY] = 1 if target.penalty_rows is None else target.penalty_rows
    if target.pair_col is None:
        rows[:, ROW_PAIR] = torch.arange(na, device=dev) + target.pair_offset
    else:
        rows[:, ROW_PAIR] = target.pair_col
    cols = torch.empty((nb, COL_FIELDS), dtype=torch.int64, device=dev)
    cols[:, COL_ID] = target.col_ids
    cols[:, COL_OWNER] = -1 if target.col_owner is None else target.col_owner
    cols[:, COL_KEEP] = 1 if target.col_keep is None else target.col_keep
    cols[:, COL_PENALTY] = 1 if target.penalty_cols is None else target.penalty_cols
    flags = sum(bit for bit, f in _FLAG_FIELDS if getattr(target, f) is not None)
    numbers = [0.0] * NUMBER_COUNT
    numbers[NUM_PAIR_OFFSET] = float(target.pair_offset)
    numbers[NUM_MARGIN] = _nan(target.margin)
    numbers[NUM_PENALTY] = float(target.penalty)
    numbers[NUM_PENALTY_MODE] = float(target.penalty_mode)
    numbers[NUM_SOFT] = float(target.soft)
    numbers[NUM_HARD] = _nan(target.hard)
    t = target.teacher
    if t is not None:
        numbers[NUM_TEACHER_KIND] = float(t.kind)
        numbers[NUM_C0], numbers[NUM_C1], numbers[NUM_EPS] = float(t.c0), float(t.c1), float(t.eps)
    numbers[NUM_ENTROPY] = float(bool(target.entropy))
    numbers[NUM_DEBIAS] = float(target.debias)
    numbers[NUM_MARGIN_RELATIVE] = float(bool(target.margin_relative))
    numbers[NUM_FLAGS] = float(flags)
    return WireTarget(rows, cols, numbers, target.mask, *((t.a, t.b, t.scale) if t is not None else (None,) * 3))


def unpack(packed: WireTarget):
    """The ``targets.Target`` that ``pack`` wrote (absent fields None again), holding ``packed``."""
    rows, cols, n = packed.rows, packed.cols, packed.numbers
    given = {f: packed.has(bit) for bit, f in _FLAG_FIELDS}
    column = {"exclude_col": rows[:, ROW_EXCLUDE], "col_keep": cols[:, COL_KEEP].bool(),
              "col_range": rows[:, ROW_LO:ROW_HI + 1], "row_owner": rows[:, ROW_OWNER],
              "col_owner": cols[:, COL_OWNER], "own_rule": rows[:, ROW_RULE], "row_group": rows[:, ROW_GROUP],
              "penalty_cols": cols[:, COL_PENALTY].bool(), "penalty_rows": rows[:, ROW_PENALTY].bool(),
              "pair_col": rows[:, ROW_PAIR]}
    fields = {f: (v.contiguous() if given[f] else None) for f, v in column.items()}
    margin, hard = n[NUM_MARGIN], n[NUM_HARD]
    teacher = None if packed.teacher_a is None else Teacher(
        packed.teacher_a, packed.teacher_b, packed.teacher_scale, int(n[NUM_TEACHER_KIND]), n[NUM_C0], n[NUM_C1],
        n[NUM_EPS])
    target = _Unpacked(rows[:, ROW_ID].contiguous(), cols[:, COL_ID].contiguous(),
                       pair_offset=int(n[NUM_PAIR_OFFSET]), margin=None if math.isnan(margin) else margin,
                       penalty=n[NUM_PENALTY], penalty_mode=int(n[NUM_PENALTY_MODE]), mask=packed.mask,
                       teacher=teacher, soft=n[NUM_SOFT], hard=None if math.isnan(hard) else hard,
                       entropy=bool(n[NUM_ENTROPY]), debias=n[NUM_DEBIAS],
                       margin_relative=bool(n[NUM_MARGIN_RELATIVE]), **fields)
    target.wire = packed
    return target


def wire_args(target, na: int, nb: int):
    """The target as the custom ops take it: rows, cols, mask, [teacher_a, teacher_b, teacher_scale],
    numbers."""
    p = pack(target, na, nb)
    return p.rows, p.cols, p.mask, [p.teacher_a, p.teacher_b, p.teacher_scale], p.numbers


def from_wire(rows, cols, mask, teacher, numbers):
    """The ``targets.Target`` of a custom op's arguments (``wire_args``)."""
    if len(numbers) != NUMBER_COUNT or len(teacher) != 3:
        raise ValueError(f"a target on the wire has {NUMBER_COUNT} numbers and 3 teacher tensors, got "
                         f"{len(numbers)} and {len(teacher)}")
    return unpack(WireTarget(rows, cols, list(numbers), mask, *teacher))
