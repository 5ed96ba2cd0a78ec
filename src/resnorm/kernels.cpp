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

// per-(n, c) coefficients (N x C doubles) in the element type T; at(n) is row n
template <typename T>
struct Coef {
  std::vector<T> v;
  int64_t c;
  Coef(const double* p, const Layout& l) : v(p, p + l.n * l.c), c(l.c) {}
  const T* at(int64_t n) const { return v.data() + n * c; }
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

// lane-wise s[k] = sum_i a'[i * kLanes + k] and q[k] = sum_i a' * b, over `rows` rows, where
// a' is a gated by b * ls[k] + lb[k] > 0 when Gated (a = g, b = x)
template <bool Gated, typename T>
inline void lane_sums(const T* a, const T* b, int64_t rows, const T* ls, const T* lb, double* s, double* q) {
  std::fill(s, s + kLanes, 0.0);
  std::fill(q, q + kLanes, 0.0);
  for (int64_t i = 0; i < rows; ++i) {
    const T* ra = a + i * kLanes;
    const T* rb = b + i * kLanes;
    for (int64_t k = 0; k < kLanes; ++k) {
      const double va = gate<Gated>(ra[k], rb[k], ls[k], lb[k]);
      s[k] += va;
      q[k] += va * double(rb[k]);
    }
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
  lane_sums<Gated>(a, b, main / kLanes, ls, lb, s, q);
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

// sums of a'[i] and a'[i] * b[i] over one contiguous row (one gate)
template <bool Gated, typename T>
inline void row_sums(const T* a, const T* b, int64_t len, T gs, T gb, double& sa, double& sab) {
  double s = 0, q = 0;
  if (len < 16) {  // a short row (2x2, 4x4 maps): a plain loop, without the vector set-up and tail
    for (int64_t i = 0; i < len; ++i) {
      const double va = gate<Gated>(a[i], b[i], gs, gb);
      s += va;
      q += va * double(b[i]);
    }
    sa = s;
    sab = q;
    return;
  }
#pragma omp simd reduction(+ : s, q)
  for (int64_t i = 0; i < len; ++i) {
    const double va = gate<Gated>(a[i], b[i], gs, gb);
    s += va;
    q += va * double(b[i]);
  }
  sa = s;
  sab = q;
}

// per-(n, c) sums of a' and a' * b over the spatial axes, for a and b in layout l
template <bool Gated, typename T>
void sums(const T* a, const T* b, const Layout& l, const Coef<T>* gs, const Coef<T>* gb, double* sa,
          double* sab) {
  const int64_t C = l.c, HW = l.hw;
  const T zero = T(0);
  auto gate_row = [&](const Coef<T>* p, int64_t n) { return Gated ? p->at(n) : &zero; };
  if (!l.channels_last) {  // each (n, c) row is contiguous
    at::parallel_for(0, l.n * C, grain(HW), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t n = r / C, c = Gated ? r % C : 0;
        row_sums<Gated>(a + r * HW, b + r * HW, HW, gate_row(gs, n)[c], gate_row(gb, n)[c], sa[r], sab[r]);
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
      double *oa = sa + n * C, *ob = sab + n * C;  // other widths: a plain double loop
      std::fill(oa, oa + C, 0.0);
      std::fill(ob, ob + C, 0.0);
      for (int64_t i = 0; i < HW; ++i)
        for (int64_t c = 0; c < C; ++c) {
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
  for_runs(l, [&](int64_t off, int64_t len, int64_t n, int64_t c, int64_t period) {
    const T *s = scale.at(n) + c, *b = shift.at(n) + c, *px = x + off;
    T* py = y + off;
    const LaneCoef<T> ls(s, period), lb(b, period);
    const T *vs = ls.v, *vb = lb.v;
    map_run(len, period, [&](int64_t i, int64_t k) {
      const T o = px[i] * vs[k] + vb[k];
      py[i] = Relu ? std::max(o, T(0)) : o;
    });
  });
}

// grad_x = g' * scale + x * c1 + c0, one pass (g' gated by x * scale + shift > 0 when Gated)
template <bool Gated, typename T>
void grad_input_pass(const T* g, const T* x, const Layout& l, const Coef<T>& scale,
                     const Coef<T>& shift, const Coef<T>& c1, const Coef<T>& c0, T* out) {
  for_runs(l, [&](int64_t off, int64_t len, int64_t n, int64_t c, int64_t period) {
    const T *s = scale.at(n) + c, *b = shift.at(n) + c, *k1 = c1.at(n) + c, *k0 = c0.at(n) + c;
    const T *pg = g + off, *px = x + off;
    T* po = out + off;
    const LaneCoef<T> ls(s, period), lb(b, period), l1(k1, period), l0(k0, period);
    const T *vs = ls.v, *vb = lb.v, *v1 = l1.v, *v0 = l0.v;
    map_run(len, period, [&](int64_t i, int64_t k) {
      po[i] = gate<Gated>(pg[i], px[i], vs[k], vb[k]) * vs[k] + (px[i] * v1[k] + v0[k]);
    });
  });
}

// A part's statistics are pooled by kind (the codes of resnorm.norms FIXED, CELL, SAMPLES, GROUPS)
enum Kind : int64_t { kFixed = 0, kCell = 1, kSamples = 2, kGroups = 3 };

// average each group of cells of t (N x C, by kind) and broadcast it back, in place
void pool(double* t, int64_t N, int64_t C, int64_t kind, int64_t groups) {
  if (kind == kSamples) {  // row by row (contiguous), each channel's sum still in sample order
    std::vector<double> m(t, t + C);
    for (int64_t n = 1; n < N; ++n)
      for (int64_t c = 0; c < C; ++c) m[c] += t[n * C + c];
    for (int64_t c = 0; c < C; ++c) m[c] /= double(N);
    for (int64_t n = 0; n < N; ++n) std::copy(m.begin(), m.end(), t + n * C);
  } else if (kind == kGroups) {
    const int64_t per = C / groups;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t g = 0; g < groups; ++g) {
        double* p = t + n * C + g * per;
        double m = 0;
        for (int64_t c = 0; c < per; ++c) m += p[c];
        m /= double(per);
        std::fill(p, p + per, m);
      }
  }
}

// running = lerp(running, value, factor) in place, for BN's running statistics
void lerp_into(const at::Tensor& running, const double* value, double scale, double factor) {
  TORCH_CHECK(running.is_contiguous(), "resnorm kernels: running statistics must be contiguous");
  AT_DISPATCH_FLOATING_TYPES(running.scalar_type(), "resnorm_lerp", [&] {
    scalar_t* r = running.data_ptr<scalar_t>();
    for (int64_t c = 0; c < running.numel(); ++c) r[c] = scalar_t(r[c] + factor * (value[c] * scale - r[c]));
  });
}

}  // namespace

// Forward of a layer with parts p = 0..P-1. Returns y and one float64 state tensor of shape
// (2 + 2P, N, C): scale, shift, then mean and rstd of each part (what norm_backward needs).
std::vector<at::Tensor> norm_forward(const at::Tensor& x, const std::vector<int64_t>& kinds,
                                     const std::vector<int64_t>& groups, const std::vector<at::Tensor>& alphas,
                                     const std::vector<at::Tensor>& fixed_mean, const std::vector<at::Tensor>& fixed_var,
                                     const std::vector<at::Tensor>& run_mean, const std::vector<at::Tensor>& run_var,
                                     double factor, double unbias, const at::Tensor& bias, double eps, bool relu) {
  const Layout l = layout_of(x);
  const int64_t N = l.n, C = l.c, NC = N * C, P = int64_t(kinds.size());
  at::Tensor state = at::empty({2 + 2 * P, N, C}, at::kDouble);
  double* scale = state.data_ptr<double>();
  double* shift = scale + NC;
  std::vector<double> mean(NC), var(NC), pv(NC);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "resnorm_stats", [&] {
    const scalar_t* p = x.data_ptr<scalar_t>();
    sums<false, scalar_t>(p, p, l, nullptr, nullptr, mean.data(), var.data());
  });
  for (int64_t i = 0; i < NC; ++i) {  // sums -> mean and biased variance
    mean[i] /= double(l.hw);
    var[i] = std::max(var[i] / double(l.hw) - mean[i] * mean[i], 0.0);
  }
  const std::vector<double> b = values(bias, C, 0.0);
  for (int64_t n = 0; n < N; ++n) std::copy(b.begin(), b.end(), shift + n * C);
  std::fill(scale, scale + NC, 0.0);
  for (int64_t p = 0; p < P; ++p) {
    double* pm = shift + NC + 2 * p * NC;
    double* pr = pm + NC;
    if (kinds[p] == kFixed) {
      const std::vector<double> fm = values(fixed_mean[p], C, 0.0), fv = values(fixed_var[p], C, 1.0);
      for (int64_t n = 0; n < N; ++n) {
        std::copy(fm.begin(), fm.end(), pm + n * C);
        std::copy(fv.begin(), fv.end(), pv.begin() + n * C);
      }
    } else {  // exact pooling of equal-sized cells: var = mean(var) + var(means)
      std::copy(mean.begin(), mean.end(), pm);
      pool(pm, N, C, kinds[p], groups[p]);
      for (int64_t i = 0; i < NC; ++i) pv[i] = var[i] + (mean[i] - pm[i]) * (mean[i] - pm[i]);
      pool(pv.data(), N, C, kinds[p], groups[p]);
      if (run_mean[p].numel()) {  // row 0 holds the pooled per-channel values
        lerp_into(run_mean[p], pm, 1.0, factor);
        lerp_into(run_var[p], pv.data(), unbias, factor);
      }
    }
    const std::vector<double> a = values(alphas[p], C, 1.0);
    const bool per_channel = kinds[p] == kFixed || kinds[p] == kSamples;  // every sample's row is row 0's
    for (int64_t i = 0; i < (per_channel ? C : NC); ++i) pr[i] = 1.0 / std::sqrt(pv[i] + eps);
    if (per_channel)
      for (int64_t n = 1; n < N; ++n) std::copy(pr, pr + C, pr + n * C);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0, i = n * C; c < C; ++c, ++i) {
        const double s = a[c] * pr[i];
        scale[i] += s;
        shift[i] -= s * pm[i];
      }
  }
  at::Tensor y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "resnorm_affine", [&] {
    const Coef<scalar_t> s(scale, l), t(shift, l);
    if (relu)
      affine_pass<true>(x.data_ptr<scalar_t>(), l, s, t, y.data_ptr<scalar_t>());
    else
      affine_pass<false>(x.data_ptr<scalar_t>(), l, s, t, y.data_ptr<scalar_t>());
  });
  return {y, state};
}

// Backward of the layer that norm_forward ran. Returns grad_x (undefined unless need_x) and one
// float64 tensor of shape (1 + P, C): the gradient of the bias, then of each part's alpha.
std::vector<at::Tensor> norm_backward(const at::Tensor& g_in, const at::Tensor& x, const at::Tensor& state,
                                      const std::vector<int64_t>& kinds, const std::vector<int64_t>& groups,
                                      const std::vector<at::Tensor>& alphas, bool relu, bool need_x) {
  const Layout l = layout_of(x);
  const int64_t N = l.n, C = l.c, NC = N * C, P = int64_t(kinds.size());
  TORCH_CHECK(state.scalar_type() == at::kDouble && state.is_contiguous() && state.numel() == (2 + 2 * P) * NC,
              "resnorm kernels: state does not match the layer");
  const double* scale = state.data_ptr<double>();
  const double* shift = scale + NC;
  const at::Tensor g = like(g_in, l);
  std::vector<double> sg(NC), sgx(NC), c1(NC, 0.0), c0(NC, 0.0), gxhat(NC), bb(NC), ag(NC);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "resnorm_grad_sums", [&] {
    const scalar_t *pg = g.data_ptr<scalar_t>(), *px = x.data_ptr<scalar_t>();
    if (relu) {
      const Coef<scalar_t> s(scale, l), t(shift, l);
      sums<true>(pg, px, l, &s, &t, sg.data(), sgx.data());
    } else {
      sums<false, scalar_t>(pg, px, l, nullptr, nullptr, sg.data(), sgx.data());
    }
  });
  at::Tensor grads = at::zeros({1 + P, C}, at::kDouble);
  double* d_bias = grads.data_ptr<double>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) d_bias[c] += sg[n * C + c];
  const double inv = 1.0 / double(l.hw);
  for (int64_t p = 0; p < P; ++p) {
    const double* pm = shift + NC + 2 * p * NC;
    const double* pr = pm + NC;
    double* d_alpha = d_bias + (1 + p) * C;
    const std::vector<double> a = values(alphas[p], C, 1.0);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0, i = n * C; c < C; ++c, ++i) {
        gxhat[i] = pr[i] * (sgx[i] - pm[i] * sg[i]);  // per cell: sum of g * x_hat
        d_alpha[c] += gxhat[i];
        bb[i] = a[c] * gxhat[i];
        ag[i] = a[c] * sg[i];
      }
    if (kinds[p] == kFixed || !need_x) continue;  // constant statistics pass no gradient through
    pool(bb.data(), N, C, kinds[p], groups[p]);
    pool(ag.data(), N, C, kinds[p], groups[p]);
    for (int64_t i = 0; i < NC; ++i) {
      const double k = pr[i] * inv, r2b = k * pr[i] * bb[i];
      c1[i] -= r2b;
      c0[i] += pm[i] * r2b - k * ag[i];
    }
  }
  at::Tensor grad_x;
  if (need_x) {
    grad_x = at::empty_like(x);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "resnorm_grad_input", [&] {
      const Coef<scalar_t> s(scale, l), t(shift, l), k1(c1.data(), l), k0(c0.data(), l);
      const scalar_t *pg = g.data_ptr<scalar_t>(), *px = x.data_ptr<scalar_t>();
      if (relu)
        grad_input_pass<true>(pg, px, l, s, t, k1, k0, grad_x.data_ptr<scalar_t>());
      else
        grad_input_pass<false>(pg, px, l, s, t, k1, k0, grad_x.data_ptr<scalar_t>());
    });
  }
  return {grad_x, grads};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("norm_forward", &norm_forward, "a norm layer's forward: y and its state (see resnorm.norms)");
  m.def("norm_backward", &norm_backward, "a norm layer's backward: grad_x and (d_bias, d_alpha...)");
}
