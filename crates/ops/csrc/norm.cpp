// ============================================================================================
// BatchNorm with statistics per (image, channel) plane
// ============================================================================================
//
// y = (x − mean) / sqrt(var + eps) · γ[c] + β[c], mean and (biased) var over each H×W plane of
// x (N, C, H, W): BatchNorm in training mode applied to each image on its own. On CUDA
// (float32, float64, bfloat16 planes; γ, β and their gradients float32, float64 for float64)
// norm_cuda.cu's kernels, on the CPU (float32, float64) the same arithmetic below; elsewhere
// libtorch's batch_norm over the N·C planes as channels of one image, as the network did before.

#include "common.h"

namespace s3ops {
namespace {

// The CPU halves of PlaneNormFn (float32, float64), the same arithmetic as norm_cuda.cu's:
// each plane's two sums (forward: Σ(x − K), Σ(x − K)², K its first value; backward: Σdy,
// Σdy·(x − mean)), then one affine pass. Why not libtorch's: its CPU BatchNorm read each plane
// three times (mean, variance, normalisation) and took about 2 ms per 1×32×256² map, 23 ms of
// a step; here a plane is summed and then, from the second-level cache, transformed, planes in
// parallel. Sums in float32 (float64 planes: float64) per run of kNormRun values, the runs
// added in float64 in order: deterministic.
constexpr int64_t kNormRun = 1024;

// Over n values: Σ(u − k) and Σ(u − k)² when w is null (the forward's), else Σw and
// Σw·(u − k) (the backward's, k the mean).
template <typename T>
S3_INLINE void plane_two_sums(const T* __restrict u, const T* __restrict w, T k, int64_t n,
                              double& s1, double& s2) {
  s1 = s2 = 0;
  for (int64_t r0 = 0; r0 < n; r0 += kNormRun) {
    const int64_t r1 = std::min(n, r0 + kNormRun);
    T a = 0, b = 0;
    if (w) {
#pragma omp simd reduction(+ : a, b)
      for (int64_t i = r0; i < r1; ++i) {
        a += w[i];
        b += w[i] * (u[i] - k);
      }
    } else {
#pragma omp simd reduction(+ : a, b)
      for (int64_t i = r0; i < r1; ++i) {
        const T d = u[i] - k;
        a += d;
        b += d * d;
      }
    }
    s1 += (double)a;
    s2 += (double)b;
  }
}

// y = (x − mean)·γ/σ + β per plane; mean and 1/σ (biased variance) into mean, invstd.
template <typename T>
void plane_norm_forward_cpu(const at::Tensor& x, const at::Tensor& g, const at::Tensor& b,
                            double eps, at::Tensor& y, at::Tensor& mean, at::Tensor& invstd) {
  const int64_t C = x.size(1), planes = x.size(0) * C, n = x.size(2) * x.size(3);
  const T *xp = x.data_ptr<T>(), *gp = g.data_ptr<T>(), *bp = b.data_ptr<T>();
  T *yp = y.data_ptr<T>(), *mp = mean.data_ptr<T>(), *ip = invstd.data_ptr<T>();
  at::parallel_for(0, planes, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const T* u = xp + q * n;
      double s1, s2;
      plane_two_sums<T>(u, nullptr, u[0], n, s1, s2);
      const T dm = T(s1 / n), var = std::max(T(s2 / n) - dm * dm, T(0));
      const T inv = T(1) / std::sqrt(var + T(eps)), m = u[0] + dm;
      const T scale = gp[q % C] * inv, shift = bp[q % C];
      mp[q] = m;
      ip[q] = inv;
      T* o = yp + q * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) o[i] = (u[i] - m) * scale + shift;
    }
  });
}

// dx = a·dy + cb·(x − mean) + ce per plane, and the plane's shares of dγ (Σdy·x̂) and dβ (Σdy).
template <typename T>
void plane_norm_backward_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& g,
                             const at::Tensor& mean, const at::Tensor& invstd, at::Tensor& dx,
                             at::Tensor& dg, at::Tensor& db) {
  const int64_t C = x.size(1), planes = x.size(0) * C, n = x.size(2) * x.size(3);
  const T *dyp = dy.data_ptr<T>(), *xp = x.data_ptr<T>(), *gp = g.data_ptr<T>();
  const T *mp = mean.data_ptr<T>(), *ip = invstd.data_ptr<T>();
  T *dxp = dx.data_ptr<T>(), *dgp = dg.data_ptr<T>(), *dbp = db.data_ptr<T>();
  at::parallel_for(0, planes, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const T *u = xp + q * n, *w = dyp + q * n;
      double sdy, sdyx;
      plane_two_sums<T>(u, w, mp[q], n, sdy, sdyx);
      const T inv = ip[q], a = gp[q % C] * inv, m = mp[q];
      const T cb = -a * inv * inv * T(sdyx) / T(n), ce = -a * T(sdy) / T(n);
      dgp[q] = T(sdyx) * inv;
      dbp[q] = T(sdy);
      T* o = dxp + q * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) o[i] = a * w[i] + cb * (u[i] - m) + ce;
    }
  });
}

