// Fused CPU kernel for the element-wise family (RootFreeAdamW, RootFreeRMSprop, AdaX,
// RootFreeAdaX).  One pass over memory per tensor; the math is exactly that of
// `hf_rootfree.optim.elementwise._single_tensor_step` (the reference path) -- keep them in sync:
//
//   s <- a*s + c*g^2
//   d <- (root ? sqrt(s) : s) * k + e
//   adam-style (precondition_first = false):
//       m <- m_decay*m + m_gain*g
//       p <- p*p_mul - lr * m / d
//   heavy-ball (precondition_first = true):
//       u <- g / d + wd_add * p
//       b <- m_decay*b + u          (only if a buffer is given; otherwise b = u)
//       p <- p*p_mul - lr * b
//
// coeffs is a float64 CPU tensor of shape [n or 1, 9] whose columns are the fields of the Python
// NamedTuple `elementwise.Coefficients`, in its order: a, c, k, e, m_decay, m_gain, lr, p_mul, wd_add.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kGrain = 1 << 15;
constexpr int64_t kNumCoeffs = 9;

template <typename C>
struct Coeffs {
  C a, c, k, e, m_decay, m_gain, lr, p_mul, wd_add;
};

template <typename P, typename S, typename C, bool kRoot, bool kHeavyBall, bool kHasBuf>
void step_contiguous(P* __restrict__ p, const P* __restrict__ g, S* __restrict__ m,
                     S* __restrict__ s, int64_t n, Coeffs<C> k) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      const C gi = static_cast<C>(g[i]);
      const C si = k.a * static_cast<C>(s[i]) + k.c * gi * gi;
      s[i] = static_cast<S>(si);
      C d;
      if constexpr (kRoot) {
        d = std::sqrt(si) * k.k + k.e;
      } else {
        d = si * k.k + k.e;
      }
      const C pi = static_cast<C>(p[i]);
      if constexpr (kHeavyBall) {
        C u = gi / d + k.wd_add * pi;
        if constexpr (kHasBuf) {
          u = k.m_decay * static_cast<C>(m[i]) + u;
          m[i] = static_cast<S>(u);
        }
        p[i] = static_cast<P>(pi * k.p_mul - k.lr * u);
      } else {
        const C mi = k.m_decay * static_cast<C>(m[i]) + k.m_gain * gi;
        m[i] = static_cast<S>(mi);
        p[i] = static_cast<P>(pi * k.p_mul - k.lr * mi / d);
      }
    }
  });
}

template <typename P, typename S, typename C>
void step_one(const at::Tensor& p, const at::Tensor& g, const at::Tensor* m, const at::Tensor& s,
              const Coeffs<C>& k, bool root, bool heavy_ball) {
  P* pp = p.data_ptr<P>();
  const P* gp = g.data_ptr<P>();
  S* sp = s.data_ptr<S>();
  S* mp = m ? m->data_ptr<S>() : nullptr;
  const int64_t n = p.numel();
#define HF_RF_CALL(R, H, B) step_contiguous<P, S, C, R, H, B>(pp, gp, mp, sp, n, k)
  if (root) {
    if (heavy_ball) {
      if (mp) HF_RF_CALL(true, true, true); else HF_RF_CALL(true, true, false);
    } else {
      HF_RF_CALL(true, false, true);
    }
  } else {
    if (heavy_ball) {
      if (mp) HF_RF_CALL(false, true, true); else HF_RF_CALL(false, true, false);
    } else {
      HF_RF_CALL(false, false, true);
    }
  }
#undef HF_RF_CALL
}

template <typename P, typename S>
void dispatch_compute(const at::Tensor& p, const at::Tensor& g, const at::Tensor* m,
                      const at::Tensor& s, const double* row, bool root, bool heavy_ball) {
  // The update is computed in float64 when the parameter or the state is float64, else float32.
  if constexpr (std::is_same_v<P, double> || std::is_same_v<S, double>) {
    Coeffs<double> k{row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8]};
    step_one<P, S, double>(p, g, m, s, k, root, heavy_ball);
  } else {
    Coeffs<float> k{static_cast<float>(row[0]), static_cast<float>(row[1]),
                    static_cast<float>(row[2]), static_cast<float>(row[3]),
                    static_cast<float>(row[4]), static_cast<float>(row[5]),
                    static_cast<float>(row[6]), static_cast<float>(row[7]),
                    static_cast<float>(row[8])};
    step_one<P, S, float>(p, g, m, s, k, root, heavy_ball);
  }
}

