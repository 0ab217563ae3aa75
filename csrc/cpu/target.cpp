// The general target of the engine (fastcon/targets/) on the CPU: its two passes as the
// operators target_stats and target_grad. Between them, fastcon/targets/passes.py combines the
// statistics (row groups, the loss, the target weights) for every backend alike.
//
// Pass 1 (target_stats), per row chunk: the GEMM of the chunk's dot products (over the columns some
// row of the chunk keeps), then one epilogue per row that decides every pair (kept, positive,
// penalised) from the target's O(N) vectors and writes the logit, or −inf for a dropped pair, into a
// logits buffer while counting and summing the positives (and, with label smoothing, the kept
// pairs); the row LSEs and, for a symmetric loss, the column LSEs then come from that buffer through
// the column statistics of the CLIP engine. Pass 2 (target_grad) decides every pair again and turns
// the dot products into G in place, for the two GEMMs of the gradients.
//
// Determinism as in engine.cpp: each row is computed by one thread; column sums are per thread (a fixed
// block of rows of every chunk) and merged in thread order.
#include <torch/library.h>

#include <memory>
#include <tuple>
#include <vector>

#include "engine.h"
#include "prefix.h"
#include "target_format.h"

namespace fastcon {
namespace cpu {
namespace {

// The target as the wire format (target_format.h) carries it: per-row and per-column lines with
// every default filled in; the presence flags say which checks a pair needs (``plain``: none).
struct TargetView {
  const int64_t* rows = nullptr;  // (na, wire::kRowFields)
  const int64_t* cols = nullptr;  // (nb, wire::kColFields)
  // The columns a pair's decision reads, each contiguous (a strided read of the (nb, kColFields)
  // lines for every pair costs a few percent at N = 4,096); only those the flags say are given.
  std::vector<int64_t> col_ids;    // cols[:, kColId], also for the vectorised sweeps
  std::vector<int64_t> col_owner;  // cols[:, kColOwner] with has_owners
  std::vector<uint8_t> col_keep;   // cols[:, kColKeep] != 0 with has_keep
  std::vector<uint8_t> col_pen;    // cols[:, kColPenalty] != 0 with has_penalty_cols
  const bool* mask = nullptr;     // (Na, Nb)
  int64_t na = 0, nb = 0;
  bool has_margin = false, has_range = false, has_keep = false, has_owners = false, has_penalty_cols = false;
  bool plain = false;  // positives by id only: every pair is kept (the loops take a vectorised path)
  double margin = 0.0;
  bool margin_relative = false;  // the bound pair − |pair|·margin instead of pair − margin
  // A guide (GISTEmbed): the margin rule compares the guide's similarities G_i·H_j, a tile of its own
  // features (the wire's teacher, of kind kTeacherGuide) formed beside the student's; in a's dtype.
  bool guide = false;
  Tensor ga, gb;
  double penalty = 0.0;
  int64_t penalty_mode = 0;
  // (col id, column) of every column with an id, sorted: a row's positives without a sweep over the
  // columns (built for plain targets, whose vectorised sweeps leave the positives to it)
  std::vector<std::pair<int64_t, int64_t>> by_id;
  int64_t row(int64_t i, int64_t k) const { return rows[i * wire::kRowFields + k]; }
  int64_t col(int64_t j, int64_t k) const { return cols[j * wire::kColFields + k]; }
  // f(j) for each positive column j of a row with id ``rid`` in [c0, c1), in order
  template <typename F>
  void for_each_positive(int64_t rid, int64_t c0, int64_t c1, F&& f) const {
    if (rid < 0) return;
    auto it = std::lower_bound(by_id.begin(), by_id.end(), std::make_pair(rid, c0));
    for (; it != by_id.end() && it->first == rid && it->second < c1; ++it) f(it->second);
  }
};

const Tensor* field(const c10::List<std::optional<Tensor>>& tensors, int k, std::vector<Tensor>& keep) {
  if (size_t(k) >= tensors.size()) return nullptr;
  const std::optional<Tensor> t = tensors.get(k);
  if (!t.has_value() || !t->defined()) return nullptr;
  keep.push_back(*t);
  return &keep.back();
}

TargetView make_view(const char* op, const Tensor& rows, const Tensor& cols, at::ArrayRef<double> numbers,
                     const std::optional<Tensor>& mask, int64_t na, int64_t nb) {
  TORCH_CHECK(numbers.size() == size_t(wire::kNumberCount), "fastcon::", op, ": the target has ",
              int64_t(wire::kNumberCount), " numbers, got ", numbers.size());
  auto lines = [&](const Tensor& t, const char* name, int64_t n, int64_t width) {
    TORCH_CHECK(t.scalar_type() == at::kLong && t.device().is_cpu() && t.is_contiguous() && t.dim() == 2 &&
                    t.size(0) == n && t.size(1) == width,
                "fastcon::", op, ": the target's ", name, " must be a contiguous int64 CPU tensor of shape (", n,
                ", ", width, ")");
    return t.data_ptr<int64_t>();
  };
  TargetView v;
  v.na = na;
  v.nb = nb;
  v.rows = lines(rows, "rows", na, wire::kRowFields);
  v.cols = lines(cols, "cols", nb, wire::kColFields);
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->device().is_cpu() && mask->is_contiguous() &&
                    mask->numel() == na * nb,
                "fastcon::", op, ": mask must be a contiguous bool CPU tensor with ", na * nb, " entries");
    v.mask = mask->data_ptr<bool>();
  }
  const int64_t flags = int64_t(numbers[wire::kNumFlags]);
  v.has_margin = !std::isnan(numbers[wire::kNumMargin]);
  v.margin = v.has_margin ? numbers[wire::kNumMargin] : 0.0;
  v.margin_relative = numbers[wire::kNumMarginRelative] != 0.0;
  v.penalty = numbers[wire::kNumPenalty];
  v.penalty_mode = int64_t(numbers[wire::kNumPenaltyMode]);
  v.has_range = flags & wire::kHasRange;
  v.has_keep = flags & wire::kHasKeep;
  v.has_owners = (flags & wire::kHasRowOwner) && (flags & wire::kHasColOwner);
  v.has_penalty_cols = flags & wire::kHasPenaltyCols;
  auto column = [&](auto& out, int64_t k, bool given) {
    if (!given) return;
    out.resize(size_t(nb));
    for (int64_t j = 0; j < nb; ++j) out[size_t(j)] = v.col(j, k);
  };
  column(v.col_ids, wire::kColId, true);
  column(v.col_owner, wire::kColOwner, v.has_owners);
  column(v.col_keep, wire::kColKeep, v.has_keep);
  column(v.col_pen, wire::kColPenalty, v.has_penalty_cols);
  const int64_t drops = wire::kHasExclude | wire::kHasKeep | wire::kHasRange | wire::kHasRowOwner |
                        wire::kHasColOwner | wire::kHasRule;
  v.plain = !(flags & drops) && !v.mask && !v.has_margin && v.penalty == 0.0;
  if (v.plain) {
    for (int64_t j = 0; j < nb; ++j) {
      if (v.col_ids[size_t(j)] >= 0) v.by_id.emplace_back(v.col_ids[size_t(j)], j);
    }
    std::sort(v.by_id.begin(), v.by_id.end());
  }
  TORCH_CHECK(v.penalty_mode == 0 || v.has_owners, "fastcon::", op,
              ": a hardness penalty by ownership needs row_owner and col_owner");
  return v;
}

// The guide of a guided margin rule (targets.py: TEACHER_GUIDE), from the wire's teacher features.
void attach_guide(TargetView& v, const char* op, const Tensor& a, at::ArrayRef<double> numbers,
                  const std::optional<Tensor>& teacher_a, const std::optional<Tensor>& teacher_b) {
  if (int64_t(numbers[wire::kNumTeacherKind]) != wire::kTeacherGuide || numbers[wire::kNumSoft] != 0.0) return;
  TORCH_CHECK(v.has_margin, "fastcon::", op, ": a guide decides the margin rule and needs a margin");
  TORCH_CHECK(teacher_a.has_value() && teacher_a->defined() && teacher_b.has_value() && teacher_b->defined(),
              "fastcon::", op, ": a guided margin needs the guide's features (teacher_a, teacher_b)");
  TORCH_CHECK(teacher_a->dim() == 2 && teacher_b->dim() == 2 && teacher_a->size(1) == teacher_b->size(1) &&
                  teacher_a->size(0) == v.na && teacher_b->size(0) == v.nb && teacher_a->is_floating_point() &&
                  teacher_b->is_floating_point() && teacher_a->device().is_cpu() && teacher_b->device().is_cpu(),
              "fastcon::", op, ": the guide's features must be floating CPU tensors of shapes (", v.na,
              ", Dg) and (", v.nb, ", Dg)");
  v.guide = true;
  v.ga = teacher_a->to(a.scalar_type()).contiguous();
  v.gb = teacher_b->to(a.scalar_type()).contiguous();
}

// The guide's similarities of a chunk (rows [r0, r0 + rows) × columns [c0, c0 + w)), or null.
template <typename T>
const T* guide_chunk(const TargetView& t, Tensor& buf, int64_t chunk_rows, int64_t r0, int64_t rows, int64_t c0,
                     int64_t w);

// The columns [c0, c1) that some row of [r0, r1) may keep (as column_span in targets.py).
std::pair<int64_t, int64_t> span(const TargetView& t, int64_t r0, int64_t r1) {
  if (t.has_margin) return {0, t.nb};
  int64_t c0 = std::numeric_limits<int64_t>::max(), c1 = std::numeric_limits<int64_t>::min();
  for (int64_t i = r0; i < r1; ++i) {
    c0 = std::min(c0, t.row(i, wire::kRowLo));
    c1 = std::max(c1, t.row(i, wire::kRowHi));
  }
  c0 = std::min(std::max<int64_t>(c0, 0), t.nb);
  return {c0, std::max(c0, std::min(c1, t.nb))};
}

// Soft targets (targets.py: a teacher's tile beside the student's). The teacher is part of the
// target's wire format: its features (teacher_a, teacher_b), its scale and its numbers (soft, kind,
// c0, c1, hard) in the target's numbers. What a pass adds comes as one list of vectors: the float64
// row and column normalisers of the teacher's pass, the positives' counts of each row and column
// (pass 1's entropy terms), and each row's and column's target mass (pass 2, where it is not 1).
enum PassVector { kRowNorm, kColNorm, kRowPos, kColPos, kRowMass, kColMass, kPassVectors };

template <typename T>
struct SoftView {
  bool on = false, linear = false, entropy = false;
  Tensor ta, tb;
  T soft = 0, tscale = 1, c0 = 0, c1 = 1, hard = 0;
  std::vector<T> rhi, rlo, chi, clo;  // the normalisers, split as SplitLse (linear: hi only)
  const T* row_pos = nullptr;
  const T* col_pos = nullptr;
  const T* row_mass = nullptr;
  const T* col_mass = nullptr;

