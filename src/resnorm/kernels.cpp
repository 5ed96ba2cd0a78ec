// Fused CPU kernels for resnorm.norms: a whole normalization layer in two calls.
//
//   norm_forward(x, ...)   statistics pass, the layer's per-(n, c) arithmetic, one
//                          y = x * scale + shift pass (then ReLU if fused)
//   norm_backward(g, ...)  one pass for the per-(n, c) sums of g' and g' * x, the closed-form
//                          backward arithmetic, one grad_x = g' * scale + x * c1 + c0 pass
//
// where g' = g, or with a fused ReLU g masked to where x * scale + shift > 0 (recomputed from
// x exactly as in the forward pass, so nothing more is stored). A layer is a sum of parts
// alpha_c * (x - mean) * rstd whose statistics are pooled by kind (see Kind and
// resnorm.norms._Pool); the per-(n, c) arithmetic mirrors resnorm.norms._parts and
// _Normalize.backward, which run the same math with tensor ops where these kernels do not
// apply. x may be NCHW-contiguous (or any contiguous (N, C, ...)) or channels_last, float32 or
// float64. Sums are accumulated in double by one thread in a fixed order, so results do not
// depend on the number of threads. Built with -ffp-contract=off so that x * scale + shift
// rounds the same in every pass. Small values are read and written through raw pointers: a
// layer costs a few tensor allocations, not dozens of small tensor ops.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#ifdef __AVX512F__
#include <immintrin.h>  // (x86 only: other CPUs take the portable conversion below)
#endif
#include <type_traits>
#include <utility>
#include <vector>

namespace {

struct Layout {
  int64_t n, c, hw;
  bool channels_last;  // memory order (n, hw, c) instead of (n, c, hw)
};

Layout layout_of(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 3, "resnorm kernels: expected (N, C, ...), got ", x.sizes());
  int64_t hw = 1;
  for (int64_t d = 2; d < x.dim(); ++d) hw *= x.size(d);
  if (x.is_contiguous()) return {x.size(0), x.size(1), hw, false};
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "resnorm kernels: expected a contiguous or channels_last tensor");
  return {x.size(0), x.size(1), hw, true};
}

// g in the same memory order as x (a copy only when autograd hands over another layout)
at::Tensor like(const at::Tensor& g, const Layout& l) {
  return g.contiguous(l.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

// the values of a small contiguous tensor of any float dtype, as doubles (empty tensor: `fill`)
std::vector<double> values(const at::Tensor& t, int64_t size, double fill) {
  if (!t.numel()) return std::vector<double>(size, fill);
  TORCH_CHECK(t.numel() == size, "resnorm kernels: expected ", size, " values, got ", t.numel());
  const at::Tensor c = t.is_contiguous() ? t : t.contiguous();
  std::vector<double> v(size);
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "resnorm_values", [&] {
    const scalar_t* p = c.data_ptr<scalar_t>();
    std::copy(p, p + size, v.begin());
  });
  return v;
}

// Scratch array `slot` of this thread, at least `size` long, kept from call to call (Kind tells
// apart sets of slots of one type). A layer's per-(n, c) arrays are 64-512 KB each; allocated
// afresh, they come back from the OS as new pages to fault in at every call (a training step
// frees and takes back far more memory than that), which cost as much as the passes themselves.
// Each slot starts at its own offset within a 4 KB page: rows of 512 doubles are 4 KB, and arrays
// walked side by side at equal page offsets stall every load behind the previous store ("4K
// aliasing", see cell_terms).
template <typename V, int Kind>
V* scratch(int slot, int64_t size) {
  thread_local std::vector<V> arrays[8];
  constexpr int64_t kPage = 4096 / sizeof(V);
  const int64_t shift = (Kind * 8 + slot + 1) * (64 / sizeof(V));  // each slot at its own offset within a page
  std::vector<V>& a = arrays[slot];
  if (int64_t(a.size()) < size + kPage + shift) a.resize(size + kPage + shift);
  const uintptr_t base = reinterpret_cast<uintptr_t>(a.data());
  return a.data() + (4096 - base % 4096) % 4096 / sizeof(V) + shift;
}
enum Scratch { kWork = 0, kCoef = 1, kGate = 2, kOut = 3 };

// Coefficients per (n, c) or per channel, in the element type T: `rows` x C values, rows = N, or
// 1 when every sample has the same ones (BN: batch or running statistics); at(n) is sample n's.
// A view of T values, or doubles converted into the thread's scratch slot `slot`.
template <typename T>
struct Coef {
  const T* v;
  int64_t step;
  Coef(const T* p, int64_t rows, int64_t channels) : v(p), step(rows == 1 ? 0 : channels) {}
  Coef(int slot, const double* p, int64_t rows, int64_t channels) : Coef(convert(slot, p, rows * channels), rows, channels) {}
  const T* at(int64_t n) const { return v + n * step; }
  static const T* convert(int slot, const double* p, int64_t size) {
    T* t = scratch<T, kCoef>(slot, size);
    std::copy(p, p + size, t);
    return t;
  }
};

int64_t grain(int64_t per_item) { return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, per_item)); }

// g masked by the fused ReLU: g where x * s + b > 0, else 0 (Gated), or g itself. Written as a
// product with a 0/1 factor so that it vectorises without branches (random signs would
// mispredict); only a non-finite g at a masked place differs (NaN instead of 0).
template <bool Gated, typename T>
inline T gate(T g, T x, T s, T b) {
  if constexpr (Gated) return g * T(x * s + b > T(0));
  return g;
}

// Sums are accumulated in double, in vector lanes: the inner loop is kLanes wide and fully
// unrolled (channels_last) or an OpenMP simd reduction (contiguous rows). Double keeps the
// per-(n, c) sums exact enough for float64 checks and finite where float32 partial sums of
// large activations and gradients would overflow; the passes stay memory-bound.
constexpr int64_t kLanes = 64;

// kLanes zeros: the gate coefficients where there is no gate
template <typename T>
alignas(64) constexpr T kZeros[kLanes] = {};

// Eight values of T in one vector (GCC/Clang vector extensions), and eight doubles
typedef float Float8 __attribute__((vector_size(32)));
typedef double Double8 __attribute__((vector_size(64)));
template <typename T>
using Vec8 = std::conditional_t<std::is_same_v<T, float>, Float8, Double8>;