template <typename P>
void dispatch_state(const at::Tensor& p, const at::Tensor& g, const at::Tensor* m,
                    const at::Tensor& s, const double* row, bool root, bool heavy_ball) {
  switch (s.scalar_type()) {
    case at::kFloat: dispatch_compute<P, float>(p, g, m, s, row, root, heavy_ball); break;
    case at::kDouble: dispatch_compute<P, double>(p, g, m, s, row, root, heavy_ball); break;
    case at::kBFloat16: dispatch_compute<P, c10::BFloat16>(p, g, m, s, row, root, heavy_ball); break;
    case at::kHalf: dispatch_compute<P, c10::Half>(p, g, m, s, row, root, heavy_ball); break;
    default: TORCH_CHECK(false, "hf_rootfree fused step: unsupported state dtype ", s.scalar_type());
  }
}

void fused_elementwise_step_(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                             at::TensorList second, const at::Tensor& coeffs, bool root,
                             bool heavy_ball) {
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == n && static_cast<int64_t>(second.size()) == n,
              "hf_rootfree fused step: params, grads and state lists differ in length");
  TORCH_CHECK(bufs.empty() || static_cast<int64_t>(bufs.size()) == n,
              "hf_rootfree fused step: buffer list must be empty or match params");
  TORCH_CHECK(!bufs.empty() || heavy_ball, "hf_rootfree fused step: adam-style update needs exp_avg");
  TORCH_CHECK(coeffs.scalar_type() == at::kDouble && coeffs.dim() == 2 &&
                  coeffs.size(1) == kNumCoeffs && (coeffs.size(0) == 1 || coeffs.size(0) == n) &&
                  coeffs.is_contiguous() && coeffs.device().is_cpu(),
              "hf_rootfree fused step: coeffs must be a contiguous float64 CPU tensor [n or 1, 9]");
  const double* rows = coeffs.data_ptr<double>();
  const bool per_tensor = coeffs.size(0) > 1;
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    // Every tensor is walked for p.numel() elements: check each one's shape against its parameter
    // before touching memory (a state loaded for a parameter of another shape must not be read or
    // written out of bounds).
    TORCH_CHECK(grads[i].sizes() == p.sizes(), "hf_rootfree fused step: tensor ", i, ": grad shape ",
                grads[i].sizes(), " differs from param shape ", p.sizes());
    TORCH_CHECK(second[i].sizes() == p.sizes(), "hf_rootfree fused step: tensor ", i,
                ": second-moment state shape ", second[i].sizes(), " differs from param shape ",
                p.sizes());
    if (!bufs.empty()) {
      TORCH_CHECK(bufs[i].sizes() == p.sizes(), "hf_rootfree fused step: tensor ", i,
                  ": momentum state shape ", bufs[i].sizes(), " differs from param shape ", p.sizes());
      TORCH_CHECK(bufs[i].scalar_type() == second[i].scalar_type(), "hf_rootfree fused step: tensor ",
                  i, ": momentum state dtype ", bufs[i].scalar_type(), " differs from the second-moment ",
                  "state dtype ", second[i].scalar_type());
    }
    TORCH_CHECK(p.device().is_cpu() && grads[i].device().is_cpu() && second[i].device().is_cpu() &&
                    (bufs.empty() || bufs[i].device().is_cpu()),
                "hf_rootfree fused step: CPU tensors only");
    if (p.numel() == 0) continue;
    TORCH_CHECK(grads[i].scalar_type() == p.scalar_type(),
                "hf_rootfree fused step: grad dtype differs from param dtype");
    TORCH_CHECK(second[i].is_contiguous() && (bufs.empty() || bufs[i].is_contiguous()),
                "hf_rootfree fused step: state must be contiguous");
    // Parameters and gradients may be non-contiguous: work on contiguous copies, write back.
    at::Tensor pc = p.contiguous();
    at::Tensor gc = grads[i].contiguous();
    const at::Tensor* m = bufs.empty() ? nullptr : &bufs[i];
    const double* row = rows + (per_tensor ? i * kNumCoeffs : 0);
    switch (p.scalar_type()) {
      case at::kFloat: dispatch_state<float>(pc, gc, m, second[i], row, root, heavy_ball); break;
      case at::kDouble: dispatch_state<double>(pc, gc, m, second[i], row, root, heavy_ball); break;
      case at::kBFloat16:
        dispatch_state<c10::BFloat16>(pc, gc, m, second[i], row, root, heavy_ball);
        break;
      case at::kHalf: dispatch_state<c10::Half>(pc, gc, m, second[i], row, root, heavy_ball); break;
      default: TORCH_CHECK(false, "hf_rootfree fused step: unsupported param dtype ", p.scalar_type());
    }
    if (!pc.is_same(p)) p.copy_(pc);
  }
}