  std::vector<T> hc, ones;  // entropy: the hard share at each column's positives; a mass of 1

  // The kernels' view of row i (kernels.h: SoftRow; pass 2 fills in its weights).
  SoftRow<T> row(int64_t i) const {
    SoftRow<T> r{};
    r.soft = soft;
    r.ts = tscale;
    r.c0 = c0;
    r.c1 = c1;
    r.rhi = rhi[size_t(i)];
    r.rlo = rlo[size_t(i)];
    r.mass = row_mass ? row_mass[i] : T(1);
    return r;
  }
  // ... and of the columns from c0 on.
  SoftCols<T> cols(int64_t col0) const {
    SoftCols<T> c{};
    if (chi.empty()) return c;
    c.thi = chi.data() + col0;
    c.tlo = clo.data() + col0;
    c.hc = hc.empty() ? nullptr : hc.data() + col0;
    c.mass = (col_mass ? col_mass : ones.data()) + col0;
    return c;
  }
};

template <typename T>
void split_norms(const Tensor& v, const char* op, const char* name, int64_t n, bool linear, std::vector<T>& hi,
                 std::vector<T>& lo) {
  check_lse(op, name, v, n);
  const double* p = v.data_ptr<double>();
  hi.resize(size_t(n));
  lo.resize(size_t(n));
  for (int64_t i = 0; i < n; ++i) {
    const T h = T(p[i]);
    hi[i] = h;
    lo[i] = (!linear && std::isfinite(h)) ? T(p[i] - double(h)) : T(0);
  }
}

template <typename T>
SoftView<T> make_soft(const char* op, const Tensor& a, const Tensor& b, at::ArrayRef<double> numbers,
                      const std::optional<Tensor>& teacher_a, const std::optional<Tensor>& teacher_b,
                      const std::optional<Tensor>& teacher_scale, const c10::List<std::optional<Tensor>>& vectors,
                      bool symmetric, std::vector<Tensor>& keep) {
  SoftView<T> v;
  if (vectors.size() == 0) return v;
  TORCH_CHECK(vectors.size() == kPassVectors, "fastcon::", op, ": a pass takes ", int(kPassVectors),
              " vectors, got ", vectors.size());
  keep.reserve(kPassVectors + 2);  // field() hands out pointers into it
  auto vec = [&](int k, const char* name, int64_t n) -> const T* {
    const Tensor* t = field(vectors, k, keep);
    if (t == nullptr) return nullptr;
    TORCH_CHECK(t->dim() == 1 && t->size(0) == n && t->scalar_type() == a.scalar_type() && t->is_contiguous() &&
                    t->device().is_cpu(),
                "fastcon::", op, ": ", name, " must be a contiguous CPU vector of a's dtype of length ", n);
    return t->data_ptr<T>();
  };
  v.row_mass = vec(kRowMass, "row_mass", a.size(0));
  v.col_mass = vec(kColMass, "col_mass", b.size(0));
  if (symmetric) v.ones.assign(size_t(b.size(0)), T(1));
  const double soft = numbers[wire::kNumSoft];
  if (soft == 0.0) return v;  // hard targets with a target mass per row (column): no teacher
  v.on = true;
  v.soft = T(soft);
  v.linear = int64_t(numbers[wire::kNumTeacherKind]) == wire::kTeacherLinear;
  v.c0 = T(numbers[wire::kNumC0]);
  v.c1 = T(numbers[wire::kNumC1]);
  const double hard = numbers[wire::kNumHard];  // NaN: what the soft targets leave
  v.hard = T(std::isnan(hard) ? 1.0 - soft : hard);
  TORCH_CHECK(teacher_a.has_value() && teacher_a->defined() && teacher_b.has_value() && teacher_b->defined(),
              "fastcon::", op, ": soft targets need teacher_a and teacher_b");
  for (const Tensor* t : {&*teacher_a, &*teacher_b}) {
    TORCH_CHECK(t->dim() == 2 && t->size(1) == a.size(1) && t->is_floating_point() && t->device().is_cpu(),
                "fastcon::", op, ": the teacher's features must be floating CPU tensors of a's dim");
  }
  TORCH_CHECK(teacher_a->size(0) == a.size(0) && teacher_b->size(0) == b.size(0), "fastcon::", op,
              ": the teacher's features must have the student's rows: ", a.size(0), " and ", b.size(0));
  v.ta = teacher_a->to(a.scalar_type()).contiguous();  // the GEMMs' dtype, a's
  v.tb = teacher_b->to(a.scalar_type()).contiguous();
  if (!v.linear) {
    TORCH_CHECK(teacher_scale.has_value() && teacher_scale->defined() && teacher_scale->numel() == 1, "fastcon::",
                op, ": a softmax teacher needs its scale as a one-element tensor");
    v.tscale = T(teacher_scale->item<double>());
  }
  const Tensor* rn = field(vectors, kRowNorm, keep);
  TORCH_CHECK(rn, "fastcon::", op, ": soft targets need the teacher's row normalisers");
  split_norms<T>(*rn, op, "the teacher's row normalisers", a.size(0), v.linear, v.rhi, v.rlo);
  if (symmetric) {
    const Tensor* cn = field(vectors, kColNorm, keep);
    TORCH_CHECK(cn, "fastcon::", op, ": a symmetric loss with soft targets needs the teacher's column normalisers");
    split_norms<T>(*cn, op, "the teacher's column normalisers", b.size(0), v.linear, v.chi, v.clo);
  }
  v.row_pos = vec(kRowPos, "the rows' positive counts", a.size(0));
  v.col_pos = vec(kColPos, "the columns' positive counts", b.size(0));
  // the targets' entropy is pass 1's term: it runs where the pass hands over the positives' counts
  v.entropy = numbers[wire::kNumEntropy] != 0.0 && v.row_pos != nullptr;
  TORCH_CHECK(!v.entropy || !symmetric || v.col_pos, "fastcon::", op,
              ": the targets' entropy needs the columns' positive counts");
  if (symmetric) {
    if (v.entropy) {  // as the torch backend forms it: hard / max(|P_j|, 1)
      v.hc.resize(size_t(b.size(0)));
      for (int64_t j = 0; j < b.size(0); ++j) v.hc[size_t(j)] = T(v.hard / std::max(v.col_pos[j], T(1)));
    }
  }
  return v;
}

// The row chunks [r0, r0 + rows) of a pass and the columns [c0, c0 + w) each keeps: body(r0, rows, c0, w);
// skip() for a chunk that keeps no column.
template <typename Body, typename Skip>
void for_each_chunk(const TargetView& t, int64_t chunk_rows, Body&& body, Skip&& skip) {
  for (int64_t r0 = 0; r0 < t.na; r0 += chunk_rows) {
    const int64_t r1 = std::min(t.na, r0 + chunk_rows);
    const auto sp = span(t, r0, r1);
    if (sp.second == sp.first) {
      skip();
      continue;
    }
    body(r0, r1 - r0, sp.first, sp.second - sp.first);
  }
}


template <typename T>
const T* guide_chunk(const TargetView& t, Tensor& buf, int64_t chunk_rows, int64_t r0, int64_t rows, int64_t c0,
                     int64_t w) {
  if (!t.guide) return nullptr;
  Tensor g = scratch_rows(buf, chunk_rows, rows, w, t.ga.options());
  at::mm_out(g, t.ga.narrow(0, r0, rows), t.gb.narrow(0, c0, w).t());
  return g.data_ptr<T>();
}

// exp(x)·mass − q of one pair: at a positive whose target q is above ½ with a mass of 1 (a row of one
// positive: p ≈ 1 there when the loss is small), expm1(x) + (1 − q), which keeps the bits that
// exp(x) − q cancels (the Triton epilogue forms it the same way).
template <typename T>
FC_INLINE T softmax_minus_q(T x, T mass, T q) {
  if (q > T(0.5) && mass == T(1)) return T(std::expm1(double(x)) + (1.0 - double(q)));
  return Math<T>::exp(x) * mass - q;
}

// Everything about row i that its pairs' decisions read, once per row.
template <typename T>
struct RowCtx {
  int64_t id, exclude, lo, hi, owner, rule;
  bool pen_row;
  T pair_bound;  // the margin rule's bound from the pair's similarity, in T as the torch backend forms it
};

// ``sim_row``: the similarities the margin rule reads (the guide's with a guide, else the dot products).
template <typename T>
RowCtx<T> row_ctx(const TargetView& t, int64_t i, const T* sim_row, int64_t c0) {
  RowCtx<T> r;
  r.id = t.row(i, wire::kRowId);
  r.exclude = t.row(i, wire::kRowExclude);
  r.lo = t.row(i, wire::kRowLo);
  r.hi = t.row(i, wire::kRowHi);
  r.owner = t.row(i, wire::kRowOwner);
  r.rule = t.has_owners ? t.row(i, wire::kRowRule) : 0;
  r.pen_row = t.penalty != 0.0 && t.row(i, wire::kRowPenalty) != 0;
  r.pair_bound = T(0);
  if (t.has_margin) {
    const T pair = sim_row[t.row(i, wire::kRowPair) - c0];
    r.pair_bound = t.margin_relative ? T(pair - T(std::abs(pair) * T(t.margin))) : T(pair - T(t.margin));
  }
  return r;
}

// The decision about pair (i, j) and its logit: returns false for a dropped pair; else sets *pos and
// the logit *v = s·d + b (+ α·d when penalised). ``g``: the similarity the margin rule reads.
template <typename T>
FC_INLINE bool decide(const TargetView& t, const RowCtx<T>& r, int64_t i, int64_t j, T d, T g, T s, T b, bool* pos,
                      T* v) {
  const int64_t cid = t.col_ids[size_t(j)];
  bool p = cid >= 0 && cid == r.id;
  if (j == r.exclude || j < r.lo || j >= r.hi) return false;
  if (t.has_keep && !t.col_keep[size_t(j)]) return false;
  bool own = false, owned = false;
  if (t.has_owners) {
    const int64_t co = t.col_owner[size_t(j)];
    owned = co >= 0;
    own = owned && co == r.owner;
    if ((r.rule == 1 && own) || (r.rule == 2 && owned && !own)) return false;
  }
  if (t.mask && !t.mask[i * t.nb + j]) return false;
  if (t.has_margin && !p && !(g <= r.pair_bound)) return false;
  T logit = d * s + b;
  if (r.pen_row && !p && (!t.has_penalty_cols || t.col_pen[size_t(j)]) &&
      (t.penalty_mode == 0 || (t.penalty_mode == 1 ? own : !own))) {
    logit = logit + T(t.penalty) * d;
  }
  *pos = p;
  *v = logit;
  return true;
}

// Per-thread column sums of the positives (and kept pairs), merged in thread order.
struct ColSums {
  int64_t nb;
  int nt;
  std::vector<double> data;  // per thread: n_pos, sum_pos, n_keep, sum_keep, cross, entropy (nb each)
  static constexpr int kSums = 6;
  ColSums(int64_t nb_, int nt_) : nb(nb_), nt(nt_), data(size_t(nt_) * kSums * size_t(nb_), 0.0) {}
  double* at(int t, int k) { return data.data() + (size_t(t) * kSums + size_t(k)) * size_t(nb); }
};

// Pass 1's statistics of one loss (one Matryoshka prefix), filled chunk by chunk: ``chunk`` is the
// epilogue of a chunk of dot products (with the teacher's and the guide's beside it), ``finish`` merges
// the threads' column sums and returns the outputs.
template <typename T>
struct StatsPass {
  const TargetView& t;
  const SoftView<T>& sv;
  T s, bb;
  bool symmetric, smoothing;
  int64_t na, nb, chunk_rows;
  int nt;
  at::TensorOptions options;
  Tensor row_lse, row_pos, row_keep, row_sum_pos, row_sum_keep;
  Tensor col_lse, col_pos, col_keep, col_sum_pos, col_sum_keep;
  Tensor cross_row, ent_row, cross_col, ent_col;
  Tensor own_logits;
  Tensor* logits;  // the chunk's logits: this pass's own buffer, or one shared by the prefixes' passes
  std::unique_ptr<ColStats<T>> cs;
  ColSums sums;

