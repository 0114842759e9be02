// ============================================================================================
// Stacked 1×1 convolutions
// ============================================================================================
//
// M independent 1×1 convolutions over (N, M·C, H, W), network j reading channels j·C..(j+1)·C:
// forward y = W_j · x_j (+ b) as one batched GEMM. The point is the weight gradient,
// Σ_pixels go · xᵀ: a GEMM with a tiny (O × C) result and a reduction over N·H·W, which cuBLAS
// ran as one 32×32 tile per network looping over all 65 536 pixels — a third of a batched
// step on an H100 (ncu, docs/gpu-checks/2026-11-26-h100). Splitting the reduction into chunks
// of pixels gives the GPU N·M·chunks independent products in one launch.
// On the CPU (float32, float64) the op serves every 1×1 conv of a fit, a lone network's too:
// the forward and the input gradient are pointwise_cpu's kernel on the NCHW planes as they are
// (oneDNN reordered each map into its blocked layout and back), the weight gradient one GEMM
// per image and network (see PointwiseFn).

#include "common.h"

namespace s3ops {
namespace {

// Length of the chunks the reduction over K pixels is cut into: a divisor of K near 1024, so
// the chunks tile it exactly; K itself (no split) for small planes or when no divisor fits.
int64_t reduction_chunk(int64_t K) {
  if (K <= 8192) return K;
  for (int64_t L = 1024; L >= 256; --L) {
    if (K % L == 0) return L;
  }
  for (int64_t L = 1025; L <= 4096; ++L) {
    if (K % L == 0) return L;
  }
  return K;
}

// How gemm_nt_split_k reads its chunks (process-wide; s3ops_set_split_k):
//  * copied: a and b are copied into chunk-major layout and ONE batched GEMM runs all B·S
//    chunk products: one launch keeps the whole GPU busy;
//  * strided: B batched GEMMs of S chunk products each, reading a and b where they are (a
//    chunk of row-major rows is a strided batch for cuBLAS): no copies, B launches;
//  * kernel: our own kernel (split_k_cuda.cu), every chunk of every image in one launch, the
//    operands read where they are; float32, float64 and bfloat16 operands on the kernels' path
//    (the others take auto's choice);
//  * auto (the default): strided for 16-bit operands, our kernel for the rest (copied where the
//    kernel does not take them or S3NET_SPLIT_K_KERNEL=0, g_switches). Measured on an H200
//    (batched fits of 16 and 32 networks): bfloat16 strided 6 % faster than copied and 10–12 %
//    faster than the kernel; float32 strided 3 % slower than copied (its copies are cheaper
//    than its extra launches relative to the GEMMs' time; 16-bit copies are relatively
//    dearer), the kernel 5–6 % faster than copied (2026-11-28).
enum SplitK : int { kSplitAuto = 0, kSplitCopied = 1, kSplitStrided = 2, kSplitKernel = 3 };
std::atomic<int> g_split_k{kSplitAuto};

}  // namespace

// (B, P, Q) = Σ over K of a (B, P, K) · b (B, Q, K)ᵀ for contiguous a and b, in the sums'
// type: float32 for 16-bit operands (which the caller rounds once, after any sum of its own),
// else theirs. The K axis is cut into S chunks of L (reduction_chunk) whose products are
// summed at the end: a reduction over tens of thousands of pixels with a tiny result would
// otherwise run as one tile per product. Deterministic, no atomics. 16-bit products come out
// of cuBLAS as float32 (its accumulators, unrounded); libtorch's CPU GEMMs cannot do that, so
// there the operands are widened first.
at::Tensor gemm_nt_split_k(const at::Tensor& a, const at::Tensor& b) {
  const int64_t B = a.size(0), P = a.size(1), K = a.size(2), Q = b.size(1);
  const int64_t L = reduction_chunk(K), S = K / L;
  const int mode = g_split_k.load(std::memory_order_relaxed);
  const bool ours = mode == kSplitKernel ||
                    (mode == kSplitAuto && a.element_size() >= 4 && g_switches[kSwitchSplitKKernel].on());
  if (S > 1 && ours && kernels_take(a)) {
    const auto ac = a.contiguous(), bc = b.contiguous();
    KernelGuard guard(a);
    auto parts = at::empty({B, S, P, Q}, a.options().dtype(dw_sum_type(a)));
    const int rc = kernels(a).split_k_products(dw_cuda_dtype(a), ac.data_ptr(), bc.data_ptr(),
                                               parts.data_ptr(), B, P, Q, K, L, kernel_stream(a));
    kernel_check("split_k", rc, "chunk products", a);
    return parts.sum(1);
  }
  const bool half = is_half_width(a), widen_first = half && !a.is_cuda();
  const auto kind = widen_first ? at::kFloat : a.scalar_type();
  // Products of (n, R1, L) · (n, L, R2) into `out` (n, R1, R2), in the sums' type.
  auto product_into = [&](at::Tensor out, const at::Tensor& x, const at::Tensor& y) {
    if (half && !widen_first) {
      at::bmm_out(out, x, y, at::kFloat);
    } else {
      at::bmm_out(out, x, y);
    }
  };
  const auto sum_kind = half ? at::kFloat : kind;
  if (S == 1) {
    auto out = at::empty({B, P, Q}, a.options().dtype(sum_kind));
    product_into(out, a.to(kind), b.to(kind).transpose(1, 2));
    return out;
  }
  at::Tensor parts = at::empty({B, S, P, Q}, a.options().dtype(sum_kind));
  const int layout = mode == kSplitKernel ? kSplitAuto : mode;  // operands the kernel declines
  if (layout == kSplitStrided || (layout == kSplitAuto && half)) {
    for (int64_t i = 0; i < B; ++i) {
      auto ai = a[i].view({P, S, L}).transpose(0, 1).to(kind);  // (S, P, L), strides (L, K, 1)
      auto bi = b[i].view({Q, S, L}).permute({1, 2, 0}).to(kind);  // (S, L, Q), (L, 1, K)
      product_into(parts[i], ai, bi);
    }
  } else {
    // (B·S, R, L) from (B, R, K): chunk s of every row side by side, as `kind`.
    auto chunked = [&](const at::Tensor& t) {
      const int64_t R = t.size(1);
      auto r = at::empty({B, S, R, L}, t.options().dtype(kind));
      r.copy_(t.view({B, R, S, L}).transpose(1, 2));
      return r.view({B * S, R, L});
    };
    product_into(parts.view({B * S, P, Q}), chunked(a), chunked(b).transpose(1, 2));
  }
  return parts.sum(1);
}

namespace {

// The CPU product of PointwiseFn on NCHW planes: y[n, j·O + o, p] = b[j·O + o] + Σ_c w[j, o, c] ·
// x[n, j·C + c, p] for a stack of M networks (b may be null). Why not libtorch's: oneDNN runs
// a 1×1 conv on its blocked layout, so each one reordered its NCHW input in and its output
// back, and the backward the saved input and the gradients again: about 56 ms of a 0.29 s
// fit step (ONEDNN_VERBOSE, README "Speed"), more than the convolutions themselves. MKL's
// GEMM on the planes as they are was slower still: rows 256 KB apart thrash its caches. Here
// each block of kPwBlock pixels of the C input rows is first copied into a small buffer (read
// in order, then reused from the first-level caches by every output), and RO outputs × RP
// vectors of pixels are summed in registers. Each output adds its bias, then the channels in
// order: the same sum whatever the block, thread or vector width.
constexpr int64_t kPwBlock = 128;

// What follows a 1×1 conv's sum (PointwiseFn's epilogue; kThen* above): nothing, `other + y`,
// or z = y kept and `other · y` returned. `other` and `z` lie like y (null when unused).
template <typename T>
struct PwThen {
  BiasThen then;
  const T* other;
  T* z;
  // The same, `at` values further on (a tile's or a block's place in y).
  PwThen at(int64_t at) const {
    return {then, other ? other + at : nullptr, z ? z + at : nullptr};
  }
};

// Writes a 1×1 conv's vector `v` at y[i] through the epilogue: other + v (the add it stands
// for, whose operands come in this order), or z[i] = v and other · v. The vector type is
// Vec<T, VB>::type named as such: passed as a template argument (deduced, explicit, or through
// std::conditional) it loses its typedef's alignment of one element, and the stores became
// aligned ones that fault on a plane's unaligned vectors.
template <typename T, int VB>
S3_INLINE void pw_store(T* __restrict y, int64_t i, const typename Vec<T, VB>::type& value,
                        const PwThen<T>& then) {
  using V = typename Vec<T, VB>::type;
  V v = value;  // by reference: a 32-byte vector by value draws GCC's note on its ABI
  if (then.then == kThenResidual) {
    v = *(const V*)(then.other + i) + v;
  } else if (then.then == kThenGate) {
    *(V*)(then.z + i) = v;
    v = *(const V*)(then.other + i) * v;
  }
  *(V*)(y + i) = v;
}

// The same for a single value.
template <typename T>
S3_INLINE void pw_store_one(T* __restrict y, int64_t i, T v, const PwThen<T>& then) {
  if (then.then == kThenResidual) {
    v = then.other[i] + v;
  } else if (then.then == kThenGate) {
    then.z[i] = v;
    v = then.other[i] * v;
  }
  y[i] = v;
}

template <typename T, int VB, int RO, int RP>
S3_INLINE void pw_tile(const T* __restrict pack, int64_t C, const T* __restrict w,
                       const T* bias, T* __restrict y, int64_t P, const PwThen<T>& then) {
  using V = typename Vec<T, VB>::type;
  constexpr int L = Vec<T, VB>::lanes;
  V acc[RO][RP];
  for (int r = 0; r < RO; ++r)
    for (int q = 0; q < RP; ++q) acc[r][q] = V{} + (bias ? bias[r] : T(0));
  for (int64_t c = 0; c < C; ++c) {
    V xv[RP];
    for (int q = 0; q < RP; ++q) xv[q] = *(const V*)(pack + c * kPwBlock + q * L);
    for (int r = 0; r < RO; ++r) {
      const T wv = w[r * C + c];
      for (int q = 0; q < RP; ++q) acc[r][q] += wv * xv[q];
    }
  }
  for (int r = 0; r < RO; ++r)
    for (int q = 0; q < RP; ++q) pw_store<T, VB>(y, r * P + q * L, acc[r][q], then);
}

// One block of `len` (≤ kPwBlock) pixels from p0 of one image and network: x (C, P), w (O, C),
// bias (O) or null, y (O, P) and the epilogue's planes laid out like it; `pack` holds
// C·kPwBlock values.
template <typename T, int VB, int RO, int RP>
S3_INLINE void pw_block(const T* x, int64_t P, int64_t C, const T* w, const T* bias, int64_t O,
                        T* y, int64_t p0, int64_t len, T* pack, const PwThen<T>& then) {
  constexpr int64_t step = RP * Vec<T, VB>::lanes;
  for (int64_t c = 0; c < C; ++c) std::memcpy(pack + c * kPwBlock, x + c * P + p0, len * sizeof(T));
  // The next block's C row pieces, one per plane, P values apart: more streams than the
  // hardware prefetchers follow, so the copy above waits on its cache misses (this copy and the
  // depthwise kernels' plane copies took 8–9 % of a CPU fit step's samples in `memcpy`). Asked
  // for now, they arrive while this block computes (a step 1.5 % faster in five alternating
  // pairs of 12-step runs: within this VM's noise, kept because it costs nothing).
  if (p0 + len < P) {
    const int64_t next = std::min(kPwBlock, P - p0 - len) * (int64_t)sizeof(T);
    for (int64_t c = 0; c < C; ++c) {
      const char* row = (const char*)(x + c * P + p0 + len);
      for (int64_t b = 0; b < next; b += 64) __builtin_prefetch(row + b);
    }
  }
  const int64_t full = len / step * step;
  int64_t o = 0;
  for (; o + RO <= O; o += RO) {
    for (int64_t p = 0; p < full; p += step)
      pw_tile<T, VB, RO, RP>(pack + p, C, w + o * C, bias ? bias + o : nullptr, y + o * P + p0 + p,
                             P, then.at(o * P + p0 + p));
  }
  for (; o < O; ++o) {
    for (int64_t p = 0; p < full; p += step)
      pw_tile<T, VB, 1, RP>(pack + p, C, w + o * C, bias ? bias + o : nullptr, y + o * P + p0 + p,
                            P, then.at(o * P + p0 + p));
  }
  for (o = 0; o < O; ++o) {
    for (int64_t p = full; p < len; ++p) {
      T sum = bias ? bias[o] : T(0);
      for (int64_t c = 0; c < C; ++c) sum += w[o * C + c] * pack[c * kPwBlock + p];
      pw_store_one(y, o * P + p0 + p, sum, then);
    }
  }
}

#define S3_PW_ARGS                                                                            \
  const T *x, int64_t P, int64_t C, const T *w, const T *bias, int64_t O, T *y, int64_t p0,     \
      int64_t len, T *pack, const PwThen<T> &then
#define S3_PW_PASS x, P, C, w, bias, O, y, p0, len, pack, then
template <typename T>
void pw_block_base(S3_PW_ARGS) { pw_block<T, 16, 4, 2>(S3_PW_PASS); }
template <typename T>
S3_AVX2 void pw_block_avx2(S3_PW_ARGS) { pw_block<T, 32, 8, 1>(S3_PW_PASS); }
template <typename T>
S3_AVX512 void pw_block_avx512(S3_PW_ARGS) { pw_block<T, 32, 8, 2>(S3_PW_PASS); }

// x (N, M, C, P) contiguous, w (M, O, C) contiguous, bias (M·O) or undefined → (N, M, O, P);
// then `then` with `other` (N, M, O, P, contiguous; undefined for nothing): for a gate, the
// value before it goes to `*z` (made here) and other · value is returned.
at::Tensor pointwise_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias,
                         BiasThen then = kThenNothing, const at::Tensor& other = at::Tensor(),
                         at::Tensor* z = nullptr) {
  const int64_t N = x.size(0), M = x.size(1), C = x.size(2), P = x.size(3), O = w.size(1);
  auto y = at::empty({N, M, O, P}, x.options());
  if (then == kThenGate) *z = at::empty_like(y);
  if (y.numel() == 0) return y;
  if (C == 0) {
    // No sum: the bias alone (or zeros), then the epilogue as libtorch's op.
    auto v = bias.defined() ? y.copy_(bias.view({1, M, O, 1}).expand_as(y)) : y.zero_();
    if (then == kThenResidual) return other + v;
    if (then == kThenGate) return other * z->copy_(v);
    return v;
  }
  const int64_t blocks = (P + kPwBlock - 1) / kPwBlock;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "s3net_pointwise", [&] {
    using T = scalar_t;
    const T* xp = x.data_ptr<T>();
    const T* wp = w.data_ptr<T>();
    const T* bp = bias.defined() ? bias.data_ptr<T>() : nullptr;
    T* yp = y.data_ptr<T>();
    const PwThen<T> all{then, then != kThenNothing ? other.data_ptr<T>() : nullptr,
                        then == kThenGate ? z->data_ptr<T>() : nullptr};
    auto fn = cpu_has_avx512() ? &pw_block_avx512<T>
              : cpu_has_avx2() ? &pw_block_avx2<T>
                               : &pw_block_base<T>;
    at::parallel_for(0, N * M * blocks, 16, [&](int64_t i0, int64_t i1) {
      std::vector<T> pack(C * kPwBlock);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t nm = i / blocks, j = nm % M, p0 = (i % blocks) * kPwBlock;
        fn(xp + nm * C * P, P, C, wp + j * O * C, bp ? bp + j * O : nullptr, O, yp + nm * O * P,
           p0, std::min(kPwBlock, P - p0), pack.data(), all.at(nm * O * P));
      }
    });
  });
  return y;
}

