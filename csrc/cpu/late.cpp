// Late interaction of token sets (FILIP, MaxSim; docs/losses.md §3.1 and §3.4) on the CPU.
//
// For items i of x (Bx, nx, D) and j of y (By, ny, D), with masks True for real tokens, the pair's
// tile is t_kr = x_ik·y_jr (nx × ny). The op returns the two sums of maxima
//
//   sx[i, j] = Σ_{k real} max_{r real} t_kr      sy[i, j] = Σ_{r real} max_{k real} t_kr
//
// FILIP divides them by the token counts (its two means), MaxSim takes sx with queries as x. Padding
// is −inf before every max, never zero; a NaN product among a pair's real entries makes both of its
// statistics NaN (a max by comparisons would drop it). Blocks of x items form one GEMM against all of y (a
// c·nx × By·ny tile, the only large buffer); the pairs' reductions run in parallel over it.
//
// The gradient op forms the same tiles again and takes each max's argmax (ties: the lowest index),
// then adds g·y_{j,r*} to x_{ik} (and g·x_{i,k*} to y_{jr}) by gathers: O((nx + ny)·D) per pair
// beside the tile's O(nx·ny·D). The x rows are owned by one thread in one pass and the y rows by one
// thread in a second, each summing in a fixed order, so the result does not depend on the thread count.
// Float gradients are summed wide: runs of float sums added in double (see kRun).
#include <torch/library.h>

#include "engine.h"