  StatsPass(const Tensor& a, const Tensor& b, T s_, T bb_, const TargetView& t_, const SoftView<T>& sv_,
            bool symmetric_, bool smoothing_, int64_t chunk_rows_, Tensor* shared_logits = nullptr)
      : t(t_), sv(sv_), s(s_), bb(bb_), symmetric(symmetric_), smoothing(smoothing_), na(a.size(0)), nb(b.size(0)),
        chunk_rows(chunk_rows_), nt(team_threads()), options(a.options()), sums(symmetric_ ? b.size(0) : 0, nt) {
    auto f64 = options.dtype(at::kDouble);
    row_lse = at::full({na}, -inf<double>(), f64);
    row_pos = at::zeros({na}, options);
    row_keep = at::zeros({na}, options);
    row_sum_pos = at::zeros({na}, f64);
    row_sum_keep = at::zeros({na}, f64);
    col_lse = at::full({nb}, -inf<double>(), f64);
    col_pos = at::zeros({nb}, options);
    col_keep = at::zeros({nb}, options);
    col_sum_pos = at::zeros({nb}, f64);
    col_sum_keep = at::zeros({nb}, f64);
    // soft targets: the cross terms Σ Qt·S and the targets' Σ Q·log Q, per row and column
    cross_row = at::zeros({sv.on ? na : 0}, f64);
    ent_row = at::zeros({sv.entropy ? na : 0}, f64);
    cross_col = at::zeros({sv.on ? nb : 0}, f64);
    ent_col = at::zeros({sv.entropy ? nb : 0}, f64);
    TORCH_CHECK(!symmetric || !t.has_range, "fastcon::target_stats: a symmetric loss keeps every column span");
    if (symmetric) cs.reset(new ColStats<T>(nb, nt));
    logits = shared_logits ? shared_logits : &own_logits;
  }

