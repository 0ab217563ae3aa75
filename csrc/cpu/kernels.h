// Element-wise epilogue kernels of the fastcon CPU engine.
//
// Every kernel works on one row (or one row range) of a logits chunk. The chunk holds the unscaled
// dot products d = A_i·B_j; the logits are S = s·d + b, formed in registers. The float kernels use
// the polynomial exp / log1p below so that gcc can vectorise the loops (``#pragma omp simd`` gives
// it the licence to reassociate the reductions); the double kernels call libm.
//
// The exported entry points (``fc_*``) are compiled several times with ``target_clones`` on x86-64
// (AVX-512, AVX2+FMA, baseline) and picked at load time, so one binary runs on any x86-64 CPU.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__) && defined(FC_ISA_AVX2)
// A build for checking the AVX2 path on an AVX-512 machine (FASTCON_CPU_ISA=avx2, `make test-avx2`).
#define FC_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define FC_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FC_CLONES
#endif

#if defined(_MSC_VER)
#define FC_INLINE __forceinline
#else
#define FC_INLINE inline __attribute__((always_inline))
#endif

namespace fastcon {
namespace cpu {

// The clone of the fc_* kernels that target_clones' resolver picks on this CPU (backend_info's "simd").
inline const char* simd_level() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
  __builtin_cpu_init();
#if __GNUC__ >= 12
  const bool v3 = __builtin_cpu_supports("x86-64-v3");
  const bool v4 = __builtin_cpu_supports("x86-64-v4");
#else
  const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2");
  const bool v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                  __builtin_cpu_supports("avx512cd");
#endif
#if defined(FC_ISA_AVX2)
  (void)v4;
  return v3 ? "avx2 (x86-64-v3; built without the AVX-512 clone)" : "baseline (x86-64)";
#else
  return v4 ? "avx512 (x86-64-v4)" : v3 ? "avx2 (x86-64-v3)" : "baseline (x86-64)";
#endif
#else
  return "baseline (no per-CPU clones with this compiler or platform)";
#endif
}


template <typename T>
struct Math;

template <>
struct Math<double> {
  static FC_INLINE double exp(double x) { return std::exp(x); }
  // log(1 + t) for t in [0, 1].
  static FC_INLINE double log1p_unit(double t) { return std::log1p(t); }
  static FC_INLINE double log(double x) { return std::log(x); }
};

FC_INLINE int32_t fc_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof(i));
  return i;
}

FC_INLINE float fc_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof(f));
  return f;
}

template <>
struct Math<float> {
  // exp(x) = 2^k · e^r with k = round(x / ln 2), r = x − k·ln 2 (|r| <= ln2/2), e^r by its Taylor
  // polynomial of degree 7 (truncation error < 1e-8 relative). ln 2 is split in a high part with few
  // significant bits (k·LN2_HI is exact) and a low correction. Results below 2^-126 are flushed to 0
  // (so exp(−inf) = 0), results above 2^127·√2 become +inf, NaN stays NaN.
  static FC_INLINE float exp(float x) {
    const float kLo = -87.6f;  // k >= -126 keeps 2^k a normal number
    const float kHi = 88.3f;   // k <= 127
    const float kLog2e = 1.44269504088896341f;
    const float kLn2Hi = 0.693359375f;
    const float kLn2Lo = -2.12194440e-4f;
    const float kMagic = 12582912.0f;  // 1.5·2^23: adding it rounds to an integer in the low bits
    float xc = x < kLo ? kLo : x;
    xc = xc > kHi ? kHi : xc;
    float kf = xc * kLog2e + kMagic;
    int32_t k = fc_bits(kf) - fc_bits(kMagic);
    kf -= kMagic;
    float r = xc - kf * kLn2Hi;
    r = r - kf * kLn2Lo;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    float y = p * fc_float((k + 127) << 23);
    y = x < kLo ? 0.0f : y;
    y = x > kHi ? std::numeric_limits<float>::infinity() : y;
    return y;
  }

