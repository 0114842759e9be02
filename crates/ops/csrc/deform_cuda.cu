// CUDA kernels of the deformable convolution (DCNv2, torchvision.ops.deform_conv2d semantics).
//
// Only the two gather/scatter steps live here; the GEMMs around them are libtorch's (cuBLAS),
// called from deform.cpp, which also owns autograd, argument checks and the current stream:
//  * im2col: cols[n][kk*C + c][p] = mask · bilinear(x[n][c], p + tap kk + offset)   (forward,
//    and again in backward for the weight gradient);
//  * col2im: from gcols = W2ᵀ·grad_out, the input gradient (atomicAdd into the four bilinear
//    corners) and the offset / mask gradients (dot products over c, no atomics: one thread owns
//    one (n, tap, pixel)).
// The column row order kk*C + c matches the weight permuted to (O, kh, kw, C), as on the CPU.
// Both wait on their gathers from L2 first (ncu on an H200, 2026-11-30, bfloat16, 16 networks:
// long-scoreboard stalls; col2im 30 % of our kernels' time at 50 % occupancy, im2col 12 %).
// Two variants timed there lost and are gone: the input gradient summed per 32×4 tile of
// outputs in shared memory (0.86–0.90 of the fits per second), and four channels' corner loads
// issued before any use (0.98: col2im then took 113 registers and ran at half the occupancy).
//
// This file includes no torch header, so nvcc only needs the CUDA toolkit.
//
// Number formats: S stores the features, the columns and their gradient; P the offsets, the
// mask, the sampling arithmetic and the offset, mask and input gradients (the input gradient is
// summed with atomics, so it is kept in P and rounded by the caller). float32 and float64 are
// both at once; bfloat16 features run with float32 positions: a bfloat16 sampling position
// near the image's side would be off by a pixel or more, a bfloat16 feature value is not.

#include <cuda_runtime.h>

#include <cstdint>

#include "kernel_dims.h"
#include "cuda_common.cuh"

namespace {

// The four bilinear corners of the sample at (y, x) in an H×W plane: plane offsets (0 for a
// corner outside, with weight 0), weights, and d(weight)/dy, d(weight)/dx. Samples with
// y <= -1, y >= H, x <= -1 or x >= W read nothing (torchvision's rule).
template <typename T>
struct Corners {
  int64_t idx[4];
  T w[4], cy[4], cx[4];
};

template <typename T>
__device__ __forceinline__ Corners<T> corners(T y, T x, int64_t H, int64_t W) {
  Corners<T> r;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    r.idx[q] = 0;
    r.w[q] = r.cy[q] = r.cx[q] = T(0);
  }
  // Written so that a NaN position reads nothing too (its corners would be garbage indices).
  if (!(y > T(-1) && y < T(H) && x > T(-1) && x < T(W))) return r;
  const T yf = floor(y), xf = floor(x);
  const int64_t yl = (int64_t)yf, xl = (int64_t)xf;
  const T ly = y - yf, lx = x - xf, hy = T(1) - ly, hx = T(1) - lx;
  const bool vy0 = yl >= 0, vy1 = yl + 1 <= H - 1, vx0 = xl >= 0, vx1 = xl + 1 <= W - 1;
  if (vy0 && vx0) { r.idx[0] = yl * W + xl;           r.w[0] = hy * hx; r.cy[0] = -hx; r.cx[0] = -hy; }
  if (vy0 && vx1) { r.idx[1] = yl * W + xl + 1;       r.w[1] = hy * lx; r.cy[1] = -lx; r.cx[1] = hy; }
  if (vy1 && vx0) { r.idx[2] = (yl + 1) * W + xl;     r.w[2] = ly * hx; r.cy[2] = hx;  r.cx[2] = -ly; }
  if (vy1 && vx1) { r.idx[3] = (yl + 1) * W + xl + 1; r.w[3] = ly * lx; r.cy[3] = lx;  r.cx[3] = ly; }
  return r;
}

// Thread i ↦ (n, kk, p): consecutive threads take consecutive output pixels, so the column
// writes and offset reads are coalesced.
struct Site {
  int64_t n, kk, p;
};

__device__ __forceinline__ Site site(const S3DeformDims& d, int64_t i) {
  const int64_t HWo = d.Ho * d.Wo;
  return {i / (HWo * d.K), (i / HWo) % d.K, i % HWo};
}

