// Matryoshka prefixes in one pass over D (fastcon/kernels/__init__.py, docs/engine.md), shared by the
// general target (target.cpp) and the sigmoid loss (engine.cpp): prefix k's tile is r_k ⊙ P_k ⊙ c_k
// with P_k = A[:, :d_k]·B[:, :d_k]ᵀ, all read from one accumulator to which each D slice adds its GEMM
// (the smallest prefix first).
#pragma once

#include <vector>
#include "engine.h"

namespace fastcon {
namespace cpu {

// A rows × w view of a scratch buffer of chunk_rows × w, (re)allocated when too small.
inline Tensor scratch_rows(Tensor& buf, int64_t chunk_rows, int64_t rows, int64_t w, const at::TensorOptions& options) {
  if (!buf.defined() || buf.numel() < rows * w) buf = at::empty({chunk_rows * w}, options);
  return buf.narrow(0, 0, rows * w).view({rows, w});
}


struct Prefixes {
  std::vector<int64_t> dims;  // d_0 > d_1 > … > d_{K−1}
  Tensor row_scale, col_scale;  // (Na, K), (Nb, K)
  int64_t k() const { return int64_t(dims.size()); }
  int64_t lo(int64_t k) const { return k + 1 < int64_t(dims.size()) ? dims[size_t(k + 1)] : 0; }  // slice k's start
};

inline Prefixes make_prefixes(const char* op, const Tensor& a, const Tensor& b, at::IntArrayRef dims, const Tensor& row_scale,
                       const Tensor& col_scale) {
  Prefixes p;
  p.dims.assign(dims.begin(), dims.end());
  const int64_t n_k = p.k();
  TORCH_CHECK(n_k >= 1, "fastcon::", op, ": at least one prefix");
  for (int64_t k = 0; k < n_k; ++k) {
    TORCH_CHECK(p.dims[size_t(k)] >= 1 && p.dims[size_t(k)] <= a.size(1) &&
                    (k == 0 || p.dims[size_t(k)] < p.dims[size_t(k - 1)]),
                "fastcon::", op, ": the prefixes must be strictly descending within [1, D]");
  }
  for (const Tensor* v : {&row_scale, &col_scale}) {
    TORCH_CHECK(v->scalar_type() == a.scalar_type() && v->dim() == 2 && v->size(1) == n_k && v->device().is_cpu(),
                "fastcon::", op, ": the prefix scales must be (N, K) CPU tensors of a's dtype");
  }
  TORCH_CHECK(row_scale.size(0) == a.size(0) && col_scale.size(0) == b.size(0), "fastcon::", op,
              ": the prefix scales need one row per row of a and b");
  p.row_scale = row_scale.contiguous();
  p.col_scale = col_scale.contiguous();
  return p;
}

// The chunk's accumulator after slice k (P_k): adds slice k's product to acc.
inline void add_slice(Tensor& acc, const Tensor& a, const Tensor& b, const Prefixes& p, int64_t k, int64_t r0, int64_t rows,
               int64_t c0, int64_t w) {
  const int64_t lo = p.lo(k), hi = p.dims[size_t(k)];
  const double beta = k + 1 == p.k() ? 0.0 : 1.0;  // the first slice starts the accumulator
  at::addmm_out(acc, acc, a.narrow(0, r0, rows).narrow(1, lo, hi - lo), b.narrow(0, c0, w).narrow(1, lo, hi - lo).t(),
                beta, 1.0);
}

// The scales of prefix k: row i's and the columns' from c0 on (contiguous copies of a column of the
// (N, K) scales).
template <typename T>
struct PrefixScales {
  std::vector<T> row, col;
  PrefixScales(const Prefixes& p, int64_t k) {
    auto take = [k](const Tensor& m, std::vector<T>& out) {
      const Tensor c = m.select(1, k).contiguous();
      out.assign(c.data_ptr<T>(), c.data_ptr<T>() + c.numel());
    };
    take(p.row_scale, row);
    take(p.col_scale, col);
  }
};

// out = r_k ⊙ acc ⊙ c_kᵀ for rows [r0, r0 + rows) × columns [c0, c0 + w), in one sweep.
template <typename T>
void scaled_tile(T* out, const T* acc, const PrefixScales<T>& sc, int64_t r0, int64_t rows, int64_t c0, int64_t w,
                 int nt) {
#pragma omp parallel for schedule(static) num_threads(nt) if (rows * w >= kMinParallelWork)
  for (int64_t li = 0; li < rows; ++li) {
    fc_scale_row(acc + li * w, out + li * w, w, sc.row[size_t(r0 + li)], sc.col.data() + c0);
  }
}

// The prefixes' tiles of each chunk, the smallest prefix first: ``chunks(body)`` as prefix_backward's;
// ``use(k, acc, tile, scales, r0, rows, c0, w)`` with acc = P_k and ``tile()`` forming r_k ⊙ P_k ⊙ c_k
// (in a scratch buffer, when the loss needs it as a tile of its own).
template <typename T, typename Chunks, typename Use>
void prefix_forward(const Tensor& a, const Tensor& b, const Prefixes& p, int64_t chunk_rows, Chunks&& chunks,
                    Use&& use) {
  const int nt = team_threads();
  std::vector<PrefixScales<T>> scales;
  for (int64_t k = 0; k < p.k(); ++k) scales.emplace_back(p, k);
  Tensor acc_buf, tile_buf;
  chunks([&](int64_t r0, int64_t rows, int64_t c0, int64_t w) {
    Tensor acc = scratch_rows(acc_buf, chunk_rows, rows, w, a.options());
    T* tile = scratch_rows(tile_buf, chunk_rows, rows, w, a.options()).data_ptr<T>();
    for (int64_t k = p.k() - 1; k >= 0; --k) {
      add_slice(acc, a, b, p, k, r0, rows, c0, w);
      const PrefixScales<T>& sc = scales[size_t(k)];
      auto scaled = [&] {
        scaled_tile<T>(tile, acc.data_ptr<T>(), sc, r0, rows, c0, w, nt);
        return tile;
      };
      use(k, acc.data_ptr<T>(), scaled, sc, r0, rows, c0, w);
    }
  });
}

// Pass 2 at every prefix, for any loss whose G of a tile is formed in place: ``chunks(body)`` calls
// body(r0, rows, c0, w) for each chunk of rows and its columns; ``make_g(k, tile, r0, rows, c0, w)``
// turns prefix k's tile (r_k ⊙ P_k ⊙ c_k, row-major rows × w) into its G_k, with the loss's own sums
// (Σ G·tile for the scale, Σ G for the bias). Here: in one sweep per prefix the scales' gradient terms
// Σ_j G_k·P_k·c_k and Σ_i G_k·P_k·r_k and H_k = r_k ⊙ G_k ⊙ c_k; slice j's GEMMs take Σ_{k≤j} H_k.
// Returns {grad_a, grad_b, grad_row_scale (Na, K), grad_col_scale (Nb, K)}, each times the logit scale s.
//
// ``make_h(k, h, P, scales, r0, rows, c0, w, col_terms, grad_rs)`` may instead form H_k in h straight
// from the accumulator P with the scales' terms (a fused sweep for the losses that have one; each
// thread adds its column terms to col_terms + tid·Nb and writes grad_rs[i·K + k]) and return true; it
// returns false where the loss has no such sweep.
template <typename T, typename Chunks, typename MakeG, typename MakeH>
std::vector<Tensor> prefix_backward(const Tensor& a, const Tensor& b, double s, const Prefixes& p, int64_t chunk_rows,
                                    Chunks&& chunks, MakeG&& make_g, MakeH&& make_h) {
  const int64_t na = a.size(0), nb = b.size(0), dim = a.size(1), n_k = p.k();
  const int nt = team_threads();
  Tensor grad_a = at::zeros({na, dim}, a.options());
  Tensor grad_b = at::zeros({nb, dim}, a.options());
  Tensor grad_rs = at::zeros({na, n_k}, a.options());
  Tensor grad_cs = at::zeros({nb, n_k}, a.options());
  std::vector<PrefixScales<T>> scales;
  for (int64_t k = 0; k < n_k; ++k) scales.emplace_back(p, k);
  std::vector<T> col_terms(size_t(nt) * size_t(nb));  // per thread: Σ_i G·P·r of the chunk's columns
  Tensor acc_buf;
  std::vector<Tensor> h_buf(static_cast<size_t>(n_k));
  chunks([&](int64_t r0, int64_t rows, int64_t c0, int64_t w) {
    Tensor acc = scratch_rows(acc_buf, chunk_rows, rows, w, a.options());
    std::vector<Tensor> h(static_cast<size_t>(n_k));
    for (int64_t k = n_k - 1; k >= 0; --k) {
      add_slice(acc, a, b, p, k, r0, rows, c0, w);
      const PrefixScales<T>& sc = scales[size_t(k)];
      Tensor g = scratch_rows(h_buf[size_t(k)], chunk_rows, rows, w, a.options());
      T* gd = g.data_ptr<T>();
      const T* pd = acc.data_ptr<T>();
      T* grs = grad_rs.data_ptr<T>();
      std::fill(col_terms.begin(), col_terms.end(), T(0));
      if (!make_h(k, gd, pd, sc, r0, rows, c0, w, col_terms.data(), grs)) {
        scaled_tile<T>(gd, pd, sc, r0, rows, c0, w, nt);
        make_g(k, gd, r0, rows, c0, w);
#pragma omp parallel num_threads(nt) if (rows * w >= kMinParallelWork)
        {
          T* col = col_terms.data() + size_t(omp_tid()) * size_t(nb);
#pragma omp for schedule(static)
          for (int64_t li = 0; li < rows; ++li) {
            const int64_t i = r0 + li;
            grs[i * n_k + k] =
                fc_prefix_grad_row(gd + li * w, pd + li * w, w, sc.row[size_t(i)], sc.col.data() + c0, col);
          }
        }
      }
      T* gcs = grad_cs.data_ptr<T>();
      for (int th = 0; th < nt; ++th) {
        const T* col = col_terms.data() + size_t(th) * size_t(nb);
        for (int64_t jj = 0; jj < w; ++jj) gcs[(c0 + jj) * n_k + k] += col[jj];
      }
      h[size_t(k)] = g;  // now H_k
    }
    for (int64_t j = 0; j < n_k; ++j) {  // slice j is covered by the prefixes k <= j
      if (j > 0) h[0].add_(h[size_t(j)]);
      const int64_t lo = p.lo(j), hi = p.dims[size_t(j)];
      Tensor ga = grad_a.narrow(0, r0, rows).narrow(1, lo, hi - lo);
      at::addmm_out(ga, ga, h[0], b.narrow(0, c0, w).narrow(1, lo, hi - lo), /*beta=*/0, /*alpha=*/s);
      Tensor gbm = grad_b.narrow(0, c0, w).narrow(1, lo, hi - lo);
      gbm.addmm_(h[0].t(), a.narrow(0, r0, rows).narrow(1, lo, hi - lo), /*beta=*/1, /*alpha=*/s);
    }
  });
  grad_rs.mul_(s);
  grad_cs.mul_(s);
  return {grad_a, grad_b, grad_rs, grad_cs};
}

}  // namespace cpu
}  // namespace fastcon
