// Multi-versioned instantiations of the epilogue kernels (see kernels.h). Kept apart from the ATen
// code so that only these small loops are compiled once per instruction set.
#include "kernels.h"

namespace fastcon {
namespace cpu {

// The eight instantiations of k_soft_stats, by (linear teacher, column direction, entropy).
#define FC_SOFT_STATS_ONE(T, LIN, COL, ENT) k_soft_stats<T, LIN, COL, ENT>(L, P, td, n, r, c, xcol, ecol, xrow, erow);
#define FC_SOFT_STATS_ENT(T, LIN, COL)      \
  if (ent) {                                \
    FC_SOFT_STATS_ONE(T, LIN, COL, true)    \
  } else {                                  \
    FC_SOFT_STATS_ONE(T, LIN, COL, false)   \
  }
#define FC_SOFT_STATS_COL(T, LIN) \
  if (col) {                      \
    FC_SOFT_STATS_ENT(T, LIN, true)  \
  } else {                        \
    FC_SOFT_STATS_ENT(T, LIN, false) \
  }
#define FC_SOFT_STATS(T, linear, col, ent) \
  if (linear) {                            \
    FC_SOFT_STATS_COL(T, true)             \
  } else {                                 \
    FC_SOFT_STATS_COL(T, false)            \
  }

#define FC_DEFINE(T)                                                                                        \
  FC_CLONES T fc_rowmax_colmax(const T* d, int64_t n, T s, T b, T* cmax) {                                   \
    return k_rowmax_colmax<T>(d, n, s, b, cmax);                                                             \
  }                                                                                                          \
  FC_CLONES T fc_rowexp_colexp(const T* d, int64_t n, T s, T b, T rsh, const T* csh, T* csum, T* ccnt,       \
                               T* rcnt) {                                                                    \
    return k_rowexp_colexp<T>(d, n, s, b, rsh, csh, csum, ccnt, rcnt);                                       \
  }                                                                                                          \
  FC_CLONES void fc_rescale(T* cmax, T* csum, T* csh, const T* tmax, int64_t n) {                            \
    k_rescale<T>(cmax, csum, csh, tmax, n);                                                                  \
  }                                                                                                          \
  FC_CLONES void fc_grad(const T* d, T* g, int64_t n, T s, T b, T rhi, T rlo, T wr, const T* chi,           \
                         const T* clo, T wc, bool use_col, T* gs, T* gb) {                                   \
    if (use_col)                                                                                             \
      k_grad<T, true>(d, g, n, s, b, rhi, rlo, wr, chi, clo, wc, gs, gb);                                    \
    else                                                                                                     \
      k_grad<T, false>(d, g, n, s, b, rhi, rlo, wr, chi, clo, wc, gs, gb);                                   \
  }                                                                                                          \
  FC_CLONES void fc_sigmoid(const T* d, T* g, int64_t n, T s, T b, T w, bool need_grad, T* loss, T* gs,       \
                            T* gb) {                                                                         \
    if (need_grad)                                                                                           \
      k_sigmoid<T, true>(d, g, n, s, b, w, loss, gs, gb);                                                    \
    else                                                                                                     \
      k_sigmoid<T, false>(d, g, n, s, b, w, loss, gs, gb);                                                   \
  }                                                                                                          \
  FC_CLONES T fc_target_row(const T* d, T* L, T* P, int64_t n, T s, T b, const int64_t* cids, int64_t rid,    \
                             bool sym, bool smooth, double* cnp, double* csp, double* cnk, double* csk, T* np,   \
                             double* sp, double* sk) {                                                       \
    if (sym) {                                                                                               \
      if (smooth) return k_target_row<T, true, true>(d, L, P, n, s, b, cids, rid, cnp, csp, cnk, csk, np, sp, sk); \
      return k_target_row<T, true, false>(d, L, P, n, s, b, cids, rid, cnp, csp, cnk, csk, np, sp, sk);     \
    }                                                                                                        \
    if (smooth) return k_target_row<T, false, true>(d, L, P, n, s, b, cids, rid, cnp, csp, cnk, csk, np, sp, sk); \
    return k_target_row<T, false, false>(d, L, P, n, s, b, cids, rid, cnp, csp, cnk, csk, np, sp, sk);       \
  }                                                                                                          \
  FC_CLONES T fc_row_exp(const T* L, int64_t n, T sh, T* cnt) { return k_row_exp<T>(L, n, sh, cnt); }        \
  FC_CLONES T fc_row_logits(const T* d, T* L, int64_t n, T s, T b, bool smooth, double* sum, T r, const T* c) { \
    return k_row_logits<T>(d, L, n, s, b, smooth, sum, r, c);                                                \
  }                                                                                                          \
  FC_CLONES void fc_scale_row(const T* p, T* out, int64_t n, T r, const T* c) { k_scale_row<T>(p, out, n, r, c); } \
  FC_CLONES T fc_prefix_grad_row(T* g, const T* p, int64_t n, T r, const T* c, T* col) {                      \
    return k_prefix_grad_row<T>(g, p, n, r, c, col);                                                         \
  }                                                                                                          \
  FC_CLONES T fc_prefix_target_grad(const T* P, T* h, int64_t n, T s, T b, T r, const T* c, const int64_t* cids, \
                                    int64_t rid, const TargetGradRow<T>& rw, const TargetGradCols<T>& cw,          \
                                    bool use_col, T* col, T* gs, T* gb) {                                         \
    if (use_col) return k_prefix_target_grad<T, true>(P, h, n, s, b, r, c, cids, rid, rw, cw, col, gs, gb);    \
    return k_prefix_target_grad<T, false>(P, h, n, s, b, r, c, cids, rid, rw, cw, col, gs, gb);                \
  }                                                                                                          \
  FC_CLONES void fc_target_grad(const T* d, T* g, int64_t n, T s, T b, const int64_t* cids, int64_t rid,     \
                                const TargetGradRow<T>& r, const TargetGradCols<T>& c, bool col, T* gs,       \
                                T* gb) {                                                                     \
    if (col)                                                                                                 \
      k_target_grad<T, true>(d, g, n, s, b, cids, rid, r, c, gs, gb);                                        \
    else                                                                                                     \
      k_target_grad<T, false>(d, g, n, s, b, cids, rid, r, c, gs, gb);                                       \
  }                                                                                                          \
  FC_CLONES void fc_soft_stats(const T* L, const T* P, const T* td, int64_t n, const SoftRow<T>& r,    \
                               const SoftCols<T>& c, bool linear, bool col, bool ent, double* xcol,          \
                               double* ecol, double* xrow, double* erow) {                                   \
    FC_SOFT_STATS(T, linear, col, ent)                                                                       \
  }                                                                                                          \
  FC_CLONES void fc_soft_grad(const T* d, T* g, const T* L, const T* P, const T* td, int64_t n,        \
                              const SoftRow<T>& r, const SoftCols<T>& c, bool linear, bool col, T* gs,       \
                              T* gb) {                                                                       \
    if (linear) {                                                                                            \
      if (col) k_soft_grad<T, true, true>(d, g, L, P, td, n, r, c, gs, gb);                                  \
      else k_soft_grad<T, true, false>(d, g, L, P, td, n, r, c, gs, gb);                                     \
    } else {                                                                                                 \
      if (col) k_soft_grad<T, false, true>(d, g, L, P, td, n, r, c, gs, gb);                                 \
      else k_soft_grad<T, false, false>(d, g, L, P, td, n, r, c, gs, gb);                                    \
    }                                                                                                        \
  }                                                                                                          \
  FC_CLONES T fc_late_row(const T* d, const T* madd, int64_t n, T* cmax, int32_t* carg, int32_t k,        \
                          bool* nan) {                                                                       \
    return k_late_row<T>(d, madd, n, cmax, carg, k, nan);                                                    \
  }                                                                                                          \
  FC_CLONES void fc_axpy(T* dst, const T* src, int64_t n, T g) { k_axpy<T>(dst, src, n, g); }

FC_DEFINE(float)
FC_DEFINE(double)
#undef FC_DEFINE

}  // namespace cpu
}  // namespace fastcon
