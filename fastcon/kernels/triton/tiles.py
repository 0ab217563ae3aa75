"""The ``@triton.jit`` tile maths that the kernels of more than one module call.

* LSE parts: a (partial) LSE is kept as its maximum ``m`` (an exact logit) and its *excess*
  ``r = Σ exp(t − m) − 1`` (the max's own term, exactly 1, is never added) and formed as
  ``float64(m) + float64(log1p(r))`` (``lse64``), so that a confident row's loss ``lse − S_pos =
  log1p(r)`` keeps fp32 relative precision however small it is (``log(1 + r)`` with ``1 + r``
  rounded in fp32 would lose everything below ulp(1) ≈ 1.2e-7); ``tile_lse_parts`` and
  ``online_row_lse`` form the parts of a tile, ``merge_lse_kernel`` merges float64 partials in a
  fixed order (no float atomics). A gradient kernel splits a float64 LSE once per tile into fp32
  ``hi + lo`` (``split_lse``) and forms ``((t − hi) − lo)·log2 e`` per element; at a positive,
  ``P − 1`` is formed with an accurate ``expm1`` instead of ``exp(x) − 1``, which would round at
  ulp(1) as well.
* The producer of the epilogues' tiles of dot products (``dot_tile``, ``column_tile``): ``tl.dot``
  over D (the matmul producer) or a chunk in memory written by ``torch.mm`` (the cuBLAS producer),
  and the work items (row block × column split) a program takes (``work_item``, ``items_end``,
  ``items_step``).
* CLIP and SigLIP: G of a softmax tile (``softmax_grad_tile``, in both orientations), the sigmoid
  loss and G (``sigmoid_terms``), and either for a tile (``clip_grad_tile``).
* The general target (``fastcon/targets/``): which pairs of a tile are kept and which are
  positives (``target_tile``), the teacher's probabilities (``teacher_tile``, ``teacher_dot_tile``),
  G (``target_grad_tile``) and the rows of a work item (``target_work_item``), called by the chunked
  epilogues (``target.py``) and the fused tile kernels (``fused_target.py``) alike.

Logits, maxima and LSEs are in natural units; exponentials are ``exp2((x − m)·log2 e)`` with the
log2 factor applied after the subtraction, so that logits of size 100 lose no more than fp32
rounding of the difference (folding log2 e into the scale would round both terms separately).
"""
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


# ------------------------------------------------------------------------------------------ LSE parts
@triton.jit
def log1p(x):
    """log(1 + x) in fp32 for x >= 0 (or -1 < x), accurate for small x: log(u)·x/(u − 1), u = 1 + x."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def expm1(x):
    """exp(x) − 1 in fp32, accurate for small |x| (Kahan: (u − 1)·x/log(u), u = e^x, which stays
    accurate with an approximate exp2); −inf gives −1. Where u is below fp32's smallest normal number
    (x < −87.3: a subnormal u, whose log is inexact, or 0) the result is u − 1 = −1 itself."""
    u = tl.exp2(x * LOG2E)
    um1 = u - 1.0
    plain = (u < 1.1754944e-38) | (u == float("inf"))
    r = um1 * (x / tl.where((u == 1.0) | plain, 1.0, tl.log(u)))
    return tl.where(u == 1.0, x, tl.where(plain, um1, r))


@triton.jit
def lse64(m, r):
    """float64 LSE from its fp32 parts: the max m and the excess r = Σ exp(t − m) − 1 (−inf stays)."""
    return tl.where(m == float("-inf"), float("-inf"), m.to(tl.float64) + log1p(r).to(tl.float64))


@triton.jit
def split_lse(lse):
    """(hi, lo) fp32 parts of a float64 LSE, hi + lo = lse; an infinite LSE gives lo = 0 (not NaN)."""
    hi = lse.to(tl.float32)
    lo = (lse - hi.to(tl.float64)).to(tl.float32)
    return hi, tl.where((hi == float("inf")) | (hi == float("-inf")), 0.0, lo)


@triton.jit
def tile_lse_parts(t, AXIS: tl.constexpr):
    """(max, excess) of t along AXIS: Σ exp(t − max) = 1 + excess; ties to the max add exactly 1 each
    beyond the first, the max's own term is never summed."""
    mx = tl.max(t, AXIS)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    e = tl.exp2((t - tl.expand_dims(mx_safe, AXIS)) * LOG2E)
    at_max = t == tl.expand_dims(mx, AXIS)
    excl = tl.sum(tl.where(at_max, 0.0, e), AXIS)
    n_eq = tl.sum(at_max.to(tl.float32), AXIS)
    return mx, excl + (n_eq - 1.0)