  // The epilogue of rows [r0, r0 + rows) × columns [c0, c0 + w): dp the dot products, tp the teacher's
  // (soft targets), gp the guide's (null without one).
  // ``row_sc``, ``col_sc`` (a Matryoshka prefix on a plain target without soft terms): dp is the
  // prefix's accumulator P and the logits are s·(P·r_i·c_j) + b, formed in the row sweep (row i's
  // scale row_sc[i], column j's col_sc[j], both indexed globally).
  void chunk(const T* dp, const T* tp, const T* gp, int64_t r0, int64_t rows, int64_t c0, int64_t w,
             const T* row_sc = nullptr, const T* col_sc = nullptr) {
    TORCH_CHECK(!row_sc || (t.plain && !sv.on), "fastcon::target_stats: scaled chunks are for plain targets");
    T* lg = scratch_rows(*logits, chunk_rows, rows, w, options).data_ptr<T>();
    T* rp = row_pos.data_ptr<T>();
    T* rk = row_keep.data_ptr<T>();
    double* rsp = row_sum_pos.data_ptr<double>();
    double* rsk = row_sum_keep.data_ptr<double>();
    double* rl = row_lse.data_ptr<double>();
    double* xr = sv.on ? cross_row.data_ptr<double>() : nullptr;
    double* er = sv.entropy ? ent_row.data_ptr<double>() : nullptr;
#pragma omp parallel num_threads(nt) if (rows * w >= kMinParallelWork)
    {
      const int tid = omp_tid(), team = omp_team();
      const int64_t i0 = rows * tid / team, i1 = rows * (tid + 1) / team;
      double* cnp = symmetric ? sums.at(tid, 0) + c0 : nullptr;
      double* csp = symmetric ? sums.at(tid, 1) + c0 : nullptr;
      double* cnk = symmetric ? sums.at(tid, 2) + c0 : nullptr;
      double* csk = symmetric ? sums.at(tid, 3) + c0 : nullptr;
      double* cxc = symmetric ? sums.at(tid, 4) + c0 : nullptr;
      double* cen = symmetric ? sums.at(tid, 5) + c0 : nullptr;
      std::vector<T> pos_row(static_cast<size_t>(w));  // the positives of a row (1 or 0)
      T* P = pos_row.data();
      const SoftCols<T> cols = sv.cols(c0);
      for (int64_t li = i0; li < i1; ++li) {
        const int64_t i = r0 + li;
        const T* d = dp + li * w;
        const T* td = sv.on ? tp + li * w : nullptr;
        const T* gd = gp ? gp + li * w : d;
        T* L = lg + li * w;
        const RowCtx<T> rc = row_ctx<T>(t, i, gd, c0);
        T n_pos = 0, n_keep = 0;
        double s_pos = 0, s_keep = 0;
        // the hard targets' share of a positive, as the torch backend forms it (|P| at least 1)
        const T h_row = sv.entropy ? T(sv.hard / std::max(sv.row_pos[i], T(1))) : T(0);
        T m = -inf<T>();
        if (t.plain) {  // every pair kept, positives by id: one vectorised sweep
          const int64_t rid = t.row(i, wire::kRowId);
          const int64_t* cids = t.col_ids.data() + c0;
          T np = 0;
          double sp = 0, sk = 0;
          T mm;
          if (sv.on) {  // the soft terms read the positives' row P
            mm = fc_target_row(d, L, P, w, s, bb, cids, rid, symmetric, smoothing, cnp, csp, cnk, csk, &np, &sp, &sk);
          } else {  // the logits in one sweep, the positives from the index
            mm = fc_row_logits(d, L, w, s, bb, smoothing, &sk, row_sc ? row_sc[i] : T(1),
                               col_sc ? col_sc + c0 : nullptr);
            t.for_each_positive(rid, c0, c0 + w, [&](int64_t j) {
              const double v = double(L[j - c0]);
              np += T(1);
              sp += v;
              if (symmetric) {
                cnp[j - c0] += 1.0;
                csp[j - c0] += v;
              }
            });
            if (symmetric && smoothing) {
              for (int64_t jj = 0; jj < w; ++jj) {
                cnk[jj] += 1.0;
                csk[jj] += double(L[jj]);
              }
            }
          }
          m = mm;
          n_pos = np;
          s_pos = sp;
          if (smoothing) {
            n_keep = T(w);
            s_keep = sk;
          }
        }
        for (int64_t jj = 0; jj < w && !t.plain; ++jj) {
          bool p = false;
          T v;
          if (!decide<T>(t, rc, i, c0 + jj, d[jj], gd[jj], s, bb, &p, &v)) {
            L[jj] = -inf<T>();
            P[jj] = T(0);
            continue;
          }
          L[jj] = v;
          m = v > m ? v : m;
          P[jj] = p ? T(1) : T(0);
          if (p) {
            n_pos += T(1);
            s_pos += double(v);
            if (symmetric) {
              cnp[jj] += 1.0;
              csp[jj] += double(v);
            }
          }
          if (smoothing) {
            n_keep += T(1);
            s_keep += double(v);
            if (symmetric) {
              cnk[jj] += 1.0;
              csk[jj] += double(v);
            }
          }
        }
        rp[i] = n_pos;
        rk[i] = n_keep;
        if (sv.on) {
          SoftRow<T> r = sv.row(i);
          r.hr = h_row;
          fc_soft_stats(L, P, td, w, r, cols, sv.linear, symmetric, sv.entropy, cxc, cen, xr + i, er ? er + i : nullptr);
        }
        rsp[i] = s_pos;
        rsk[i] = s_keep;
        if (!symmetric) {  // the row LSE here (else from the column statistics below, in one sweep)
          const T sh = lse_shift(m);
          T cnt = 0;
          const T acc = fc_row_exp(L, w, sh, &cnt);
          rl[i] = lse_from_parts(double(sh), double(cnt), double(acc));
        }
      }
    }
    if (symmetric) cs->add_chunk(lg, rows, T(1), T(0), rl + r0);
  }