// Sum of |x| per tensor, accumulated in float64 over fixed blocks of kSumBlock elements whose
// partial sums are added in block order: the result does not depend on the number of threads.
// It feeds the per-tensor relative damping (mean |g|) of the AdamW-unit defaults; one read of
// each gradient, where torch's CPU norm is several times slower.
constexpr int64_t kSumBlock = 1 << 14;

template <typename T>
double abs_sum_contiguous(const T* x, int64_t n) {
  const int64_t blocks = (n + kSumBlock - 1) / kSumBlock;
  std::vector<double> partial(static_cast<size_t>(blocks), 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t lo = b * kSumBlock;
      const int64_t hi = std::min(n, lo + kSumBlock);
      // eight float64 lanes (vectorizes without reassociation flags), then the lanes in order
      double lane[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
      int64_t i = lo;
      for (; i + 8 <= hi; i += 8) {
        for (int j = 0; j < 8; ++j) lane[j] += std::fabs(static_cast<double>(x[i + j]));
      }
      double acc = 0.0;
      for (int j = 0; j < 8; ++j) acc += lane[j];
      for (; i < hi; ++i) acc += std::fabs(static_cast<double>(x[i]));
      partial[static_cast<size_t>(b)] = acc;
    }
  });
  double total = 0.0;
  for (double v : partial) total += v;
  return total;
}

at::Tensor abs_sums(at::TensorList tensors) {
  const int64_t n = static_cast<int64_t>(tensors.size());
  at::Tensor out = at::zeros({n}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.device().is_cpu(), "hf_rootfree abs_sums: CPU tensors only");
    if (t.numel() == 0) continue;
    at::Tensor c = t.contiguous();
    switch (c.scalar_type()) {
      case at::kFloat: o[i] = abs_sum_contiguous(c.data_ptr<float>(), c.numel()); break;
      case at::kDouble: o[i] = abs_sum_contiguous(c.data_ptr<double>(), c.numel()); break;
      case at::kBFloat16: o[i] = abs_sum_contiguous(c.data_ptr<c10::BFloat16>(), c.numel()); break;
      case at::kHalf: o[i] = abs_sum_contiguous(c.data_ptr<c10::Half>(), c.numel()); break;
      default: TORCH_CHECK(false, "hf_rootfree abs_sums: unsupported dtype ", c.scalar_type());
    }
  }
  return out;
}

