// ============================================================================================
// Per-pixel losses of a map of logits: cross-entropy and continuity
// ============================================================================================
//
// For logits (M, K, H, W), per image m:
//  * ce[m] = Σ_p (logsumexp_k x[m,:,p] − x[m,t_p,p]) / max(1, #valid p): cross-entropy against
//    a target t (M, H, W), pixels whose target is outside [0, K) (IGNORE) left out; without a
//    target, against the map's own argmax (first maximum on ties, NaN counting as a maximum,
//    as torch.argmax), which is returned;
//  * continuity[m] (asked for) = mean |x[y+1] − x[y]| + mean |x[:, x+1] − x[:, x]| over every
//    channel: the mean L1 of vertical and horizontal neighbour differences.
// Backward: ∂ce/∂x = (softmax − onehot(t)) / #valid at valid pixels; ∂continuity/∂x the signs of
// the differences on either side, over their counts.
//
// Why one op: the fit's response map gets both terms, and libtorch runs them as ~25 passes over
// it (argmax, log_softmax, the NLL and its backward's zero fill, the differences, their abs,
// the slices' backward fills and copies, autograd's adds of the three gradients). Here the
// forward reads the map once and the backward reads it once and writes its gradient once. On
// a GPU a 16-network step's response map is 134 MB (float32), so each pass saved counts; on
// the CPU the argmax alone over the strided channel axis took longer than the log_softmax.
//
// Sums per row in float64 (each row's partials in the logits' adding type, float32 or
// float64), the rows of an image added in order: deterministic, and the same for an image
// alone or in any batch. 16-bit logits are read as they are and added in float32; the
// gradient is rounded once. Kernels: CPU here (rows in parallel), CUDA in losses_cuda.cu.

#include "common.h"