template <typename T>
inline Vec8<T> load8(const T* p) {
  Vec8<T> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// as doubles (exact): one instruction with AVX-512 (GCC splits __builtin_convertvector in halves there)
inline Double8 to_double8(Double8 v) { return v; }
inline Double8 to_double8(Float8 v) {
#ifdef __AVX512F__
  return Double8(_mm512_cvtps_pd(__m256(v)));
#else
  return __builtin_convertvector(v, Double8);
#endif
}

// lane-wise s[k] = sum_i a'[i * stride + k] and q[k] = sum_i a' * b, over `rows` rows, where
// a' is a gated by b * ls[k] + lb[k] > 0 when Gated (a = g, b = x). Written with explicit
// vectors: as plain arrays, the 128 accumulators were zeroed in memory (rep stos) at every call,
// which at 2x2 maps (4 rows a call) cost as much as the sums. Lane by lane the same arithmetic
// as gate() and a plain double loop.
template <bool Gated, typename T>
inline void lane_sums(const T* a, const T* b, int64_t rows, int64_t stride, const T* ls, const T* lb, double* s,
                      double* q) {
  constexpr int kVecs = kLanes / 8;
  Double8 as[kVecs] = {}, aq[kVecs] = {};
  for (int64_t i = 0; i < rows; ++i) {
    const T* ra = a + i * stride;
    const T* rb = b + i * stride;
#pragma GCC unroll 8
    for (int v = 0; v < kVecs; ++v) {
      Vec8<T> va = load8(ra + 8 * v);
      const Vec8<T> vb = load8(rb + 8 * v);
      if constexpr (Gated) {
        const Vec8<T> on = vb * load8(ls + 8 * v) + load8(lb + 8 * v) > T(0) ? Vec8<T>{} + T(1) : Vec8<T>{};
        va = va * on;
      }
      const Double8 da = to_double8(va);
      as[v] += da;
      aq[v] += da * to_double8(vb);
    }
  }
#pragma GCC unroll 8
  for (int v = 0; v < kVecs; ++v) {
    std::memcpy(s + 8 * v, &as[v], sizeof as[v]);
    std::memcpy(q + 8 * v, &aq[v], sizeof aq[v]);
  }
}

// sums of a'[i] and a'[i] * b[i] over i < len folded into `outs` interleaved outputs (out[i % outs],
// outs divides kLanes); the gate of output j uses gs[j], gb[j]
template <bool Gated, typename T>
inline void strided_sums(const T* a, const T* b, int64_t len, int64_t outs, const T* gs, const T* gb, double* sa,
                         double* sab) {
  alignas(64) T ls[kLanes] = {}, lb[kLanes] = {};
  if (Gated)
    for (int64_t base = 0; base < kLanes; base += outs)
      for (int64_t j = 0; j < outs; ++j) ls[base + j] = gs[j], lb[base + j] = gb[j];
  double s[kLanes], q[kLanes];
  const int64_t main = len - len % kLanes;
  lane_sums<Gated>(a, b, main / kLanes, kLanes, ls, lb, s, q);
  std::fill(sa, sa + outs, 0.0);
  std::fill(sab, sab + outs, 0.0);
  for (int64_t base = 0; base < kLanes; base += outs)
    for (int64_t j = 0; j < outs; ++j) sa[j] += s[base + j], sab[j] += q[base + j];
  for (int64_t i = main, j = 0; i < len; ++i, j = j + 1 == outs ? 0 : j + 1) {
    const T va = gate<Gated>(a[i], b[i], ls[j], lb[j]);
    sa[j] += va;
    sab[j] += double(va) * double(b[i]);
  }
}

// sums of a'[i] and a'[i] * b[i] over one contiguous row of more than kShort values (one gate)
template <bool Gated, typename T>
inline void row_sums(const T* a, const T* b, int64_t len, T gs, T gb, double& sa, double& sab) {
  double s = 0, q = 0;
#pragma omp simd reduction(+ : s, q)
  for (int64_t i = 0; i < len; ++i) {
    const double va = gate<Gated>(a[i], b[i], gs, gb);
    s += va;
    q += va * double(b[i]);
  }
  sa = s;
  sab = q;
}

// NCHW rows up to this long (maps of 1x1 to 4x4) are handled a sample at a time, vectorised
// across rows (a row's values in order within a vector lane) instead of one call per row
constexpr int64_t kShort = 16;

// Calls f(std::integral_constant<int64_t, HW>) for the common short map sizes (1x1, 1x2, 1x3,
// 2x2, 2x3, 2x4, 3x3, 3x4, 4x4) so that row loops unroll, and f(HW = 0, read as "hw at run time") otherwise
template <typename F>
inline void with_row_length(int64_t hw, F f) {
  switch (hw) {
    case 1: return f(std::integral_constant<int64_t, 1>{});
    case 2: return f(std::integral_constant<int64_t, 2>{});
    case 3: return f(std::integral_constant<int64_t, 3>{});
    case 4: return f(std::integral_constant<int64_t, 4>{});
    case 6: return f(std::integral_constant<int64_t, 6>{});
    case 8: return f(std::integral_constant<int64_t, 8>{});
    case 9: return f(std::integral_constant<int64_t, 9>{});
    case 12: return f(std::integral_constant<int64_t, 12>{});
    case 16: return f(std::integral_constant<int64_t, 16>{});
    default: return f(std::integral_constant<int64_t, 0>{});
  }
}

// row sums of a[i] and a[i] * b[i] over `rows` short rows of length HW (or hw when HW = 0): each
// row is summed in order from 0, one row per vector lane
template <int64_t HW, typename T>
inline void short_row_sums(const T* a, const T* b, int64_t rows, int64_t hw, double* sa, double* sab) {
  const int64_t len = HW ? HW : hw;
#pragma omp simd
  for (int64_t r = 0; r < rows; ++r) {
    double s = 0, q = 0;
    for (int64_t i = 0; i < len; ++i) {
      const double va = a[r * len + i];
      s += va;
      q += va * double(b[r * len + i]);
    }
    sa[r] = s;
    sab[r] = q;
  }
}

// NCHW maps of up to kShort values: calls body(n, len) once per sample n (its C rows), len the row
// length as with_row_length passes it; false (and nothing called) for other layouts
template <typename F>
bool for_short_rows(const Layout& l, F body) {
  if (l.channels_last || l.hw > kShort) return false;
  with_row_length(l.hw, [&](auto len) {
    at::parallel_for(0, l.n, grain(l.hw * l.c), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) body(n, len);
    });
  });
  return true;
}

// calls f(i, r) for every value i of `rows` rows of length HW (hw when HW = 0), r the row of i
template <int64_t HW, typename F>
inline void map_short_rows(int64_t rows, int64_t hw, F f) {
  const int64_t len = HW ? HW : hw;
#pragma omp simd
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < len; ++k) f(r * len + k, r);
}