template <typename T>
__device__ __forceinline__ void sample_point(const S3DeformDims& d, const T* off, Site s, T& y,
                                             T& x) {
  const int64_t HWo = d.Ho * d.Wo;
  const int64_t ho = s.p / d.Wo, wo = s.p % d.Wo, ki = s.kk / d.kw, kj = s.kk % d.kw;
  const T* o = off + (s.n * 2 * d.K + 2 * s.kk) * HWo + s.p;
  y = T(ho * d.sh - d.ph + ki * d.dh) + o[0];
  x = T(wo * d.sw - d.pw + kj * d.dw) + o[HWo];
}

// Σ_c gcol · x at each corner, over one more channel (`plane`: that channel's input plane): what
// the offset and mask gradients of a sample are made of.
template <typename S, typename P>
__device__ __forceinline__ void add_corner_products(P (&s)[4], P gc, const S* plane,
                                                    const Corners<P>& cr) {
#pragma unroll
  for (int q = 0; q < 4; ++q) s[q] += gc * widen(plane[cr.idx[q]]);
}

// A sample's mask gradient and offset gradients (dy, dx) from its corner products.
template <typename P>
struct SampleGrads {
  P mask, dy, dx;
};
template <typename P>
__device__ __forceinline__ SampleGrads<P> sample_grads(const Corners<P>& cr, const P (&s)[4], P m) {
  return {cr.w[0] * s[0] + cr.w[1] * s[1] + cr.w[2] * s[2] + cr.w[3] * s[3],
          m * (cr.cy[0] * s[0] + cr.cy[1] * s[1] + cr.cy[2] * s[2] + cr.cy[3] * s[3]),
          m * (cr.cx[0] * s[0] + cr.cx[1] * s[1] + cr.cx[2] * s[2] + cr.cx[3] * s[3])};
}

template <typename S, typename P>
__global__ void im2col_kernel(S3DeformDims d, const S* __restrict__ x, const P* __restrict__ off,
                              const P* __restrict__ mask, S* __restrict__ cols) {
  const int64_t HWo = d.Ho * d.Wo, HW = d.H * d.W, total = d.N * d.K * HWo;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)blockDim.x * gridDim.x) {
    const Site s = site(d, i);
    P y, xx;
    sample_point(d, off, s, y, xx);
    const Corners<P> cr = corners(y, xx, d.H, d.W);
    const P m = mask ? mask[(s.n * d.K + s.kk) * HWo + s.p] : P(1);
    const P w0 = m * cr.w[0], w1 = m * cr.w[1], w2 = m * cr.w[2], w3 = m * cr.w[3];
    const S* xn = x + s.n * d.C * HW;
    S* col = cols + (s.n * d.K + s.kk) * d.C * HWo + s.p;
    for (int64_t c = 0; c < d.C; ++c) {
      const S* plane = xn + c * HW;
      col[c * HWo] = store_as<S>(w0 * widen(plane[cr.idx[0]]) + w1 * widen(plane[cr.idx[1]]) +
                                 w2 * widen(plane[cr.idx[2]]) + w3 * widen(plane[cr.idx[3]]));
    }
  }
}

template <typename S, typename P>
__global__ void col2im_kernel(S3DeformDims d, const S* __restrict__ x, const P* __restrict__ off,
                              const P* __restrict__ mask, const S* __restrict__ gcols,
                              P* __restrict__ gi, P* __restrict__ goff, P* __restrict__ gmask) {
  const int64_t HWo = d.Ho * d.Wo, HW = d.H * d.W, total = d.N * d.K * HWo;
  const bool coord = goff != nullptr || gmask != nullptr;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)blockDim.x * gridDim.x) {
    const Site s = site(d, i);
    P y, xx;
    sample_point(d, off, s, y, xx);
    const Corners<P> cr = corners(y, xx, d.H, d.W);
    const P m = mask ? mask[(s.n * d.K + s.kk) * HWo + s.p] : P(1);
    const S* xn = x + s.n * d.C * HW;
    P* gin = gi ? gi + s.n * d.C * HW : nullptr;
    const S* g = gcols + (s.n * d.K + s.kk) * d.C * HWo + s.p;
    P sums[4] = {0, 0, 0, 0};
    for (int64_t c = 0; c < d.C; ++c) {
      const P gc = widen(g[c * HWo]);
      const int64_t base = c * HW;
      if (coord) add_corner_products(sums, gc, xn + base, cr);
      if (gin) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          if (cr.w[q] != P(0)) atomicAdd(gin + base + cr.idx[q], m * cr.w[q] * gc);
        }
      }
    }
    if (coord) {
      const SampleGrads<P> sg = sample_grads(cr, sums, m);
      if (gmask) gmask[(s.n * d.K + s.kk) * HWo + s.p] = sg.mask;
      if (goff) {
        P* o = goff + (s.n * 2 * d.K + 2 * s.kk) * HWo + s.p;
        o[0] = sg.dy;
        o[HWo] = sg.dx;
      }
    }
  }
}