namespace s3ops {
namespace {

// Sums one row y of image m writes into `rows` (its 4 values): Σ ce, #valid, Σ|dy|, Σ|dx|.
constexpr int kRowSums = 4;

// e^x in float32 without a library call, so that the row loops vectorise: 2^n · e^r with
// n = round(x·log₂e), r = x − n·ln 2 (ln 2 in two parts) and Cephes' degree-6 polynomial for
// e^r; within about 1 ulp of e^x (measured over [−87, 88]). x is clamped to [−87.3, 88.3] (e^x
// then 1e-38 rather than 0 below: the sums and gradients here never notice). 2^n is built from
// the bits of n + 1.5·2²³ (whose low bits hold n) in unsigned arithmetic, so a NaN, which the
// clamp keeps and the polynomial returns, is no undefined conversion on the way.
S3_INLINE float exp_row(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
  const float shift = 12582912.0f;  // 1.5 · 2²³: adding it rounds to an integer
  const float t = x * 1.44269504088896341f + shift;
  const float n = t - shift;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float q = 1.9875691500e-4f;
  q = q * r + 1.3981999507e-3f;
  q = q * r + 8.3334519073e-3f;
  q = q * r + 4.1665795894e-2f;
  q = q * r + 1.6666665459e-1f;
  q = q * r + 5.0000001201e-1f;
  const float e = q * r * r + r + 1.0f;
  const uint32_t bits = (__builtin_bit_cast(uint32_t, t) - 0x4B400000u + 127u) << 23;
  return e * __builtin_bit_cast(float, bits);
}
S3_INLINE double exp_row(double x) { return std::exp(x); }

// sign(v) (0 for 0 and NaN), branch-free so that the loops vectorise.
template <typename A>
S3_INLINE A sign_of(A v) {
  return static_cast<A>(v > A(0)) - static_cast<A>(v < A(0));
}

// ============================================================================================
// Argmax over the channel axis
// ============================================================================================
//
// labels (N, H, W) int64 = torch.argmax(x (N, K, H, W), 1): the first maximum, a NaN beating any
// number. Why: the default preset takes the clustering of the turned copy, a forward-only pass,
// as this argmax, and libtorch's CPU argmax over the strided channel axis took 9 ms for the
// 1×32×256² map of a step (3 % of it). Here each channel's stretch of a chunk of pixels is read
// once, in a loop that vectorises (the running maximum and index, one lane per pixel). CPU
// only (float32, float64, bfloat16 compared in float32); elsewhere libtorch's argmax.

constexpr int64_t kArgmaxChunk = 1024;

template <typename T, typename A>
S3_INLINE void argmax_chunk(const T* x, int64_t K, int64_t P, int64_t len, int64_t* out) {
  A mx[kArgmaxChunk];
  int32_t arg[kArgmaxChunk];
  for (int64_t i = 0; i < len; ++i) {
    mx[i] = static_cast<A>(x[i]);
    arg[i] = 0;
  }
  for (int64_t k = 1; k < K; ++k) {
    const T* __restrict p = x + k * P;
    for (int64_t i = 0; i < len; ++i) {
      const A v = static_cast<A>(p[i]);
      const bool take = v > mx[i] || (v != v && mx[i] == mx[i]);
      mx[i] = take ? v : mx[i];
      arg[i] = take ? static_cast<int32_t>(k) : arg[i];
    }
  }
  for (int64_t i = 0; i < len; ++i) out[i] = arg[i];
}
template <typename T, typename A>
void argmax_chunk_base(const T* x, int64_t K, int64_t P, int64_t len, int64_t* out) {
  argmax_chunk<T, A>(x, K, P, len, out);
}
template <typename T, typename A>
S3_AVX2 void argmax_chunk_avx2(const T* x, int64_t K, int64_t P, int64_t len, int64_t* out) {
  argmax_chunk<T, A>(x, K, P, len, out);
}

// x contiguous (N, K, H, W) on the CPU, K < 2³¹ → (N, H, W) int64.
at::Tensor argmax_channels_cpu(const at::Tensor& x) {
  const int64_t N = x.size(0), K = x.size(1), P = x.size(2) * x.size(3);
  auto out = at::empty({N, x.size(2), x.size(3)}, x.options().dtype(at::kLong));
  if (out.numel() == 0) return out;
  const int64_t chunks = (P + kArgmaxChunk - 1) / kArgmaxChunk;
  int64_t* op = out.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "argmax_channels", [&] {
    using T = scalar_t;
    using A = std::conditional_t<std::is_same_v<T, double>, double, float>;
    const T* xp = x.data_ptr<T>();
    auto fn = cpu_has_avx2() ? &argmax_chunk_avx2<T, A> : &argmax_chunk_base<T, A>;
    at::parallel_for(0, N * chunks, 16, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t n = b / chunks, i0 = (b % chunks) * kArgmaxChunk;
        fn(xp + n * K * P + i0, K, P, std::min(kArgmaxChunk, P - i0), op + n * P + i0);
      }
    });
  });
  return out;
}

// Per-thread row buffers.
template <typename A>
struct RowBuffers {
  std::vector<A> mx, sum, dy, dx;
  std::vector<int64_t> arg;
  explicit RowBuffers(int64_t W) : mx(W), sum(W), dy(W), dx(W), arg(W) {}
};