// per-(n, c) sums of a' and a' * b over the spatial axes, for a and b in layout l
template <bool Gated, typename T>
void sums(const T* a, const T* b, const Layout& l, const Coef<T>* gs, const Coef<T>* gb, double* sa,
          double* sab) {
  const int64_t C = l.c, HW = l.hw;
  const T zero = T(0);
  auto gate_row = [&](const Coef<T>* p, int64_t n) { return Gated ? p->at(n) : &zero; };
  if (for_short_rows(l, [&](int64_t n, auto len) {
        constexpr int64_t L = decltype(len)::value;
        const T *pa = a + n * C * HW, *pb = b + n * C * HW;
        if constexpr (Gated) {  // the gate first, in its own vectorised pass over the sample's rows
          T* t = scratch<T, kGate>(0, C * HW);
          const T *s = gs->at(n), *t0 = gb->at(n);
          map_short_rows<L>(C, HW, [&](int64_t i, int64_t r) { t[i] = gate<true>(pa[i], pb[i], s[r], t0[r]); });
          pa = t;
        }
        short_row_sums<L>(pa, pb, C, HW, sa + n * C, sab + n * C);
      }))
    return;
  if (!l.channels_last) {  // each (n, c) row is contiguous
    at::parallel_for(0, l.n * C, grain(HW), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin, n = begin / C, c = begin % C; r < end; ++r) {
        row_sums<Gated>(a + r * HW, b + r * HW, HW, gate_row(gs, n)[Gated ? c : 0], gate_row(gb, n)[Gated ? c : 0],
                        sa[r], sab[r]);
        if (++c == C) c = 0, ++n;
      }
    });
    return;
  }
  at::parallel_for(0, l.n, grain(HW * C), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const T* pa = a + n * HW * C;
      const T* pb = b + n * HW * C;
      const T *s = gate_row(gs, n), *t = gate_row(gb, n);
      if (kLanes % C == 0) {  // channel c is every C-th value: lane k holds channel k % C
        strided_sums<Gated>(pa, pb, HW * C, C, s, t, sa + n * C, sab + n * C);
        continue;
      }
      // other widths: kLanes channels at a time summed down the rows in registers, the rest
      // (C % kLanes channels) in a plain double loop
      double *oa = sa + n * C, *ob = sab + n * C;
      const int64_t full = C - C % kLanes;
      for (int64_t c0 = 0; c0 < full; c0 += kLanes)
        lane_sums<Gated>(pa + c0, pb + c0, HW, C, Gated ? s + c0 : kZeros<T>, Gated ? t + c0 : kZeros<T>, oa + c0,
                         ob + c0);
      std::fill(oa + full, oa + C, 0.0);
      std::fill(ob + full, ob + C, 0.0);
      for (int64_t i = 0; i < HW; ++i)
        for (int64_t c = full; c < C; ++c) {
          const T va = gate<Gated>(pa[i * C + c], pb[i * C + c], Gated ? s[c] : zero, Gated ? t[c] : zero);
          oa[c] += va;
          ob[c] += double(va) * double(pb[i * C + c]);
        }
    }
  });
}

// Runs body(offset, length, n, c, period) over the tensor in memory order: for NCHW one call per
// (n, c) row (every value has channel c, period 1); for channels_last one call per sample
// n (value j has channel j % C: c = 0, period C).
template <typename F>
void for_runs(const Layout& l, F body) {
  const int64_t C = l.c, HW = l.hw;
  if (!l.channels_last) {
    at::parallel_for(0, l.n * C, grain(HW), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) body(r * HW, HW, r / C, r % C, int64_t(1));
    });
  } else {
    at::parallel_for(0, l.n, grain(HW * C), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) body(n * HW * C, HW * C, n, int64_t(0), C);
    });
  }
}

// A run's coefficients as seen by map_run's index k: v[k] is the coefficient of the value it
// passes with k. Period 1 (an NCHW row): v = p, k = 0. A period that divides kLanes (channels_last,
// C <= 64): lane copies, v[k] = p[k % period]. Any other period (channels_last, C = 128, 512,
// 48...): v = p and k is the channel, walked a row of C values at a time.
template <typename T>
struct LaneCoef {
  alignas(64) T buf[kLanes];
  const T* v;
  LaneCoef(const T* p, int64_t period) : v(p) {
    if (period > 1 && kLanes % period == 0) {
      for (int64_t base = 0; base < kLanes; base += period) std::copy(p, p + period, buf + base);
      v = buf;
    }
  }
};

// calls f(i, k) for every value i of a run, in vectorisable loops with k as LaneCoef defines it
// (len is a multiple of period: a run is one (n, c) row, or one sample of C-value rows)
template <typename F>
inline void map_run(int64_t len, int64_t period, F f) {
  if (period == 1) {
    for (int64_t i = 0; i < len; ++i) f(i, int64_t(0));
  } else if (kLanes % period == 0) {
    int64_t i = 0;
    for (; i + kLanes <= len; i += kLanes)
      for (int64_t k = 0; k < kLanes; ++k) f(i + k, k);
    for (; i < len; ++i) f(i, i % kLanes);
  } else {
    for (int64_t i = 0; i < len; i += period)
      for (int64_t c = 0; c < period; ++c) f(i + c, c);
  }
}

// y = x * scale + shift (then max(y, 0) when Relu), one pass
template <bool Relu, typename T>
void affine_pass(const T* x, const Layout& l, const Coef<T>& scale, const Coef<T>& shift, T* y) {
  auto op = [](T v, T s, T b) {
    const T o = v * s + b;
    return Relu ? std::max(o, T(0)) : o;
  };
  if (for_short_rows(l, [&](int64_t n, auto len) {
        const T *s = scale.at(n), *b = shift.at(n), *px = x + n * l.c * l.hw;
        T* py = y + n * l.c * l.hw;
        map_short_rows<decltype(len)::value>(l.c, l.hw, [&](int64_t i, int64_t r) { py[i] = op(px[i], s[r], b[r]); });
      }))
    return;
  for_runs(l, [&](int64_t off, int64_t len, int64_t n, int64_t c, int64_t period) {
    const T *px = x + off;
    T* py = y + off;
    const LaneCoef<T> ls(scale.at(n) + c, period), lb(shift.at(n) + c, period);
    const T *vs = ls.v, *vb = lb.v;
    map_run(len, period, [&](int64_t i, int64_t k) { py[i] = op(px[i], vs[k], vb[k]); });
  });
}