// The weight gradient of the CPU 1×1 conv: gw[o][c] = Σ_p gy[o][p] · x[c][p], both operands
// NCHW planes. MKL's GEMM took 1.45–1.7 ms for 32 × 32 channels over 256² pixels and 4.3 ms
// for 32 × 96 (two threads); these loops about 1.0 and 3.4. Why: the pixel axis is the sum's
// axis and the planes' contiguous one, so RO outputs × RC inputs each keep a vector of
// per-lane partial sums in registers over a whole stretch of pixels, loading each plane's
// vector once per tile and reducing across lanes only at the end of the stretch.
constexpr int64_t kWgStretch = 2048;

template <typename T, int VB, int RO, int RC>
S3_INLINE void wg_tile(const T* __restrict gy, const T* __restrict x, int64_t P, int64_t p0,
                       int64_t p1, T* __restrict gw, int64_t C) {
  using V = typename Vec<T, VB>::type;
  constexpr int L = Vec<T, VB>::lanes;
  V acc[RO][RC];
  for (int r = 0; r < RO; ++r)
    for (int q = 0; q < RC; ++q) acc[r][q] = V{};
  int64_t p = p0;
  for (; p + L <= p1; p += L) {
    V xv[RC];
    for (int q = 0; q < RC; ++q) xv[q] = *(const V*)(x + q * P + p);
    for (int r = 0; r < RO; ++r) {
      const V g = *(const V*)(gy + r * P + p);
      for (int q = 0; q < RC; ++q) acc[r][q] += g * xv[q];
    }
  }
  for (int r = 0; r < RO; ++r) {
    for (int q = 0; q < RC; ++q) {
      T sum = 0;
      for (int l = 0; l < L; ++l) sum += acc[r][q][l];
      for (int64_t t = p; t < p1; ++t) sum += gy[r * P + t] * x[q * P + t];
      gw[r * C + q] += sum;
    }
  }
}