// Row y of one image x (K, H, W): its lse, its argmax (into `target` unless `given`) and its
// four sums. Loops run along the row, each channel at a time, so they vectorise; the sums go
// through per-pixel buffers, added up in order at the end.
template <typename T, typename A>
S3_INLINE void pl_row_impl(const T* x, int64_t K, int64_t H, int64_t W, int64_t y,
                           const int64_t* given, int64_t* target, A* lse, bool cont, double* rows,
                           RowBuffers<A>& b) {
  const int64_t P = H * W, o = y * W;
  A* __restrict mx = b.mx.data();
  A* __restrict sum = b.sum.data();
  int64_t* __restrict arg = b.arg.data();
  for (int64_t i = 0; i < W; ++i) {
    mx[i] = static_cast<A>(x[o + i]);
    arg[i] = 0;
    sum[i] = A(0);
  }
  for (int64_t k = 1; k < K; ++k) {
    const T* p = x + k * P + o;
    // torch.argmax: the first maximum, a NaN beating any number. With a given target only the
    // maximum is needed.
    if (given) {
      for (int64_t i = 0; i < W; ++i) {
        const A v = static_cast<A>(p[i]);
        mx[i] = v > mx[i] || (v != v && mx[i] == mx[i]) ? v : mx[i];
      }
      continue;
    }
    for (int64_t i = 0; i < W; ++i) {
      const A v = static_cast<A>(p[i]);
      const bool take = v > mx[i] || (v != v && mx[i] == mx[i]);
      mx[i] = take ? v : mx[i];
      arg[i] = take ? k : arg[i];
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    const T* p = x + k * P + o;
    for (int64_t i = 0; i < W; ++i) sum[i] += exp_row(static_cast<A>(p[i]) - mx[i]);
  }
  double ce = 0, valid = 0;
  const int64_t* t = given ? given + o : arg;
  for (int64_t i = 0; i < W; ++i) {
    const A logs = std::log(sum[i]);
    lse[o + i] = mx[i] + logs;
    if (!given) target[o + i] = arg[i];
    if (t[i] < 0 || t[i] >= K) continue;
    // (max − x_t) + log Σ exp(x − max): exactly log Σ for the argmax, as log_softmax gives it.
    ce += static_cast<double>((mx[i] - static_cast<A>(x[t[i] * P + o + i])) + logs);
    valid += 1;
  }
  double dy = 0, dx = 0;
  if (cont) {
    A* __restrict by = b.dy.data();
    A* __restrict bx = b.dx.data();
    for (int64_t i = 0; i < W; ++i) by[i] = bx[i] = A(0);
    for (int64_t k = 0; k < K; ++k) {
      const T* p = x + k * P + o;
      if (y + 1 < H) {
        for (int64_t i = 0; i < W; ++i) by[i] += std::abs(static_cast<A>(p[i + W]) - static_cast<A>(p[i]));
      }
      for (int64_t i = 0; i + 1 < W; ++i) bx[i] += std::abs(static_cast<A>(p[i + 1]) - static_cast<A>(p[i]));
    }
    for (int64_t i = 0; i < W; ++i) {
      dy += by[i];
      dx += bx[i];
    }
  }
  double* r = rows + y * kRowSums;
  r[0] = ce;
  r[1] = valid;
  r[2] = dy;
  r[3] = dx;
}

// Row y's gradient, every channel. coef: a (ce's scale), by, bx (continuity's per difference).
// `scale` and `tk`: per-pixel buffers (a at valid pixels, else 0; the target, −1 if invalid).
template <typename T, typename A>
S3_INLINE void pl_grad_row_impl(const T* x, int64_t K, int64_t H, int64_t W, int64_t y,
                                const int64_t* target, const A* lse, const A* coef, bool cont,
                                T* grad, RowBuffers<A>& b) {
  const int64_t P = H * W, o = y * W;
  const A a = coef[0], cy = coef[1], cx = coef[2];
  A* __restrict d = b.sum.data();
  A* __restrict scale = b.mx.data();
  int64_t* __restrict tk = b.arg.data();
  const A* l = lse + o;
  for (int64_t i = 0; i < W; ++i) {
    const int64_t t = target[o + i];
    const bool valid = t >= 0 && t < K;
    scale[i] = valid ? a : A(0);
    tk[i] = valid ? t : -1;
  }
  for (int64_t k = 0; k < K; ++k) {
    const T* p = x + k * P + o;
    for (int64_t i = 0; i < W; ++i) {
      d[i] = scale[i] * (exp_row(static_cast<A>(p[i]) - l[i]) - (tk[i] == k ? A(1) : A(0)));
    }
    if (cont) {
      if (y > 0) {
        for (int64_t i = 0; i < W; ++i) d[i] += cy * sign_of(static_cast<A>(p[i]) - static_cast<A>(p[i - W]));
      }
      if (y + 1 < H) {
        for (int64_t i = 0; i < W; ++i) d[i] -= cy * sign_of(static_cast<A>(p[i + W]) - static_cast<A>(p[i]));
      }
      for (int64_t i = 1; i < W; ++i) d[i] += cx * sign_of(static_cast<A>(p[i]) - static_cast<A>(p[i - 1]));
      for (int64_t i = 0; i + 1 < W; ++i) d[i] -= cx * sign_of(static_cast<A>(p[i + 1]) - static_cast<A>(p[i]));
    }
    T* g = grad + k * P + o;
    for (int64_t i = 0; i < W; ++i) g[i] = static_cast<T>(d[i]);
  }
}

#define S3_PL_ROW_ARGS                                                                       \
  const T *x, int64_t K, int64_t H, int64_t W, int64_t y, const int64_t *given, int64_t *target, \
      A *lse, bool cont, double *rows, RowBuffers<A> &b
#define S3_PL_GRAD_ARGS                                                                     \
  const T *x, int64_t K, int64_t H, int64_t W, int64_t y, const int64_t *target, const A *lse, \
      const A *coef, bool cont, T *grad, RowBuffers<A> &b
template <typename T, typename A>
void pl_row_base(S3_PL_ROW_ARGS) { pl_row_impl<T, A>(x, K, H, W, y, given, target, lse, cont, rows, b); }
template <typename T, typename A>
S3_AVX2 void pl_row_avx2(S3_PL_ROW_ARGS) { pl_row_impl<T, A>(x, K, H, W, y, given, target, lse, cont, rows, b); }
template <typename T, typename A>
void pl_grad_row_base(S3_PL_GRAD_ARGS) { pl_grad_row_impl<T, A>(x, K, H, W, y, target, lse, coef, cont, grad, b); }
template <typename T, typename A>
S3_AVX2 void pl_grad_row_avx2(S3_PL_GRAD_ARGS) { pl_grad_row_impl<T, A>(x, K, H, W, y, target, lse, coef, cont, grad, b); }

// Rows in parallel; each row's sums land in its own slot, so no order depends on threads.
void pixel_losses_cpu(const at::Tensor& x, const int64_t* given, at::Tensor& target,
                      at::Tensor& lse, bool cont, at::Tensor& rows) {
  const int64_t M = x.size(0), K = x.size(1), H = x.size(2), W = x.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "pixel_losses", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    int64_t* tp = target.data_ptr<int64_t>();
    A* lp = lse.data_ptr<A>();
    double* rp = rows.data_ptr<double>();
    auto fn = cpu_has_avx2() ? &pl_row_avx2<scalar_t, A> : &pl_row_base<scalar_t, A>;
    at::parallel_for(0, M * H, 16, [&](int64_t lo, int64_t hi) {
      RowBuffers<A> b(W);
      for (int64_t r = lo; r < hi; ++r) {
        const int64_t m = r / H, y = r % H;
        fn(xp + m * K * H * W, K, H, W, y, given ? given + m * H * W : nullptr, tp + m * H * W,
           lp + m * H * W, cont, rp + m * H * kRowSums, b);
      }
    });
  });
}