@triton.jit
def online_row_lse(m_i, r_i, t):
    """One column tile of an online row LSE kept as (max m_i, excess r_i): Σ_j exp(t_j − m_i) = 1 + r_i."""
    tile_max = tl.max(t, 1)
    m_new = tl.maximum(m_i, tile_max)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    e = tl.exp2((t - m_safe[:, None]) * LOG2E)
    at_max = t == m_new[:, None]
    excl = tl.sum(tl.where(at_max, 0.0, e), 1)
    n_eq = tl.sum(at_max.to(tl.float32), 1)
    alpha = tl.exp2((m_i - m_safe) * LOG2E)  # the old max's term; 0 for m_i = −inf
    # the new max comes from this tile: the old max's term alpha joins the excess, one tile max is
    # the new "1"; else every tile element (ties to the max included) is excess
    r_new = r_i * alpha + excl + tl.where(tile_max > m_i, alpha + (n_eq - 1.0), n_eq)
    return m_new, r_new


@triton.jit
def merge_lse_kernel(
    part_ptr, out_ptr,
    K, N,
    stride_pk, stride_pn,
    ACCUMULATE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """out[n] = ln(Σ_k e^part[k, n]) over float64 natural-unit partials, merged with the existing
    ``out[n]`` when ACCUMULATE, in float64: M = max, then M + log1p(Σ_{k ≠ argmax} e^(part − M))
    with the differences taken in float64 and exponentiated in fp32. Two passes over k in a fixed
    order: deterministic."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < N
    if ACCUMULATE:
        m = tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.float64)
    else:
        m = tl.full([BLOCK_N], float("-inf"), tl.float64)
    prev = m
    for k in range(0, K):
        p = tl.load(part_ptr + k * stride_pk + offs * stride_pn, mask=mask, other=float("-inf")).to(tl.float64)
        m = tl.maximum(m, p)
    inf_m = (m == float("-inf")) | (m == float("inf"))
    m_safe = tl.where(inf_m, 0.0, m)
    acc = tl.zeros([BLOCK_N], tl.float32)   # Σ e^(p − M) over the partials below the max
    cnt = tl.zeros([BLOCK_N], tl.float32)   # partials equal to the max
    if ACCUMULATE:
        acc += tl.where(prev == m, 0.0, tl.exp2((prev - m_safe).to(tl.float32) * LOG2E))
        cnt += tl.where(prev == m, 1.0, 0.0)
    for k in range(0, K):
        p = tl.load(part_ptr + k * stride_pk + offs * stride_pn, mask=mask, other=float("-inf")).to(tl.float64)
        acc += tl.where(p == m, 0.0, tl.exp2((p - m_safe).to(tl.float32) * LOG2E))
        cnt += tl.where(p == m, 1.0, 0.0)
    res = m_safe + log1p(acc + (cnt - 1.0)).to(tl.float64)
    res = tl.where(inf_m, m, res)
    tl.store(out_ptr + offs, res, mask=mask)


# ---------------------------------------------------------------------------- tiles and work items
@triton.jit
def dot_tile(dot_ptr, stride_dm, a_ptr, stride_am, b_ptr, stride_bn, D, offs_m, offs_n, mask_m, mask_n,
             MATMUL: tl.constexpr, INPUT_PRECISION: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The producer of the engine's tiles: the fp32 dot products A_i·B_j of rows ``offs_m`` of a chunk
    of A and rows ``offs_n`` of B, 0 outside ``mask_m × mask_n``. With MATMUL formed here, ``tl.dot``
    over D in BLOCK_K slices of A (row stride stride_am) and B (stride_bn), fp32 accumulation (wgmma on
    sm_90, mma on sm_80); else read from a chunk of dot products in memory (row stride stride_dm),
    written by ``torch.mm``. Every operand has a unit inner stride. Both passes of a loss call it with
    the same BLOCK_K, so a logit is the same number in each."""
    if MATMUL:
        d = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, D, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < D
            x = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :],
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            y = tl.load(b_ptr + offs_n.to(tl.int64)[:, None] * stride_bn + offs_k[None, :],
                        mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            d = tl.dot(x, tl.trans(y), d, input_precision=INPUT_PRECISION)
    else:
        d = tl.load(dot_ptr + offs_m[:, None] * stride_dm + offs_n[None, :],
                    mask=mask_m[:, None] & mask_n[None, :], other=0.0)
    return d


@triton.jit
def column_tile(ct, dot_ptr, stride_dm, a_ptr, stride_am, b_ptr, stride_bn, D, offs_m, mask_m, N,
                MATMUL: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Column tile ``ct`` of a row block (local rows ``offs_m``) of an epilogue over N columns: its
    column offsets, their mask and its dot products (``dot_tile``)."""
    offs_n = ct * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    d = dot_tile(dot_ptr, stride_dm, a_ptr, stride_am, b_ptr, stride_bn, D, offs_m, offs_n, mask_m, mask_n,
                 MATMUL, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    return offs_n, mask_n, d


@triton.jit
def items_end(n_items, PERSISTENT: tl.constexpr):
    """End of a program's loop over work items: all of them for a persistent grid (the matmul
    producer, whose configurations state an occupancy: ``work_items``), else its own one (a loop the
    compiler sees run once: no loop-carried registers)."""
    if PERSISTENT:
        end = n_items
    else:
        end = tl.program_id(0) + 1
    return end


@triton.jit
def items_step(PERSISTENT: tl.constexpr):
    if PERSISTENT:
        step = tl.num_programs(0)
    else:
        step = 1
    return step


@triton.jit
def work_item(item, m_blocks, tiles_per_split, R, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Work item ``item`` of an epilogue over R rows × N columns: row block m (fastest, so that the
    programs running at once walk the same column tiles of B and share them in L2) and column
    split s. Returns (m, its local row offsets as int64 and their mask, its column tiles [t0, t1))."""
    pid_m = item % m_blocks
    pid_s = item // m_blocks
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    t0 = pid_s * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(N, BLOCK_N))
    return pid_m, offs_m, offs_m < R, t0, t1