// gw (O, C) += the products over pixels [p0, p1), stretch by stretch (a stretch of the O + C
// planes stays in the second-level cache while every tile reads it).
template <typename T, int VB, int RO, int RC>
S3_INLINE void wg_range(const T* gy, const T* x, int64_t O, int64_t C, int64_t P, int64_t p0,
                        int64_t p1, T* gw) {
  for (int64_t s = p0; s < p1; s += kWgStretch) {
    const int64_t e = std::min(s + kWgStretch, p1);
    int64_t o = 0;
    for (; o + RO <= O; o += RO) {
      int64_t c = 0;
      for (; c + RC <= C; c += RC) wg_tile<T, VB, RO, RC>(gy + o * P, x + c * P, P, s, e, gw + o * C + c, C);
      for (; c < C; ++c) wg_tile<T, VB, RO, 1>(gy + o * P, x + c * P, P, s, e, gw + o * C + c, C);
    }
    for (; o < O; ++o) {
      int64_t c = 0;
      for (; c + RC <= C; c += RC) wg_tile<T, VB, 1, RC>(gy + o * P, x + c * P, P, s, e, gw + o * C + c, C);
      for (; c < C; ++c) wg_tile<T, VB, 1, 1>(gy + o * P, x + c * P, P, s, e, gw + o * C + c, C);
    }
  }
}

