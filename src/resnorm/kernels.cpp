// Fused CPU passes for resnorm.norms: the full-size passes every scheme needs, each one
// read of its inputs (and one write), with an optional fused ReLU after the norm.
//
//   stats(x)                                  per-(n, c) spatial mean and biased variance
//   affine(x, scale, shift, relu)             y = x * scale + shift, then max(y, 0) if relu
//   grad_sums(g, x, scale, shift, relu)       per-(n, c) sums of g' and g' * x
//   grad_input(g, x, scale, shift, c1, c0, relu)   g' * scale + x * c1 + c0
//
// where g' = g, or with relu g masked to where x * scale + shift > 0 (recomputed from x,
// exactly as in the forward pass, so nothing more is stored). Coefficients are (N, C) or
// (1, C) tensors of any float dtype, per sample and channel or shared over samples.
// x may be NCHW-contiguous (or any contiguous (N, C, ...)) or channels_last. Each per-(n, c)
// sum is accumulated by one thread in a fixed order (blocks in T, block sums in double), so
// results do not depend on the number of threads. Built with -ffp-contract=off, so that
// x * scale + shift rounds the same in every pass. Per-scheme arithmetic stays in Python.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
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

// a (N or 1, C) coefficient converted once to T; at(n) is row n (row 0 when shared over samples)
template <typename T>
struct PerChannel {
  std::vector<T> v;
  int64_t row;
  PerChannel(const at::Tensor& t, const Layout& l) : row(t.size(0) == 1 ? 0 : l.c) {
    TORCH_CHECK(t.dim() == 2 && t.size(1) == l.c && (t.size(0) == 1 || t.size(0) == l.n),
                "resnorm kernels: expected a (N or 1, C) coefficient, got ", t.sizes());
    const at::Tensor d = t.to(at::kDouble).contiguous();
    const double* p = d.data_ptr<double>();
    v.assign(p, p + d.numel());
  }
  const T* at(int64_t n) const { return v.data() + n * row; }
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
  alignas(64) T ls[kLanes], lb[kLanes];
  for (int64_t k = 0; k < kLanes; ++k) {
    ls[k] = Gated ? gs[k % outs] : T(0);
    lb[k] = Gated ? gb[k % outs] : T(0);
  }
  double s[kLanes], q[kLanes];
  const int64_t main = len - len % kLanes;
  lane_sums<Gated>(a, b, main / kLanes, ls, lb, s, q);
  std::fill(sa, sa + outs, 0.0);
  std::fill(sab, sab + outs, 0.0);
  for (int64_t k = 0; k < kLanes; ++k) {
    sa[k % outs] += s[k];
    sab[k % outs] += q[k];
  }
  for (int64_t i = main; i < len; ++i) {
    const int64_t j = (i - main) % outs;
    const T va = gate<Gated>(a[i], b[i], ls[j], lb[j]);
    sa[j] += va;
    sab[j] += double(va) * double(b[i]);
  }
}

// sums of a'[i] and a'[i] * b[i] over one contiguous row (one gate)
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

// per-(n, c) sums of a' and a' * b over the spatial axes, for a and b in layout l
template <bool Gated, typename T>
void sums(const T* a, const T* b, const Layout& l, const PerChannel<T>* gs, const PerChannel<T>* gb, double* sa,
          double* sab) {
  const int64_t C = l.c, HW = l.hw;
  const T zero = T(0);
  auto gate_row = [&](const PerChannel<T>* p, int64_t n) { return Gated ? p->at(n) : &zero; };
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

// per-lane copies of a run's coefficients: lane k holds p[k % period] (period divides kLanes)
template <typename T>
struct LaneCoef {
  alignas(64) T v[kLanes];
  LaneCoef(const T* p, int64_t period) {
    for (int64_t k = 0; k < kLanes; ++k) v[k] = p[k % period];
  }
};

// out[i] = f(i, lane coefficients of i) over a run; vectorised kLanes at a time when the period
// divides kLanes, else a plain loop over (value, channel)
template <typename T, typename F>
inline void map_run(int64_t len, int64_t period, F f) {
  if (kLanes % period == 0) {
    int64_t i = 0;
    for (; i + kLanes <= len; i += kLanes)
      for (int64_t k = 0; k < kLanes; ++k) f(i + k, k);
    for (; i < len; ++i) f(i, i % kLanes);
  } else {
    for (int64_t i = 0; i < len; ++i) f(i, -1 - i % period);  // negative: channel -1 - lane
  }
}

// y = x * scale + shift (then max(y, 0) when Relu), one pass
template <bool Relu, typename T>
void affine_pass(const T* x, const Layout& l, const PerChannel<T>& scale, const PerChannel<T>& shift, T* y) {
  for_runs(l, [&](int64_t off, int64_t len, int64_t n, int64_t c, int64_t period) {
    const T *s = scale.at(n) + c, *b = shift.at(n) + c, *px = x + off;
    T* py = y + off;
    const bool lanes = kLanes % period == 0;
    const LaneCoef<T> ls(lanes ? s : s, lanes ? period : 1), lb(b, lanes ? period : 1);
    map_run<T>(len, period, [&](int64_t i, int64_t k) {
      const T ks = k >= 0 ? ls.v[k] : s[-1 - k], kb = k >= 0 ? lb.v[k] : b[-1 - k];
      const T o = px[i] * ks + kb;
      py[i] = Relu ? std::max(o, T(0)) : o;
    });
  });
}

// grad_x = g' * scale + x * c1 + c0, one pass (g' gated by x * scale + shift > 0 when Gated)
template <bool Gated, typename T>
void grad_input_pass(const T* g, const T* x, const Layout& l, const PerChannel<T>& scale,
                     const PerChannel<T>& shift, const PerChannel<T>& c1, const PerChannel<T>& c0, T* out) {
  for_runs(l, [&](int64_t off, int64_t len, int64_t n, int64_t c, int64_t period) {
    const T *s = scale.at(n) + c, *b = shift.at(n) + c, *k1 = c1.at(n) + c, *k0 = c0.at(n) + c;
    const T *pg = g + off, *px = x + off;
    T* po = out + off;
    const int64_t lp = kLanes % period == 0 ? period : 1;
    const LaneCoef<T> ls(s, lp), lb(b, lp), l1(k1, lp), l0(k0, lp);
    map_run<T>(len, period, [&](int64_t i, int64_t k) {
      const int64_t j = -1 - k;
      const T ks = k >= 0 ? ls.v[k] : s[j], kb = k >= 0 ? lb.v[k] : b[j];
      const T kk1 = k >= 0 ? l1.v[k] : k1[j], kk0 = k >= 0 ? l0.v[k] : k0[j];
      po[i] = gate<Gated>(pg[i], px[i], ks, kb) * ks + (px[i] * kk1 + kk0);
    });
  });
}

at::Tensor per_cell(const Layout& l) { return at::empty({l.n, l.c}, at::kDouble); }

}  // namespace

