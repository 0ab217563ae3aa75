// Shared pieces of the fastcon CPU engine (engine.cpp: CLIP/SigLIP; target.cpp: the general target):
// threading helpers, input checks, the float64 LSE from its parts, the column statistics of the
// statistics pass and the split LSEs of the gradient pass.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "kernels.h"

namespace fastcon {
namespace cpu {

using at::Tensor;

inline int team_threads() { return std::max(1, at::get_num_threads()); }

// Below this many logits an epilogue runs on the calling thread: waking a team costs more than
// the work (and much more when the cores are oversubscribed).
constexpr int64_t kMinParallelWork = int64_t(1) << 15;

inline int omp_tid() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

inline int omp_team() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

// ---------------------------------------------------------------------------------------------
// Input checks

inline void check_pair(const char* op, const Tensor& a, const Tensor& b, const Tensor& scale, const Tensor& bias,
                int64_t chunk_rows) {
  TORCH_CHECK(a.dim() == 2, "fastcon::", op, ": a must be a 2-D (Na, D) tensor, got shape ", a.sizes());
  TORCH_CHECK(b.dim() == 2, "fastcon::", op, ": b must be a 2-D (Nb, D) tensor, got shape ", b.sizes());
  TORCH_CHECK(a.size(1) == b.size(1), "fastcon::", op, ": a and b must have the same feature dimension D, got a ",
              a.sizes(), " and b ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "fastcon::", op, ": a and b must have the same dtype, got ",
              a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble, "fastcon::", op,
              ": the CPU engine supports float32 and float64 inputs (upcast bf16/fp16 to float32 first), got ",
              a.scalar_type());
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), "fastcon::", op, ": a and b must be CPU tensors, got ",
              a.device(), " and ", b.device());
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous(), "fastcon::", op,
              ": a and b must be contiguous (call .contiguous() first)");
  for (const Tensor* t : {&scale, &bias}) {
    const char* name = (t == &scale) ? "scale" : "bias";
    TORCH_CHECK(t->dim() == 0, "fastcon::", op, ": ", name, " must be a 0-d tensor, got shape ", t->sizes());
    TORCH_CHECK(t->device().is_cpu(), "fastcon::", op, ": ", name, " must be a CPU tensor, got ", t->device());
    TORCH_CHECK(t->is_floating_point(), "fastcon::", op, ": ", name, " must be a floating-point tensor, got ",
                t->scalar_type());
  }
  TORCH_CHECK(chunk_rows >= 1, "fastcon::", op, ": chunk_rows must be >= 1, got ", chunk_rows);
}

// An LSE input: float64 for every input dtype (see "LSE precision" in fastcon/kernels/__init__.py).
inline void check_lse(const char* op, const char* name, const Tensor& v, int64_t n) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == n, "fastcon::", op, ": ", name, " must be a 1-D tensor of length ", n,
              ", got shape ", v.sizes());
  TORCH_CHECK(v.scalar_type() == at::kDouble, "fastcon::", op, ": ", name,
              " must be a float64 tensor (the LSE statistics are float64 for every input dtype, as lse_stats "
              "returns them), got ", v.scalar_type());
  TORCH_CHECK(v.device().is_cpu() && v.is_contiguous(), "fastcon::", op, ": ", name,
              " must be a contiguous CPU tensor");
}

template <typename T>
T scalar_of(const Tensor& t) {
  return static_cast<T>(t.item<double>());
}

// ---------------------------------------------------------------------------------------------
// LSEs are float64 (see "LSE precision" in fastcon/kernels/__init__.py), formed from their parts:
// shift + log(count + sum), with `count` the number of terms at the shift (each exactly exp(0) = 1)
// and `sum` the others, summed apart so that they keep their precision when they are tiny.
inline double lse_from_parts(double shift, double count, double sum) { return shift + std::log1p((count - 1.0) + sum); }

// Column statistics: per-thread running (max, count at the max, Σexp of the rest) accumulators.

template <typename T>
struct ColStats {
  int64_t nb;
  int nt;
  int64_t tile;                     // rows per tile of the two-sweep epilogue
  std::vector<T> storage;           // per thread: cmax, tile_sum, csh, tmax, tile_cnt (nb each)
  std::vector<double> total_sum;    // per thread: Σ exp(S − csh) over the tiles seen, S != csh (nb each)
  std::vector<double> total_cnt;    // per thread: how many S == csh (nb each)

  ColStats(int64_t nb_, int nt_) : nb(nb_), nt(nt_) {
    // A tile of rows is swept twice; keep it around 256 KiB so the second sweep hits L2.
    const int64_t target = (int64_t(256) << 10) / int64_t(sizeof(T));
    tile = std::min<int64_t>(64, std::max<int64_t>(1, target / std::max<int64_t>(nb, 1)));
    storage.resize(size_t(nt) * 5 * size_t(nb));
    total_sum.assign(size_t(nt) * size_t(nb), 0.0);
    total_cnt.assign(size_t(nt) * size_t(nb), 0.0);
    for (int t = 0; t < nt; ++t) {
      std::fill(cmax(t), cmax(t) + nb, -inf<T>());
      std::fill(tile_sum(t), tile_sum(t) + nb, T(0));
      std::fill(csh(t), csh(t) + nb, T(0));
      std::fill(tile_cnt(t), tile_cnt(t) + nb, T(0));
    }
  }
  T* base(int t) { return storage.data() + size_t(t) * 5 * size_t(nb); }
  T* cmax(int t) { return base(t); }
  T* tile_sum(int t) { return base(t) + nb; }
  T* csh(int t) { return base(t) + 2 * nb; }
  T* tmax(int t) { return base(t) + 3 * nb; }
  T* tile_cnt(int t) { return base(t) + 4 * nb; }
  double* total(int t) { return total_sum.data() + size_t(t) * size_t(nb); }
  double* count(int t) { return total_cnt.data() + size_t(t) * size_t(nb); }