  std::vector<Tensor> finish() {
    if (symmetric) {
      cs->finish(col_lse.data_ptr<double>());
      T* cp = col_pos.data_ptr<T>();
      T* ck = col_keep.data_ptr<T>();
      double* csp = col_sum_pos.data_ptr<double>();
      double* csk = col_sum_keep.data_ptr<double>();
      double* cxc = sv.on ? cross_col.data_ptr<double>() : nullptr;
      double* cen = sv.entropy ? ent_col.data_ptr<double>() : nullptr;
      for (int th = 0; th < nt; ++th) {
        for (int64_t j = 0; j < nb; ++j) {
          cp[j] += T(sums.at(th, 0)[j]);
          csp[j] += sums.at(th, 1)[j];
          ck[j] += T(sums.at(th, 2)[j]);
          csk[j] += sums.at(th, 3)[j];
          if (cxc) cxc[j] += sums.at(th, 4)[j];
          if (cen) cen[j] += sums.at(th, 5)[j];
        }
      }
    }
    std::vector<Tensor> out = {row_lse, row_pos, row_keep, row_sum_pos, row_sum_keep,
                               col_lse, col_pos, col_keep, col_sum_pos, col_sum_keep};
    if (sv.on) out.insert(out.end(), {cross_row, cross_col, ent_row, ent_col});
    return out;
  }
};

template <typename T>
std::vector<Tensor> target_stats_impl(const Tensor& a, const Tensor& b, T s, T bb, const TargetView& t,
                                      const SoftView<T>& sv, bool symmetric, bool smoothing, int64_t chunk_rows,
                                      int64_t cache_bytes) {
  StatsPass<T> pass(a, b, s, bb, t, sv, symmetric, smoothing, chunk_rows);
  std::vector<Tensor> cache;
  int64_t kept_bytes = 0;
  bool caching = true;
  Tensor buf, tbuf, gbuf;
  for_each_chunk(t, chunk_rows, [&](int64_t r0, int64_t rows, int64_t c0, int64_t w) {
    Tensor dot;
    const int64_t bytes = rows * w * int64_t(sizeof(T));
    if (caching && kept_bytes + bytes <= cache_bytes) {
      dot = at::empty({rows, w}, a.options());
      cache.push_back(dot);
      kept_bytes += bytes;
    } else {
      caching = false;
      dot = scratch_rows(buf, chunk_rows, rows, w, a.options());
    }
    at::mm_out(dot, a.narrow(0, r0, rows), b.narrow(0, c0, w).t());
    const T* tp = nullptr;  // the teacher's dot products of the chunk
    if (sv.on) {
      Tensor tdot = scratch_rows(tbuf, chunk_rows, rows, w, a.options());
      at::mm_out(tdot, sv.ta.narrow(0, r0, rows), sv.tb.narrow(0, c0, w).t());
      tp = tdot.data_ptr<T>();
    }
    pass.chunk(dot.data_ptr<T>(), tp, guide_chunk<T>(t, gbuf, chunk_rows, r0, rows, c0, w), r0, rows, c0, w);
  }, [&] { caching = false; });
  std::vector<Tensor> out = pass.finish();
  for (auto& c : cache) out.push_back(c);
  return out;
}

// A vector of weights for the columns, or null when absent.
template <typename T>
const T* opt_vec(const std::optional<Tensor>& v, const char* name, int64_t n) {
  if (!v.has_value() || !v->defined()) return nullptr;
  TORCH_CHECK(v->dim() == 1 && v->size(0) == n && v->is_contiguous() && v->device().is_cpu(),
              "fastcon::target_grad: ", name, " must be a contiguous CPU vector of length ", n);
  return v->data_ptr<T>();
}

// Pass 2 with soft targets for rows [r0, r0 + rows): the pairs decided into a row of logits (−inf
// where dropped) and positives, then G in place of the dot products by the vectorised kernel.
template <typename T>
void soft_grad_rows(const TargetView& t, const SoftView<T>& sv, T* dp, const T* tp, int64_t r0, int64_t rows,
                    int64_t c0, int64_t w, T s, T bb, const SplitLse<T>& rls, const T* qrp, const T* qrk, T wr,
                    const T* chi, const T* clo, const T* qcp, const T* qck, const T* wc, int nt,
                    std::vector<double>& gs_rows, std::vector<double>& gb_rows) {
  const bool symmetric = chi != nullptr;
#pragma omp parallel num_threads(nt) if (rows * w >= kMinParallelWork)
  {
    std::vector<T> logits(static_cast<size_t>(w));
    std::vector<T> pos(static_cast<size_t>(w));
    SoftCols<T> c = sv.cols(c0);
    if (symmetric) {
      c.shi = chi + c0;
      c.slo = clo + c0;
      c.qcp = qcp + c0;
      c.qck = qck + c0;
      c.wc = wc + c0;
    }
#pragma omp for schedule(static)
    for (int64_t li = 0; li < rows; ++li) {
      const int64_t i = r0 + li;
      T* d = dp + li * w;
      if (t.plain) {
        const int64_t rid = t.row(i, wire::kRowId);
        const int64_t* cids = t.col_ids.data() + c0;
        T* L = logits.data();
        T* P = pos.data();
#pragma omp simd
        for (int64_t jj = 0; jj < w; ++jj) {
          L[jj] = d[jj] * s + bb;
          P[jj] = (rid >= 0 && cids[jj] == rid) ? T(1) : T(0);
        }
      } else {
        const RowCtx<T> rc = row_ctx<T>(t, i, d, c0);
        for (int64_t jj = 0; jj < w; ++jj) {
          bool p = false;
          T v;
          const bool kept = decide<T>(t, rc, i, c0 + jj, d[jj], d[jj], s, bb, &p, &v);  // (no guide here)
          logits[size_t(jj)] = kept ? v : -inf<T>();
          pos[size_t(jj)] = (kept && p) ? T(1) : T(0);
        }
      }
      SoftRow<T> r = sv.row(i);
      r.wr = wr;
      r.shi = rls.hi[size_t(i)];
      r.slo = rls.lo[size_t(i)];
      r.qp = qrp[i];
      r.qk = qrk[i];
      T gs = 0, gb = 0;
      fc_soft_grad(d, d, logits.data(), pos.data(), tp + li * w, w, r, c, sv.linear, symmetric, &gs, &gb);
      gs_rows[size_t(i)] = double(gs);
      gb_rows[size_t(i)] = double(gb);
    }
  }
}

// The weights of pass 2 (targets.TargetWeights) as the kernels read them: the row and column LSEs
// split in (hi, lo), the targets at the positives and of the smoothing, the weights, the masses.
template <typename T>
struct GradWeights {
  bool symmetric = false;
  std::unique_ptr<SplitLse<T>> rls, cls;
  const T* qrp = nullptr;
  const T* qrk = nullptr;
  const T* qcp = nullptr;
  const T* qck = nullptr;
  const T* wc = nullptr;
  const T* row_mass = nullptr;
  const T* col_mass = nullptr;
  T wr = 0;
  std::vector<T> ones;  // a column mass of 1 where the target gives none