namespace fastcon {
namespace cpu {
namespace {

void check_late(const char* op, const Tensor& x, const Tensor& y, const Tensor& xm, const Tensor& ym,
                int64_t block) {
  TORCH_CHECK(x.dim() == 3 && y.dim() == 3, "fastcon::", op, ": x and y must be 3-D (B, n, D) tensors, got ",
              x.sizes(), " and ", y.sizes());
  TORCH_CHECK(x.size(2) == y.size(2), "fastcon::", op, ": x and y must have the same feature dimension D, got ",
              x.sizes(), " and ", y.sizes());
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "fastcon::", op, ": x and y must have the same dtype, got ",
              x.scalar_type(), " and ", y.scalar_type());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "fastcon::", op,
              ": float32 and float64 inputs only (upcast bf16/fp16 first), got ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu() && xm.device().is_cpu() && ym.device().is_cpu(),
              "fastcon::", op, ": every input must be a CPU tensor");
  TORCH_CHECK(x.is_contiguous() && y.is_contiguous(), "fastcon::", op, ": x and y must be contiguous");
  for (const Tensor* m : {&xm, &ym}) {
    const Tensor& v = (m == &xm) ? x : y;
    TORCH_CHECK(m->scalar_type() == at::kBool && m->dim() == 2 && m->size(0) == v.size(0) &&
                    m->size(1) == v.size(1) && m->is_contiguous(),
                "fastcon::", op, ": ", (m == &xm) ? "x_mask" : "y_mask", " must be a contiguous bool (B, n) tensor ",
                "matching its features, got ", m->scalar_type(), " ", m->sizes());
  }
  TORCH_CHECK(block >= 1, "fastcon::", op, ": block must be >= 1, got ", block);
}

// The gathered rows of late_grad_t are summed wide for float: a destination row takes its terms in runs
// of kRun, summed in float in the row itself (the plain axpy), and each run's sum is added to a double
// copy of the row. A row can take up to Bx·nx terms (a token that is the argmax of every token of every
// item on the other side), and one float running sum over them all drifts by several times the error of
// the materialised formula's GEMM, which sums in blocks. Runs of 8 keep the gradients within that error
// at about half the extra time of a double add for every term.
constexpr int32_t kRun = 8;

// wide[0:n] += part[0:n] (wide = part for a row's first run), then part = 0.
FC_CLONES void flush_run(double* __restrict wide, float* __restrict part, int64_t n, bool first) {
  if (first) {
#pragma omp simd
    for (int64_t e = 0; e < n; ++e) wide[e] = double(part[e]);
  } else {
#pragma omp simd
    for (int64_t e = 0; e < n; ++e) wide[e] += double(part[e]);
  }
#pragma omp simd
  for (int64_t e = 0; e < n; ++e) part[e] = 0.0f;
}

// part[0:n] = wide[0:n] + part[0:n], rounded once.
FC_CLONES void finish_row(float* __restrict part, const double* __restrict wide, int64_t n) {
#pragma omp simd
  for (int64_t e = 0; e < n; ++e) part[e] = float(wide[e] + double(part[e]));
}

// rows[q] += g·src, counting the row's terms in count[q] and ending a run at every kRun-th; a float64
// row is summed in place.
FC_INLINE void add_term(float* rows, double* wide, int32_t* count, int64_t q, const float* src, int64_t d, float g) {
  fc_axpy(rows + q * d, src, d, g);
  if (++count[q] % kRun == 0) flush_run(wide + q * d, rows + q * d, d, count[q] == kRun);
}

FC_INLINE void add_term(double* rows, double*, int32_t*, int64_t q, const double* src, int64_t d, double g) {
  fc_axpy(rows + q * d, src, d, g);
}

// The sums of rows[0:n] with their double rows.
FC_INLINE void finish_rows(float* rows, const double* wide, const int32_t* count, int64_t n, int64_t d) {
  for (int64_t q = 0; q < n; ++q)
    if (count[q] >= kRun) finish_row(rows + q * d, wide + q * d, d);
}

FC_INLINE void finish_rows(double*, const double*, const int32_t*, int64_t, int64_t) {}

int64_t pair_grain(int64_t nx, int64_t ny) {
  return std::max<int64_t>(1, kMinParallelWork / std::max<int64_t>(1, nx * ny));
}

// One pair of a block: its tile rows (row k at d + k·ld), y's mask row as 0 (real) / −inf (padding),
// and a thread's scratch of ny values (the column maxima).
template <typename T>
struct PairTile {
  int64_t p, i, j;  // the pair's index in the block, its x item and its y item
  const T* d;
  int64_t ld;
  const T* madd;
  T* cmax;
};

// The walk both ops share: for each block of `block` x items, one GEMM tile of the block's tokens
// against every y token ((c·nx) × (By·ny)), then pair(PairTile) for every pair of the block, in
// parallel over the pairs; then after_block(i0, c) on the calling thread.
template <typename T, typename Pair, typename After>
void for_each_pair(const Tensor& x, const Tensor& y, const Tensor& ym, int64_t block, Pair pair, After after_block) {
  const int64_t bx = x.size(0), nx = x.size(1), by = y.size(0), ny = y.size(1);
  const Tensor yflat = y.reshape({by * ny, y.size(2)});
  const Tensor madd_t = at::zeros(ym.sizes(), x.options()).masked_fill_(ym.logical_not(), -inf<T>());
  const T* madd = madd_t.data_ptr<T>();
  const int64_t ld = by * ny;
  for (int64_t i0 = 0; i0 < bx; i0 += block) {
    const int64_t c = std::min(block, bx - i0);
    const Tensor tile = at::mm(x.narrow(0, i0, c).reshape({c * nx, x.size(2)}), yflat.t());
    const T* tp = tile.data_ptr<T>();
    at::parallel_for(0, c * by, pair_grain(nx, ny), [&](int64_t p0, int64_t p1) {
      std::vector<T> cmax(static_cast<size_t>(ny));
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t li = p / by, j = p % by;
        std::fill(cmax.begin(), cmax.end(), -inf<T>());
        pair(PairTile<T>{p, i0 + li, j, tp + li * nx * ld + j * ny, ld, madd + j * ny, cmax.data()});
      }
    });
    after_block(i0, c);
  }
}

template <typename T>
std::vector<Tensor> late_stats_t(const Tensor& x, const Tensor& y, const Tensor& xm, const Tensor& ym, bool want_x,
                                 bool want_y, int64_t block) {
  const int64_t bx = x.size(0), nx = x.size(1), by = y.size(0), ny = y.size(1);
  Tensor sx = at::zeros({want_x ? bx : 0, by}, x.options());
  Tensor sy = at::zeros({want_y ? bx : 0, by}, x.options());
  if (bx == 0 || by == 0 || (!want_x && !want_y)) return {sx, sy};
  const bool* xmp = xm.data_ptr<bool>();
  T* sxp = sx.data_ptr<T>();
  T* syp = sy.data_ptr<T>();
  const T quiet = std::numeric_limits<T>::quiet_NaN();
  auto pair = [&](const PairTile<T>& t) {
    double acc = 0;
    bool nan = false;  // a NaN product among the real pairs: both statistics are NaN
    for (int64_t k = 0; k < nx; ++k) {
      if (!xmp[t.i * nx + k]) continue;
      acc += fc_late_row(t.d + k * t.ld, t.madd, ny, want_y ? t.cmax : nullptr, nullptr, 0, &nan);
    }
    if (want_x) sxp[t.i * by + t.j] = nan ? quiet : T(acc);
    if (want_y) {
      double acc_y = 0;
      for (int64_t r = 0; r < ny; ++r)
        if (t.madd[r] == T(0)) acc_y += t.cmax[r];
      syp[t.i * by + t.j] = nan ? quiet : T(acc_y);
    }
  };
  for_each_pair<T>(x, y, ym, block, pair, [](int64_t, int64_t) {});
  return {sx, sy};
}