struct PlaneNormFn : public torch::autograd::Function<PlaneNormFn> {
  static at::Tensor forward(AutogradContext* ctx, at::Tensor input, at::Tensor gamma,
                            at::Tensor beta, double eps) {
    auto x = input.contiguous();
    const auto g = gamma.contiguous(), b = beta.contiguous();
    const int64_t C = x.size(1), planes = x.size(0) * C, elems = x.size(2) * x.size(3);
    auto y = at::empty_like(x);
    const auto sums = x.options().dtype(dw_sum_type(x));
    auto mean = at::empty({planes}, sums), invstd = at::empty({planes}, sums);
    ctx->saved_data["need"] = std::vector<int64_t>{input.requires_grad(), gamma.requires_grad(),
                                                   beta.requires_grad()};
    if (cpu_kernels_take(x)) {
      AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "s3net_plane_norm", [&] {
        plane_norm_forward_cpu<scalar_t>(x, g, b, eps, y, mean, invstd);
      });
      ctx->save_for_backward({x, g, mean, invstd});
      return y;
    }
    KernelGuard guard(x);
    auto scratch = at::empty({kernels(x).plane_norm_scratch(planes, elems)}, sums);
    const int rc = kernels(x).plane_norm_forward(
        dw_cuda_dtype(x), x.data_ptr(), y.data_ptr(), g.data_ptr(), b.data_ptr(), mean.data_ptr(),
        invstd.data_ptr(), scratch.data_ptr(), planes, elems, C, eps, kernel_stream(x));
    kernel_check("plane_norm", rc, "forward", x);
    ctx->save_for_backward({x, g, mean, invstd});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto sv = ctx->get_saved_variables();
    const at::Tensor &x = sv[0], &g = sv[1], &mean = sv[2], &invstd = sv[3];
    const auto need = ctx->saved_data["need"].toIntVector();
    auto dy = grads[0].contiguous();
    const int64_t N = x.size(0), C = x.size(1), planes = N * C, elems = x.size(2) * x.size(3);
    auto dx = at::empty_like(x);
    auto dg = at::empty({planes}, mean.options()), db = at::empty({planes}, mean.options());
    if (cpu_kernels_take(x)) {
      AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "s3net_plane_norm_backward", [&] {
        plane_norm_backward_cpu<scalar_t>(dy, x, g, mean, invstd, dx, dg, db);
      });
      return {need[0] ? dx : at::Tensor(), need[1] ? dg.view({N, C}).sum(0).to(g.scalar_type()) : at::Tensor(),
              need[2] ? db.view({N, C}).sum(0).to(g.scalar_type()) : at::Tensor(), at::Tensor()};
    }
    KernelGuard guard(x);
    auto scratch = at::empty({kernels(x).plane_norm_scratch(planes, elems)}, mean.options());
    const int rc = kernels(x).plane_norm_backward(
        dw_cuda_dtype(x), dy.data_ptr(), x.data_ptr(), g.data_ptr(), mean.data_ptr(),
        invstd.data_ptr(), dx.data_ptr(), dg.data_ptr(), db.data_ptr(), scratch.data_ptr(), planes,
        elems, C, kernel_stream(x));
    kernel_check("plane_norm", rc, "backward", x);
    // Each channel's γ and β gradients: its planes' shares added, image by image.
    return {need[0] ? dx : at::Tensor(), need[1] ? dg.view({N, C}).sum(0).to(g.scalar_type()) : at::Tensor(),
            need[2] ? db.view({N, C}).sum(0).to(g.scalar_type()) : at::Tensor(), at::Tensor()};
  }
};

// libtorch's batch_norm, one image at a time in effect: the N·C planes as the channels of one
// image, γ and β repeated per image (for N = 1, BatchNorm itself).
at::Tensor plane_norm_libtorch(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                               double eps) {
  const int64_t n = x.size(0);
  if (n == 1) return at::batch_norm(x, gamma, beta, {}, {}, true, 0.1, eps, true);
  auto y = at::batch_norm(x.flatten(0, 1).unsqueeze(0), gamma.repeat({n}), beta.repeat({n}), {},
                          {}, true, 0.1, eps, true);
  return y.view(x.sizes());
}

}  // namespace
}  // namespace s3ops

using namespace s3ops;

extern "C" {

// BatchNorm in training mode with statistics per (image, channel) plane (see PlaneNormFn).
int s3ops_plane_norm(const at::Tensor* input, const at::Tensor* gamma, const at::Tensor* beta,
                     double eps, at::Tensor** out, char** err) {
  S3_PROTECT({
    RECORD_FUNCTION("s3net::plane_norm", std::vector<c10::IValue>({*input}));
    *out = nullptr;
    *err = nullptr;
    const char* nm = "plane_norm: ";
    const at::Tensor& x = *input;
    TORCH_CHECK(x.dim() == 4, nm, "input must be 4-D (N, C, H, W), got ", x.sizes());
    const int64_t C = x.size(1);
    TORCH_CHECK(gamma->dim() == 1 && gamma->size(0) == C && beta->dim() == 1 && beta->size(0) == C,
                nm, "gamma and beta must be (", C, "), got ", gamma->sizes(), " and ", beta->sizes());
    TORCH_CHECK(gamma->device() == x.device() && beta->device() == x.device(), nm,
                "gamma and beta must be on the input's device");
    TORCH_CHECK(eps > 0, nm, "eps must be positive, got ", eps);
    at::Tensor r;
    const auto kind = x.scalar_type();
    const auto params = kind == at::kDouble ? at::kDouble : at::kFloat;
    if ((kernels_take(x) || cpu_kernels_take(x)) && gamma->scalar_type() == params &&
        beta->scalar_type() == params &&
        x.size(2) * x.size(3) > 0) {
      r = PlaneNormFn::apply(x, *gamma, *beta, eps);
    }
    if (!r.defined()) r = plane_norm_libtorch(x, *gamma, *beta, eps);
    *out = new at::Tensor(std::move(r));
    return 0;
  })
}

}  // extern "C"