void pixel_losses_grad_cpu(const at::Tensor& x, const at::Tensor& target, const at::Tensor& lse,
                           const at::Tensor& coef, bool cont, at::Tensor& grad) {
  const int64_t M = x.size(0), K = x.size(1), H = x.size(2), W = x.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "pixel_losses_backward", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const int64_t* tp = target.data_ptr<int64_t>();
    const A* lp = lse.data_ptr<A>();
    const A* cp = coef.data_ptr<A>();
    scalar_t* gp = grad.data_ptr<scalar_t>();
    auto fn = cpu_has_avx2() ? &pl_grad_row_avx2<scalar_t, A> : &pl_grad_row_base<scalar_t, A>;
    at::parallel_for(0, M * H, 16, [&](int64_t lo, int64_t hi) {
      RowBuffers<A> b(W);
      for (int64_t r = lo; r < hi; ++r) {
        const int64_t m = r / H, y = r % H, off = m * K * H * W;
        fn(xp + off, K, H, W, y, tp + m * H * W, lp + m * H * W, cp + m * 3, cont, gp + off, b);
      }
    });
  });
}

void pixel_losses_cuda(const at::Tensor& x, const int64_t* given, at::Tensor& target,
                       at::Tensor& lse, bool cont, at::Tensor& rows) {
  KernelGuard guard(x);
  const int rc = kernels(x).pixel_losses(dw_cuda_dtype(x), x.data_ptr(), given,
                                         target.data_ptr<int64_t>(), lse.data_ptr(), cont,
                                         rows.data_ptr<double>(), x.size(0), x.size(1), x.size(2),
                                         x.size(3), kernel_stream(x));
  kernel_check("pixel_losses", rc, "forward", x);
}
void pixel_losses_grad_cuda(const at::Tensor& x, const at::Tensor& target, const at::Tensor& lse,
                            const at::Tensor& coef, bool cont, at::Tensor& grad) {
  KernelGuard guard(x);
  const int rc = kernels(x).pixel_losses_grad(
      dw_cuda_dtype(x), x.data_ptr(), target.data_ptr<int64_t>(), lse.data_ptr(), coef.data_ptr(),
      cont, grad.data_ptr(), x.size(0), x.size(1), x.size(2), x.size(3), kernel_stream(x));
  kernel_check("pixel_losses", rc, "backward", x);
}

