// fastcon CPU engine: the four operations of the backend contract (fastcon/kernels/__init__.py) over
// S = s·A·Bᵀ + b, computed in row chunks. The GEMMs go to ATen (MKL / oneDNN underneath) into
// buffers allocated once per call; the element-wise epilogues are the OpenMP-parallel, vectorised
// loops of kernels.h.
//
// Determinism: row quantities are computed by one thread each and the scalar reductions are summed
// row by row in a fixed order, so they do not depend on the thread count. Column statistics are
// accumulated per thread (each thread owns a fixed block of rows of every chunk) and merged in
// thread order: bitwise deterministic for a given thread count.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "engine.h"
#include "prefix.h"

namespace fastcon {
namespace cpu {
namespace {

template <typename T>
void softmax_grad_rows(T* dot, int64_t row0, int64_t rows, int64_t nb, T s, T b, const SplitLse<T>& row_lse,
                       const SplitLse<T>& col_lse, int64_t pos_offset, T w_row, T w_col, T w_pos, double* gs_rows,
                       double* gb_rows, int nt) {
  const bool use_col = w_col != T(0);
  const T* chi = col_lse.hi.data();
  const T* clo = col_lse.lo.data();
#pragma omp parallel for schedule(static) num_threads(nt) if (rows * nb >= kMinParallelWork)
  for (int64_t i = 0; i < rows; ++i) {
    T* d = dot + i * nb;
    const int64_t gi = row0 + i;
    const int64_t p = (pos_offset < nb - gi) ? gi + pos_offset : nb;  // column of the positive, or nb
    const T rhi = row_lse.hi[gi], rlo = row_lse.lo[gi];
    T gs1 = 0, gb1 = 0, gs2 = 0, gb2 = 0, gs3 = 0, gb3 = 0;
    fc_grad(d, d, p, s, b, rhi, rlo, w_row, chi, clo, w_col, use_col, &gs1, &gb1);
    if (p < nb) {
      // The positive, one per row: in double from the float64 LSEs, so that P − 1 and Q − 1 (tiny
      // for a confident pair) keep their relative precision before the target is subtracted.
      const T dv = d[p];
      const double v = double(dv * s + b);  // rounded to T as in the loops and the statistics
      double e = std::exp(v - row_lse.lse[gi]) * double(w_row);
      if (use_col) e += std::exp(v - col_lse.lse[p]) * double(w_col);
      e -= double(w_pos);
      d[p] = T(e);
      gs2 = d[p] * dv;
      gb2 = d[p];
      fc_grad(d + p + 1, d + p + 1, nb - p - 1, s, b, rhi, rlo, w_row, chi + p + 1, clo + p + 1, w_col, use_col, &gs3,
              &gb3);
    }
    gs_rows[gi] = double(gs1) + double(gs2) + double(gs3);
    gb_rows[gi] = double(gb1) + double(gb2) + double(gb3);
  }
}

// pos_logit[row0 + i] = S_{row0+i, row0+i+pos_offset} (0 without a positive), from a chunk's dots.
template <typename T>
void positive_logits(const T* dot, int64_t row0, int64_t rows, int64_t nb, T s, T b, int64_t pos_offset,
                     T* pos_logit) {
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t gi = row0 + i;
    pos_logit[gi] = (pos_offset < nb - gi) ? dot[i * nb + gi + pos_offset] * s + b : T(0);
  }
}

// Rows [row0, row0 + rows) of the sigmoid loss; the positive of global row i is column i + pos_offset.
template <typename T>
void sigmoid_rows(T* dot, int64_t row0, int64_t rows, int64_t nb, T s, T b, int64_t pos_offset, T w,
                  bool need_grad, double* loss_rows, double* gs_rows, double* gb_rows, int nt) {
#pragma omp parallel for schedule(static) num_threads(nt) if (rows * nb >= kMinParallelWork)
  for (int64_t i = 0; i < rows; ++i) {
    T* d = dot + i * nb;
    const int64_t gi = row0 + i;
    const int64_t p = (pos_offset < nb - gi) ? gi + pos_offset : nb;  // column of the positive, or nb
    T l1 = 0, g1 = 0, b1 = 0, l2 = 0, g2 = 0, b2 = 0, l3 = 0, g3 = 0, b3 = 0;
    fc_sigmoid(d, d, p, s, b, w, need_grad, &l1, &g1, &b1);
    if (p < nb) {
      // positive: softplus(−S) and G = w·(σ(S) − 1) = −w·σ(−S)
      const T dv = d[p];
      const T v = dv * s + b;
      const T av = std::abs(v);
      const T t = std::exp(-av);
      l2 = std::max(-v, T(0)) + std::log1p(t);
      if (need_grad) {
        const T q = T(1) / (T(1) + t);
        const T e = -(v >= T(0) ? t * q : q) * w;
        g2 = e * dv;
        b2 = e;
        d[p] = e;
      }
      fc_sigmoid(d + p + 1, d + p + 1, nb - p - 1, s, b, w, need_grad, &l3, &g3, &b3);
    }
    loss_rows[i] = double(l1) + double(l2) + double(l3);
    if (need_grad) {
      gs_rows[i] = double(g1) + double(g2) + double(g3);
      gb_rows[i] = double(b1) + double(b2) + double(b3);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Operations

template <typename T>
std::tuple<Tensor, Tensor, Tensor> lse_stats_impl(const Tensor& a, const Tensor& b, T s, T bb, int64_t pos_offset,
                                                  int64_t chunk_rows) {
  const int64_t na = a.size(0), nb = b.size(0);
  const int nt = team_threads();
  Tensor row_lse = at::empty({na}, a.options().dtype(at::kDouble));
  Tensor col_lse = at::empty({nb}, a.options().dtype(at::kDouble));
  Tensor pos_logit = at::empty({na}, a.options());
  ColStats<T> cs(nb, nt);
  Tensor buf = at::empty({std::min(chunk_rows, na), nb}, a.options());
  for (int64_t r0 = 0; r0 < na; r0 += chunk_rows) {
    const int64_t rows = std::min(chunk_rows, na - r0);
    Tensor view = buf.narrow(0, 0, rows);
    gemm_dot(view, a, b, r0, rows);
    positive_logits<T>(view.data_ptr<T>(), r0, rows, nb, s, bb, pos_offset, pos_logit.data_ptr<T>());
    cs.add_chunk(view.data_ptr<T>(), rows, s, bb, row_lse.data_ptr<double>() + r0);
  }
  cs.finish(col_lse.data_ptr<double>());
  return {row_lse, col_lse, pos_logit};
}

// Pass 2 over rows [r0, r0+rows) whose dot products are in `dot` (overwritten with G).
template <typename T>
void softmax_grad_block(Tensor& dot, const Tensor& a, const Tensor& b, int64_t r0, int64_t rows, T s, T bb,
                        const SplitLse<T>& row_lse, const SplitLse<T>& col_lse, int64_t pos_offset, T w_row,
                        T w_col, T w_pos,
                        std::vector<double>& gs_rows, std::vector<double>& gb_rows, Tensor& grad_a, Tensor& grad_b,
                        int nt) {
  const int64_t nb = b.size(0);
  softmax_grad_rows<T>(dot.data_ptr<T>(), r0, rows, nb, s, bb, row_lse, col_lse, pos_offset, w_row, w_col, w_pos,
                       gs_rows.data(), gb_rows.data(), nt);
  gemm_grads(dot, a, b, r0, rows, double(s), grad_a, grad_b);
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor> softmax_grad_impl(const Tensor& a, const Tensor& b, T s, T bb,
                                                             const Tensor& row_lse, const Tensor& col_lse,
                                                             int64_t pos_offset, double w_row, double w_col,
                                                             double w_pos, int64_t chunk_rows) {
  const int64_t na = a.size(0), nb = b.size(0), d = a.size(1);
  const int nt = team_threads();
  Tensor grad_a = at::empty({na, d}, a.options());
  Tensor grad_b = at::zeros({nb, d}, a.options());
  std::vector<double> gs_rows(na), gb_rows(na);
  const SplitLse<T> rls(row_lse.data_ptr<double>(), na), cls(col_lse.data_ptr<double>(), nb);
  Tensor buf = at::empty({std::min(chunk_rows, na), nb}, a.options());
  for (int64_t r0 = 0; r0 < na; r0 += chunk_rows) {
    const int64_t rows = std::min(chunk_rows, na - r0);
    Tensor view = buf.narrow(0, 0, rows);
    gemm_dot(view, a, b, r0, rows);
    softmax_grad_block<T>(view, a, b, r0, rows, s, bb, rls, cls, pos_offset, T(w_row), T(w_col), T(w_pos), gs_rows,
                          gb_rows, grad_a, grad_b, nt);
  }
  return {grad_a, grad_b, scalar_tensor(ordered_sum(gs_rows), a), scalar_tensor(ordered_sum(gb_rows), a)};
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> softmax_fused_impl(
    const Tensor& a, const Tensor& b, T s, T bb, int64_t pos_offset, double w_row, double w_col, double w_pos,
    int64_t chunk_rows, int64_t cache_bytes) {
  const int64_t na = a.size(0), nb = b.size(0), d = a.size(1);
  const int nt = team_threads();
  // The chunks kept from pass 1 are a prefix: chunk after chunk while the total fits in cache_bytes.
  // Being the contiguous rows [0, cached), they are computed and consumed as one block.
  int64_t cached = 0;
  {
    int64_t kept = 0;
    const int64_t row_bytes = nb * int64_t(sizeof(T));
    for (int64_t r0 = 0; r0 < na; r0 += chunk_rows) {
      const int64_t rows = std::min(chunk_rows, na - r0);
      if (kept + rows * row_bytes > cache_bytes) break;
      kept += rows * row_bytes;
      cached += rows;
    }
  }
  Tensor row_lse = at::empty({na}, a.options().dtype(at::kDouble));
  Tensor col_lse = at::empty({nb}, a.options().dtype(at::kDouble));
  Tensor pos_logit = at::empty({na}, a.options());
  Tensor cache = at::empty({cached, nb}, a.options());
  Tensor buf = at::empty({std::min(chunk_rows, na - cached), nb}, a.options());
  double* rl = row_lse.data_ptr<double>();
  T* pl = pos_logit.data_ptr<T>();

  // pass 1: statistics
  {
    ColStats<T> cs(nb, nt);
    if (cached > 0) {
      gemm_dot(cache, a, b, 0, cached);
      positive_logits<T>(cache.data_ptr<T>(), 0, cached, nb, s, bb, pos_offset, pl);
      cs.add_chunk(cache.data_ptr<T>(), cached, s, bb, rl);
    }
    for (int64_t r0 = cached; r0 < na; r0 += chunk_rows) {
      const int64_t rows = std::min(chunk_rows, na - r0);
      Tensor view = buf.narrow(0, 0, rows);
      gemm_dot(view, a, b, r0, rows);
      positive_logits<T>(view.data_ptr<T>(), r0, rows, nb, s, bb, pos_offset, pl);
      cs.add_chunk(view.data_ptr<T>(), rows, s, bb, rl + r0);
    }
    cs.finish(col_lse.data_ptr<double>());
  }
  {
    // Only the columns that own a positive, [pos_offset, pos_offset + Na), enter the column softmax.
    double* cl = col_lse.data_ptr<double>();
    const int64_t c0 = std::min(pos_offset, nb);
    const int64_t c1 = (na < nb - c0) ? c0 + na : nb;
    for (int64_t j = 0; j < c0; ++j) cl[j] = inf<double>();
    for (int64_t j = c1; j < nb; ++j) cl[j] = inf<double>();
  }

  // pass 2: gradients. The cached block goes first and is released before the chunk buffer is taken
  // again, so that the cache, the chunk buffer and the gradients are never all held at once.
  const int64_t buf_rows = buf.size(0);
  if (cached > 0) buf = Tensor();
  Tensor grad_a = at::empty({na, d}, a.options());
  Tensor grad_b = at::zeros({nb, d}, a.options());
  std::vector<double> gs_rows(na), gb_rows(na);
  const SplitLse<T> rls(rl, na), cls(col_lse.data_ptr<double>(), nb);
  if (cached > 0) {
    softmax_grad_block<T>(cache, a, b, 0, cached, s, bb, rls, cls, pos_offset, T(w_row), T(w_col), T(w_pos), gs_rows,
                          gb_rows, grad_a, grad_b, nt);
    cache = Tensor();
    if (cached < na) buf = at::empty({buf_rows, nb}, a.options());
  }
  for (int64_t r0 = cached; r0 < na; r0 += chunk_rows) {
    const int64_t rows = std::min(chunk_rows, na - r0);
    Tensor view = buf.narrow(0, 0, rows);
    gemm_dot(view, a, b, r0, rows);
    softmax_grad_block<T>(view, a, b, r0, rows, s, bb, rls, cls, pos_offset, T(w_row), T(w_col), T(w_pos), gs_rows,
                          gb_rows, grad_a, grad_b, nt);
  }
  return {row_lse, col_lse, pos_logit, grad_a, grad_b, scalar_tensor(ordered_sum(gs_rows), a),
          scalar_tensor(ordered_sum(gb_rows), a)};
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> sigmoid_fused_impl(const Tensor& a, const Tensor& b, T s, T bb,
                                                                      int64_t pos_offset, double w,
                                                                      int64_t chunk_rows, bool need_grad) {
  const int64_t na = a.size(0), nb = b.size(0), d = a.size(1);
  const int nt = team_threads();
  Tensor grad_a, grad_b;
  if (need_grad) {
    grad_a = at::empty({na, d}, a.options());
    grad_b = at::zeros({nb, d}, a.options());
  } else {
    grad_a = at::empty({0}, a.options());
    grad_b = at::empty({0}, a.options());
  }
  std::vector<double> loss_rows(na), gs_rows(need_grad ? na : 0), gb_rows(need_grad ? na : 0);
  Tensor buf = at::empty({std::min(chunk_rows, na), nb}, a.options());
  for (int64_t r0 = 0; r0 < na; r0 += chunk_rows) {
    const int64_t rows = std::min(chunk_rows, na - r0);
    Tensor view = buf.narrow(0, 0, rows);
    gemm_dot(view, a, b, r0, rows);
    sigmoid_rows<T>(view.data_ptr<T>(), r0, rows, nb, s, bb, pos_offset, T(w), need_grad, loss_rows.data() + r0,
                    need_grad ? gs_rows.data() + r0 : nullptr, need_grad ? gb_rows.data() + r0 : nullptr, nt);
    if (need_grad) gemm_grads(view, a, b, r0, rows, double(s), grad_a, grad_b);
  }
  Tensor loss = scalar_tensor(ordered_sum(loss_rows), a);
  if (!need_grad) return {loss, grad_a, grad_b, at::empty({0}, a.options()), at::empty({0}, a.options())};
  return {loss, grad_a, grad_b, scalar_tensor(ordered_sum(gs_rows), a), scalar_tensor(ordered_sum(gb_rows), a)};
}

// ---------------------------------------------------------------------------------------------
// Dispatcher entry points

void check_pos_offset(const char* op, int64_t pos_offset) {
  TORCH_CHECK(pos_offset >= 0, "fastcon::", op, ": pos_offset must be >= 0, got ", pos_offset);
}

std::tuple<Tensor, Tensor, Tensor> lse_stats(const Tensor& a, const Tensor& b, const Tensor& scale,
                                             const Tensor& bias, int64_t pos_offset, int64_t chunk_rows) {
  check_pair("lse_stats", a, b, scale, bias, chunk_rows);
  check_pos_offset("lse_stats", pos_offset);
  if (a.scalar_type() == at::kDouble)
    return lse_stats_impl<double>(a, b, scalar_of<double>(scale), scalar_of<double>(bias), pos_offset, chunk_rows);
  return lse_stats_impl<float>(a, b, scalar_of<float>(scale), scalar_of<float>(bias), pos_offset, chunk_rows);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> softmax_grad(const Tensor& a, const Tensor& b, const Tensor& scale,
                                                        const Tensor& bias, const Tensor& row_lse,
                                                        const Tensor& col_lse, int64_t pos_offset, double w_row,
                                                        double w_col, double w_pos, int64_t chunk_rows) {
  check_pair("softmax_grad", a, b, scale, bias, chunk_rows);
  check_lse("softmax_grad", "row_lse", row_lse, a.size(0));
  check_lse("softmax_grad", "col_lse", col_lse, b.size(0));
  check_pos_offset("softmax_grad", pos_offset);
  if (a.scalar_type() == at::kDouble)
    return softmax_grad_impl<double>(a, b, scalar_of<double>(scale), scalar_of<double>(bias), row_lse, col_lse,
                                     pos_offset, w_row, w_col, w_pos, chunk_rows);
  return softmax_grad_impl<float>(a, b, scalar_of<float>(scale), scalar_of<float>(bias), row_lse, col_lse,
                                  pos_offset, w_row, w_col, w_pos, chunk_rows);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> softmax_fused(
    const Tensor& a, const Tensor& b, const Tensor& scale, const Tensor& bias, int64_t pos_offset, double w_row,
    double w_col, double w_pos, int64_t chunk_rows, int64_t cache_bytes) {
  check_pair("softmax_fused", a, b, scale, bias, chunk_rows);
  check_pos_offset("softmax_fused", pos_offset);
  if (a.scalar_type() == at::kDouble)
    return softmax_fused_impl<double>(a, b, scalar_of<double>(scale), scalar_of<double>(bias), pos_offset, w_row,
                                      w_col, w_pos, chunk_rows, cache_bytes);
  return softmax_fused_impl<float>(a, b, scalar_of<float>(scale), scalar_of<float>(bias), pos_offset, w_row, w_col,
                                   w_pos, chunk_rows, cache_bytes);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> sigmoid_fused(const Tensor& a, const Tensor& b,
                                                                 const Tensor& scale, const Tensor& bias,
                                                                 int64_t pos_offset, double w, int64_t chunk_rows,
                                                                 bool need_grad) {
  check_pair("sigmoid_fused", a, b, scale, bias, chunk_rows);
  check_pos_offset("sigmoid_fused", pos_offset);
  if (a.scalar_type() == at::kDouble)
    return sigmoid_fused_impl<double>(a, b, scalar_of<double>(scale), scalar_of<double>(bias), pos_offset, w,
                                      chunk_rows, need_grad);
  return sigmoid_fused_impl<float>(a, b, scalar_of<float>(scale), scalar_of<float>(bias), pos_offset, w,
                                   chunk_rows, need_grad);
}

// SigLIP at every Matryoshka prefix in one pass over D (prefix.h): Σ_k weights[k]·loss_sum_k, and with
// need_grad the gradients of w·Σ_k weights[k]·loss_sum_k, G_k formed by sigmoid_rows on prefix k's tile.
template <typename T>
std::vector<Tensor> sigmoid_prefix_fused_impl(const Tensor& a, const Tensor& b, T s, T bb, int64_t pos_offset,
                                              double w, at::ArrayRef<double> weights, int64_t chunk_rows,
                                              bool need_grad, const Prefixes& p) {
  const int64_t na = a.size(0), nb = b.size(0);
  const int nt = team_threads();
  std::vector<double> loss_k(static_cast<size_t>(na)), gs_k(static_cast<size_t>(na)), gb_k(static_cast<size_t>(na));
  std::vector<double> loss_rows(size_t(na), 0.0), gs_rows(size_t(na), 0.0), gb_rows(size_t(na), 0.0);
  auto chunks = [&](auto&& body) {
    for (int64_t r0 = 0; r0 < na; r0 += chunk_rows) body(r0, std::min(chunk_rows, na - r0), int64_t(0), nb);
  };
  auto make_g = [&](int64_t k, T* tile, int64_t r0, int64_t rows, int64_t, int64_t) {
    const double wk = weights[size_t(k)];
    sigmoid_rows<T>(tile, r0, rows, nb, s, bb, pos_offset, T(w * wk), need_grad, loss_k.data() + r0,
                    gs_k.data() + r0, gb_k.data() + r0, nt);
    for (int64_t i = r0; i < r0 + rows; ++i) {
      loss_rows[size_t(i)] += wk * loss_k[size_t(i)];
      if (need_grad) {
        gs_rows[size_t(i)] += gs_k[size_t(i)];
        gb_rows[size_t(i)] += gb_k[size_t(i)];
      }
    }
  };
  std::vector<Tensor> out;
  if (need_grad) {
    out = prefix_backward<T>(a, b, double(s), p, chunk_rows, chunks, make_g, [](auto&&...) { return false; });
  } else {  // the forward alone: each prefix's tile from the accumulator, its loss
    prefix_forward<T>(a, b, p, chunk_rows, chunks, [&](int64_t k, const T*, auto&& tile, const PrefixScales<T>&,
                                                        int64_t r0, int64_t rows, int64_t c0, int64_t width) {
      make_g(k, tile(), r0, rows, c0, width);
    });
    const Tensor none = at::empty({0}, a.options());
    out = {none, none.clone(), none.clone(), none.clone()};
  }
  Tensor loss = scalar_tensor(ordered_sum(loss_rows), a);
  Tensor gs = need_grad ? scalar_tensor(ordered_sum(gs_rows), a) : at::empty({0}, a.options());
  Tensor gb = need_grad ? scalar_tensor(ordered_sum(gb_rows), a) : at::empty({0}, a.options());
  return {loss, out[0], out[1], gs, gb, out[2], out[3]};
}

std::vector<Tensor> sigmoid_prefix_fused(const Tensor& a, const Tensor& b, const Tensor& scale, const Tensor& bias,
                                         int64_t pos_offset, double w, at::ArrayRef<double> weights,
                                         int64_t chunk_rows, bool need_grad, at::IntArrayRef dims,
                                         const Tensor& row_scale, const Tensor& col_scale) {
  const char* op = "sigmoid_prefix_fused";
  check_pair(op, a, b, scale, bias, chunk_rows);
  check_pos_offset(op, pos_offset);
  const Prefixes p = make_prefixes(op, a, b, dims, row_scale, col_scale);
  TORCH_CHECK(int64_t(weights.size()) == p.k(), "fastcon::", op, ": one weight per prefix");
  if (a.scalar_type() == at::kDouble)
    return sigmoid_prefix_fused_impl<double>(a, b, scalar_of<double>(scale), scalar_of<double>(bias), pos_offset, w,
                                             weights, chunk_rows, need_grad, p);
  return sigmoid_prefix_fused_impl<float>(a, b, scalar_of<float>(scale), scalar_of<float>(bias), pos_offset, w,
                                          weights, chunk_rows, need_grad, p);
}

// ---------------------------------------------------------------------------------------------
// Direct losses: the whole loss of a small CPU problem in one operator with its own autograd node
// (fastcon/ops/engine.py, "The direct C++ loss"). The loss is assembled here as the ops layer assembles it
// from the operators above (clip_engine_loss and siglip_engine_loss there, label smoothing's two
// column sums included), in the same chunks; the backward multiplies the
// gradients the forward computed by the upstream gradient and rounds once to each input's dtype,
// in the order of operations autograd follows through the ops layer's graph. What it spares is the
// Python and autograd glue around the operators (0.1 to 0.3 ms a call), most of the time of a
// problem of a few hundred rows, where the materialised formula would otherwise be faster.

using torch::autograd::variable_list;

enum DirectKind : int64_t { kDirectSoftmax = 0, kDirectSigmoid = 1 };

struct DirectResult {
  double loss = 0;
  Tensor grad_a, grad_b, grad_scale, grad_bias;  // undefined without need_grad
};

template <typename T>
DirectResult direct_impl(const Tensor& a, const Tensor& b, T s, T bb, int64_t kind, int64_t pos_offset,
                         bool symmetric, double eps, int64_t chunk_rows, int64_t cache_bytes, bool need_grad) {
  const int64_t na = a.size(0), nb = b.size(0);
  DirectResult r;
  if (kind == kDirectSigmoid) {
    const double fold = 1.0 / double(na);  // the 1/Na of the loss, taken into the gradient weights
    auto out = sigmoid_fused_impl<T>(a, b, s, bb, pos_offset, fold, chunk_rows, need_grad);
    r.loss = double(std::get<0>(out).template item<T>() / T(na));  // the sum rounded to T, then / Na in T
    if (need_grad) std::tie(std::ignore, r.grad_a, r.grad_b, r.grad_scale, r.grad_bias) = out;
    return r;
  }
  const double w_col = symmetric ? 1.0 : 0.0;
  const double denom = (symmetric ? 2.0 : 1.0) * double(na);
  const double fold = 1.0 / denom;
  Tensor row_lse, col_lse, pos_logit;
  if (need_grad) {
    std::tie(row_lse, col_lse, pos_logit, r.grad_a, r.grad_b, r.grad_scale, r.grad_bias) = softmax_fused_impl<T>(
        a, b, s, bb, pos_offset, fold, w_col * fold, (1.0 + w_col) * (1.0 - eps) * fold, chunk_rows, cache_bytes);
  } else {
    std::tie(row_lse, col_lse, pos_logit) = lse_stats_impl<T>(a, b, s, bb, pos_offset, chunk_rows);
  }
  const double* rl = row_lse.data_ptr<double>();
  const double* cl = col_lse.data_ptr<double>();
  const T* pl = pos_logit.data_ptr<T>();
  double sum = 0;
  for (int64_t i = 0; i < na; ++i) {
    const double t = (1.0 - eps) * double(pl[i]);
    double term = rl[i] - t;
    if (symmetric) term = term + (cl[pos_offset + i] - t);
    sum += term;
  }
  r.loss = sum / denom;
  return r;
}

// Label smoothing's O(N·D) part (clip_engine_loss): the targets ε/Nb add −(ε/Nb)·Σ_ij S_ij to the row
// terms and ε/Na that of the columns with a positive to the column terms, through the column sums of
// the features (in the accumulation dtype) and their dot products in float64.
struct Smoothing {
  Tensor sum_a, sum_b, sum_b_pos;  // float64
  double dot = 0, dot_pos = 0, s = 0, b = 0;

  Smoothing(const Tensor& a, const Tensor& b_feat, at::ScalarType acc, int64_t pos_offset, bool symmetric, double s64,
            double b64)
      : s(s64), b(b64) {
    sum_a = a.sum(0, false, acc).to(at::kDouble);
    sum_b = b_feat.sum(0, false, acc).to(at::kDouble);
    dot = at::dot(sum_a, sum_b).item<double>();
    if (symmetric) {
      sum_b_pos = b_feat.narrow(0, pos_offset, a.size(0)).sum(0, false, acc).to(at::kDouble);
      dot_pos = at::dot(sum_b_pos, sum_a).item<double>();
    }
  }
  double total(double eps, double na, double nb) const {
    double t = (eps / nb) * (s * dot + b * (na * nb));
    if (sum_b_pos.defined()) t = t + (eps / na) * (s * dot_pos + b * (na * na));
    return t;
  }
};

struct DirectLoss : public torch::autograd::Function<DirectLoss> {
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& a, const Tensor& b,
                        const Tensor& scale, const std::optional<Tensor>& bias, int64_t kind, int64_t pos_offset,
                        bool symmetric, double eps, int64_t chunk_rows, int64_t cache_bytes, bool need_grad) {
    const bool wide = a.scalar_type() == at::kDouble;
    const auto acc = wide ? at::kDouble : at::kFloat;
    const Tensor x = a.to(acc).contiguous(), y = b.to(acc).contiguous();
    // scale and bias as the accumulation dtype holds them
    const double sv = wide ? scale.item<double>() : double(float(scale.item<double>()));
    const double bv = !bias.has_value() ? 0.0 : wide ? bias->item<double>() : double(float(bias->item<double>()));
    DirectResult r = wide ? direct_impl<double>(x, y, sv, bv, kind, pos_offset, symmetric, eps, chunk_rows,
                                                cache_bytes, need_grad)
                          : direct_impl<float>(x, y, float(sv), float(bv), kind, pos_offset, symmetric, eps,
                                               chunk_rows, cache_bytes, need_grad);
    const double na = double(a.size(0)), nb = double(b.size(0)), denom = (symmetric ? 2.0 : 1.0) * na;
    double loss = r.loss;
    std::optional<Smoothing> smooth;
    if (eps > 0) {
      smooth.emplace(a, b, acc, pos_offset, symmetric, sv, bv);
      loss = loss - smooth->total(eps, na, nb) / denom;
    }
    if (need_grad) {
      variable_list saved = {r.grad_a, r.grad_b, r.grad_scale, bias.has_value() ? r.grad_bias : Tensor()};
      if (smooth) saved.insert(saved.end(), {smooth->sum_a, smooth->sum_b, smooth->sum_b_pos});
      ctx->save_for_backward(saved);
      ctx->saved_data["dtypes"] = std::vector<int64_t>{
          int64_t(a.scalar_type()), int64_t(b.scalar_type()), int64_t(scale.scalar_type()),
          int64_t(bias.has_value() ? bias->scalar_type() : acc)};
      ctx->saved_data["shapes"] = std::vector<int64_t>{scale.dim(), bias.has_value() ? bias->dim() : 0};
      ctx->saved_data["numbers"] = std::vector<double>{eps, na, nb, denom, double(pos_offset), smooth ? smooth->dot : 0,
                                                       smooth ? smooth->dot_pos : 0, sv};
    }
    // float64, rounded to the accumulation dtype, then to the features' own (as the ops layer does)
    return at::scalar_tensor(loss, x.options()).to(a.scalar_type());
  }

  static variable_list backward(torch::autograd::AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "fastcon's fused losses do not support double backward (create_graph=True): their gradients "
                "are computed in the forward pass and have no graph; use backend='reference' for higher-order "
                "derivatives");
    const auto saved = ctx->get_saved_variables();
    const auto dtypes = ctx->saved_data["dtypes"].toIntVector();
    const auto dims = ctx->saved_data["shapes"].toIntVector();
    const auto num = ctx->saved_data["numbers"].toDoubleVector();
    const double eps = num[0], na = num[1], nb = num[2], denom = num[3];
    const Tensor& g = grads[0];
    const double g64 = g.item<double>();
    const bool unit = g64 == 1.0;
    auto dtype = [&](size_t k) { return static_cast<at::ScalarType>(dtypes[k]); };
    // the saved gradient k times the upstream gradient, in its own (wide) dtype
    auto scaled = [&](size_t k) { return unit ? saved[k] : saved[k] * g.to(saved[k].scalar_type()); };
    variable_list out(11);  // one per forward argument
    for (size_t k = 0; k < 2; ++k) {
      if (ctx->needs_input_grad(k)) out[k] = scaled(k).to(dtype(k));
    }
    Tensor gs = ctx->needs_input_grad(2) ? scaled(2) : Tensor();
    Tensor gbias = (saved[3].defined() && ctx->needs_input_grad(3)) ? scaled(3) : Tensor();
    if (eps > 0) {
      // the derivative of −total/denom, step by step as autograd takes it through clip_engine_loss
      const Tensor &sum_a = saved[4], &sum_b = saved[5], &sum_b_pos = saved[6];
      const double dot = num[5], dot_pos = num[6], s64 = num[7];
      const double u = (-g64) / denom, v1 = u * (eps / nb), gd1 = v1 * s64;
      Tensor ca = sum_b * gd1, cb = sum_a * gd1;
      double cs = v1 * dot, cbias = v1 * (na * nb);
      Tensor cb_pos;
      if (sum_b_pos.defined()) {
        const double v2 = u * (eps / na), gd2 = v2 * s64;
        ca = ca + sum_b_pos * gd2;
        cb_pos = sum_a * gd2;
        cs = cs + v2 * dot_pos;
        cbias = cbias + v2 * (na * na);
      }
      const auto acc = saved[0].scalar_type();  // the wide dtype of the gradients
      if (out[0].defined()) out[0] = ca.to(acc).to(dtype(0)) + out[0];
      if (out[1].defined()) {
        Tensor c = cb.to(acc).to(dtype(1)).expand_as(out[1]).clone();
        if (cb_pos.defined()) {
          Tensor rows = c.narrow(0, int64_t(num[4]), int64_t(na));
          rows.copy_(cb_pos.to(acc).to(dtype(1)) + rows);
        }
        out[1] = c + out[1];
      }
      if (gs.defined()) gs = gs + at::scalar_tensor(cs, gs.options());
      if (gbias.defined()) gbias = gbias + at::scalar_tensor(cbias, gbias.options());
    }
    // a scale (bias) given as a one-element tensor of another shape gets its gradient in that shape
    if (gs.defined()) out[2] = gs.to(dtype(2)).reshape(std::vector<int64_t>(size_t(dims[0]), 1));
    if (gbias.defined()) out[3] = gbias.to(dtype(3)).reshape(std::vector<int64_t>(size_t(dims[1]), 1));
    return out;
  }
};

Tensor direct_loss(const Tensor& a, const Tensor& b, const Tensor& scale, const std::optional<Tensor>& bias,
                   int64_t kind, int64_t pos_offset, bool symmetric, double label_smoothing, int64_t chunk_rows,
                   int64_t cache_bytes) {
  TORCH_CHECK(kind == kDirectSoftmax || kind == kDirectSigmoid, "fastcon::direct_loss: kind must be 0 (softmax) or "
              "1 (sigmoid), got ", kind);
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(1) && a.size(0) > 0 && b.size(0) > 0,
              "fastcon::direct_loss: a and b must be non-empty (N, D) tensors of one D, got ", a.sizes(), " and ",
              b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type() && a.is_floating_point(), "fastcon::direct_loss: a and b must "
              "share a floating dtype, got ", a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu() && scale.device().is_cpu() &&
                  (!bias.has_value() || bias->device().is_cpu()),
              "fastcon::direct_loss: every input must be a CPU tensor");
  TORCH_CHECK(scale.numel() == 1 && (!bias.has_value() || bias->numel() == 1),
              "fastcon::direct_loss: scale and bias must hold one element each");
  TORCH_CHECK(pos_offset >= 0 && (kind == kDirectSigmoid || pos_offset + a.size(0) <= b.size(0)),
              "fastcon::direct_loss: pos_offset=", pos_offset, " does not fit ", a.size(0), " rows in ", b.size(0),
              " columns");
  TORCH_CHECK(label_smoothing >= 0 && label_smoothing <= 1 && (kind == kDirectSoftmax || label_smoothing == 0),
              "fastcon::direct_loss: label_smoothing must be in [0, 1] (softmax only), got ", label_smoothing);
  TORCH_CHECK(chunk_rows >= 1 && cache_bytes >= 0, "fastcon::direct_loss: chunk_rows must be >= 1 and cache_bytes "
              ">= 0, got ", chunk_rows, " and ", cache_bytes);
  const bool need_grad = at::GradMode::is_enabled() &&
                         (a.requires_grad() || b.requires_grad() || scale.requires_grad() ||
                          (bias.has_value() && bias->requires_grad()));
  return DirectLoss::apply(a, b, scale, bias, kind, pos_offset, symmetric, label_smoothing, chunk_rows, cache_bytes,
                           need_grad);
}

}  // namespace
}  // namespace cpu
}  // namespace fastcon

TORCH_LIBRARY(fastcon, m) {
  m.def(
      "lse_stats(Tensor a, Tensor b, Tensor scale, Tensor bias, int pos_offset, int chunk_rows) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "softmax_grad(Tensor a, Tensor b, Tensor scale, Tensor bias, Tensor row_lse, Tensor col_lse, int pos_offset, "
      "float w_row, float w_col, float w_pos, int chunk_rows) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "softmax_fused(Tensor a, Tensor b, Tensor scale, Tensor bias, int pos_offset, float w_row, float w_col, "
      "float w_pos, int chunk_rows, int cache_bytes) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "sigmoid_fused(Tensor a, Tensor b, Tensor scale, Tensor bias, int pos_offset, float w, int chunk_rows, "
      "bool need_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "sigmoid_prefix_fused(Tensor a, Tensor b, Tensor scale, Tensor bias, int pos_offset, float w, float[] weights, "
      "int chunk_rows, bool need_grad, int[] dims, Tensor row_scale, Tensor col_scale) -> Tensor[]");
  m.def("direct_loss(Tensor a, Tensor b, Tensor scale, Tensor? bias, int kind, int pos_offset, bool symmetric, "
        "float label_smoothing, int chunk_rows, int cache_bytes) -> Tensor");
  m.def("simd_level() -> str", [] { return std::string(fastcon::cpu::simd_level()); });
}

TORCH_LIBRARY_IMPL(fastcon, CPU, m) {
  m.impl("lse_stats", &fastcon::cpu::lse_stats);
  m.impl("softmax_grad", &fastcon::cpu::softmax_grad);
  m.impl("softmax_fused", &fastcon::cpu::softmax_fused);
  m.impl("sigmoid_fused", &fastcon::cpu::sigmoid_fused);
  m.impl("sigmoid_prefix_fused", &fastcon::cpu::sigmoid_prefix_fused);
}

// The direct loss carries its own autograd node, so one kernel serves every dispatch key.
TORCH_LIBRARY_IMPL(fastcon, CompositeImplicitAutograd, m) { m.impl("direct_loss", &fastcon::cpu::direct_loss); }

// The shared library is importable as the Python module fastcon._C (no Python bindings: the
// operators are reached through torch.ops.fastcon.*; importing the module registers them).
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "fastcon C++ CPU engine (torch.ops.fastcon)",
                                          -1, nullptr};
  return PyModule_Create(&module_def);
}