  // log(1 + t) for t in [0, 1] as 2·atanh(u), u = t / (2 + t) in [0, 1/3]: the odd series
  // 2u·Σ u^(2n)/(2n+1) truncated after n = 8 (relative error < 2e-9). No cancellation anywhere.
  static FC_INLINE float log1p_unit(float t) {
    float u = t / (2.0f + t);
    float u2 = u * u;
    float p = 1.0f / 17.0f;
    p = p * u2 + 1.0f / 15.0f;
    p = p * u2 + 1.0f / 13.0f;
    p = p * u2 + 1.0f / 11.0f;
    p = p * u2 + 1.0f / 9.0f;
    p = p * u2 + 1.0f / 7.0f;
    p = p * u2 + 1.0f / 5.0f;
    p = p * u2 + 1.0f / 3.0f;
    p = p * u2 + 1.0f;
    return 2.0f * u * p;
  }

  // log(x) for a normal x > 0: x = m·2^e with m in [1, 2), log x = e·ln 2 + log1p_unit(m − 1).
  static FC_INLINE float log(float x) {
    const int32_t bits = fc_bits(x);
    const int32_t e = ((bits >> 23) & 0xff) - 127;
    const float m = fc_float((bits & 0x007fffff) | 0x3f800000);
    return float(e) * 0.693147180559945309f + log1p_unit(m - 1.0f);
  }
};

template <typename T>
FC_INLINE T inf() {
  return std::numeric_limits<T>::infinity();
}

// An entry of G as the gradient GEMMs read it: a subnormal value (below 2^-126 in fp32; a softmax
// weight times 1/N, e.g. at temperature 0.01) is 0. Its contribution is below what fp32 resolves
// beside the row's other terms, and subnormal operands slow the GEMM by an order of magnitude on
// x86 cores without flush-to-zero.
template <typename T>
FC_INLINE T flush_subnormal(T g) {
  return (g < std::numeric_limits<T>::min() && g > -std::numeric_limits<T>::min()) ? T(0) : g;
}

// The shift used for a log-sum-exp whose maximum is m: m itself, or 0 when m is infinite (as
// torch.logsumexp does, so an all −inf row gives −inf and a +inf entry gives +inf).
template <typename T>
FC_INLINE T lse_shift(T m) {
  return (m == inf<T>() || m == -inf<T>()) ? T(0) : m;
}

// ---- stats, sweep 1: returns max_j S_j and updates cmax[j] = max(cmax[j], S_j).
template <typename T>
FC_INLINE T k_rowmax_colmax(const T* __restrict d, int64_t n, T s, T b, T* __restrict cmax) {
  T m = -inf<T>();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) {
    T v = d[j] * s + b;
    m = v > m ? v : m;
    T c = cmax[j];
    cmax[j] = v > c ? v : c;
  }
  return m;
}

// ---- stats, sweep 2: the sums of exp(S_j − shift) without the terms at the shift itself, which
// are exactly 1 and are counted instead: returns Σ_{S_j != rsh} exp(S_j − rsh) and writes the number
// of j with S_j == rsh to *rcnt; adds exp(S_j − csh[j]) to csum[j], or 1 to ccnt[j] where S_j == csh[j].
// Summing the terms below the maximum apart from the 1 of the maximum keeps their precision: the LSE
// is then shift + log1p((count − 1) + sum), exact to the precision of that small sum, where a sum
// 1 + ε in T would round ε to ulp(1).
template <typename T>
FC_INLINE T k_rowexp_colexp(const T* __restrict d, int64_t n, T s, T b, T rsh, const T* __restrict csh,
                            T* __restrict csum, T* __restrict ccnt, T* rcnt) {
  T acc = 0, cnt = 0;
#pragma omp simd reduction(+ : acc, cnt)
  for (int64_t j = 0; j < n; ++j) {
    T v = d[j] * s + b;
    T er = Math<T>::exp(v - rsh);
    bool rt = v == rsh;
    acc += rt ? T(0) : er;
    cnt += rt ? T(1) : T(0);
    T c = csh[j];
    T ec = Math<T>::exp(v - c);
    bool ct = v == c;
    csum[j] += ct ? T(0) : ec;
    ccnt[j] += ct ? T(1) : T(0);
  }
  *rcnt = cnt;
  return acc;
}