  GradWeights(const char* op, int64_t na, int64_t nb, const Tensor& row_lse, const Tensor& q_row_pos,
              const Tensor& q_row_keep, double w_row, const std::optional<Tensor>& col_lse,
              const std::optional<Tensor>& q_col_pos, const std::optional<Tensor>& q_col_keep,
              const std::optional<Tensor>& w_col, const T* row_mass_, const T* col_mass_)
      : row_mass(row_mass_), col_mass(col_mass_), wr(T(w_row)) {
    check_lse(op, "row_lse", row_lse, na);
    symmetric = col_lse.has_value() && col_lse->defined();
    if (symmetric) check_lse(op, "col_lse", *col_lse, nb);
    qrp = opt_vec<T>(q_row_pos, "q_row_pos", na);
    qrk = opt_vec<T>(q_row_keep, "q_row_keep", na);
    TORCH_CHECK(qrp != nullptr && qrk != nullptr, "fastcon::", op, ": q_row_pos and q_row_keep are required");
    for (const Tensor* v : {&q_row_pos, &q_row_keep}) {
      TORCH_CHECK(v->scalar_type() == c10::CppTypeToScalarType<T>::value, "fastcon::", op,
                  ": the row weights must have a's dtype");
    }
    rls.reset(new SplitLse<T>(row_lse.data_ptr<double>(), na));
    if (symmetric) {
      qcp = opt_vec<T>(q_col_pos, "q_col_pos", nb);
      qck = opt_vec<T>(q_col_keep, "q_col_keep", nb);
      wc = opt_vec<T>(w_col, "w_col", nb);
      TORCH_CHECK(qcp && qck && wc, "fastcon::", op, ": a symmetric loss needs the column weights");
      cls.reset(new SplitLse<T>(col_lse->data_ptr<double>(), nb));
      if (!col_mass) ones.assign(size_t(nb), T(1));
    }
  }
  const T* chi() const { return symmetric ? cls->hi.data() : nullptr; }
  const T* clo() const { return symmetric ? cls->lo.data() : nullptr; }
  // the columns' weights from column c0 on, as k_target_grad reads them
  TargetGradCols<T> cols(int64_t c0) const {
    if (!symmetric) return TargetGradCols<T>{};
    const T* mass = col_mass ? col_mass : ones.data();
    return TargetGradCols<T>{wc + c0, cls->hi.data() + c0, cls->lo.data() + c0, mass + c0, qck + c0};
  }
};

// G of a kept pair (i, j) with logit v (p: a positive), without soft targets.
template <typename T>
FC_INLINE T pair_grad(const GradWeights<T>& gw, int64_t i, int64_t j, T v, bool p) {
  const T rmass = gw.row_mass ? gw.row_mass[i] : T(1);  // a target mass (a row-LSE's upstream weight)
  T g = gw.wr * (softmax_minus_q<T>((v - gw.rls->hi[i]) - gw.rls->lo[i], rmass, p ? gw.qrp[i] : T(0)) - gw.qrk[i]);
  if (gw.symmetric && gw.wc[j] != T(0)) {
    const T cmass = gw.col_mass ? gw.col_mass[j] : T(1);
    g += gw.wc[j] * (softmax_minus_q<T>((v - gw.cls->hi[j]) - gw.cls->lo[j], cmass, p ? gw.qcp[j] : T(0)) -
                     gw.qck[j]);
  }
  return g;
}

// The row weights of row i as k_target_grad reads them.
template <typename T>
TargetGradRow<T> grad_row(const GradWeights<T>& gw, int64_t i) {
  return TargetGradRow<T>{gw.wr, gw.rls->hi[i], gw.rls->lo[i], gw.row_mass ? gw.row_mass[i] : T(1), gw.qrk[i]};
}

// Pass 2's G without soft targets, in place of the dot products dp of rows [r0, r0 + rows) × columns
// [c0, c0 + w) (gp: the guide's, or null); each row's Σ G·d and Σ G into gs_rows and gb_rows.
template <typename T>
void grad_rows(const TargetView& t, const GradWeights<T>& gw, T* dp, const T* gp, int64_t r0, int64_t rows,
               int64_t c0, int64_t w, T s, T bb, int nt, std::vector<double>& gs_rows, std::vector<double>& gb_rows) {
  const TargetGradCols<T> gcols = gw.cols(c0);
#pragma omp parallel for schedule(static) num_threads(nt) if (rows * w >= kMinParallelWork)
  for (int64_t li = 0; li < rows; ++li) {
    const int64_t i = r0 + li;
    T* d = dp + li * w;
    const T* gd = gp ? gp + li * w : d;  // (read before d is overwritten by G, each entry at its turn)
    const RowCtx<T> rc = row_ctx<T>(t, i, gd, c0);
    T gs = 0, gb = 0;
    if (t.plain) {  // every pair kept: the non-positives in one vectorised sweep, then the positives
      fc_target_grad(d, d, w, s, bb, t.col_ids.data() + c0, rc.id, grad_row(gw, i), gcols, gw.symmetric, &gs, &gb);
      t.for_each_positive(rc.id, c0, c0 + w, [&](int64_t j) {
        const T dv = d[j - c0];
        const T g = pair_grad(gw, i, j, dv * s + bb, true);
        gs += g * dv;
        gb += g;
        d[j - c0] = flush_subnormal(g);
      });
    }
    for (int64_t jj = 0; jj < w && !t.plain; ++jj) {
      const int64_t j = c0 + jj;
      const T dv = d[jj];
      bool p = false;
      T v;
      T g = T(0);
      if (decide<T>(t, rc, i, j, dv, gd[jj], s, bb, &p, &v)) g = pair_grad(gw, i, j, v, p);
      gs += g * dv;
      gb += g;
      d[jj] = flush_subnormal(g);
    }
    gs_rows[size_t(i)] += double(gs);
    gb_rows[size_t(i)] += double(gb);
  }
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor> target_grad_impl(const Tensor& a, const Tensor& b, T s, T bb,
                                                             const TargetView& t, const SoftView<T>& sv,
                                                             const GradWeights<T>& gw, int64_t chunk_rows,
                                                             const std::vector<Tensor>& cache) {
  const int64_t na = a.size(0), nb = b.size(0), dim = a.size(1);
  const int nt = team_threads();
  Tensor grad_a = at::zeros({na, dim}, a.options());
  Tensor grad_b = at::zeros({nb, dim}, a.options());
  std::vector<double> gs_rows(size_t(na), 0.0), gb_rows(size_t(na), 0.0);
  Tensor buf, tbuf, gbuf;
  size_t k = 0;  // the next cached chunk
  bool cached_prefix = true;
  for_each_chunk(t, chunk_rows, [&](int64_t r0, int64_t rows, int64_t c0, int64_t w) {
    Tensor dot;
    if (cached_prefix && k < cache.size()) {
      dot = cache[k++];
      TORCH_CHECK(dot.size(0) == rows && dot.size(1) == w, "fastcon::target_grad: cached chunk of shape ",
                  dot.sizes(), " where (", rows, ", ", w, ") was expected");
      dot = dot.clone();  // G is written in place; the cache stays the caller's
    } else {
      cached_prefix = false;
      dot = scratch_rows(buf, chunk_rows, rows, w, a.options());
      at::mm_out(dot, a.narrow(0, r0, rows), b.narrow(0, c0, w).t());
    }
    T* dp = dot.data_ptr<T>();
    const T* gp = guide_chunk<T>(t, gbuf, chunk_rows, r0, rows, c0, w);
    if (sv.on) {
      Tensor tdot = scratch_rows(tbuf, chunk_rows, rows, w, a.options());
      at::mm_out(tdot, sv.ta.narrow(0, r0, rows), sv.tb.narrow(0, c0, w).t());
      soft_grad_rows<T>(t, sv, dp, tdot.data_ptr<T>(), r0, rows, c0, w, s, bb, *gw.rls, gw.qrp, gw.qrk, gw.wr,
                        gw.chi(), gw.clo(), gw.qcp, gw.qck, gw.wc, nt, gs_rows, gb_rows);
    } else {
      grad_rows<T>(t, gw, dp, gp, r0, rows, c0, w, s, bb, nt, gs_rows, gb_rows);
    }
    Tensor ga = grad_a.narrow(0, r0, rows);
    at::addmm_out(ga, ga, dot, b.narrow(0, c0, w), /*beta=*/0, /*alpha=*/double(s));
    Tensor gbm = grad_b.narrow(0, c0, w);
    gbm.addmm_(dot.t(), a.narrow(0, r0, rows), /*beta=*/1, /*alpha=*/double(s));
  }, [&] { cached_prefix = false; });
  return {grad_a, grad_b, scalar_tensor(ordered_sum(gs_rows), a), scalar_tensor(ordered_sum(gb_rows), a)};
}

// The chunks of a prefix pass (for_each_chunk, as prefix.h's ``chunks``), each with the guide's tile
// (``gp``; null without a guide), formed once for every prefix.
template <typename T>
struct GuidedChunks {
  const TargetView& t;
  int64_t chunk_rows;
  Tensor buf;
  const T* gp = nullptr;
  template <typename Body>
  void operator()(Body&& body) {
    for_each_chunk(t, chunk_rows, [&](int64_t r0, int64_t rows, int64_t c0, int64_t w) {
      gp = guide_chunk<T>(t, buf, chunk_rows, r0, rows, c0, w);
      body(r0, rows, c0, w);
    }, [] {});
  }
};

template <typename T>
std::vector<Tensor> target_prefix_stats_impl(const Tensor& a, const Tensor& b, T s, T bb, const TargetView& t,
                                             const SoftView<T>& sv, bool symmetric, bool smoothing,
                                             int64_t chunk_rows, const Prefixes& p) {
  Tensor logits;  // one logits buffer for every prefix's pass (each is done with it before the next)
  std::vector<std::unique_ptr<StatsPass<T>>> passes;
  for (int64_t k = 0; k < p.k(); ++k) {
    passes.emplace_back(new StatsPass<T>(a, b, s, bb, t, sv, symmetric, smoothing, chunk_rows, &logits));
  }
  GuidedChunks<T> chunks{t, chunk_rows};
  prefix_forward<T>(a, b, p, chunk_rows, chunks, [&](int64_t k, const T* acc, auto&& tile, const PrefixScales<T>& sc,
                                                      int64_t r0, int64_t rows, int64_t c0, int64_t w) {
    if (t.plain && !sv.on) {  // the scales in the row sweep: no pass of their own
      passes[size_t(k)]->chunk(acc, nullptr, chunks.gp, r0, rows, c0, w, sc.row.data(), sc.col.data());
    } else {
      passes[size_t(k)]->chunk(tile(), nullptr, chunks.gp, r0, rows, c0, w);
    }
  });
  std::vector<Tensor> out;
  for (auto& pass : passes) {
    std::vector<Tensor> one = pass->finish();
    out.insert(out.end(), one.begin(), one.end());
  }
  return out;
}

// Pass 2 at every prefix (prefix.h: prefix_backward), G_k from the target's grad_rows.
template <typename T>
std::vector<Tensor> target_prefix_grad_impl(const Tensor& a, const Tensor& b, T s, T bb, const TargetView& t,
                                            const std::vector<std::unique_ptr<GradWeights<T>>>& gws,
                                            int64_t chunk_rows, const Prefixes& p) {
  const int nt = team_threads();
  std::vector<double> gs_rows(size_t(a.size(0)), 0.0), gb_rows(size_t(a.size(0)), 0.0);
  GuidedChunks<T> chunks{t, chunk_rows};
  auto make_g = [&](int64_t k, T* tile, int64_t r0, int64_t rows, int64_t c0, int64_t w) {
    grad_rows<T>(t, *gws[size_t(k)], tile, chunks.gp, r0, rows, c0, w, s, bb, nt, gs_rows, gb_rows);
  };
  // a plain target: H_k and the scales' terms in one sweep from the accumulator
  // (fc_prefix_target_grad), the positives formed exactly after it
  const int64_t nb = b.size(0), n_k = p.k();
  auto make_h = [&](int64_t k, T* h, const T* acc, const PrefixScales<T>& sc, int64_t r0, int64_t rows, int64_t c0,
                    int64_t w, T* col_terms, T* grs) {
    if (!t.plain) return false;
    const GradWeights<T>& gw = *gws[size_t(k)];
    const TargetGradCols<T> gcols = gw.cols(c0);
    const T* cs = sc.col.data();
#pragma omp parallel num_threads(nt) if (rows * w >= kMinParallelWork)
    {
      T* col = col_terms + size_t(omp_tid()) * size_t(nb);
#pragma omp for schedule(static)
      for (int64_t li = 0; li < rows; ++li) {
        const int64_t i = r0 + li;
        const int64_t rid = t.row(i, wire::kRowId);
        const T r = sc.row[size_t(i)];
        const T* P = acc + li * w;
        T* hr = h + li * w;
        T gs = 0, gb = 0;
        T rt = fc_prefix_target_grad(P, hr, w, s, bb, r, cs + c0, t.col_ids.data() + c0, rid, grad_row(gw, i), gcols,
                                     gw.symmetric, col, &gs, &gb);
        t.for_each_positive(rid, c0, c0 + w, [&](int64_t j) {
          const int64_t jj = j - c0;
          const T dv = P[jj] * r * cs[j];
          const T g = pair_grad(gw, i, j, dv * s + bb, true);
          gs += g * dv;
          gb += g;
          const T gp = flush_subnormal(g) * P[jj];
          rt += gp * cs[j];
          col[jj] += gp * r;
          hr[jj] = flush_subnormal(g) * r * cs[j];
        });
        grs[i * n_k + k] = rt;
        gs_rows[size_t(i)] += double(gs);
        gb_rows[size_t(i)] += double(gb);
      }
    }
    return true;
  };
  std::vector<Tensor> out = prefix_backward<T>(a, b, double(s), p, chunk_rows, chunks, make_g, make_h);
  out.insert(out.begin() + 2, {scalar_tensor(ordered_sum(gs_rows), a), scalar_tensor(ordered_sum(gb_rows), a)});
  return out;
}

// ---------------------------------------------------------------------------------------------
// Dispatcher entry points

std::vector<Tensor> target_stats(const Tensor& a, const Tensor& b, const Tensor& scale, const Tensor& bias,
                                 const Tensor& rows, const Tensor& cols, at::ArrayRef<double> numbers,
                                 const std::optional<Tensor>& mask, const std::optional<Tensor>& teacher_a,
                                 const std::optional<Tensor>& teacher_b, const std::optional<Tensor>& teacher_scale,
                                 const c10::List<std::optional<Tensor>>& vectors, bool symmetric, bool smoothing,
                                 int64_t chunk_rows, int64_t cache_bytes) {
  check_pair("target_stats", a, b, scale, bias, chunk_rows);
  std::vector<Tensor> keep;
  TargetView t = make_view("target_stats", rows, cols, numbers, mask, a.size(0), b.size(0));
  attach_guide(t, "target_stats", a, numbers, teacher_a, teacher_b);
  auto soft = [&](auto zero) {
    return make_soft<decltype(zero)>("target_stats", a, b, numbers, teacher_a, teacher_b, teacher_scale, vectors,
                                     symmetric, keep);
  };
  if (a.scalar_type() == at::kDouble)
    return target_stats_impl<double>(a, b, scalar_of<double>(scale), scalar_of<double>(bias), t, soft(0.0),
                                     symmetric, smoothing, chunk_rows, cache_bytes);
  return target_stats_impl<float>(a, b, scalar_of<float>(scale), scalar_of<float>(bias), t, soft(0.0f), symmetric,
                                  smoothing, chunk_rows, cache_bytes);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> target_grad(
    const Tensor& a, const Tensor& b, const Tensor& scale, const Tensor& bias, const Tensor& rows, const Tensor& cols,
    at::ArrayRef<double> numbers, const std::optional<Tensor>& mask, const std::optional<Tensor>& teacher_a,
    const std::optional<Tensor>& teacher_b, const std::optional<Tensor>& teacher_scale,
    const c10::List<std::optional<Tensor>>& vectors, const Tensor& row_lse, const Tensor& q_row_pos,
    const Tensor& q_row_keep, double w_row, const std::optional<Tensor>& col_lse,
    const std::optional<Tensor>& q_col_pos, const std::optional<Tensor>& q_col_keep,
    const std::optional<Tensor>& w_col, int64_t chunk_rows, at::TensorList cache) {
  check_pair("target_grad", a, b, scale, bias, chunk_rows);
  TargetView t = make_view("target_grad", rows, cols, numbers, mask, a.size(0), b.size(0));
  attach_guide(t, "target_grad", a, numbers, teacher_a, teacher_b);
  const std::vector<Tensor> chunks(cache.begin(), cache.end());
  std::vector<Tensor> keep;
  const bool symmetric = col_lse.has_value() && col_lse->defined();
  auto run = [&](auto zero) {
    using T = decltype(zero);
    const SoftView<T> sv = make_soft<T>("target_grad", a, b, numbers, teacher_a, teacher_b, teacher_scale, vectors,
                                        symmetric, keep);
    const GradWeights<T> gw("target_grad", a.size(0), b.size(0), row_lse, q_row_pos, q_row_keep, w_row, col_lse,
                            q_col_pos, q_col_keep, w_col, sv.row_mass, sv.col_mass);
    return target_grad_impl<T>(a, b, scalar_of<T>(scale), scalar_of<T>(bias), t, sv, gw, chunk_rows, chunks);
  };
  return a.scalar_type() == at::kDouble ? run(0.0) : run(0.0f);
}

// The checked target (with its guide) and prefixes of a prefix operator's call; soft targets take one
// engine call per prefix.
struct PrefixCall {
  TargetView t;
  Prefixes p;
  PrefixCall(const char* op, const Tensor& a, const Tensor& b, const Tensor& scale, const Tensor& bias,
             const Tensor& rows, const Tensor& cols, at::ArrayRef<double> numbers, const std::optional<Tensor>& mask,
             const std::optional<Tensor>& guide_a, const std::optional<Tensor>& guide_b, int64_t chunk_rows,
             at::IntArrayRef dims, const Tensor& row_scale, const Tensor& col_scale) {
    check_pair(op, a, b, scale, bias, chunk_rows);
    TORCH_CHECK(numbers[wire::kNumSoft] == 0.0, "fastcon::", op, ": soft targets take one engine call per prefix");
    t = make_view(op, rows, cols, numbers, mask, a.size(0), b.size(0));
    attach_guide(t, op, a, numbers, guide_a, guide_b);
    p = make_prefixes(op, a, b, dims, row_scale, col_scale);
  }
};

std::vector<Tensor> target_prefix_stats(const Tensor& a, const Tensor& b, const Tensor& scale, const Tensor& bias,
                                        const Tensor& rows, const Tensor& cols, at::ArrayRef<double> numbers,
                                        const std::optional<Tensor>& mask, const std::optional<Tensor>& guide_a,
                                        const std::optional<Tensor>& guide_b, bool symmetric, bool smoothing,
                                        int64_t chunk_rows, at::IntArrayRef dims, const Tensor& row_scale,
                                        const Tensor& col_scale) {
  const char* op = "target_prefix_stats";
  const PrefixCall call(op, a, b, scale, bias, rows, cols, numbers, mask, guide_a, guide_b, chunk_rows, dims,
                        row_scale, col_scale);
  const TargetView& t = call.t;
  const Prefixes& p = call.p;
  auto run = [&](auto zero) {
    using T = decltype(zero);
    const SoftView<T> none;
    return target_prefix_stats_impl<T>(a, b, scalar_of<T>(scale), scalar_of<T>(bias), t, none, symmetric, smoothing,
                                       chunk_rows, p);
  };
  return a.scalar_type() == at::kDouble ? run(0.0) : run(0.0f);
}

std::vector<Tensor> target_prefix_grad(
    const Tensor& a, const Tensor& b, const Tensor& scale, const Tensor& bias, const Tensor& rows, const Tensor& cols,
    at::ArrayRef<double> numbers, const std::optional<Tensor>& mask, const std::optional<Tensor>& guide_a,
    const std::optional<Tensor>& guide_b, at::TensorList row_lse, at::TensorList q_row_pos,
    at::TensorList q_row_keep, at::ArrayRef<double> w_row, const c10::List<std::optional<Tensor>>& col_lse,
    const c10::List<std::optional<Tensor>>& q_col_pos, const c10::List<std::optional<Tensor>>& q_col_keep,
    const c10::List<std::optional<Tensor>>& w_col, int64_t chunk_rows, at::IntArrayRef dims, const Tensor& row_scale,
    const Tensor& col_scale) {
  const char* op = "target_prefix_grad";
  const PrefixCall call(op, a, b, scale, bias, rows, cols, numbers, mask, guide_a, guide_b, chunk_rows, dims,
                        row_scale, col_scale);
  const TargetView& t = call.t;
  const Prefixes& p = call.p;
  const size_t n_k = size_t(p.k());
  TORCH_CHECK(row_lse.size() == n_k && q_row_pos.size() == n_k && q_row_keep.size() == n_k && w_row.size() == n_k &&
                  col_lse.size() == n_k && q_col_pos.size() == n_k && q_col_keep.size() == n_k &&
                  w_col.size() == n_k,
              "fastcon::", op, ": one set of weights per prefix");
  auto run = [&](auto zero) {
    using T = decltype(zero);
    std::vector<std::unique_ptr<GradWeights<T>>> gws;
    for (size_t k = 0; k < n_k; ++k) {
      gws.emplace_back(new GradWeights<T>(op, a.size(0), b.size(0), row_lse[k], q_row_pos[k], q_row_keep[k],
                                          w_row[k], col_lse.get(k), q_col_pos.get(k), q_col_keep.get(k),
                                          w_col.get(k), nullptr, nullptr));
    }
    return target_prefix_grad_impl<T>(a, b, scalar_of<T>(scale), scalar_of<T>(bias), t, gws, chunk_rows, p);
  };
  return a.scalar_type() == at::kDouble ? run(0.0) : run(0.0f);
}

}  // namespace
}  // namespace cpu
}  // namespace fastcon