// grad_x = g' * scale + x * c1 + c0, one pass (g' gated by x * scale + shift > 0 when Gated)
template <bool Gated, typename T>
void grad_input_pass(const T* g, const T* x, const Layout& l, const Coef<T>& scale,
                     const Coef<T>& shift, const Coef<T>& c1, const Coef<T>& c0, T* out) {
  auto op = [](T gv, T xv, T s, T b, T k1, T k0) { return gate<Gated>(gv, xv, s, b) * s + (xv * k1 + k0); };
  if (for_short_rows(l, [&](int64_t n, auto len) {
        const int64_t off = n * l.c * l.hw;
        const T *s = scale.at(n), *b = shift.at(n), *k1 = c1.at(n), *k0 = c0.at(n), *pg = g + off, *px = x + off;
        T* po = out + off;
        map_short_rows<decltype(len)::value>(l.c, l.hw, [&](int64_t i, int64_t r) {
          po[i] = op(pg[i], px[i], s[r], b[r], k1[r], k0[r]);
        });
      }))
    return;
  for_runs(l, [&](int64_t off, int64_t len, int64_t n, int64_t c, int64_t period) {
    const T *pg = g + off, *px = x + off;
    T* po = out + off;
    const LaneCoef<T> ls(scale.at(n) + c, period), lb(shift.at(n) + c, period), l1(c1.at(n) + c, period),
        l0(c0.at(n) + c, period);
    const T *vs = ls.v, *vb = lb.v, *v1 = l1.v, *v0 = l0.v;
    map_run(len, period, [&](int64_t i, int64_t k) { po[i] = op(pg[i], px[i], vs[k], vb[k], v1[k], v0[k]); });
  });
}

// A part's statistics are pooled by kind (the codes of resnorm.norms FIXED, CELL, SAMPLES, GROUPS)
enum Kind : int64_t { kFixed = 0, kCell = 1, kSamples = 2, kGroups = 3 };

// 1 / sqrt(var + eps), the one rounding of every rstd here
inline double rstd_of(double var, double eps) { return 1.0 / std::sqrt(var + eps); }

// BN's pooling, the one order of its sums over the samples: out[c] = the mean over n of
// term(i, c), i = n * C + c the cell's index in an N x C array, added in sample order from row 0's
// term on (row by row, contiguous), then / N. The forward pools its means and variances with it;
// the backward adds its bb and ag in the same order as it makes them (cell_terms' Add), then / N.
// (IN's cells are not pooled; GN's and LN's groups are pooled by over_groups.)
template <typename F>
inline void mean_over_samples(int64_t N, int64_t C, double* __restrict out, F term) {
  for (int64_t c = 0; c < C; ++c) out[c] = term(c, c);
  for (int64_t n = 1; n < N; ++n)
    for (int64_t c = 0, i = n * C; c < C; ++c, ++i) out[c] += term(i, c);
  for (int64_t c = 0; c < C; ++c) out[c] /= double(N);
}

// s[k] = the sum over c in [c0, c1) of f(k, c), for k < K, each in channel order from 0, the K
// sums side by side in registers: K independent chains of additions (a sum kept in memory instead
// waits for its own store at every step: at 512 channels that cost more than the layer's passes)
template <int64_t K, typename F>
inline void side_sums(int64_t c0, int64_t c1, double* s, F f) {
  double acc[K] = {};
  for (int64_t c = c0; c < c1; ++c)
    for (int64_t k = 0; k < K; ++k) acc[k] += f(k, c);
  std::copy(acc, acc + K, s);
}

// the same for K = count, 1 to kSide
constexpr int64_t kSide = 8;
template <typename F>
inline void side_sums(int64_t count, int64_t c0, int64_t c1, double* s, F f) {
  switch (count) {
    case 1: return side_sums<1>(c0, c1, s, f);
    case 2: return side_sums<2>(c0, c1, s, f);
    case 3: return side_sums<3>(c0, c1, s, f);
    case 4: return side_sums<4>(c0, c1, s, f);
    case 5: return side_sums<5>(c0, c1, s, f);
    case 6: return side_sums<6>(c0, c1, s, f);
    case 7: return side_sums<7>(c0, c1, s, f);
    default: return side_sums<kSide>(c0, c1, s, f);
  }
}

// calls f(c0, c1, m, v) for each group of channels [c0, c1) of width per = C / groups, where m[n]
// and v[n] are the means over sample n's group of a[i] and of fb(n, i, m[n]) (i = n * C + c: the
// second term may use the first's mean). Each sum runs in channel order, as a plain loop would add
// it, with kSide samples' sums side by side (side_sums).
template <typename FB, typename F>
void over_groups(const double* a, int64_t N, int64_t C, int64_t groups, FB fb, F f) {
  const int64_t per = C / groups;
  std::vector<double> m(N), v(N);
  for (int64_t c0 = 0; c0 < C; c0 += per) {
    for (int64_t n0 = 0; n0 < N; n0 += kSide) {
      const int64_t count = std::min(kSide, N - n0);
      side_sums(count, c0, c0 + per, &m[n0], [&](int64_t k, int64_t c) { return a[(n0 + k) * C + c]; });
      for (int64_t n = n0; n < n0 + count; ++n) m[n] /= double(per);
      side_sums(count, c0, c0 + per, &v[n0],
                [&](int64_t k, int64_t c) { return fb(n0 + k, (n0 + k) * C + c, m[n0 + k]); });
      for (int64_t n = n0; n < n0 + count; ++n) v[n] /= double(per);
    }
    f(c0, c0 + per, m, v);
  }
}

// GN's and LN's statistics, one mean and rstd per (sample, group) (N x groups): each sample's
// group mean, and its variance pooled exactly, mean(var + (mean_c - mean)^2)
void group_stats(const double* mean, const double* var, int64_t N, int64_t C, int64_t groups, double eps,
                 double* pm, double* pr) {
  const int64_t per = C / groups;
  over_groups(
      mean, N, C, groups,
      [&](int64_t, int64_t i, double m) {
        const double d = mean[i] - m;
        return var[i] + d * d;
      },
      [&](int64_t c0, int64_t, const std::vector<double>& m, const std::vector<double>& v) {
        for (int64_t n = 0, j = c0 / per; n < N; ++n, j += groups) {
          pm[j] = m[n];
          pr[j] = rstd_of(v[n], eps);
        }
      });
}

// running = lerp(running, value, factor) in place, for BN's running statistics
void lerp_into(const at::Tensor& running, const double* value, double scale, double factor) {
  TORCH_CHECK(running.is_contiguous(), "resnorm kernels: running statistics must be contiguous");
  AT_DISPATCH_FLOATING_TYPES(running.scalar_type(), "resnorm_lerp", [&] {
    scalar_t* r = running.data_ptr<scalar_t>();
    for (int64_t c = 0; c < running.numel(); ++c) r[c] = scalar_t(r[c] + factor * (value[c] * scale - r[c]));
  });
}