// ---- stats: a new column maximum tmax (>= cmax) arrived; rescale the running sums from the old
// shift to the new one (factor exp(old − new) <= 1), then store the new max and shift.
template <typename T>
FC_INLINE void k_rescale(T* __restrict cmax, T* __restrict csum, T* __restrict csh, const T* __restrict tmax,
                         int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    T o = cmax[j];
    T nw = tmax[j];
    T nsh = lse_shift(nw);
    T f = Math<T>::exp(csh[j] - nsh);
    f = (o == -inf<T>()) ? T(0) : f;
    f = (o == nw) ? T(1) : f;
    csum[j] *= f;
    cmax[j] = nw;
    csh[j] = nsh;
  }
}

// ---- softmax gradient of one row, in place allowed (g may equal d):
// G_j = w_row·exp(S_j − rl) [+ w_col·exp(S_j − cl_j)]; returns Σ G·d and Σ G. The (float64) LSEs come
// split in two numbers of T, rl = rhi + rlo and cl_j = chi[j] + clo[j], and the exponents are formed
// as (S − hi) − lo: S − hi is exact when the two are close (the logits that matter), so the exponent
// keeps the precision of the float64 LSE without any double arithmetic per element. An LSE of +inf
// comes as (inf, 0) and gives exp(−inf) = 0.
template <typename T, bool kCol>
FC_INLINE void k_grad(const T* d, T* g, int64_t n, T s, T b, T rhi, T rlo, T wr, const T* __restrict chi,
                      const T* __restrict clo, T wc, T* out_gs, T* out_gb) {
  T as = 0, ab = 0;
#pragma omp simd reduction(+ : as, ab)
  for (int64_t j = 0; j < n; ++j) {
    T dv = d[j];
    T v = dv * s + b;
    T e = Math<T>::exp((v - rhi) - rlo) * wr;
    if (kCol) e += Math<T>::exp((v - chi[j]) - clo[j]) * wc;
    as += e * dv;
    ab += e;
    g[j] = flush_subnormal(e);
  }
  *out_gs = as;
  *out_gb = ab;
}

// A row's and the columns' weights of a general target's pass 2 (k_target_grad): the row weight, its
// split LSE, its target mass and smoothing target; per column the weight, split LSE, mass and
// smoothing target (the columns only with a column direction).
template <typename T>
struct TargetGradRow {
  T wr, rhi, rlo, mass, qk;
};

template <typename T>
struct TargetGradCols {
  const T* wc;
  const T* hi;
  const T* lo;
  const T* mass;
  const T* qk;
};

// ---- pass 2 of a general target without soft targets, one row whose pairs are all kept (a plain
// target: positives by id only). At the row's non-positives G_j = wr·(exp(S_j − rl)·rmass − qk)
// [+ wc_j·(exp(S_j − cl_j)·cmass_j − qck_j)], the LSEs split as in k_grad; the positives
// (cids[j] == rid >= 0) keep g[j] = d[j] and are left out of the returned Σ G·d and Σ G, for the
// caller to form exactly (an exp(x) − q near 1 − 1 needs expm1; they are one or a few per row).
template <typename T, bool kCol>
FC_INLINE void k_target_grad(const T* d, T* g, int64_t n, T s, T b, const int64_t* __restrict cids, int64_t rid,
                             const TargetGradRow<T>& r, const TargetGradCols<T>& c, T* out_gs, T* out_gb) {
  T as = 0, ab = 0;
#pragma omp simd reduction(+ : as, ab)
  for (int64_t j = 0; j < n; ++j) {
    T dv = d[j];
    T v = dv * s + b;
    T e = r.wr * (Math<T>::exp((v - r.rhi) - r.rlo) * r.mass - r.qk);
    if (kCol) e += c.wc[j] * (Math<T>::exp((v - c.hi[j]) - c.lo[j]) * c.mass[j] - c.qk[j]);
    const bool p = rid >= 0 && cids[j] == rid;
    e = p ? T(0) : e;
    as += e * dv;
    ab += e;
    g[j] = p ? dv : flush_subnormal(e);
  }
  *out_gs = as;
  *out_gb = ab;
}

