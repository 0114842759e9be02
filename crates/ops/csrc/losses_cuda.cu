// CUDA kernels of pixel_losses (losses.cpp): per image of a map of logits (M, K, H, W), the
// cross-entropy against a target or against the map's own argmax, and the continuity term
// (mean L1 of vertical and horizontal neighbour differences); and the gradient of both at
// once. See losses.cpp for the definitions and why one op.
//
// A block owns a row (image m, row y): each thread a pixel of it, looping over the K channels
// (each channel's read is a warp's consecutive pixels). Forward: the maximum and argmax over
// the channels, then Σ exp(x − max) (a second pass over the same values, which the row keeps
// in cache: the same arithmetic as the CPU kernel, in the same order), the pixel's
// cross-entropy and, asked for, its differences with the pixel below and to the right; the
// block's four sums (Σ ce, #valid, Σ|dy|, Σ|dx|) go to the row's slot in `rows` (float64), which
// the caller adds up per image in order: deterministic, no atomics. Backward: every channel's
// gradient of a pixel from its log-sum-exp and the signs of its four differences.
// Storage float32, float64 or bfloat16 (added in float32).

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_common.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kSums = 4;

template <typename A>
__device__ __forceinline__ A abs_of(A v) {
  return v < A(0) ? -v : v;
}
// sign(v), 0 for 0 and NaN (as the CPU kernel).
template <typename A>
__device__ __forceinline__ A sign_of(A v) {
  return A(v > A(0)) - A(v < A(0));
}
__device__ __forceinline__ float exp_of(float v) { return expf(v); }
__device__ __forceinline__ double exp_of(double v) { return exp(v); }
__device__ __forceinline__ float log_of(float v) { return logf(v); }
__device__ __forceinline__ double log_of(double v) { return log(v); }

template <typename S>
__global__ void __launch_bounds__(kThreads)
    losses_forward(const S* __restrict__ x, const int64_t* __restrict__ given,
                   int64_t* __restrict__ target, typename Acc<S>::type* __restrict__ lse, bool cont,
                   double* __restrict__ rows, int64_t M, int64_t K, int64_t H, int64_t W) {
  using A = typename Acc<S>::type;
  __shared__ A red[kSums][kThreads / 32];
  const int64_t P = H * W;
  for (int64_t r = blockIdx.x; r < M * H; r += gridDim.x) {
    const int64_t m = r / H, y = r % H;
    const S* xm = x + m * K * P;
    A sum[kSums] = {A(0), A(0), A(0), A(0)};
    for (int64_t i = threadIdx.x; i < W; i += kThreads) {
      const int64_t o = y * W + i;
      A mx = widen(xm[o]);
      int64_t arg = 0;
      for (int64_t k = 1; k < K; ++k) {
        const A v = widen(xm[k * P + o]);
        // torch.argmax: the first maximum, a NaN beating any number.
        if (v > mx || (v != v && mx == mx)) {
          mx = v;
          arg = k;
        }
      }
      A s = A(0);
      for (int64_t k = 0; k < K; ++k) s += exp_of(widen(xm[k * P + o]) - mx);
      const A logs = log_of(s);
      lse[m * P + o] = mx + logs;
      int64_t t = arg;
      if (given) {
        t = given[m * P + o];
      } else {
        target[m * P + o] = arg;
      }
      if (t >= 0 && t < K) {
        sum[0] += (mx - widen(xm[t * P + o])) + logs;
        sum[1] += A(1);
      }
      if (cont) {
        for (int64_t k = 0; k < K; ++k) {
          const S* p = xm + k * P + o;
          const A v = widen(p[0]);
          if (y + 1 < H) sum[2] += abs_of(widen(p[W]) - v);
          if (i + 1 < W) sum[3] += abs_of(widen(p[1]) - v);
        }
      }
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
    for (int j = 0; j < kSums; ++j) {
      const A v = warp_sum(sum[j]);
      if (lane == 0) red[j][warp] = v;
    }
    __syncthreads();
    if (threadIdx.x < kSums) {
      double t = 0;
      for (int w = 0; w < kThreads / 32; ++w) t += (double)red[threadIdx.x][w];
      rows[r * kSums + threadIdx.x] = t;
    }
    __syncthreads();
  }
}

// coef (M, 3): ce's scale, continuity's per vertical and per horizontal difference.
template <typename S>
__global__ void __launch_bounds__(kThreads)
    losses_backward(const S* __restrict__ x, const int64_t* __restrict__ target,
                    const typename Acc<S>::type* __restrict__ lse,
                    const typename Acc<S>::type* __restrict__ coef, bool cont, S* __restrict__ grad,
                    int64_t M, int64_t K, int64_t H, int64_t W) {
  using A = typename Acc<S>::type;
  const int64_t P = H * W;
  for (int64_t r = blockIdx.x; r < M * H; r += gridDim.x) {
    const int64_t m = r / H, y = r % H;
    const S* xm = x + m * K * P;
    S* gm = grad + m * K * P;
    const A a = coef[m * 3], by = coef[m * 3 + 1], bx = coef[m * 3 + 2];
    for (int64_t i = threadIdx.x; i < W; i += kThreads) {
      const int64_t o = y * W + i;
      const int64_t t = target[m * P + o];
      const bool valid = t >= 0 && t < K;
      const A l = lse[m * P + o];
      for (int64_t k = 0; k < K; ++k) {
        const S* p = xm + k * P + o;
        const A v = widen(p[0]);
        A d = valid ? a * (exp_of(v - l) - (t == k ? A(1) : A(0))) : A(0);
        if (cont) {
          if (y > 0) d += by * sign_of(v - widen(p[-W]));
          if (y + 1 < H) d -= by * sign_of(widen(p[W]) - v);
          if (i > 0) d += bx * sign_of(v - widen(p[-1]));
          if (i + 1 < W) d -= bx * sign_of(widen(p[1]) - v);
        }
        gm[k * P + o] = store_as<S>(d);
      }
    }
  }
}

unsigned row_blocks(int64_t rows) {
  return (unsigned)(rows < (int64_t(1) << 30) ? (rows > 0 ? rows : 1) : (int64_t(1) << 30));
}

template <typename S>
int forward(const void* x, const int64_t* given, int64_t* target, void* lse, bool cont,
            double* rows, int64_t M, int64_t K, int64_t H, int64_t W, cudaStream_t st) {
  using A = typename Acc<S>::type;
  S3_LAUNCH(row_blocks(M * H), kThreads, 0, st, losses_forward<S>)((const S*)x, given, target, (A*)lse,
                                                           cont, rows, M, K, H, W);
  return (int)cudaGetLastError();
}

template <typename S>
int backward(const void* x, const int64_t* target, const void* lse, const void* coef, bool cont,
             void* grad, int64_t M, int64_t K, int64_t H, int64_t W, cudaStream_t st) {
  using A = typename Acc<S>::type;
  S3_LAUNCH(row_blocks(M * H), kThreads, 0, st, losses_backward<S>)(
      (const S*)x, target, (const A*)lse, (const A*)coef, cont, (S*)grad, M, K, H, W);
  return (int)cudaGetLastError();
}

}  // namespace