// The two sums of squares that graft a root-free step onto AdamW's step size (lr_units="adamw"),
// per tensor, from the state *before* the step (nothing is written): with
//   s' = a*s + c*g^2,   n = m_decay*m + m_gain*g (adam-style) or n = g (heavy ball),
// row i of the result is
//   [ sum (n / (k*s' + lam_i))^2,   sum (n / (sqrt(k*s'*inv_b) + eps))^2 ]
// i.e. the squared norms of the root-free direction and of AdamW's step from the same moments.
// Element math and sums in float64, over fixed blocks (independent of the number of threads).
// Element math in the update's precision C (float64 when the parameter or state is float64, else
// float32, as the step kernel); squares summed in float64 over fixed blocks of kSumBlock elements,
// in eight lanes per block (vectorizes without reassociation flags), then blocks in order: the
// result does not depend on the number of threads.
template <typename P, typename S, typename C, bool kHeavyBall>
void graft_sum_contiguous(const P* __restrict__ g, const S* __restrict__ m, const S* __restrict__ s,
                          int64_t n, const double* row, double lam, double inv_b, double eps,
                          double* out) {
  const C a = static_cast<C>(row[0]), c = static_cast<C>(row[1]), k = static_cast<C>(row[2]);
  const C m_decay = static_cast<C>(row[4]), m_gain = static_cast<C>(row[5]);
  const C lam_c = static_cast<C>(lam), k_b = static_cast<C>(row[2] * inv_b), eps_c = static_cast<C>(eps);
  const int64_t blocks = (n + kSumBlock - 1) / kSumBlock;
  std::vector<double> partial(static_cast<size_t>(2 * blocks), 0.0);
  auto terms = [&](int64_t i, double& root_free, double& adamw) {
    const C gi = static_cast<C>(g[i]);
    const C si = a * static_cast<C>(s[i]) + c * gi * gi;
    C ni;
    if constexpr (kHeavyBall) {
      ni = gi;
    } else {
      ni = m_decay * static_cast<C>(m[i]) + m_gain * gi;
    }
    const C u = ni / (k * si + lam_c);
    const C v = ni / (std::sqrt(k_b * si) + eps_c);
    root_free += static_cast<double>(u * u);
    adamw += static_cast<double>(v * v);
  };
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t lo = b * kSumBlock;
      const int64_t hi = std::min(n, lo + kSumBlock);
      double rf[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
      double ad[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
      int64_t i = lo;
      for (; i + 8 <= hi; i += 8) {
        for (int j = 0; j < 8; ++j) terms(i + j, rf[j], ad[j]);
      }
      double root_free = 0.0, adamw = 0.0;
      for (int j = 0; j < 8; ++j) {
        root_free += rf[j];
        adamw += ad[j];
      }
      for (; i < hi; ++i) terms(i, root_free, adamw);
      partial[static_cast<size_t>(2 * b)] = root_free;
      partial[static_cast<size_t>(2 * b + 1)] = adamw;
    }
  });
  for (int64_t b = 0; b < blocks; ++b) {
    out[0] += partial[static_cast<size_t>(2 * b)];
    out[1] += partial[static_cast<size_t>(2 * b + 1)];
  }
}

template <typename P, typename S>
void graft_sum_compute(const P* g, const S* m, const S* s, int64_t n, const double* row, double lam,
                       double inv_b, double eps, bool heavy_ball, double* out) {
  using C = std::conditional_t<std::is_same_v<P, double> || std::is_same_v<S, double>, double, float>;
  if (heavy_ball) {
    graft_sum_contiguous<P, S, C, true>(g, m, s, n, row, lam, inv_b, eps, out);
  } else {
    graft_sum_contiguous<P, S, C, false>(g, m, s, n, row, lam, inv_b, eps, out);
  }
}

template <typename P>
void graft_sum_state(const at::Tensor& g, const at::Tensor* m, const at::Tensor& s, const double* row,
                     double lam, double inv_b, double eps, bool heavy_ball, double* out) {
  const P* gp = g.data_ptr<P>();
  const int64_t n = g.numel();
#define HF_RF_SUMS(S)                                                                         \
  graft_sum_compute<P, S>(gp, m ? m->data_ptr<S>() : nullptr, s.data_ptr<S>(), n, row, lam, \
                          inv_b, eps, heavy_ball, out)
  switch (s.scalar_type()) {
    case at::kFloat: HF_RF_SUMS(float); break;
    case at::kDouble: HF_RF_SUMS(double); break;
    case at::kBFloat16: HF_RF_SUMS(c10::BFloat16); break;
    case at::kHalf: HF_RF_SUMS(c10::Half); break;
    default: TORCH_CHECK(false, "hf_rootfree graft_sums: unsupported state dtype ", s.scalar_type());
  }
#undef HF_RF_SUMS
}