#define S3_WG_ARGS \
  const T *gy, const T *x, int64_t O, int64_t C, int64_t P, int64_t p0, int64_t p1, T *gw
// Tiles sized to the registers: 16 vector accumulators of 32 with AVX-512, 8 of 16 below.
template <typename T>
void wg_range_base(S3_WG_ARGS) { wg_range<T, 16, 2, 4>(gy, x, O, C, P, p0, p1, gw); }
template <typename T>
S3_AVX2 void wg_range_avx2(S3_WG_ARGS) { wg_range<T, 32, 2, 4>(gy, x, O, C, P, p0, p1, gw); }
template <typename T>
S3_AVX512 void wg_range_avx512(S3_WG_ARGS) { wg_range<T, 64, 4, 4>(gy, x, O, C, P, p0, p1, gw); }

// go (N, M, O, P), x (N, M, C, P), both contiguous → gw (M, O, C). Each (image, network) pair's
// pixels are split into one range per thread; the ranges' sums are added in order, then the
// images' in order. The split depends on P and the thread count only, so a network's gradient
// has the same bits alone and in a stack (as the fit's batching tests require).
at::Tensor pointwise_wgrad_cpu(const at::Tensor& go, const at::Tensor& x) {
  const int64_t N = go.size(0), M = go.size(1), O = go.size(2), P = go.size(3), C = x.size(2);
  auto gw = at::zeros({M, O, C}, go.options());
  if (N == 0 || P == 0 || O == 0 || C == 0) return gw;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), P / 1024));
  auto partial = at::empty({parts, O, C}, go.options());
  AT_DISPATCH_FLOATING_TYPES(go.scalar_type(), "s3net_pointwise_wgrad", [&] {
    using T = scalar_t;
    auto fn = cpu_has_avx512() ? &wg_range_avx512<T>
              : cpu_has_avx2() ? &wg_range_avx2<T>
                               : &wg_range_base<T>;
    const T* gp = go.data_ptr<T>();
    const T* xp = x.data_ptr<T>();
    T* pp = partial.data_ptr<T>();
    T* gwp = gw.data_ptr<T>();
    for (int64_t j = 0; j < M; ++j) {
      for (int64_t n = 0; n < N; ++n) {
        const T* g = gp + (n * M + j) * O * P;
        const T* xx = xp + (n * M + j) * C * P;
        at::parallel_for(0, parts, 1, [&](int64_t a, int64_t b) {
          for (int64_t k = a; k < b; ++k) {
            T* acc = pp + k * O * C;
            std::fill(acc, acc + O * C, T(0));
            fn(g, xx, O, C, P, P * k / parts, P * (k + 1) / parts, acc);
          }
        });
        T* dst = gwp + j * O * C;
        for (int64_t k = 0; k < parts; ++k)
          for (int64_t i = 0; i < O * C; ++i) dst[i] += pp[k * O * C + i];
      }
    }
  });
  return gw;
}