// ---- pass 1 of a general target, one row whose pairs are all kept (a plain target: positives by id):
// L_j = s·d_j + b and P_j = [cids[j] == rid >= 0]; returns max_j L_j and writes the number of positives
// and their summed logits, and the sum of all logits (*sk, with kSmooth); with kSym the columns' counts
// and sums (cnp, csp; with kSmooth also cnk, csk).
template <typename T, bool kSym, bool kSmooth>
FC_INLINE T k_target_row(const T* __restrict d, T* __restrict L, T* __restrict P, int64_t n, T s, T b,
                         const int64_t* __restrict cids, int64_t rid, double* cnp, double* csp, double* cnk,
                         double* csk, T* out_np, double* out_sp, double* out_sk) {
  // Three sweeps over the row (in L1), each with reductions of one type: GCC 12 miscompiles a float
  // max beside double sums and column stores in one loop under -fno-trapping-math at x86-64-v3/v4.
  T mm = -inf<T>();
#pragma omp simd reduction(max : mm)
  for (int64_t j = 0; j < n; ++j) {
    const T v = d[j] * s + b;
    L[j] = v;
    P[j] = (rid >= 0 && cids[j] == rid) ? T(1) : T(0);
    mm = v > mm ? v : mm;
  }
  double np = 0, sp = 0, sk = 0;
#pragma omp simd reduction(+ : np, sp, sk)
  for (int64_t j = 0; j < n; ++j) {
    const double v = double(L[j]);
    const double p = double(P[j]);
    np += p;
    sp += p * v;
    if (kSmooth) sk += v;
  }
  if (kSym) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const double v = double(L[j]);
      const double p = double(P[j]);
      cnp[j] += p;
      csp[j] += p * v;
      if (kSmooth) {
        cnk[j] += 1.0;
        csk[j] += v;
      }
    }
  }
  *out_np = T(np);
  *out_sp = sp;
  *out_sk = sk;
  return mm;
}

// ---- a row's logits L_j = s·d_j + b: returns max_j L_j, and with ``smooth`` writes Σ_j L_j (float64)
// to *sum (a plain target's pass 1 without soft targets, whose positives come from an index).
// With column scales ``c`` (a Matryoshka prefix's tile straight from its accumulator d = P_k, r the
// row's scale): L_j = s·(d_j·r·c_j) + b, the tile formed as k_scale_row forms it.
template <typename T>
FC_INLINE T k_row_logits(const T* __restrict d, T* __restrict L, int64_t n, T s, T b, bool smooth, double* sum,
                         T r = T(1), const T* __restrict c = nullptr) {
  T mm = -inf<T>();
  if (c) {
#pragma omp simd reduction(max : mm)
    for (int64_t j = 0; j < n; ++j) {
      const T v = (d[j] * r * c[j]) * s + b;
      L[j] = v;
      mm = v > mm ? v : mm;
    }
  } else {
#pragma omp simd reduction(max : mm)
    for (int64_t j = 0; j < n; ++j) {
      const T v = d[j] * s + b;
      L[j] = v;
      mm = v > mm ? v : mm;
    }
  }
  double acc = 0;
  if (smooth) {  // (a loop of its own: see k_target_row)
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < n; ++j) acc += double(L[j]);
  }
  *sum = acc;
  return mm;
}