extern "C" {

// dtype: 0 = float32, 1 = float64, 2 = bfloat16 logits (M, K, H, W), contiguous; lse (M, H, W)
// in the adding type (float32; float64 for float64); target (M, H, W) int64, written unless
// `given` is set; rows (M·H, 4) float64, written. Returns a cudaError_t (0 = success).
int S3_ENTRY(pixel_losses)(int dtype, const void* x, const int64_t* given, int64_t* target,
                            void* lse, int cont, double* rows, int64_t M, int64_t K, int64_t H,
                            int64_t W, void* stream) {
  if (M * H * W == 0) return 0;
  const cudaStream_t st = (cudaStream_t)stream;
  if (dtype == 0) return forward<float>(x, given, target, lse, cont != 0, rows, M, K, H, W, st);
  if (dtype == 1) return forward<double>(x, given, target, lse, cont != 0, rows, M, K, H, W, st);
  if (dtype == 2) return forward<Bf16>(x, given, target, lse, cont != 0, rows, M, K, H, W, st);
  return (int)cudaErrorInvalidValue;
}

// grad (like x) from x, the target, the forward's lse and coef (M, 3) in the adding type.
int S3_ENTRY(pixel_losses_grad)(int dtype, const void* x, const int64_t* target, const void* lse,
                                 const void* coef, int cont, void* grad, int64_t M, int64_t K,
                                 int64_t H, int64_t W, void* stream) {
  if (M * H * W == 0) return 0;
  const cudaStream_t st = (cudaStream_t)stream;
  if (dtype == 0) return backward<float>(x, target, lse, coef, cont != 0, grad, M, K, H, W, st);
  if (dtype == 1) return backward<double>(x, target, lse, coef, cont != 0, grad, M, K, H, W, st);
  if (dtype == 2) return backward<Bf16>(x, target, lse, coef, cont != 0, grad, M, K, H, W, st);
  return (int)cudaErrorInvalidValue;
}

}  // extern "C"