// The epilogue of a 1×1 conv on the kernels' path, after at::matmul's y (N, M, O, HW): the
// bias and `then` in one pass of the bias kernel; without a bias or off the kernels, the
// libtorch ops the epilogue stands for. Returns the output; for a gate, y becomes z.
at::Tensor pointwise_then(at::Tensor& y, const std::optional<at::Tensor>& bias, int64_t HW,
                          BiasThen then, const at::Tensor& other) {
  if (bias && bias_cuda_ok(y) && bias->scalar_type() == y.scalar_type() &&
      (then == kThenNothing || bias_cuda_ok(other))) {
    at::Tensor out = then == kThenGate ? at::empty_like(y) : at::Tensor();
    bias_add_cuda(y, *bias, HW, then, other, then == kThenGate ? &out : nullptr);
    return then == kThenGate ? out : y;
  }
  if (bias) add_bias(y, *bias, HW);
  if (then == kThenResidual) return other + y;
  if (then == kThenGate) return other * y;
  return y;
}

struct PointwiseFn : public torch::autograd::Function<PointwiseFn> {
  // `other` and `then`: what follows the conv (BiasThen; s3ops_pointwise_conv2d): the output is
  // conv + other (a residual) or other · conv (a gate), with the bits of the conv followed by
  // libtorch's add or multiply, and their gradients.
  static at::Tensor forward(AutogradContext* ctx, at::Tensor input, at::Tensor weight,
                            std::optional<at::Tensor> bias, int64_t models,
                            std::optional<at::Tensor> other, int64_t then_code) {
    const int64_t N = input.size(0), M = models, C = input.size(1) / M;
    const int64_t H = input.size(2), W = input.size(3), O = weight.size(0) / M;
    const auto then = static_cast<BiasThen>(then_code);
    auto x = input.contiguous().view({N, M, C, H * W});
    auto w = weight.contiguous().view({M, O, C});
    const at::Tensor o = then == kThenNothing ? at::Tensor() : other->contiguous().view({N, M, O, H * W});
    at::Tensor y, z;  // (N, M, O, HW); z: a gate's input
    if (cpu_kernels_take(x)) {
      y = pointwise_cpu(x, w, bias ? bias->contiguous() : at::Tensor(), then, o, &z);
    } else {
      z = at::matmul(w, x);
      y = pointwise_then(z, bias, H * W, then, o);
    }
    const bool gate = then == kThenGate;
    ctx->save_for_backward({weight.requires_grad() ? x : at::Tensor(),
                            input.requires_grad() ? w : at::Tensor(),
                            gate && other->requires_grad() ? z : at::Tensor(),
                            gate ? o : at::Tensor()});
    ctx->saved_data["shape"] = std::vector<int64_t>{N, M, C, O, H, W};
    ctx->saved_data["need_b"] = bias && bias->requires_grad();
    ctx->saved_data["then"] = then_code;
    ctx->saved_data["need_other"] = then != kThenNothing && other->requires_grad();
    return y.view({N, M * O, H, W});
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto sv = ctx->get_saved_variables();
    auto d = ctx->saved_data["shape"].toIntVector();
    const int64_t N = d[0], M = d[1], C = d[2], O = d[3], H = d[4], W = d[5], HW = H * W;
    const auto then = static_cast<BiasThen>(ctx->saved_data["then"].toInt());
    const bool need_other = ctx->saved_data["need_other"].toBool();
    auto go = grads[0].contiguous().view({N, M, O, HW});
    at::Tensor g_other;
    if (then == kThenResidual && need_other) {
      g_other = grads[0];
    } else if (then == kThenGate) {
      // y = u · z: the conv's gradient g · u, the gate's g · z (as libtorch's multiply).
      const at::Tensor& u = sv[3];
      const at::Tensor& z = sv[2];
      if (need_other && bias_cuda_ok(go) && bias_cuda_ok(u) && bias_cuda_ok(z)) {
        auto [gz, gu] = gate_grad_cuda(go, u, z);
        go = gz;
        g_other = gu.view({N, M * O, H, W});
      } else {
        if (need_other) g_other = (go * z).view({N, M * O, H, W});
        go = go * u;
      }
    }
    at::Tensor gi, gw, gb;
    if (sv[1].defined()) {
      const auto wt = sv[1].transpose(1, 2);  // (M, C, O)
      gi = (cpu_kernels_take(go) ? pointwise_cpu(go, wt.contiguous(), at::Tensor())
                                        : at::matmul(wt, go))
               .view({N, M * C, H, W});
    }
    if (sv[0].defined() && cpu_kernels_take(go)) {
      // Per (image, network): go (O, HW) · x (C, HW)ᵀ on the planes as they are (the split
      // reductions below serve a GPU), added over the images in order; a network's result
      // does not depend on the stack it trains in (see pointwise_wgrad_cpu).
      gw = pointwise_wgrad_cpu(go, sv[0]).view({M * O, C, 1, 1});
    } else if (sv[0].defined()) {
      // Per (image, network): go (O, HW) · x (C, HW)ᵀ, then summed over the images.
      // In the sums' type (float32 for 16-bit) until here: rounded once.
      auto g = gemm_nt_split_k(go.view({N * M, O, HW}), sv[0].view({N * M, C, HW}));
      gw = g.view({N, M * O, C}).sum(0).to(go.scalar_type()).view({M * O, C, 1, 1});
    }
    if (ctx->saved_data["need_b"].toBool()) gb = bias_grad(go, HW, M * O, go.scalar_type());
    return {gi, gw, gb, at::Tensor(), g_other, at::Tensor()};
  }
};