// ---- a row's LSE parts at the shift sh: returns Σ_{L_j != sh} exp(L_j − sh) and writes the number of
// L_j == sh to *cnt (k_rowexp_colexp's split, for one row).
template <typename T>
FC_INLINE T k_row_exp(const T* __restrict L, int64_t n, T sh, T* cnt) {
  T c = 0, acc = 0;
#pragma omp simd reduction(+ : c, acc)
  for (int64_t j = 0; j < n; ++j) {
    const T x = L[j];
    const bool at_shift = x == sh;
    c += at_shift ? T(1) : T(0);
    acc += at_shift ? T(0) : Math<T>::exp(x - sh);
  }
  *cnt = c;
  return acc;
}

// ---- Matryoshka prefixes (one pass over D): a row of prefix k's tile from the accumulator P_k,
// out_j = P_j·r·c_j (out may equal p).
template <typename T>
FC_INLINE void k_scale_row(const T* p, T* out, int64_t n, T r, const T* __restrict c) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] = p[j] * r * c[j];
}

// ---- ... and after pass 2's G of that row: the scales' gradient terms Σ_j G_j·P_j·c_j (returned) and
// col[j] += G_j·P_j·r, and G_j becomes H_j = r·G_j·c_j (the GEMMs' operand).
template <typename T>
FC_INLINE T k_prefix_grad_row(T* __restrict g, const T* __restrict p, int64_t n, T r, const T* __restrict c,
                              T* __restrict col) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) {
    const T gp = g[j] * p[j];
    acc += gp * c[j];
    col[j] += gp * r;
    g[j] = g[j] * r * c[j];
  }
  return acc;
}

// ---- Matryoshka pass 2 of a plain target's row straight from prefix k's accumulator P, in one sweep:
// the tile dv_j = P_j·r·c_j, its G_j as k_target_grad's at the non-positives (0 at the positives,
// cids[j] == rid >= 0, which the caller forms exactly), H_j = r·G_j·c_j written to h, G_j·P_j·r added
// to col[j]; returns Σ_j G_j·P_j·c_j and writes Σ G·dv and Σ G.
template <typename T, bool kCol>
FC_INLINE T k_prefix_target_grad(const T* __restrict P, T* __restrict h, int64_t n, T s, T b, T r,
                                 const T* __restrict c, const int64_t* __restrict cids, int64_t rid,
                                 const TargetGradRow<T>& rw, const TargetGradCols<T>& cw, T* __restrict col,
                                 T* out_gs, T* out_gb) {
  T as = 0, ab = 0, rt = 0;
#pragma omp simd reduction(+ : as, ab, rt)
  for (int64_t j = 0; j < n; ++j) {
    const T dv = P[j] * r * c[j];
    const T v = dv * s + b;
    T e = rw.wr * (Math<T>::exp((v - rw.rhi) - rw.rlo) * rw.mass - rw.qk);
    if (kCol) e += cw.wc[j] * (Math<T>::exp((v - cw.hi[j]) - cw.lo[j]) * cw.mass[j] - cw.qk[j]);
    e = (rid >= 0 && cids[j] == rid) ? T(0) : e;
    as += e * dv;
    ab += e;
    const T g = flush_subnormal(e);
    const T gp = g * P[j];
    rt += gp * c[j];
    col[j] += gp * r;
    h[j] = g * r * c[j];
  }
  *out_gs = as;
  *out_gb = ab;
  return rt;
}

// ---- sigmoid loss of negatives, one row range: Σ softplus(S_j); with kGrad also G_j = w·σ(S_j)
// (written to g, which may equal d) and Σ G·d, Σ G.
template <typename T, bool kGrad>
FC_INLINE void k_sigmoid(const T* d, T* g, int64_t n, T s, T b, T w, T* out_loss, T* out_gs, T* out_gb) {
  T al = 0, as = 0, ab = 0;
#pragma omp simd reduction(+ : al, as, ab)
  for (int64_t j = 0; j < n; ++j) {
    T dv = d[j];
    T v = dv * s + b;
    T av = v < T(0) ? -v : v;
    T t = Math<T>::exp(-av);
    al += (v > T(0) ? v : T(0)) + Math<T>::log1p_unit(t);
    if (kGrad) {
      T q = T(1) / (T(1) + t);
      T e = (v >= T(0) ? q : t * q) * w;
      as += e * dv;
      ab += e;
      g[j] = flush_subnormal(e);
    }
  }
  *out_loss = al;
  if (kGrad) {
    *out_gs = as;
    *out_gb = ab;
  }
}