  // Stats of `rows` rows of unscaled dot products `dot` (rows × nb, row-major). Writes the (float64)
  // row LSEs and folds the columns into the accumulators of the thread that owns each row block. A
  // column's sum runs over up to Na rows: it is accumulated in T within a tile (<= 64 rows) and in
  // double across tiles, so its rounding error does not grow with Na.
  void add_chunk(const T* dot, int64_t rows, T s, T b, double* row_lse) {
    if (rows == 0) return;
#pragma omp parallel num_threads(nt) if (rows * nb >= kMinParallelWork)
    {
      const int tid = omp_tid();
      const int team = omp_team();
      const int64_t r0 = rows * tid / team, r1 = rows * (tid + 1) / team;
      T* cm = cmax(tid);
      T* ts = tile_sum(tid);
      T* sh = csh(tid);
      T* tm = tmax(tid);
      double* tot = total(tid);
      double* cnt = count(tid);
      T* tc = tile_cnt(tid);
      T rmax[64];
      for (int64_t t0 = r0; t0 < r1; t0 += tile) {
        const int64_t t1 = std::min(r1, t0 + tile);
        std::copy(cm, cm + nb, tm);
        for (int64_t i = t0; i < t1; ++i) rmax[i - t0] = fc_rowmax_colmax(dot + i * nb, nb, s, b, tm);
        // Move the double totals to the new shifts (rare after the first tiles: the max settles); the
        // terms at the old shift are no longer 1 and join the sum.
        for (int64_t j = 0; j < nb; ++j) {
          if (tm[j] != cm[j] && cm[j] != -inf<T>()) {
            tot[j] = (tot[j] + cnt[j]) * std::exp(double(sh[j]) - double(lse_shift(tm[j])));
            cnt[j] = 0.0;
          }
        }
        fc_rescale(cm, ts, sh, tm, nb);  // ts is all zero here: this only updates cmax and the shifts
        for (int64_t i = t0; i < t1; ++i) {
          const T rsh = lse_shift(rmax[i - t0]);
          T rc = 0;
          const T acc = fc_rowexp_colexp(dot + i * nb, nb, s, b, rsh, sh, ts, tc, &rc);
          row_lse[i] = lse_from_parts(double(rsh), double(rc), double(acc));
        }
        for (int64_t j = 0; j < nb; ++j) {
          tot[j] += double(ts[j]);
          cnt[j] += double(tc[j]);
          ts[j] = T(0);
          tc[j] = T(0);
        }
      }
    }
  }

  // col_lse_j = logsumexp over every row seen, merging the thread partials in thread order.
  void finish(double* col_lse) {
    const int n_threads = nt;
#pragma omp parallel for schedule(static) num_threads(nt) if (nb * nt >= kMinParallelWork)
    for (int64_t j = 0; j < nb; ++j) {
      T m = -inf<T>();
      for (int t = 0; t < n_threads; ++t) m = std::max(m, cmax(t)[j]);
      const T shift = lse_shift(m);
      double sum = 0, n_at_shift = 0;
      for (int t = 0; t < n_threads; ++t) {
        const T mt = cmax(t)[j];
        if (mt == -inf<T>()) continue;
        if (mt == m) {  // same shift
          sum += total(t)[j];
          n_at_shift += count(t)[j];
        } else {
          sum += (total(t)[j] + count(t)[j]) * std::exp(double(csh(t)[j]) - double(shift));
        }
      }
      col_lse[j] = lse_from_parts(double(shift), n_at_shift, sum);
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Gradient epilogues (in place: the dot products of the rows become G).

// The float64 LSEs of the gradient pass, each also split in hi = T(lse), lo = T(lse − hi) for the
// element loops (hi + lo = lse to twice the precision of T; for T = double, lo = 0). An infinite (or
// out of range of T) LSE gives lo = 0, so that (S − hi) − lo stays ±inf and exp of it 0 or inf.
template <typename T>
struct SplitLse {
  const double* lse;
  std::vector<T> hi, lo;
  SplitLse(const double* lse_, int64_t n) : lse(lse_), hi(size_t(n)), lo(size_t(n)) {
    for (int64_t i = 0; i < n; ++i) {
      const T h = T(lse[i]);
      hi[i] = h;
      lo[i] = std::isfinite(h) ? T(lse[i] - double(h)) : T(0);
    }
  }
};


inline double ordered_sum(const std::vector<double>& v) {
  double acc = 0;
  for (double x : v) acc += x;
  return acc;
}

inline Tensor scalar_tensor(double v, const Tensor& like) { return at::scalar_tensor(v, like.options()); }

// dot(rows) = A[r0:r0+rows] · Bᵀ into `out` (rows × Nb, contiguous).
inline void gemm_dot(Tensor& out, const Tensor& a, const Tensor& b, int64_t r0, int64_t rows) {
  at::mm_out(out, a.narrow(0, r0, rows), b.t());
}

// grad_a[r0:r0+rows] = s·G·B and grad_b += s·Gᵀ·A[r0:r0+rows].
inline void gemm_grads(const Tensor& g, const Tensor& a, const Tensor& b, int64_t r0, int64_t rows, double s,
                       Tensor& grad_a, Tensor& grad_b) {
  Tensor ga = grad_a.narrow(0, r0, rows);
  at::addmm_out(ga, ga, g, b, /*beta=*/0, /*alpha=*/s);
  grad_b.addmm_(g.t(), a.narrow(0, r0, rows), /*beta=*/1, /*alpha=*/s);
}

}  // namespace cpu
}  // namespace fastcon