void pointwise_check(const at::Tensor& x, const at::Tensor& w,
                     const std::optional<at::Tensor>& b, int64_t models) {
  const char* nm = "pointwise_conv2d: ";
  TORCH_CHECK(models >= 1, nm, "need at least one network, got ", models);
  TORCH_CHECK(x.dim() == 4 && x.size(1) % models == 0, nm,
              "input must be (N, M·C, H, W) with M = ", models, ", got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble || is_half_width(x),
              nm, "input must be float32, float64, bfloat16 or float16, got ", x.scalar_type());
  const int64_t C = x.size(1) / models;
  TORCH_CHECK(w.dim() == 4 && w.size(0) % models == 0 && w.size(1) == C && w.size(2) == 1 &&
                  w.size(3) == 1,
              nm, "weight must be (M·O, ", C, ", 1, 1) with M = ", models, ", got ", w.sizes());
  TORCH_CHECK(w.scalar_type() == x.scalar_type() && w.device() == x.device(), nm,
              "weight dtype/device must match the input");
  if (b) {
    TORCH_CHECK(b->dim() == 1 && b->size(0) == w.size(0), nm, "bias must be [", w.size(0),
                "], got ", b->sizes());
    TORCH_CHECK(b->scalar_type() == x.scalar_type() && b->device() == x.device(), nm,
                "bias dtype/device must match the input");
  }
}

}  // namespace
}  // namespace s3ops