// One sample's per-cell backward terms of a part, over `len` channels (restrict: vectorised
// across them): gxhat = sum of g * x_hat in the cell (d alpha's share), bb = alpha * gxhat,
// ag = alpha * sum(g). The part's mean and rstd are pm[c * Stride], pr[c * Stride]: Stride 1 for
// a value per channel, 0 for one value (a GN/LN group's). Add: bb and ag are added to, not
// written (BN pools them over the samples as they are made, in mean_over_samples' order).
template <int64_t Stride, bool Add = false>
inline void cell_terms(int64_t len, const double* __restrict sg, const double* __restrict sgx,
                       const double* __restrict pm, const double* __restrict pr, const double* __restrict a,
                       double* __restrict gxhat, double* __restrict bb, double* __restrict ag) {
  for (int64_t c = 0; c < len; ++c) {
    const double s = sg[c], sx = sgx[c], al = a[c], gh = pr[c * Stride] * (sx - pm[c * Stride] * s);
    gxhat[c] = gh;
    if (Add) {
      bb[c] += al * gh;
      ag[c] += al * s;
    } else {
      bb[c] = al * gh;
      ag[c] = al * s;
    }
  }
}
// (At 512 channels a sample's row is 4 KB; with the scratch arrays at the same offset within a
// page, each load here after a store to another of them waited for that store ("4K aliasing"),
// and this loop ran at a third of its speed. scratch() now places every array at its own offset.)

// A part's share of grad_x = g' * scale + x * c1 + c0 in one cell, from its pooled bb and ag
inline void input_term(double inv, double pm, double pr, double bb, double ag, double& c1, double& c0) {
  const double k = pr * inv, r2b = k * pr * bb;
  c1 -= r2b;
  c0 += pm * r2b - k * ag;
}

// Where a part keeps its statistics (mean, then rstd, each `size` doubles) in the state: at their
// own resolution, one value per channel (BN, running statistics), per (n, c) (IN) or per (n, group)
// (GN, LN); at(n, c) is the index of the value that cell (n, c) uses.
struct Stats {
  int64_t kind, size, per, groups, C;
  Stats(int64_t kind_, int64_t groups_, int64_t N, int64_t C_)
      : kind(kind_), per(kind_ == kGroups ? C_ / groups_ : 1), groups(groups_), C(C_) {
    size = kind == kCell ? N * C : kind == kGroups ? N * groups : C;
  }
  int64_t at(int64_t n, int64_t c) const {
    return kind == kCell ? n * C + c : kind == kGroups ? n * groups + c / per : c;
  }
};

// calls f(i, c, j) for every cell i = r * C + c of R coefficient rows, j = sp.at(r, c) (without a
// division per cell)
template <typename F>
void for_cells(const Stats& sp, int64_t R, int64_t C, F f) {
  for (int64_t r = 0; r < R; ++r) {
    if (sp.kind == kGroups) {
      for (int64_t q = 0, j = r * sp.groups; q < sp.groups; ++q, ++j)
        for (int64_t c = q * sp.per; c < (q + 1) * sp.per; ++c) f(r * C + c, c, j);
    } else {
      const int64_t j0 = sp.kind == kCell ? r * C : 0;
      for (int64_t c = 0; c < C; ++c) f(r * C + c, c, j0 + c);
    }
  }
}

// The number of coefficient rows of a layer: 1 when every part's statistics are per channel
// (BN: batch or running ones), so that every sample has the same scale and shift; else N
int64_t coef_rows(const std::vector<int64_t>& kinds, int64_t n) {
  const bool per_channel = std::all_of(kinds.begin(), kinds.end(), [](int64_t k) { return k == kFixed || k == kSamples; });
  return per_channel ? 1 : n;
}

// IN, GN and LN: every statistic stays within a sample, so a whole layer can run a few samples at
// a time, their passes back to back while their values are still in cache (over_samples)
bool sample_local(const std::vector<int64_t>& kinds) {
  return std::all_of(kinds.begin(), kinds.end(), [](int64_t k) { return k == kCell || k == kGroups; });
}

// Samples per block of a sample-local layer (over_samples): up to kSide, so that over_groups
// sums that many samples side by side (one sample alone is one chain of dependent additions per
// group: at 512 channels that chain cost more than the layer's passes); at most kBlockValues
// values, so that a block's arrays stay in this core's cache between its passes; and at most
// N / threads, so that every thread gets samples. Each sample's results do not depend on the
// block it is in: every sum inside runs over one sample, in the same order whatever the block.
constexpr int64_t kBlockValues = int64_t(1) << 16;
int64_t block_of(const Layout& l) {
  const int64_t per_thread = (l.n + at::get_num_threads() - 1) / at::get_num_threads();
  return std::max<int64_t>(1, std::min({kSide, per_thread, kBlockValues / std::max<int64_t>(1, l.c * l.hw)}));
}

// Runs body(n0, Layout of the samples from n0): once for the whole batch, or for sample-local
// layers once per block of samples (block_of), the blocks spread over the threads (the passes
// inside then run serially)
template <typename F>
void over_samples(const Layout& l, bool local, F body) {
  if (!local || l.n == 1) return body(int64_t(0), l);
  const int64_t block = block_of(l), blocks = (l.n + block - 1) / block;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * block;
      body(n0, Layout{std::min(block, l.n - n0), l.c, l.hw, l.channels_last});
    }
  });
}

// One part of a layer as the forward and backward cores see it: its kind and groups, its
// per-channel alpha (and fixed or running statistics), and where its mean and rstd are in the state
struct Part {
  Stats st;
  std::vector<double> alpha, fixed_mean, fixed_var;
  at::Tensor run_mean, run_var;
  double* base;  // the part's mean in the state: st.size values, then its rstd
  double* mean(int64_t n0) const { return base + st.at(n0, 0); }  // from sample n0 on
  double* rstd(int64_t n0) const { return base + st.size + st.at(n0, 0); }
};

int64_t state_size(const std::vector<int64_t>& kinds, const std::vector<int64_t>& groups, int64_t N, int64_t C) {
  int64_t total = 0;
  for (size_t p = 0; p < kinds.size(); ++p) total += 2 * Stats(kinds[p], groups[p], N, C).size;
  return total;
}