// ---- soft targets (a teacher's tile beside the student's, fastcon/targets/). A row of the
// student's logits L comes with −inf on its dropped pairs and P marking its positives; td holds the
// teacher's dot products of the row. The teacher's value of a pair is t = c1·td + c0 (a linear
// teacher) or t = s_t·td (softmax), its row probability t / n_i or exp(t − n_i) and its column one
// t / n_j or exp(t − n_j), the float64 normalisers n split in (hi, lo) as the LSEs of k_grad are.

// x·log x (0 at 0; subnormal x, whose term is below 1e-37, count as 0).
template <typename T>
FC_INLINE T xlogx(T x) {
  const bool normal = x >= std::numeric_limits<T>::min();
  const T l = Math<T>::log(normal ? x : T(1));  // computed for every lane, then selected: no branch
  return normal ? T(x * l) : T(0);
}

template <typename T>
struct SoftRow {
  T soft, ts, c0, c1;  // the teacher's share of the targets, its scale, a linear teacher's c0, c1
  T rhi, rlo;          // the teacher's row normaliser
  T hr;                // with the entropy: the hard targets' share at a positive of the row
  T wr, shi, slo, mass, qp, qk;  // pass 2: the row weight, the student's row LSE, the row's target
                                 // mass and its hard and smoothing targets
};

template <typename T>
struct SoftCols {
  const T* thi;  // the teacher's column normalisers
  const T* tlo;
  const T* hc;   // entropy: the hard share at a positive of each column
  const T* shi;  // pass 2: the student's column LSEs, masses, targets and weights
  const T* slo;
  const T* mass;
  const T* qcp;
  const T* qck;
  const T* wc;
};

template <typename T, bool kLinear>
FC_INLINE T soft_prob(T t, T hi, T lo) {
  return kLinear ? T(t / hi) : Math<T>::exp((t - hi) - lo);
}

// Pass 1: adds Σ Qt·S (and with kEnt Σ Q·log Q of Q = soft·Qt + hard·[pos]/|P|) of the row to
// *xrow (*erow) and, with kCol, of each column to xcol[j] (ecol[j]), all in float64. (The row's
// numbers are copied to locals first, and the probabilities computed for every pair then selected:
// read through the reference, or behind a condition, they keep gcc from vectorising the loop; so do
// positives as bytes, hence P in T.)
template <typename T, bool kLinear, bool kCol, bool kEnt>
FC_INLINE void k_soft_stats(const T* __restrict L, const T* __restrict P, const T* __restrict td, int64_t n,
                            const SoftRow<T>& r, const SoftCols<T>& c, double* __restrict xcol,
                            double* __restrict ecol, double* xrow, double* erow) {
  const T soft = r.soft, ts = r.ts, c0 = r.c0, c1 = r.c1, rhi = r.rhi, rlo = r.rlo, hr = r.hr;
  const T* __restrict thi = c.thi;
  const T* __restrict tlo = c.tlo;
  const T* __restrict hc = c.hc;
  double xr = 0, er = 0;
#pragma omp simd reduction(+ : xr, er)
  for (int64_t j = 0; j < n; ++j) {
    const T v = L[j];
    const T vk = v != -inf<T>() ? v : T(0);
    const T t = kLinear ? T(td[j] * c1 + c0) : T(td[j] * ts);
    T qr = soft_prob<T, kLinear>(t, rhi, rlo);
    qr = v != -inf<T>() ? qr : T(0);
    xr += double(qr * vk);
    const T pos = P[j];
    if (kEnt) er += double(xlogx<T>(soft * qr + pos * hr));
    if (kCol) {
      T qc = soft_prob<T, kLinear>(t, thi[j], tlo[j]);
      qc = v != -inf<T>() ? qc : T(0);
      xcol[j] += double(qc * vk);
      if (kEnt) ecol[j] += double(xlogx<T>(soft * qc + pos * hc[j]));
    }
  }
  *xrow += xr;
  if (kEnt) *erow += er;
}