template <typename T>
std::vector<Tensor> late_grad_t(const Tensor& x, const Tensor& y, const Tensor& xm, const Tensor& ym,
                                const c10::optional<Tensor>& gx_opt, const c10::optional<Tensor>& gy_opt,
                                int64_t block) {
  const int64_t bx = x.size(0), nx = x.size(1), by = y.size(0), ny = y.size(1), d = x.size(2);
  Tensor dx = at::zeros_like(x), dy = at::zeros_like(y);
  const bool hx = gx_opt.has_value() && gx_opt->defined(), hy = gy_opt.has_value() && gy_opt->defined();
  for (const c10::optional<Tensor>* g : {&gx_opt, &gy_opt}) {
    if (!g->has_value() || !(*g)->defined()) continue;
    const Tensor& t = **g;
    TORCH_CHECK(t.dim() == 2 && t.size(0) == bx && t.size(1) == by && t.scalar_type() == x.scalar_type() &&
                    t.is_contiguous() && t.device().is_cpu(),
                "fastcon::late_grad: grad_x and grad_y must be contiguous (Bx, By) CPU tensors of x's dtype, got ",
                t.scalar_type(), " ", t.sizes());
  }
  if (bx == 0 || by == 0 || (!hx && !hy)) return {dx, dy};
  const bool* xmp = xm.data_ptr<bool>();
  const T* gxp = hx ? gx_opt->data_ptr<T>() : nullptr;
  const T* gyp = hy ? gy_opt->data_ptr<T>() : nullptr;
  const T* xp = x.data_ptr<T>();
  const T* yp = y.data_ptr<T>();
  T* dxp = dx.data_ptr<T>();
  T* dyp = dy.data_ptr<T>();
  // float: the double rows of dy (written by a row's first run) and every y row's term count
  const bool two_level = x.scalar_type() == at::kFloat;
  Tensor dy_wide = at::empty({two_level ? by * ny * d : 0}, y.options().dtype(at::kDouble));
  Tensor dy_count = at::zeros({two_level ? by * ny : 0}, y.options().dtype(at::kInt));
  double* dywp = dy_wide.data_ptr<double>();
  int32_t* dycp = dy_count.data_ptr<int32_t>();
  // argmaxes of a block's pairs: rarg[p, k] = r*, carg[p, r] = k* (−1: padding)
  const int64_t block_items = std::min(block, bx);
  Tensor rarg = at::empty({block_items * by * nx}, x.options().dtype(at::kInt));
  Tensor carg = at::empty({block_items * by * ny}, x.options().dtype(at::kInt));
  int32_t* rap = rarg.data_ptr<int32_t>();
  int32_t* cap = carg.data_ptr<int32_t>();
  auto pair = [&](const PairTile<T>& t) {
    int32_t* ra = rap + t.p * nx;
    int32_t* ca = cap + t.p * ny;
    std::fill(ca, ca + ny, int32_t(-1));
    for (int64_t k = 0; k < nx; ++k) {
      if (!xmp[t.i * nx + k]) {
        ra[k] = -1;
        continue;
      }
      const T* row = t.d + k * t.ld;
      bool nan = false;  // NaN products: the upstream gradient is NaN then, and so are the gradients
      const T m = fc_late_row(row, t.madd, ny, hy ? t.cmax : nullptr, hy ? ca : nullptr, int32_t(k), &nan);
      int64_t r = 0;
      while (r < ny && !(t.madd[r] == T(0) && row[r] == m)) ++r;  // the first maximum among the real tokens
      ra[k] = r < ny ? int32_t(r) : -1;
    }
  };
  auto gradients = [&](int64_t i0, int64_t c) {
    // x's gradient: each item of the block owns its rows (their double rows in a thread's scratch)
    at::parallel_for(0, c, 1, [&](int64_t l0, int64_t l1) {
      std::vector<double> wide(static_cast<size_t>(two_level ? nx * d : 0));
      std::vector<int32_t> count(static_cast<size_t>(nx));
      for (int64_t li = l0; li < l1; ++li) {
        const int64_t i = i0 + li;
        T* dxi = dxp + i * nx * d;
        std::fill(count.begin(), count.end(), 0);
        for (int64_t j = 0; j < by; ++j) {
          const T g1 = hx ? gxp[i * by + j] : T(0), g2 = hy ? gyp[i * by + j] : T(0);
          const int32_t* ra = rap + (li * by + j) * nx;
          const int32_t* ca = cap + (li * by + j) * ny;
          const T* yj = yp + j * ny * d;
          if (g1 != T(0))
            for (int64_t k = 0; k < nx; ++k)
              if (ra[k] >= 0) add_term(dxi, wide.data(), count.data(), k, yj + int64_t(ra[k]) * d, d, g1);
          if (g2 != T(0))
            for (int64_t r = 0; r < ny; ++r)
              if (ca[r] >= 0) add_term(dxi, wide.data(), count.data(), ca[r], yj + r * d, d, g2);
        }
        finish_rows(dxi, wide.data(), count.data(), nx, d);
      }
    });
    // y's gradient: each y item owns its rows and takes the block's items in order
    at::parallel_for(0, by, 1, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        T* dyj = dyp + j * ny * d;
        double* wj = two_level ? dywp + j * ny * d : nullptr;
        int32_t* cj = two_level ? dycp + j * ny : nullptr;
        for (int64_t li = 0; li < c; ++li) {
          const int64_t i = i0 + li;
          const T g1 = hx ? gxp[i * by + j] : T(0), g2 = hy ? gyp[i * by + j] : T(0);
          const int32_t* ra = rap + (li * by + j) * nx;
          const int32_t* ca = cap + (li * by + j) * ny;
          const T* xi = xp + i * nx * d;
          if (g1 != T(0))
            for (int64_t k = 0; k < nx; ++k)
              if (ra[k] >= 0) add_term(dyj, wj, cj, ra[k], xi + k * d, d, g1);
          if (g2 != T(0))
            for (int64_t r = 0; r < ny; ++r)
              if (ca[r] >= 0) add_term(dyj, wj, cj, r, xi + int64_t(ca[r]) * d, d, g2);
        }
      }
    });
  };
  for_each_pair<T>(x, y, ym, block, pair, gradients);
  if (two_level)
    at::parallel_for(0, by, 1, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) finish_rows(dyp + j * ny * d, dywp + j * ny * d, dycp + j * ny, ny, d);
    });
  return {dx, dy};
}