TORCH_LIBRARY_FRAGMENT(fastcon, m) {
  m.def(
      "target_stats(Tensor a, Tensor b, Tensor scale, Tensor bias, Tensor rows, Tensor cols, "
      "float[] numbers, Tensor? mask, Tensor? teacher_a, Tensor? teacher_b, Tensor? teacher_scale, "
      "Tensor?[] vectors, bool symmetric, bool smoothing, int chunk_rows, int cache_bytes) -> Tensor[]");
  m.def(
      "target_grad(Tensor a, Tensor b, Tensor scale, Tensor bias, Tensor rows, Tensor cols, "
      "float[] numbers, Tensor? mask, Tensor? teacher_a, Tensor? teacher_b, Tensor? teacher_scale, "
      "Tensor?[] vectors, Tensor row_lse, "
      "Tensor q_row_pos, Tensor q_row_keep, "
      "float w_row, Tensor? col_lse, Tensor? q_col_pos, Tensor? q_col_keep, Tensor? w_col, int chunk_rows, "
      "Tensor[] cache) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "target_prefix_stats(Tensor a, Tensor b, Tensor scale, Tensor bias, Tensor rows, Tensor cols, "
      "float[] numbers, Tensor? mask, Tensor? guide_a, Tensor? guide_b, bool symmetric, bool smoothing, "
      "int chunk_rows, int[] dims, Tensor row_scale, Tensor col_scale) -> Tensor[]");
  m.def(
      "target_prefix_grad(Tensor a, Tensor b, Tensor scale, Tensor bias, Tensor rows, Tensor cols, "
      "float[] numbers, Tensor? mask, Tensor? guide_a, Tensor? guide_b, Tensor[] row_lse, Tensor[] q_row_pos, "
      "Tensor[] q_row_keep, float[] w_row, Tensor?[] col_lse, Tensor?[] q_col_pos, Tensor?[] q_col_keep, "
      "Tensor?[] w_col, int chunk_rows, int[] dims, Tensor row_scale, Tensor col_scale) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(fastcon, CPU, m) {
  m.impl("target_stats", &fastcon::cpu::target_stats);
  m.impl("target_grad", &fastcon::cpu::target_grad);
  m.impl("target_prefix_stats", &fastcon::cpu::target_prefix_stats);
  m.impl("target_prefix_grad", &fastcon::cpu::target_prefix_grad);
}

TORCH_LIBRARY_FRAGMENT(fastcon, m) {
  m.def("target_format() -> int[]", [] { return fastcon::wire::format_indices(); });
}