// Returns {ce (M), continuity (M; zeros when not asked), target (M, H, W) int64}; the first two
// in float32 (float64 for float64 logits).
struct PixelLossesFn : public torch::autograd::Function<PixelLossesFn> {
  static variable_list forward(AutogradContext* ctx, at::Tensor logits, std::optional<at::Tensor> given,
                               bool cont) {
    const auto x = logits.detach().contiguous();
    const int64_t M = x.size(0), K = x.size(1), H = x.size(2), W = x.size(3);
    const auto acc = x.options().dtype(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
    const auto g = given ? given->detach().contiguous() : at::Tensor();
    auto target = g.defined() ? g : at::empty({M, H, W}, x.options().dtype(at::kLong));
    auto lse = at::empty({M, H, W}, acc);
    auto rows = at::empty({M * H, kRowSums}, x.options().dtype(at::kDouble));
    const int64_t* gp = g.defined() ? g.data_ptr<int64_t>() : nullptr;
    if (on_kernels(x)) {
      pixel_losses_cuda(x, gp, target, lse, cont, rows);
    } else {
      pixel_losses_cpu(x, gp, target, lse, cont, rows);
    }
    const auto sums = rows.view({M, H, kRowSums}).sum(1);  // (M, 4), rows added in order
    const auto count = sums.select(1, 1).clamp_min(1.0);
    auto ce = (sums.select(1, 0) / count).to(acc.dtype());
    auto co = cont ? (sums.select(1, 2) / double(K * (H - 1) * W) +
                      sums.select(1, 3) / double(K * H * (W - 1)))
                         .to(acc.dtype())
                   : at::zeros({M}, acc);
    ctx->save_for_backward({x, target, lse, count});
    ctx->saved_data["cont"] = cont;
    ctx->mark_non_differentiable({target});
    return {ce, co, target};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto sv = ctx->get_saved_variables();
    const at::Tensor &x = sv[0], &target = sv[1], &lse = sv[2], &count = sv[3];
    const bool cont = ctx->saved_data["cont"].toBool();
    const int64_t M = x.size(0), K = x.size(1), H = x.size(2), W = x.size(3);
    const auto acc = lse.options();
    const auto zeros = [&] { return at::zeros({M}, count.options()); };
    const auto gce = grads[0].defined() ? grads[0].to(at::kDouble) : zeros();
    const auto gco = grads[1].defined() && cont ? grads[1].to(at::kDouble) : zeros();
    // Per image: ce's scale, and continuity's per vertical and per horizontal difference.
    const auto coef = at::stack({gce / count, gco / double(std::max<int64_t>(1, K * (H - 1) * W)),
                                 gco / double(std::max<int64_t>(1, K * H * (W - 1)))}, 1)
                          .to(acc.dtype())
                          .contiguous();
    auto grad = at::empty_like(x);
    if (on_kernels(x)) {
      pixel_losses_grad_cuda(x, target, lse, coef, cont, grad);
    } else {
      pixel_losses_grad_cpu(x, target, lse, coef, cont, grad);
    }
    return {grad, at::Tensor(), at::Tensor()};
  }
};

}  // namespace
}  // namespace s3ops