at::Tensor graft_sums(at::TensorList grads, at::TensorList bufs, at::TensorList second,
                      const at::Tensor& coeffs, const at::Tensor& lam, double inv_b, double eps,
                      bool heavy_ball) {
  const int64_t n = static_cast<int64_t>(grads.size());
  TORCH_CHECK(static_cast<int64_t>(second.size()) == n &&
                  (heavy_ball || static_cast<int64_t>(bufs.size()) == n),
              "hf_rootfree graft_sums: grads, buffers and state lists differ in length");
  TORCH_CHECK(coeffs.scalar_type() == at::kDouble && coeffs.dim() == 2 &&
                  coeffs.size(1) == kNumCoeffs && (coeffs.size(0) == 1 || coeffs.size(0) == n) &&
                  coeffs.is_contiguous() && coeffs.device().is_cpu(),
              "hf_rootfree graft_sums: coeffs must be a contiguous float64 CPU tensor [n or 1, 9]");
  TORCH_CHECK(lam.scalar_type() == at::kDouble && lam.dim() == 1 && lam.size(0) == n &&
                  lam.is_contiguous() && lam.device().is_cpu(),
              "hf_rootfree graft_sums: lam must be a contiguous float64 CPU vector [n]");
  at::Tensor out = at::zeros({n, 2}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  const double* rows = coeffs.data_ptr<double>();
  const double* lams = lam.data_ptr<double>();
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& g = grads[i];
    const at::Tensor* m = heavy_ball ? nullptr : &bufs[i];
    // Read for g.numel() elements: shapes, dtypes and layout checked before memory is touched.
    TORCH_CHECK(g.device().is_cpu() && second[i].device().is_cpu() && (!m || m->device().is_cpu()),
                "hf_rootfree graft_sums: CPU tensors only");
    // (the gradient's shape is its parameter's: checked in Python before any kernel runs)
    TORCH_CHECK(second[i].sizes() == g.sizes(), "hf_rootfree graft_sums: tensor ", i,
                ": second-moment state shape ", second[i].sizes(), " differs from param shape ",
                g.sizes());
    TORCH_CHECK(!m || m->sizes() == g.sizes(), "hf_rootfree graft_sums: tensor ", i,
                ": momentum state shape ", m ? m->sizes() : g.sizes(), " differs from param shape ",
                g.sizes());
    TORCH_CHECK(second[i].is_contiguous() && (!m || (m->is_contiguous() &&
                                                      m->scalar_type() == second[i].scalar_type())),
                "hf_rootfree graft_sums: tensor ", i, ": state must be contiguous, of one dtype");
    if (g.numel() == 0) continue;
    at::Tensor gc = g.contiguous();
    const double* row = rows + (coeffs.size(0) > 1 ? i * kNumCoeffs : 0);
    double* oi = o + 2 * i;
    switch (gc.scalar_type()) {
      case at::kFloat: graft_sum_state<float>(gc, m, second[i], row, lams[i], inv_b, eps, heavy_ball, oi); break;
      case at::kDouble: graft_sum_state<double>(gc, m, second[i], row, lams[i], inv_b, eps, heavy_ball, oi); break;
      case at::kBFloat16:
        graft_sum_state<c10::BFloat16>(gc, m, second[i], row, lams[i], inv_b, eps, heavy_ball, oi);
        break;
      case at::kHalf: graft_sum_state<c10::Half>(gc, m, second[i], row, lams[i], inv_b, eps, heavy_ball, oi); break;
      default: TORCH_CHECK(false, "hf_rootfree graft_sums: unsupported grad dtype ", gc.scalar_type());
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(hf_rootfree, m) {
  m.def(
      "fused_elementwise_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] bufs, "
      "Tensor(c!)[] second, Tensor coeffs, bool root, bool heavy_ball) -> ()");
  m.def("abs_sums(Tensor[] tensors) -> Tensor");
  m.def(
      "graft_sums(Tensor[] grads, Tensor[] bufs, Tensor[] second, Tensor coeffs, Tensor lam, "
      "float inv_b, float eps, bool heavy_ball) -> Tensor");
}

TORCH_LIBRARY_IMPL(hf_rootfree, CPU, m) {
  m.impl("fused_elementwise_step_", &fused_elementwise_step_);
  m.impl("abs_sums", &abs_sums);
  m.impl("graft_sums", &graft_sums);
}