using namespace s3ops;

extern "C" {

// `then`: 0 the conv alone, 1 other + conv, 2 other · conv (BiasThen); `other` (the output's
// shape, dtype and device) for 1 and 2, else null.
int s3ops_pointwise_conv2d(const at::Tensor* input, const at::Tensor* weight,
                           const at::Tensor* bias, int64_t models, const at::Tensor* other,
                           int then, at::Tensor** out, char** err) {
  S3_PROTECT({
    RECORD_FUNCTION("s3net::pointwise_conv2d", std::vector<c10::IValue>({*input, *weight}));
    *out = nullptr;
    *err = nullptr;
    std::optional<at::Tensor> b, o;
    if (bias) b = *bias;
    if (other) o = *other;
    pointwise_check(*input, *weight, b, models);
    const char* nm = "pointwise_conv2d: ";
    TORCH_CHECK(then >= kThenNothing && then <= kThenGate, nm, "unknown epilogue ", then);
    TORCH_CHECK((then == kThenNothing) == !o, nm,
                then == kThenNothing ? "a tensor to add or multiply by needs an epilogue"
                                     : "the epilogue needs its tensor");
    if (o) {
      const std::vector<int64_t> shape{input->size(0), weight->size(0), input->size(2),
                                       input->size(3)};
      TORCH_CHECK(o->sizes() == at::IntArrayRef(shape), nm, "the ",
                  then == kThenResidual ? "residual" : "gate", " must be shaped like the output ",
                  at::IntArrayRef(shape), ", got ", o->sizes());
      TORCH_CHECK(o->scalar_type() == input->scalar_type() && o->device() == input->device(), nm,
                  "the ", then == kThenResidual ? "residual" : "gate",
                  "'s dtype/device must match the input");
    }
    at::Tensor r = PointwiseFn::apply(*input, *weight, b, models, o, then);
    *out = new at::Tensor(std::move(r));
    return 0;
  })
}

// Which layout gemm_nt_split_k uses from now on, process-wide (see g_split_k): 0 auto,
// 1 copied, 2 strided, 3 our kernel; anything else is auto.
void s3ops_set_split_k(int mode) {
  g_split_k.store(mode == kSplitCopied || mode == kSplitStrided || mode == kSplitKernel ? mode
                                                                                        : kSplitAuto);
}

}  // extern "C"