std::vector<Tensor> late_stats(const Tensor& x, const Tensor& y, const Tensor& x_mask, const Tensor& y_mask,
                               bool want_x, bool want_y, int64_t block) {
  check_late("late_stats", x, y, x_mask, y_mask, block);
  if (x.scalar_type() == at::kDouble) return late_stats_t<double>(x, y, x_mask, y_mask, want_x, want_y, block);
  return late_stats_t<float>(x, y, x_mask, y_mask, want_x, want_y, block);
}

std::vector<Tensor> late_grad(const Tensor& x, const Tensor& y, const Tensor& x_mask, const Tensor& y_mask,
                              const c10::optional<Tensor>& grad_x, const c10::optional<Tensor>& grad_y,
                              int64_t block) {
  check_late("late_grad", x, y, x_mask, y_mask, block);
  if (x.scalar_type() == at::kDouble) return late_grad_t<double>(x, y, x_mask, y_mask, grad_x, grad_y, block);
  return late_grad_t<float>(x, y, x_mask, y_mask, grad_x, grad_y, block);
}

}  // namespace
}  // namespace cpu
}  // namespace fastcon

TORCH_LIBRARY_FRAGMENT(fastcon, m) {
  m.def("late_stats(Tensor x, Tensor y, Tensor x_mask, Tensor y_mask, bool want_x, bool want_y, int block) "
        "-> Tensor[]");
  m.def("late_grad(Tensor x, Tensor y, Tensor x_mask, Tensor y_mask, Tensor? grad_x, Tensor? grad_y, int block) "
        "-> Tensor[]");
}

TORCH_LIBRARY_IMPL(fastcon, CPU, m) {
  m.impl("late_stats", &fastcon::cpu::late_stats);
  m.impl("late_grad", &fastcon::cpu::late_grad);
}