# ------------------------------------------------------------------------------------ CLIP, SigLIP
@triton.jit
def softmax_grad_tile(t, ct, offs_n, mask_n, mask_m, target, first_target, N, own_hi, own_lo, other_lse_ptr,
                      w_row, w_col, w_tgt, HAS_COL_TERM: tl.constexpr, TRANSPOSED: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """G of one tile of logits t (the program's own BLOCK_M lines × tile ct of the other side's N):
    w_row·exp(t − row_lse) [+ w_col·exp(t − col_lse) with HAS_COL_TERM], the LSEs as fp32 hi + lo; at
    the positives (other index = ``target`` of the own line) instead w_tgt + w_col·(P_col − 1) +
    w_row·(P_row − 1) with expm1, w_tgt = w_row [+ w_col] − w_pos. The own lines' LSE is (own_hi,
    own_lo), the other side's is read from ``other_lse_ptr``. Rows (TRANSPOSED False): the own lines
    are S's rows. TRANSPOSED: the tile is Gᵀ, the own lines are S's columns (own_hi, own_lo read only
    with HAS_COL_TERM) and ``target`` the row of each column's positive. Both orientations add the
    terms in the same order."""
    if TRANSPOSED:
        row_hi, row_lo = split_lse(tl.load(other_lse_ptr + offs_n, mask=mask_n, other=float("inf")))
        g = w_row * tl.exp2(((t - row_hi[None, :]) - row_lo[None, :]) * LOG2E)
        if HAS_COL_TERM:
            g += w_col * tl.exp2(((t - own_hi[:, None]) - own_lo[:, None]) * LOG2E)
    else:
        g = w_row * tl.exp2(((t - own_hi[:, None]) - own_lo[:, None]) * LOG2E)
        if HAS_COL_TERM:
            col_hi, col_lo = split_lse(tl.load(other_lse_ptr + offs_n, mask=mask_n, other=float("inf")))
            g += w_col * tl.exp2(((t - col_hi[None, :]) - col_lo[None, :]) * LOG2E)
    if (ct * BLOCK_N < first_target + BLOCK_M) & (ct * BLOCK_N + BLOCK_N > first_target):
        # this tile holds positives
        is_t = offs_n[None, :] == target[:, None]
        t_pos = tl.sum(tl.where(is_t, t, 0.0), 1)
        in_range = mask_m & (target >= 0) & (target < N)
        # the O(1) parts first: a column LSE of +inf gives w_col·(−1), which must cancel
        # against w_tgt before the small row term is added
        g_pos = w_tgt
        if TRANSPOSED:  # the row LSE of each column's positive row
            if HAS_COL_TERM:
                g_pos += w_col * expm1((t_pos - own_hi) - own_lo)
            pr_hi, pr_lo = split_lse(tl.load(other_lse_ptr + target, mask=in_range, other=float("inf")))
            g_pos += w_row * expm1((t_pos - pr_hi) - pr_lo)
        else:  # the column LSE of each row's positive column
            if HAS_COL_TERM:
                pc_hi, pc_lo = split_lse(tl.load(other_lse_ptr + target, mask=in_range, other=float("inf")))
                g_pos += w_col * expm1((t_pos - pc_hi) - pc_lo)
            g_pos += w_row * expm1((t_pos - own_hi) - own_lo)
        g = tl.where(is_t, g_pos[:, None], g)
    return g


@triton.jit
def softplus(x):
    """log(1 + e^x), stable, with an accurate log1p (log(u)·e/(u − 1), u = 1 + e)."""
    e = tl.exp2(-tl.abs(x) * LOG2E)
    u = 1.0 + e
    l1p = tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))
    return tl.maximum(x, 0.0) + l1p