// Pass 2, in place (g may equal d): G = w_r·(P_row·mass − q_pos·[pos] − q_keep − soft·Qt_row)
// [+ w_c·(the same of the column)] on the kept pairs, 0 on the dropped ones; returns Σ G·d, Σ G.
template <typename T, bool kLinear, bool kCol>
FC_INLINE void k_soft_grad(const T* d, T* g, const T* __restrict L, const T* __restrict P,
                           const T* __restrict td, int64_t n, const SoftRow<T>& r, const SoftCols<T>& c, T* out_gs,
                           T* out_gb) {
  const T soft = r.soft, ts = r.ts, c0 = r.c0, c1 = r.c1, rhi = r.rhi, rlo = r.rlo;
  const T wr = r.wr, shi = r.shi, slo = r.slo, mass = r.mass, qp = r.qp, qk = r.qk;
  const T* __restrict thi = c.thi;
  const T* __restrict tlo = c.tlo;
  const T* __restrict cshi = c.shi;
  const T* __restrict cslo = c.slo;
  const T* __restrict cmass = c.mass;
  const T* __restrict qcp = c.qcp;
  const T* __restrict qck = c.qck;
  const T* __restrict wc = c.wc;
  T as = 0, ab = 0;
#pragma omp simd reduction(+ : as, ab)
  for (int64_t j = 0; j < n; ++j) {
    const T dv = d[j];
    const T v = L[j];
    const T pos = P[j];
    const T t = kLinear ? T(td[j] * c1 + c0) : T(td[j] * ts);
    T e = wr * (Math<T>::exp((v - shi) - slo) * mass - pos * qp - qk - soft * soft_prob<T, kLinear>(t, rhi, rlo));
    if (kCol) {
      e += wc[j] * (Math<T>::exp((v - cshi[j]) - cslo[j]) * cmass[j] - pos * qcp[j] - qck[j] -
                    soft * soft_prob<T, kLinear>(t, thi[j], tlo[j]));
    }
    e = v != -inf<T>() ? e : T(0);
    as += e * dv;
    ab += e;
    g[j] = flush_subnormal(e);
  }
  *out_gs = as;
  *out_gb = ab;
}

// ---- late interaction (csrc/cpu/late.cpp): one row k of a pair's tile of dot products p_k·t_r.
// madd[r] is 0 for a real token r and −inf for padding (so v = d[r] + madd[r] is −inf there, or NaN
// for a NaN or +inf product, which the max ignores either way). Returns the max over r of v; when cmax
// is given, cmax[r] = max(cmax[r], v), and when carg is given too, carg[r] = k where the row raises it
// strictly (a tie keeps the lowest k). *nan is set when a real entry is NaN (a comparison would drop
// it; the caller returns NaN). An add and a float flag: an 8-bit mask and a select cost AVX2 four
// times as much here.
template <typename T>
FC_INLINE T k_late_row(const T* __restrict d, const T* __restrict madd, int64_t n, T* __restrict cmax,
                       int32_t* __restrict carg, int32_t k, bool* nan) {
  T m = -inf<T>();
  T bad = 0;
  if (cmax == nullptr) {
#pragma omp simd reduction(max : m) reduction(+ : bad)
    for (int64_t r = 0; r < n; ++r) {
      const T v = d[r] + madd[r];
      m = v > m ? v : m;
      bad += (v != v && madd[r] == T(0)) ? T(1) : T(0);
    }
  } else if (carg == nullptr) {
#pragma omp simd reduction(max : m) reduction(+ : bad)
    for (int64_t r = 0; r < n; ++r) {
      const T v = d[r] + madd[r];
      m = v > m ? v : m;
      bad += (v != v && madd[r] == T(0)) ? T(1) : T(0);
      const T c = cmax[r];
      cmax[r] = v > c ? v : c;
    }
  } else {
#pragma omp simd reduction(max : m) reduction(+ : bad)
    for (int64_t r = 0; r < n; ++r) {
      const T v = d[r] + madd[r];
      m = v > m ? v : m;
      bad += (v != v && madd[r] == T(0)) ? T(1) : T(0);
      const bool up = v > cmax[r];
      cmax[r] = up ? v : cmax[r];
      carg[r] = up ? k : carg[r];
    }
  }
  if (bad != T(0)) *nan = true;
  return m;
}