using namespace s3ops;

extern "C" {

// Per image of logits (M, K, H, W): cross-entropy against `target` (M, H, W) int64, or against
// the logits' own argmax when `target` is null, and (when `continuity`) the continuity term
// (PixelLossesFn). outs: ce (M), continuity (M; null when not asked), target (M, H, W).
int s3ops_pixel_losses(const at::Tensor* logits, const at::Tensor* target, int continuity,
                       at::Tensor** outs, char** err) {
  S3_PROTECT({
    RECORD_FUNCTION("s3net::pixel_losses", std::vector<c10::IValue>({*logits}));
    outs[0] = outs[1] = outs[2] = nullptr;
    *err = nullptr;
    const char* nm = "pixel_losses: ";
    const at::Tensor& x = *logits;
    TORCH_CHECK(x.dim() == 4, nm, "logits must be 4-D (M, K, H, W), got ", x.sizes());
    const auto kind = x.scalar_type();
    TORCH_CHECK(kind == at::kFloat || kind == at::kDouble || kind == at::kBFloat16, nm,
                "logits must be float32, float64 or bfloat16, got ", kind);
    const int64_t M = x.size(0), K = x.size(1), H = x.size(2), W = x.size(3);
    TORCH_CHECK(K >= 1 && H >= 1 && W >= 1, nm, "logits need a channel and a pixel, got ",
                x.sizes());
    TORCH_CHECK(!continuity || (H >= 2 && W >= 2), nm,
                "the continuity term needs at least 2×2 pixels, got ", x.sizes());
#ifndef S3OPS_CUDA
    TORCH_CHECK(!x.is_cuda(), nm, "this build has no CUDA kernels (nvcc was not found)");
#endif
    TORCH_CHECK(x.is_cuda() || x.device().is_cpu(), nm, "logits on ", x.device(),
                ": only CPU and CUDA are supported");
    std::optional<at::Tensor> given;
    if (target) {
      TORCH_CHECK(target->scalar_type() == at::kLong, nm, "target must be int64, got ",
                  target->scalar_type());
      TORCH_CHECK(target->dim() == 3 && target->size(0) == M && target->size(1) == H &&
                      target->size(2) == W,
                  nm, "target must be (", M, ", ", H, ", ", W, "), got ", target->sizes());
      TORCH_CHECK(target->device() == x.device(), nm, "target is on ", target->device(),
                  " but the logits are on ", x.device());
      given = *target;
    }
    auto r = PixelLossesFn::apply(x, given, continuity != 0);
    outs[0] = new at::Tensor(std::move(r[0]));
    if (continuity) outs[1] = new at::Tensor(std::move(r[1]));
    outs[2] = new at::Tensor(std::move(r[2]));
    return 0;
  })
}

// torch.argmax(input, 1) of a 4-D input: our CPU kernel where it takes the input, else
// libtorch's. Never part of a graph (an argmax has no gradient).
int s3ops_argmax_channels(const at::Tensor* input, at::Tensor** out, char** err) {
  S3_PROTECT({
    RECORD_FUNCTION("s3net::argmax_channels", std::vector<c10::IValue>({*input}));
    *out = nullptr;
    *err = nullptr;
    const at::Tensor& x = *input;
    TORCH_CHECK(x.dim() == 4, "argmax_channels: input must be 4-D (N, K, H, W), got ", x.sizes());
    TORCH_CHECK(x.size(1) > 0, "argmax_channels: input has no channels: ", x.sizes());
    const auto kind = x.scalar_type();
    const bool ours = x.device().is_cpu() && !on_kernels(x) && x.size(1) < (int64_t(1) << 31) &&
                      (kind == at::kFloat || kind == at::kDouble || kind == at::kBFloat16);
    at::NoGradGuard no_grad;
    *out = new at::Tensor(ours ? argmax_channels_cpu(x.contiguous()) : at::argmax(x, 1));
    return 0;
  })
}

}  // extern "C"