@triton.jit
def sigmoid_terms(s, is_pos):
    """(softplus(−z·S), σ(S) − [z = +1]) for z = +1 on positives, −1 elsewhere."""
    x = tl.where(is_pos, -s, s)
    loss = softplus(x)
    e = tl.exp2(-tl.abs(s) * LOG2E)
    inv = 1.0 / (1.0 + e)
    sig = tl.where(s >= 0, inv, e * inv)          # σ(S)
    sig_neg = tl.where(s >= 0, e * inv, inv)      # σ(−S) = 1 − σ(S)
    g = tl.where(is_pos, -sig_neg, sig)
    return loss, g


@triton.jit
def clip_grad_tile(t, mask, ct, offs_n, mask_n, mask_m, target, first_target, N, own_hi, own_lo, other_lse_ptr,
                   w_row, w_col, w_tgt, SIGMOID: tl.constexpr, HAS_COL_TERM: tl.constexpr,
                   TRANSPOSED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(each own line's loss over the tile's ``mask``, G) of one tile of logits t, the positive of
    own line i at other index ``target[i]``: SigLIP's (SIGMOID: Σ softplus(−z·S) and
    G = w_row·(σ(S) − [positive])) or CLIP's (no loss: zeros; G of ``softmax_grad_tile``, with
    the other arguments as there)."""
    if SIGMOID:
        loss, g = sigmoid_terms(t, offs_n[None, :] == target[:, None])
        line_loss = tl.sum(tl.where(mask, loss, 0.0), 1)
        g = w_row * g
    else:
        line_loss = tl.zeros([BLOCK_M], tl.float32)
        g = softmax_grad_tile(t, ct, offs_n, mask_n, mask_m, target, first_target, N, own_hi, own_lo,
                              other_lse_ptr, w_row, w_col, w_tgt, HAS_COL_TERM, TRANSPOSED, BLOCK_M, BLOCK_N)
    return line_loss, g


# ------------------------------------------------------------------------------ the general target
# A general-target kernel is compiled per variant: two constexpr bit sets, built on the host by
# ``target.rule_bits`` and ``target.term_bits``. Test a bit as ``BIT & SET``, the named bit first
# (under the interpreter SET may be a plain int, which has no ``&`` with a constexpr).
#
# RULES, the pair rules in use (what ``target_tile`` decides beyond the wire format's columns):
RULE_MARGIN = tl.constexpr(1)         # a negative is kept only below its row's margin bound
RULE_PENALTY = tl.constexpr(2)        # the hardness penalty on the flagged pairs ...
RULE_PENALTY_OWN = tl.constexpr(4)    # ... only of the same owner (penalty_mode 1)
RULE_PENALTY_OTHER = tl.constexpr(8)  # ... only of different owners (penalty_mode 2)
RULE_DENSE = tl.constexpr(16)         # the dense keep mask
RULE_GUIDE = tl.constexpr(32)         # the margin rule reads a guide's tile (its chunk at tdot), not the student's
# TERMS, the loss's terms:
TERM_SYMMETRIC = tl.constexpr(1)      # the column direction beside the rows'
TERM_SMOOTHING = tl.constexpr(2)      # label smoothing's sums over the kept pairs (pass 1)
TERM_SOFT = tl.constexpr(4)           # soft targets: the teacher's tiles
TERM_LINEAR = tl.constexpr(8)         # ... of a linear teacher (else a softmax one)
TERM_ENTROPY = tl.constexpr(16)       # ... and the mixed targets' entropy (pass 1)
TERM_MASS = tl.constexpr(32)          # a softmax term weighted by each row's (column's) mass (pass 2)
#
# Per-row and per-column vectors (``vec``): one float64 array of VEC_WIDTH columns per direction,
# row-major, so that a chunk's rows are a slice of it. Pass 1 reads only VEC_T_NORM and VEC_T_HARD.
VEC_LSE = tl.constexpr(0)      # the LSE over the kept pairs (pass 2)
VEC_Q_POS = tl.constexpr(1)    # the target mass at each positive
VEC_Q_KEEP = tl.constexpr(2)   # the target mass on every kept pair (label smoothing)
VEC_MASS = tl.constexpr(3)     # the softmax term's mass (TERM_MASS)
VEC_WEIGHT = tl.constexpr(4)   # a column's weight (the rows' is the number NUM_W_ROW)
VEC_T_NORM = tl.constexpr(5)   # the teacher's normaliser (a linear teacher's reciprocal, ``teacher_tile``)
VEC_T_HARD = tl.constexpr(6)   # the hard targets' weight per positive beside the teacher (TERM_ENTROPY)
VEC_WIDTH = tl.constexpr(7)
# The numbers of a launch (``numbers``, fp32):
NUM_PENALTY = tl.constexpr(0)  # the hardness penalty
NUM_W_ROW = tl.constexpr(1)    # the rows' weight (pass 2)
NUM_G_SCALE = tl.constexpr(2)  # the power of two that lifts G before its cast (pass 2)
NUM_T_C0 = tl.constexpr(3)     # a linear teacher's T = c0 + c1·dot
NUM_T_C1 = tl.constexpr(4)
NUM_SOFT = tl.constexpr(5)     # the soft targets' weight
NUM_T_SCALE = tl.constexpr(6)  # a softmax teacher's scale
NUM_WIDTH = tl.constexpr(7)


@triton.jit
def vec_load(vec_ptr, offs, mask, COL: tl.constexpr, other):
    """Column COL of a per-row (per-column) vector at offs, as fp32."""
    return tl.load(vec_ptr + offs * VEC_WIDTH + COL, mask=mask, other=other).to(tl.float32)


@triton.jit
def margin_tile(d, tdot_ptr, stride_t, offs_m, offs_n, mask_m, mask_n, RULES: tl.constexpr):
    """The similarities the margin rule compares: the tile ``d`` itself, or with RULE_GUIDE the guide's
    tile at the same local rows and columns of its chunk (fp32, at tdot_ptr)."""
    if RULE_GUIDE & RULES:
        return tl.load(tdot_ptr + offs_m[:, None] * stride_t + offs_n[None, :],
                       mask=mask_m[:, None] & mask_n[None, :], other=0.0)
    return d


@triton.jit
def target_tile(d, g, rows, cols, mask_m, mask_n, row_info_ptr, col_info_ptr, row_flag_ptr, col_flag_ptr,
                dense_ptr, stride_dense, numbers_ptr, bound, scale, bias, RULES: tl.constexpr):
    """(kept, positive, logits) of a tile ``d`` of dot products A_i·B_j (unscaled, fp32) of the
    chunk's rows ``rows`` (the row-side arrays start at the chunk's first row) and the global column
    indices ``cols`` (targets.py states the rules). Dropped pairs and the tile's padding (outside
    mask_m × mask_n) are not kept; ``bound`` is each row's margin bound from its pair's similarity
    (RULE_MARGIN), ``g`` the similarities it is compared with (``margin_tile``)."""
    rid = tl.load(row_info_ptr + rows * 6 + 0, mask=mask_m, other=-2)
    excl = tl.load(row_info_ptr + rows * 6 + 1, mask=mask_m, other=-1)
    lo = tl.load(row_info_ptr + rows * 6 + 2, mask=mask_m, other=0)
    hi = tl.load(row_info_ptr + rows * 6 + 3, mask=mask_m, other=0)
    rown = tl.load(row_info_ptr + rows * 6 + 4, mask=mask_m, other=-1)
    rule = tl.load(row_info_ptr + rows * 6 + 5, mask=mask_m, other=0)
    cid = tl.load(col_info_ptr + cols * 2 + 0, mask=mask_n, other=-3)
    cown = tl.load(col_info_ptr + cols * 2 + 1, mask=mask_n, other=-1)
    ckeep = tl.load(col_flag_ptr + cols * 2 + 0, mask=mask_n, other=0)
    c2 = cols[None, :]
    # the negations as comparisons, not ~ (the interpreter of Triton 3.3 and older cannot invert a mask)
    pos = (cid[None, :] >= 0) & (cid[None, :] == rid[:, None])
    not_pos = (cid[None, :] < 0) | (cid[None, :] != rid[:, None])
    keep = (mask_m[:, None] & mask_n[None, :]) & (ckeep[None, :] != 0)
    keep = keep & (c2 != excl[:, None]) & (c2 >= lo[:, None]) & (c2 < hi[:, None])
    owned = cown[None, :] >= 0
    own = owned & (cown[None, :] == rown[:, None])
    not_own = (cown[None, :] < 0) | (cown[None, :] != rown[:, None])
    # rule 1 drops the row's own columns, rule 2 the columns another row owns
    keep = keep & ((rule[:, None] != 1) | not_own) & ((rule[:, None] != 2) | (cown[None, :] < 0) | own)
    if RULE_DENSE & RULES:
        dense = tl.load(dense_ptr + rows[:, None].to(tl.int64) * stride_dense + c2,
                        mask=mask_m[:, None] & mask_n[None, :], other=0)
        keep = keep & (dense != 0)
    if RULE_MARGIN & RULES:
        keep = keep & (pos | (g <= bound[:, None]))
    pos = pos & keep
    t = d * scale + bias
    if RULE_PENALTY & RULES:
        prow = tl.load(row_flag_ptr + rows, mask=mask_m, other=0)
        pcol = tl.load(col_flag_ptr + cols * 2 + 1, mask=mask_n, other=0)
        pen = keep & not_pos & (prow[:, None] != 0) & (pcol[None, :] != 0)
        if RULE_PENALTY_OWN & RULES:
            pen = pen & own
        if RULE_PENALTY_OTHER & RULES:
            pen = pen & not_own
        t = tl.where(pen, t + tl.load(numbers_ptr + NUM_PENALTY) * d, t)
    return keep, pos, t


@triton.jit
def teacher_tile(td, keep, t_scale, t_c0, t_c1, t_row_hi, t_row_lo, t_col_hi, t_col_lo,
                 TEACHER_LINEAR: tl.constexpr, COLS: tl.constexpr):
    """The teacher's target probabilities (q_row, q_col) of a tile ``td`` of its dot products
    A_t,i·B_t,j (fp32) on the kept pairs ``keep`` (0 elsewhere, the tile's padding included). Softmax
    teacher: logits ``T = t_scale·td`` and ``exp(T − norm)`` with each row's (column's) float64
    normaliser as fp32 (hi, lo) (``split_lse``); linear teacher (TEACHER_LINEAR): weights
    ``T = t_c0 + t_c1·td`` and ``T·(1/norm)``: for a linear teacher the vectors hold the normalisers'
    reciprocals (hi; lo unused), within an ulp of torch's ``T / norm`` without a division in the
    kernel (whose slow path costs registers). q_col only with COLS (zeros otherwise). As
    ``torch_chunked.teacher_probs``."""
    if TEACHER_LINEAR:
        t = td * t_c1 + t_c0
        q_row = t * t_row_hi[:, None]
    else:
        t = td * t_scale
        q_row = tl.exp2(((t - t_row_hi[:, None]) - t_row_lo[:, None]) * LOG2E)
    q_row = tl.where(keep, q_row, 0.0)
    q_col = tl.zeros_like(q_row)
    if COLS:
        if TEACHER_LINEAR:
            q_col = t * t_col_hi[None, :]
        else:
            q_col = tl.exp2(((t - t_col_hi[None, :]) - t_col_lo[None, :]) * LOG2E)
        q_col = tl.where(keep, q_col, 0.0)
    return q_row, q_col


@triton.jit
def _teacher_norms(vec_ptr, offs, mask):
    """fp32 (hi, lo) of the teacher's float64 normalisers (VEC_T_NORM) at offs (+inf outside mask,
    whose pairs the keep mask drops)."""
    return split_lse(tl.load(vec_ptr + offs * VEC_WIDTH + VEC_T_NORM, mask=mask, other=float("inf")))


@triton.jit
def grad_row_vectors(row_vec_ptr, offs_m, mask_m, TERMS: tl.constexpr):
    """Pass 2's per-row inputs of ``target_grad_tile`` at rows ``offs_m``: the float64 row LSE as fp32
    (hi, lo), the target mass at a positive and on every kept pair, and (TERM_MASS) the softmax term's
    mass (``qp`` stands in for it otherwise)."""
    row_hi, row_lo = split_lse(tl.load(row_vec_ptr + offs_m * VEC_WIDTH + VEC_LSE, mask=mask_m, other=float("inf")))
    qp = vec_load(row_vec_ptr, offs_m, mask_m, VEC_Q_POS, 0.0)
    qk = vec_load(row_vec_ptr, offs_m, mask_m, VEC_Q_KEEP, 0.0)
    mass = qp
    if TERM_MASS & TERMS:
        mass = vec_load(row_vec_ptr, offs_m, mask_m, VEC_MASS, 0.0)
    return row_hi, row_lo, qp, qk, mass


@triton.jit
def teacher_rows(numbers_ptr, row_vec_ptr, offs_m, mask_m, TERMS: tl.constexpr):
    """(scale, row normalisers hi, lo) of the teacher at rows ``offs_m`` (dummies without TERM_SOFT)."""
    t_scale = 1.0
    if TERM_SOFT & TERMS:
        if not (TERM_LINEAR & TERMS):
            t_scale = tl.load(numbers_ptr + NUM_T_SCALE)
        t_row_hi, t_row_lo = _teacher_norms(row_vec_ptr, offs_m, mask_m)
    else:
        t_row_hi = tl.zeros(offs_m.shape, tl.float32)
        t_row_lo = t_row_hi
    return t_scale, t_row_hi, t_row_lo


@triton.jit
def _p_minus_q(x, pos, qp, mass, HAS_MASS: tl.constexpr):
    """``mass·exp(x) − q·[pos]`` of one direction (``qp``, ``mass`` broadcast to the tile): at a
    positive with q > ½ (a single confident one) as ``mass·expm1(x) + (mass − q)``, which keeps the
    precision of P ≈ 1; elsewhere directly. Without HAS_MASS the mass is 1."""
    e = tl.exp2(x * LOG2E)
    if HAS_MASS:
        g = tl.where(pos, tl.where(qp > 0.5, mass * expm1(x) + (mass - qp), e * mass - qp), e * mass)
    else:
        g = tl.where(pos, tl.where(qp > 0.5, expm1(x) + (1.0 - qp), e - qp), e)
    return g


@triton.jit
def target_grad_tile(t, keep, pos, row_hi, row_lo, qp, qk, mass, q_row, q_col, offs_n, mask_n, col_vec_ptr,
                     numbers_ptr, TERMS: tl.constexpr):
    """G = ∂L/∂S of a tile of logits ``t`` (``target_tile``: its kept pairs and positives), 0 off the kept
    pairs: ``w_row·(mass·P_row − q_pos·[pos] − q_keep − soft·Qt_row)`` with the row vectors of
    ``grad_row_vectors`` (the float64 LSE as fp32 hi, lo), plus with TERM_SYMMETRIC ``w_col·(…)`` of
    the same form per column, its vectors read here at the tile's local columns ``offs_n``. Soft
    targets (TERM_SOFT): the teacher's probabilities ``q_row``, ``q_col`` (``teacher_tile``). Every
    producer of a tile calls it: the epilogues of ``target.py`` (either producer) and the fused tile
    kernels (``fused_target.py``), so that G is one formula."""
    HAS_MASS: tl.constexpr = (TERM_MASS & TERMS) != 0
    soft = tl.load(numbers_ptr + NUM_SOFT)
    g = _p_minus_q((t - row_hi[:, None]) - row_lo[:, None], pos, qp[:, None], mass[:, None], HAS_MASS) - qk[:, None]
    if TERM_SOFT & TERMS:
        g = g - soft * q_row
    g = tl.load(numbers_ptr + NUM_W_ROW) * g
    if TERM_SYMMETRIC & TERMS:
        col_hi, col_lo = split_lse(tl.load(col_vec_ptr + offs_n * VEC_WIDTH + VEC_LSE, mask=mask_n,
                                           other=float("inf")))
        qcp = vec_load(col_vec_ptr, offs_n, mask_n, VEC_Q_POS, 0.0)
        qck = vec_load(col_vec_ptr, offs_n, mask_n, VEC_Q_KEEP, 0.0)
        wc = vec_load(col_vec_ptr, offs_n, mask_n, VEC_WEIGHT, 0.0)
        mc = qcp
        if HAS_MASS:
            mc = vec_load(col_vec_ptr, offs_n, mask_n, VEC_MASS, 0.0)
        gc = _p_minus_q((t - col_hi[None, :]) - col_lo[None, :], pos, qcp[None, :], mc[None, :], HAS_MASS)
        gc = gc - qck[None, :]
        if TERM_SOFT & TERMS:
            gc = gc - soft * q_col
        g += tl.where(wc[None, :] != 0.0, wc[None, :] * gc, 0.0)
    return tl.where(keep, g, 0.0)


@triton.jit
def row_bounds(bound_ptr, offs_m, mask_m, RULES: tl.constexpr, BLOCK_M: tl.constexpr):
    """Each row's margin bound (``targets.margin_bound`` of its pair's similarity) at local rows
    ``offs_m`` (zeros without RULE_MARGIN)."""
    if RULE_MARGIN & RULES:
        bound = tl.load(bound_ptr + offs_m, mask=mask_m, other=0.0)
    else:
        bound = tl.zeros([BLOCK_M], tl.float32)
    return bound


@triton.jit
def target_items(R, W, tiles_per_split, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The work items (row blocks × column splits) of an epilogue over R rows × W columns whose column
    tiles are split ``tiles_per_split`` to a split (``plan.work_items``: its splits are exactly what
    the tiles need)."""
    return tl.cdiv(R, BLOCK_M) * tl.cdiv(tl.cdiv(W, BLOCK_N), tiles_per_split)