// dst[0:n] += g · src[0:n]
template <typename T>
FC_INLINE void k_axpy(T* __restrict dst, const T* __restrict src, int64_t n, T g) {
#pragma omp simd
  for (int64_t e = 0; e < n; ++e) dst[e] += g * src[e];
}

// Exported (multi-versioned) entry points, defined in kernels.cpp.
#define FC_DECLARE(T)                                                                                      \
  T fc_rowmax_colmax(const T* d, int64_t n, T s, T b, T* cmax);                                             \
  T fc_rowexp_colexp(const T* d, int64_t n, T s, T b, T rsh, const T* csh, T* csum, T* ccnt, T* rcnt);      \
  void fc_rescale(T* cmax, T* csum, T* csh, const T* tmax, int64_t n);                                      \
  void fc_grad(const T* d, T* g, int64_t n, T s, T b, T rhi, T rlo, T wr, const T* chi, const T* clo, T wc, \
               bool use_col, T* gs, T* gb);                                                                 \
  void fc_sigmoid(const T* d, T* g, int64_t n, T s, T b, T w, bool need_grad, T* loss, T* gs, T* gb);       \
  void fc_scale_row(const T* p, T* out, int64_t n, T r, const T* c);                                         \
  T fc_target_row(const T* d, T* L, T* P, int64_t n, T s, T b, const int64_t* cids, int64_t rid, bool sym,    \
                  bool smooth, double* cnp, double* csp, double* cnk, double* csk, T* np, double* sp,          \
                  double* sk);                                                                                \
  T fc_row_exp(const T* L, int64_t n, T sh, T* cnt);                                                          \
  T fc_row_logits(const T* d, T* L, int64_t n, T s, T b, bool smooth, double* sum, T r, const T* c);       \
  T fc_prefix_grad_row(T* g, const T* p, int64_t n, T r, const T* c, T* col);                                 \
  T fc_prefix_target_grad(const T* P, T* h, int64_t n, T s, T b, T r, const T* c, const int64_t* cids,         \
                          int64_t rid, const TargetGradRow<T>& rw, const TargetGradCols<T>& cw, bool use_col,  \
                          T* col, T* gs, T* gb);                                                              \
  void fc_target_grad(const T* d, T* g, int64_t n, T s, T b, const int64_t* cids, int64_t rid,                \
                      const TargetGradRow<T>& r, const TargetGradCols<T>& c, bool col, T* gs, T* gb);         \
  void fc_soft_stats(const T* L, const T* P, const T* td, int64_t n, const SoftRow<T>& r,              \
                     const SoftCols<T>& c, bool linear, bool col, bool ent, double* xcol, double* ecol,      \
                     double* xrow, double* erow);                                                            \
  void fc_soft_grad(const T* d, T* g, const T* L, const T* P, const T* td, int64_t n,                  \
                    const SoftRow<T>& r, const SoftCols<T>& c, bool linear, bool col, T* gs, T* gb);   \
  T fc_late_row(const T* d, const T* madd, int64_t n, T* cmax, int32_t* carg, int32_t k, bool* nan);   \
  void fc_axpy(T* dst, const T* src, int64_t n, T g);

FC_DECLARE(float)
FC_DECLARE(double)
#undef FC_DECLARE

}  // namespace cpu
}  // namespace fastcon