// per-(n, c) mean and biased variance over the spatial axes, in float64
std::vector<at::Tensor> stats(const at::Tensor& x) {
  const Layout l = layout_of(x);
  at::Tensor mean = per_cell(l), var = per_cell(l);
  double* s = mean.data_ptr<double>();
  double* q = var.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "resnorm_stats", [&] {
    const scalar_t* p = x.data_ptr<scalar_t>();
    sums<false, scalar_t>(p, p, l, nullptr, nullptr, s, q);
  });
  const double inv = 1.0 / double(l.hw);
  for (int64_t i = 0; i < l.n * l.c; ++i) {
    s[i] *= inv;
    q[i] = std::max(q[i] * inv - s[i] * s[i], 0.0);
  }
  return {mean, var};
}

// x * scale + shift, then max(., 0) if relu
at::Tensor affine(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, bool relu) {
  const Layout l = layout_of(x);
  at::Tensor y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "resnorm_affine", [&] {
    const PerChannel<scalar_t> s(scale, l), b(shift, l);
    if (relu)
      affine_pass<true>(x.data_ptr<scalar_t>(), l, s, b, y.data_ptr<scalar_t>());
    else
      affine_pass<false>(x.data_ptr<scalar_t>(), l, s, b, y.data_ptr<scalar_t>());
  });
  return y;
}

// per-(n, c) sums of g' and g' * x over the spatial axes, in float64
std::vector<at::Tensor> grad_sums(const at::Tensor& g_in, const at::Tensor& x, const at::Tensor& scale,
                                  const at::Tensor& shift, bool relu) {
  const Layout l = layout_of(x);
  const at::Tensor g = like(g_in, l);
  at::Tensor sum_g = per_cell(l), sum_gx = per_cell(l);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "resnorm_grad_sums", [&] {
    const scalar_t *pg = g.data_ptr<scalar_t>(), *px = x.data_ptr<scalar_t>();
    if (relu) {
      const PerChannel<scalar_t> s(scale, l), b(shift, l);
      sums<true>(pg, px, l, &s, &b, sum_g.data_ptr<double>(), sum_gx.data_ptr<double>());
    } else {
      sums<false, scalar_t>(pg, px, l, nullptr, nullptr, sum_g.data_ptr<double>(), sum_gx.data_ptr<double>());
    }
  });
  return {sum_g, sum_gx};
}

// g' * scale + x * c1 + c0
at::Tensor grad_input(const at::Tensor& g_in, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                      const at::Tensor& c1, const at::Tensor& c0, bool relu) {
  const Layout l = layout_of(x);
  const at::Tensor g = like(g_in, l);
  at::Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "resnorm_grad_input", [&] {
    const PerChannel<scalar_t> s(scale, l), b(shift, l), k1(c1, l), k0(c0, l);
    const scalar_t *pg = g.data_ptr<scalar_t>(), *px = x.data_ptr<scalar_t>();
    if (relu)
      grad_input_pass<true>(pg, px, l, s, b, k1, k0, out.data_ptr<scalar_t>());
    else
      grad_input_pass<false>(pg, px, l, s, b, k1, k0, out.data_ptr<scalar_t>());
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("stats", &stats, "per-(n, c) spatial mean and biased variance (float64)");
  m.def("affine", &affine, "x * scale + shift, then ReLU if relu");
  m.def("grad_sums", &grad_sums, "per-(n, c) spatial sums of g' and g' * x (float64)");
  m.def("grad_input", &grad_input, "g' * scale + x * c1 + c0");
}