@triton.jit
def target_work_item(item, scale_ptr, bias_ptr, bound_ptr, R, W, tiles_per_split, RULES: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """What work item ``item`` (row block m = item % m_blocks, column split s = item // m_blocks:
    ``work_item``) of an epilogue over a chunk of R rows × W columns works on: (m, s), its rows
    (local offsets and mask), their margin bounds, the scale and bias, and its column tiles [t0, t1)."""
    wide = tl.zeros([], tl.int64)  # the item's indices in int64, as the addresses are
    m_blocks = tl.cdiv(R, BLOCK_M)
    pid_m = item % m_blocks + wide
    pid_s = item // m_blocks + wide
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < R
    t0 = pid_s * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(W, BLOCK_N))
    bound = row_bounds(bound_ptr, offs_m, mask_m, RULES, BLOCK_M)
    return (pid_m, pid_s, offs_m, mask_m, bound, tl.load(scale_ptr).to(tl.float32),
            tl.load(bias_ptr).to(tl.float32), t0, t1)


@triton.jit
def teacher_dot_tile(tdot_ptr, stride_tm, offs_m, offs_n, mask_m, mask_n, keep, numbers_ptr, col_vec_ptr, t_scale,
                     t_row_hi, t_row_lo, TERMS: tl.constexpr):
    """``teacher_tile`` of a tile of the teacher's dot products, read from its fp32 chunk in memory
    (whatever the student's producer), its column normalisers read here."""
    td = tl.load(tdot_ptr + offs_m[:, None] * stride_tm + offs_n[None, :], mask=mask_m[:, None] & mask_n[None, :],
                 other=0.0)
    SYMMETRIC: tl.constexpr = (TERM_SYMMETRIC & TERMS) != 0
    if SYMMETRIC:
        t_col_hi, t_col_lo = _teacher_norms(col_vec_ptr, offs_n, mask_n)
    else:
        t_col_hi, t_col_lo = t_row_hi, t_row_lo  # unused
    return teacher_tile(td, keep, t_scale, tl.load(numbers_ptr + NUM_T_C0), tl.load(numbers_ptr + NUM_T_C1), t_row_hi,
                        t_row_lo, t_col_hi, t_col_lo, (TERM_LINEAR & TERMS) != 0, SYMMETRIC)