constexpr int kThreads = 256;

unsigned grid_for(const S3DeformDims& d) {
  const int64_t total = d.N * d.K * d.Ho * d.Wo;
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  // Grid-stride loops cover the rest; 2^20 blocks is far more than any GPU runs at once.
  return (unsigned)(blocks < (1 << 20) ? (blocks > 0 ? blocks : 1) : (1 << 20));
}

}  // namespace

extern "C" {

// dtype: 0 = float32, 1 = float64, 2 = bfloat16 features (x, cols) with float32 positions (off,
// mask). Pointers are device pointers of contiguous tensors (mask may be null); `stream` is a
// cudaStream_t. Returns a cudaError_t (0 = success; cudaErrorInvalidValue for another code).
int S3_ENTRY(deform_im2col)(int dtype, const S3DeformDims* d, const void* x, const void* off,
                             const void* mask, void* cols, void* stream) {
  if (d->N * d->K * d->Ho * d->Wo == 0) return 0;
  const cudaStream_t st = (cudaStream_t)stream;
  const unsigned grid = grid_for(*d);
  if (dtype == 0) {
    S3_LAUNCH(grid, kThreads, 0, st, im2col_kernel<float, float>)(
        *d, (const float*)x, (const float*)off, (const float*)mask, (float*)cols);
  } else if (dtype == 1) {
    S3_LAUNCH(grid, kThreads, 0, st, im2col_kernel<double, double>)(
        *d, (const double*)x, (const double*)off, (const double*)mask, (double*)cols);
  } else if (dtype == 2) {
    S3_LAUNCH(grid, kThreads, 0, st, im2col_kernel<Bf16, float>)(
        *d, (const Bf16*)x, (const float*)off, (const float*)mask, (Bf16*)cols);
  } else {
    return (int)cudaErrorInvalidValue;
  }
  return (int)cudaGetLastError();
}

// gi (input gradient, NCHW, in the positions' type, accumulated into: zero it first), goff and
// gmask (written) may each be null when not needed. gcols has the features' type.
int S3_ENTRY(deform_col2im)(int dtype, const S3DeformDims* d, const void* x, const void* off,
                             const void* mask, const void* gcols, void* gi, void* goff,
                             void* gmask, void* stream) {
  if (d->N * d->K * d->Ho * d->Wo == 0) return 0;
  const cudaStream_t st = (cudaStream_t)stream;
  const unsigned grid = grid_for(*d);
  if (dtype == 0) {
    S3_LAUNCH(grid, kThreads, 0, st, col2im_kernel<float, float>)(
        *d, (const float*)x, (const float*)off, (const float*)mask, (const float*)gcols,
        (float*)gi, (float*)goff, (float*)gmask);
  } else if (dtype == 1) {
    S3_LAUNCH(grid, kThreads, 0, st, col2im_kernel<double, double>)(
        *d, (const double*)x, (const double*)off, (const double*)mask, (const double*)gcols,
        (double*)gi, (double*)goff, (double*)gmask);
  } else if (dtype == 2) {
    S3_LAUNCH(grid, kThreads, 0, st, col2im_kernel<Bf16, float>)(
        *d, (const Bf16*)x, (const float*)off, (const float*)mask, (const Bf16*)gcols,
        (float*)gi, (float*)goff, (float*)gmask);
  } else {
    return (int)cudaErrorInvalidValue;
  }
  return (int)cudaGetLastError();
}

const char* S3_ENTRY(error_string)(int code) { return cudaGetErrorString((cudaError_t)code); }

}  // extern "C"