std::vector<Part> layer_parts(const std::vector<int64_t>& kinds, const std::vector<int64_t>& groups,
                              const std::vector<at::Tensor>& alphas, int64_t N, int64_t C, double* state) {
  std::vector<Part> parts;
  for (size_t p = 0; p < kinds.size(); ++p) {
    Part part{Stats(kinds[p], groups[p], N, C), values(alphas[p], C, 1.0), {}, {}, {}, {}, state};
    state += 2 * part.st.size;
    parts.push_back(std::move(part));
  }
  return parts;
}

std::vector<int64_t> kinds_of(const std::vector<Part>& parts) {
  std::vector<int64_t> kinds;
  for (const Part& p : parts) kinds.push_back(p.st.kind);
  return kinds;
}

// The coefficients of y = x * scale + shift for R rows of the samples from n0 on (R x C, double),
// from the parts' statistics in the state: scale = sum of alpha * rstd, shift = b - sum of
// alpha * rstd * mean, the parts added in order. The forward computes them, and the backward
// computes them again rather than keeping them: for IN, GN and LN they are N x C values, half
// the size of x at 2x2 maps, to write, keep and read back per layer.
void coefficients(const std::vector<Part>& parts, const std::vector<double>& b, int64_t n0, int64_t N, int64_t C,
                  int64_t R, double* scale, double* shift) {
  for (int64_t r = 0; r < R; ++r) std::copy(b.begin(), b.end(), shift + r * C);
  std::fill(scale, scale + R * C, 0.0);
  for (const Part& part : parts) {
    const double *pm = part.mean(n0), *pr = part.rstd(n0);
    for_cells(Stats(part.st.kind, part.st.groups, N, C), R, C, [&](int64_t i, int64_t c, int64_t j) {
      const double s = part.alpha[c] * pr[j];
      scale[i] += s;
      shift[i] -= s * pm[j];
    });
  }
}

// The scratch slots (kCoef) of the coefficients in x's dtype: scale and shift, then the backward's c1 and c0
enum CoefSlot { kScale = 0, kShift = 1, kC1 = 2, kC0 = 3 };

// The coefficients in x's dtype T (in this thread's kCoef slots kScale and kShift). A layer of
// one part (all but BIN) has them written straight in T from the same double arithmetic
// (0 + s and b - s * mean, as coefficients() adds them up); several parts are added up in the
// double arrays `scale` and `shift` (R x C) first.
template <typename T>
std::pair<Coef<T>, Coef<T>> coefficients_in(const std::vector<Part>& parts, const std::vector<double>& b, int64_t n0,
                                            int64_t N, int64_t C, int64_t R, double* scale, double* shift) {
  if (parts.size() != 1) {
    coefficients(parts, b, n0, N, C, R, scale, shift);
    return {Coef<T>(kScale, scale, R, C), Coef<T>(kShift, shift, R, C)};
  }
  T *ts = scratch<T, kCoef>(kScale, R * C), *tt = scratch<T, kCoef>(kShift, R * C);
  const Part& part = parts[0];
  const double *pm = part.mean(n0), *pr = part.rstd(n0), *a = part.alpha.data();
  for_cells(Stats(part.st.kind, part.st.groups, N, C), R, C, [&](int64_t i, int64_t c, int64_t j) {
    const double s = a[c] * pr[j];
    ts[i] = T(0.0 + s);
    tt[i] = T(b[c] - s * pm[j]);
  });
  return {Coef<T>(ts, R, C), Coef<T>(tt, R, C)};
}

// The forward of the samples of layout l from n0 on (x and y offset to them): statistics, each
// part's mean and rstd (into the state) and y
template <typename T>
void forward_core(const T* x, T* y, const Layout& l, int64_t n0, const std::vector<Part>& parts,
                  const std::vector<double>& b, double eps, double factor, double unbias, bool relu) {
  const int64_t N = l.n, C = l.c, NC = N * C;
  const std::vector<int64_t> kinds = kinds_of(parts);
  const int64_t R = coef_rows(kinds, N), RC = R * C;
  double *mean = scratch<double, kWork>(0, NC), *var = scratch<double, kWork>(1, NC),
         *pooled = scratch<double, kWork>(2, C), *pv = scratch<double, kWork>(3, C),
         *scale = scratch<double, kWork>(4, RC), *shift = scratch<double, kWork>(5, RC);
  if (!std::all_of(kinds.begin(), kinds.end(), [](int64_t k) { return k == kFixed; })) {  // (running ones need none)
    sums<false, T>(x, x, l, nullptr, nullptr, mean, var);
    if ((l.hw & (l.hw - 1)) == 0) {  // sums -> mean and biased variance; / 2^k is * 2^-k, exactly
      const double inv = 1.0 / double(l.hw);
      for (int64_t i = 0; i < NC; ++i) {
        mean[i] *= inv;
        var[i] = std::max(var[i] * inv - mean[i] * mean[i], 0.0);
      }
    } else {
      for (int64_t i = 0; i < NC; ++i) {
        mean[i] /= double(l.hw);
        var[i] = std::max(var[i] / double(l.hw) - mean[i] * mean[i], 0.0);
      }
    }
  }
  for (const Part& part : parts) {
    double *pm = part.mean(n0), *pr = part.rstd(n0);
    const Stats st(part.st.kind, part.st.groups, N, C);  // its statistics for these samples
    if (st.kind == kFixed) {
      for (int64_t c = 0; c < C; ++c) pm[c] = part.fixed_mean[c], pr[c] = rstd_of(part.fixed_var[c], eps);
    } else if (st.kind == kGroups) {
      group_stats(mean, var, N, C, st.groups, eps, pm, pr);
    } else if (st.kind == kCell) {
      std::copy(mean, mean + NC, pm);
      for (int64_t i = 0; i < NC; ++i) pr[i] = rstd_of(var[i] + 0.0, eps);  // var + (mean - mean)^2, as pooled
    } else {  // exact pooling of equal-sized cells: var = mean(var) + var(means)
      mean_over_samples(N, C, pooled, [&](int64_t i, int64_t) { return mean[i]; });  // per channel (C values)
      // each cell's var + (mean - pooled mean)^2, pooled as it is made (no N x C store of the terms)
      mean_over_samples(N, C, pv, [&](int64_t i, int64_t c) {
        const double d = mean[i] - pooled[c];
        return var[i] + d * d;
      });
      if (part.run_mean.numel()) {
        lerp_into(part.run_mean, pooled, 1.0, factor);
        lerp_into(part.run_var, pv, unbias, factor);
      }
      for (int64_t c = 0; c < C; ++c) pm[c] = pooled[c], pr[c] = rstd_of(pv[c], eps);
    }
  }
  const auto [s, t] = coefficients_in<T>(parts, b, n0, N, C, R, scale, shift);
  if (relu)
    affine_pass<true>(x, l, s, t, y);
  else
    affine_pass<false>(x, l, s, t, y);
}

// The backward of the samples of layout l from n0 on (g, x and grad_x offset to them; b the bias,
// for the coefficients): grad_x (when not null), and per (n, c) the sum of g' (sg) and
// each part's sum of g' * x_hat (gxhat), offset to the samples, which the caller adds up over the
// samples in sample order for the parameters' gradients
template <typename T>
void backward_core(const T* g, const T* x, T* grad_x, const Layout& l, int64_t n0, const std::vector<Part>& parts,
                   const std::vector<double>& b, bool relu, double* sg, const std::vector<double*>& gxhat) {
  const int64_t N = l.n, C = l.c, NC = N * C, P = int64_t(parts.size());
  const int64_t R = coef_rows(kinds_of(parts), N), RC = R * C;
  double *sgx = scratch<double, kWork>(0, NC), *bb = scratch<double, kWork>(1, NC),
         *ag = scratch<double, kWork>(2, NC), *c1 = scratch<double, kWork>(3, RC), *c0 = scratch<double, kWork>(4, RC),
         *scale = scratch<double, kWork>(5, RC), *shift = scratch<double, kWork>(6, RC);
  // grad_x's c1 and c0 per cell: with one part (all but BIN) written straight in T from the
  // same double arithmetic as the sums over parts would start from 0; else summed in double
  const bool single = P == 1;
  T *t1 = scratch<T, kCoef>(kC1, RC), *t0 = scratch<T, kCoef>(kC0, RC);
  if (!single || parts[0].st.kind == kFixed) {
    std::fill(c1, c1 + RC, 0.0);
    std::fill(c0, c0 + RC, 0.0);
  }
  const auto [s, t] = coefficients_in<T>(parts, b, n0, N, C, R, scale, shift);
  if (relu)
    sums<true>(g, x, l, &s, &t, sg, sgx);
  else
    sums<false, T>(g, x, l, nullptr, nullptr, sg, sgx);
  const double inv = 1.0 / double(l.hw);
  for (int64_t p = 0; p < P; ++p) {
    const Part& part = parts[p];
    const Stats st(part.st.kind, part.st.groups, N, C);
    const double *pm = part.mean(n0), *pr = part.rstd(n0), *a = part.alpha.data();
    for (int64_t n = 0; n < N; ++n) {
      const double *gs = sg + n * C, *gx = sgx + n * C;
      double *pb = bb + n * C, *pa = ag + n * C, *gh = gxhat[p] + n * C;
      if (st.kind == kGroups) {
        for (int64_t q = 0, g0 = 0; q < st.groups; ++q, g0 += st.per) {
          const int64_t j = n * st.groups + q;
          cell_terms<0>(st.per, gs + g0, gx + g0, pm + j, pr + j, a + g0, gh + g0, pb + g0, pa + g0);
        }
      } else if (st.kind == kSamples) {  // pooled into row 0 as they are made: mean_over_samples' sums
        if (n == 0)                      // (row 0, then each next row in sample order), no N x C store
          cell_terms<1>(C, gs, gx, pm, pr, a, gh, bb, ag);
        else
          cell_terms<1, true>(C, gs, gx, pm, pr, a, gh, bb, ag);
      } else {
        const int64_t j = st.at(n, 0);
        cell_terms<1>(C, gs, gx, pm + j, pr + j, a, gh, pb, pa);
      }
    }
    if (st.kind == kFixed || !grad_x) continue;  // constant statistics pass no gradient through
    if (st.kind == kGroups) {  // bb and ag pooled over each group, as in group_stats
      over_groups(
          bb, N, C, st.groups, [&](int64_t, int64_t i, double) { return ag[i]; },
          [&](int64_t g0, int64_t g1, const std::vector<double>& mb, const std::vector<double>& ma) {
            for (int64_t n = 0; n < N; ++n) {
              const int64_t j = st.at(n, g0);
              double k1 = 0.0, k0 = 0.0;
              input_term(inv, pm[j], pr[j], mb[n], ma[n], k1, k0);
              if (single) {
                std::fill(t1 + n * C + g0, t1 + n * C + g1, T(k1));
                std::fill(t0 + n * C + g0, t0 + n * C + g1, T(k0));
              } else {
                for (int64_t i = n * C + g0; i < n * C + g1; ++i) c1[i] += k1, c0[i] += k0;
              }
            }
          });
      continue;
    }
    if (st.kind == kSamples)  // summed into row 0 above; their means, where cell (n, c) finds them at j = c
      for (int64_t c = 0; c < C; ++c) bb[c] /= double(N), ag[c] /= double(N);
    for_cells(st, R, C, [&](int64_t i, int64_t, int64_t j) {
      if (single) {
        double k1 = 0.0, k0 = 0.0;
        input_term(inv, pm[j], pr[j], bb[j], ag[j], k1, k0);
        t1[i] = T(k1), t0[i] = T(k0);
      } else {
        input_term(inv, pm[j], pr[j], bb[j], ag[j], c1[i], c0[i]);
      }
    });
  }
  if (!grad_x) return;
  const bool in_t = single && parts[0].st.kind != kFixed;
  const Coef<T> k1 = in_t ? Coef<T>(t1, R, C) : Coef<T>(kC1, c1, R, C), k0 = in_t ? Coef<T>(t0, R, C) : Coef<T>(kC0, c0, R, C);
  if (relu)
    grad_input_pass<true>(g, x, l, s, t, k1, k0, grad_x);
  else
    grad_input_pass<false>(g, x, l, s, t, k1, k0, grad_x);
}

}  // namespace

// Forward of a layer with parts p = 0..P-1. Returns y and the float64 state (each part's mean and
// rstd at its own resolution, see Stats): with the layer's alphas and bias, what norm_backward
// needs. (Small on purpose: at 2x2 maps a per-(n, c) float64 state would be 4x the data, freshly
// allocated memory to fault in at every call.)
std::vector<at::Tensor> norm_forward(const at::Tensor& x, const std::vector<int64_t>& kinds,
                                     const std::vector<int64_t>& groups, const std::vector<at::Tensor>& alphas,
                                     const std::vector<at::Tensor>& fixed_mean, const std::vector<at::Tensor>& fixed_var,
                                     const std::vector<at::Tensor>& run_mean, const std::vector<at::Tensor>& run_var,
                                     double factor, double unbias, const at::Tensor& bias, double eps, bool relu) {
  const Layout l = layout_of(x);
  const int64_t N = l.n, C = l.c;
  at::Tensor state = at::empty({state_size(kinds, groups, N, C)}, at::kDouble);
  std::vector<Part> parts = layer_parts(kinds, groups, alphas, N, C, state.data_ptr<double>());
  for (size_t p = 0; p < parts.size(); ++p) {
    if (kinds[p] == kFixed) {
      parts[p].fixed_mean = values(fixed_mean[p], C, 0.0);
      parts[p].fixed_var = values(fixed_var[p], C, 1.0);
    }
    parts[p].run_mean = run_mean[p];
    parts[p].run_var = run_var[p];
  }
  const std::vector<double> b = values(bias, C, 0.0);
  at::Tensor y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "resnorm_forward", [&] {
    const scalar_t* px = x.data_ptr<scalar_t>();
    scalar_t* py = y.data_ptr<scalar_t>();
    over_samples(l, sample_local(kinds), [&](int64_t n0, const Layout& ls) {
      const int64_t off = n0 * C * l.hw;
      forward_core(px + off, py + off, ls, n0, parts, b, eps, factor, unbias, relu);
    });
  });
  return {y, state};
}

// Backward of the layer that norm_forward ran (state is its output; alphas and bias are the
// forward's). Returns grad_x
// (undefined unless need_x), then the gradients of the bias and of each part's alpha, (C,) each:
// in float64, or in x's dtype when `in_x_dtype` (the layer's parameters take them as they are:
// converted here as Tensor.to would, without a Python call per tensor).
std::vector<at::Tensor> norm_backward(const at::Tensor& g_in, const at::Tensor& x, const at::Tensor& state,
                                      const std::vector<int64_t>& kinds, const std::vector<int64_t>& groups,
                                      const std::vector<at::Tensor>& alphas, const at::Tensor& bias, bool relu,
                                      bool need_x, bool in_x_dtype) {
  const Layout l = layout_of(x);
  const int64_t N = l.n, C = l.c, NC = N * C, P = int64_t(kinds.size());
  TORCH_CHECK(state.scalar_type() == at::kDouble && state.is_contiguous() &&
                  state.numel() == state_size(kinds, groups, N, C),
              "resnorm kernels: state does not match the layer");
  const std::vector<Part> parts = layer_parts(kinds, groups, alphas, N, C, state.data_ptr<double>());  // read only
  const std::vector<double> b = values(bias, C, 0.0);
  const at::Tensor g = like(g_in, l);
  double* sg = scratch<double, kOut>(0, NC);
  std::vector<double*> gxhat;
  for (int64_t p = 0; p < P; ++p) gxhat.push_back(scratch<double, kOut>(1 + int(p), NC));
  at::Tensor grad_x = need_x ? at::empty_like(x) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "resnorm_backward", [&] {
    const scalar_t *pg = g.data_ptr<scalar_t>(), *px = x.data_ptr<scalar_t>();
    scalar_t* po = need_x ? grad_x.data_ptr<scalar_t>() : nullptr;
    over_samples(l, sample_local(kinds), [&](int64_t n0, const Layout& ls) {
      const int64_t off = n0 * C * l.hw;
      std::vector<double*> gh;
      for (double* p : gxhat) gh.push_back(p + n0 * C);
      backward_core(pg + off, px + off, po ? po + off : nullptr, ls, n0, parts, b, relu, sg + n0 * C, gh);
    });
  });
  std::vector<at::Tensor> out{grad_x};
  std::vector<double> d(C);
  for (int64_t p = -1; p < P; ++p) {  // the parameters' gradients, summed in sample order
    const double* v = p < 0 ? sg : gxhat[p];
    std::fill(d.begin(), d.end(), 0.0);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < C; ++c) d[c] += v[n * C + c];
    at::Tensor t = at::empty({C}, x.options().dtype(in_x_dtype ? x.scalar_type() : at::kDouble));
    AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "resnorm_param_grads", [&] {
      std::copy(d.begin(), d.end(), t.data_ptr<scalar_t>());
    });
    out.push_back(t);
  }
  return out;
}

// A layer of one part whose only parameters are weight (its alpha) and bias, as one autograd node
// in C++: the engine calls norm_backward without a round trip through Python (60-90 us a layer
// measured in a training step, where the convolutions leave the caches cold). Its arguments are
// the layer's own, not lists (every tensor argument is an input the node records, every list a
// conversion): stat_mean and stat_var are the fixed statistics (kind kFixed) or the running ones
// to update (kSamples), else absent. BIN, whose alphas mix its parameters, keeps resnorm.norms._Normalize.
struct NormNode : public torch::autograd::Function<NormNode> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& stat_mean, const std::optional<at::Tensor>& stat_var,
                            int64_t kind, int64_t groups, double factor, double unbias, double eps, bool relu) {
    const at::Tensor empty = at::empty({0}, at::kFloat);
    const at::Tensor w = weight.value_or(empty), b = bias.value_or(empty);
    const at::Tensor mean = stat_mean.value_or(empty), var = stat_var.value_or(empty);
    const bool fixed = kind == kFixed;
    std::vector<at::Tensor> out = norm_forward(x, {kind}, {groups}, {w}, {fixed ? mean : empty}, {fixed ? var : empty},
                                               {fixed ? empty : mean}, {fixed ? empty : var}, factor, unbias, b, eps,
                                               relu);
    ctx->save_for_backward({x, w, b, out[1]});
    ctx->saved_data["layer"] = std::vector<int64_t>{kind, groups, relu};
    return out[0];
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const std::vector<int64_t> layer = ctx->saved_data["layer"].toIntVector();
    const bool need_x = ctx->needs_input_grad(0);
    std::vector<at::Tensor> r =
        norm_backward(grads[0], saved[0], saved[3], {layer[0]}, {layer[1]}, {saved[1]}, saved[2], layer[2] != 0, need_x,
                      true);
    torch::autograd::variable_list out(11);
    out[0] = need_x ? r[0] : at::Tensor();
    out[1] = ctx->needs_input_grad(1) ? r[2] : at::Tensor();
    out[2] = ctx->needs_input_grad(2) ? r[1] : at::Tensor();
    return out;
  }
};

at::Tensor norm_autograd(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                         const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& stat_mean,
                         const std::optional<at::Tensor>& stat_var, int64_t kind, int64_t groups, double factor,
                         double unbias, double eps, bool relu) {
  return NormNode::apply(x, weight, bias, stat_mean, stat_var, kind, groups, factor, unbias, eps, relu);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("norm_autograd", &norm_autograd, "a norm layer with weight and bias as one autograd node (see NormNode)");
  m.def("norm_forward", &norm_forward, "a norm layer's forward: y and its state (see resnorm.norms)");
  m.def("norm_backward", &norm_backward, "a norm layer's backward: grad_x, d_bias, d_alpha...");
}
