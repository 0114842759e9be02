// CUDA kernels of the stride-1 depthwise convolution (NCHW, one k×k kernel per channel, any
// padding and dilation): forward, and the two halves of its backward.
//
// Why our own: libtorch's depthwise kernels for these shapes (k = 3…7, dilation up to 3, 256²
// planes) ran an order of magnitude below the GPU's memory bandwidth (H200 profile in
// docs/gpu-checks/2026-11-26-h200-batch), and they are half of a batched fit's step.
//
// Both kernels work on a 32×32 tile of outputs of one plane per block of 32×8 threads. The
// block first copies the input region the tile reads — (32 + span)² values, span = (k−1)·d,
// zero outside the image — into shared memory with coalesced loads, so every input value is
// read from global memory about once however large the dilated kernel is. A thread then owns
// four outputs of one column (rows ty, ty+8, ty+16, ty+24): neighbouring threads read
// neighbouring shared-memory words (no bank conflicts) and each weight is loaded once per four
// outputs.
//  * correlate: out = bias + Σ_taps w · in. The input gradient is the same correlation of the
//    output gradient with the flipped kernel and padding (k−1)·d − p (ops.cpp flips it).
//  * weight gradient: each block reduces Σ go · in over its tile for every tap (warp shuffles,
//    then across the 8 warps) and writes one partial per (plane, tile, tap); ops.cpp sums the
//    partials with libtorch. No atomics, so the result is deterministic.
// bfloat16 planes are read and written as such, but the shared tile, the sums and the weight
// gradient's partials are float32: a 16-bit kernel with 16-bit sums would lose the taps' low
// bits. This file includes no torch header, and not cuda_bf16.h either (it needs CCCL headers
// the PyPI nvcc lacks): bfloat16 is its bits, converted here, so nvcc only needs the CUDA
// runtime headers.

#include <cuda_runtime.h>

#include <cstdint>

#include "kernel_dims.h"

namespace {

constexpr int kTile = 32;           // outputs per tile side
constexpr int kRows = 8;            // thread rows per block (blockDim = 32 × 8)
constexpr int kPer = kTile / kRows;  // outputs per thread
constexpr int kWarps = kTile * kRows / 32;

// The type the kernels add in for each storage type.
template <typename S>
struct Acc {
  using type = S;
};
// A bfloat16 value: the top 16 bits of a float32.
struct Bf16 {
  uint16_t bits;
};
template <>
struct Acc<Bf16> {
  using type = float;
};

__device__ __forceinline__ float widen(Bf16 v) { return __uint_as_float((uint32_t)v.bits << 16); }
__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ double widen(double v) { return v; }

template <typename S>
__device__ __forceinline__ S store_as(typename Acc<S>::type v) {
  return v;
}
// Rounded to nearest, ties to even, NaN as 0x7fc0: what libtorch's c10::BFloat16 does.
template <>
__device__ __forceinline__ Bf16 store_as<Bf16>(float v) {
  const uint32_t u = __float_as_uint(v);
  if (v != v) return Bf16{(uint16_t)0x7fc0u};
  return Bf16{(uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}

struct TileGeom {
  int64_t plane, y0, x0;  // plane index and the tile's first output row / column
  int side;               // shared tile side: kTile + span
};

__device__ __forceinline__ TileGeom tile_geom(const S3DepthwiseDims& d) {
  const int64_t tx = (d.Wo + kTile - 1) / kTile, ty = (d.Ho + kTile - 1) / kTile;
  const int64_t b = blockIdx.x, per_plane = tx * ty;
  const int64_t t = b % per_plane;
  TileGeom g;
  g.plane = b / per_plane;
  g.y0 = (t / tx) * kTile;
  g.x0 = (t % tx) * kTile;
  g.side = kTile + (int)((d.k - 1) * d.d);
  return g;
}

// Copies the input region read by the tile (origin (y0 − p, x0 − p), side × side) into `s`,
// widened to the sums' type, zeros outside the plane.
template <typename S, typename A>
__device__ __forceinline__ void load_region(const S3DepthwiseDims& d, const TileGeom& g,
                                            const S* __restrict__ src, A* s) {
  const int tid = threadIdx.y * kTile + threadIdx.x, n = g.side * g.side;
  for (int i = tid; i < n; i += kTile * kRows) {
    const int64_t y = g.y0 - d.p + i / g.side, x = g.x0 - d.p + i % g.side;
    s[i] = (y >= 0 && y < d.H && x >= 0 && x < d.W) ? widen(src[y * d.W + x]) : A(0);
  }
}

// S: the storage type, T: the type of the sums. KS: the kernel size when it is known at compile
// time (3, 5, 7: loops unrolled), else 0.
template <typename S, int KS, typename T = typename Acc<S>::type>
__global__ void __launch_bounds__(kTile* kRows)
    correlate_kernel(S3DepthwiseDims d, const S* __restrict__ in, const S* __restrict__ w,
                     const S* __restrict__ bias, S* __restrict__ out) {
  extern __shared__ __align__(16) unsigned char smem[];
  T* region = reinterpret_cast<T*>(smem);
  const TileGeom g = tile_geom(d);
  const int k = KS > 0 ? KS : (int)d.k, kk = k * k;
  T* sw = region + g.side * g.side;
  const int64_t c = g.plane % d.C;
  const int tid = threadIdx.y * kTile + threadIdx.x;
  for (int i = tid; i < kk; i += kTile * kRows) sw[i] = widen(w[c * kk + i]);
  load_region(d, g, in + g.plane * d.H * d.W, region);
  __syncthreads();
  const T b0 = bias ? widen(bias[c]) : T(0);
  T acc[kPer];
#pragma unroll
  for (int r = 0; r < kPer; ++r) acc[r] = b0;
  const int dil = (int)d.d, tx = threadIdx.x;
#pragma unroll
  for (int i = 0; i < k; ++i) {
#pragma unroll
    for (int j = 0; j < k; ++j) {
      const T wv = sw[i * k + j];
      const T* s = region + (threadIdx.y + i * dil) * g.side + tx + j * dil;
#pragma unroll
      for (int r = 0; r < kPer; ++r) acc[r] += wv * s[r * kRows * g.side];
    }
  }
  const int64_t x = g.x0 + tx;
  if (x >= d.Wo) return;
  S* o = out + g.plane * d.Ho * d.Wo;
#pragma unroll
  for (int r = 0; r < kPer; ++r) {
    const int64_t y = g.y0 + threadIdx.y + r * kRows;
    if (y < d.Ho) o[y * d.Wo + x] = store_as<S>(acc[r]);
  }
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// partial[(plane · tiles + tile) · k² + tap] = Σ over the tile's outputs of go · in at the tap,
// in the sums' type T.
template <typename S, int KS, typename T = typename Acc<S>::type>
__global__ void __launch_bounds__(kTile* kRows)
    weight_grad_kernel(S3DepthwiseDims d, const S* __restrict__ in, const S* __restrict__ go,
                       T* __restrict__ partial) {
  extern __shared__ __align__(16) unsigned char smem[];
  T* region = reinterpret_cast<T*>(smem);
  const TileGeom g = tile_geom(d);
  const int k = KS > 0 ? KS : (int)d.k, kk = k * k;
  T* red = region + g.side * g.side;  // kWarps × k²
  load_region(d, g, in + g.plane * d.H * d.W, region);
  const int tx = threadIdx.x, dil = (int)d.d;
  const int64_t x = g.x0 + tx;
  const S* gp = go + g.plane * d.Ho * d.Wo;
  T gv[kPer];
#pragma unroll
  for (int r = 0; r < kPer; ++r) {
    const int64_t y = g.y0 + threadIdx.y + r * kRows;
    gv[r] = (x < d.Wo && y < d.Ho) ? widen(gp[y * d.Wo + x]) : T(0);
  }
  __syncthreads();
  const int warp = (threadIdx.y * kTile + tx) / 32, lane = tx % 32;
#pragma unroll
  for (int t = 0; t < kk; ++t) {
    const int i = t / k, j = t % k;
    const T* s = region + (threadIdx.y + i * dil) * g.side + tx + j * dil;
    T v = T(0);
#pragma unroll
    for (int r = 0; r < kPer; ++r) v += gv[r] * s[r * kRows * g.side];
    v = warp_sum(v);
    if (lane == 0) red[warp * kk + t] = v;
  }
  __syncthreads();
  const int tid = threadIdx.y * kTile + tx;
  for (int t = tid; t < kk; t += kTile * kRows) {
    T v = T(0);
#pragma unroll
    for (int q = 0; q < kWarps; ++q) v += red[q * kk + t];
    partial[(int64_t)blockIdx.x * kk + t] = v;
  }
}

int64_t tiles_of(const S3DepthwiseDims& d) {
  return ((d.Ho + kTile - 1) / kTile) * ((d.Wo + kTile - 1) / kTile);
}

size_t region_bytes(const S3DepthwiseDims& d, size_t elem) {
  const int64_t side = kTile + (d.k - 1) * d.d;
  return (size_t)(side * side) * elem;
}

template <typename T>
int launch_correlate(const S3DepthwiseDims& d, const T* in, const T* w, const T* bias, T* out,
                     cudaStream_t st) {
  using A = typename Acc<T>::type;
  const size_t shm = region_bytes(d, sizeof(A)) + (size_t)(d.k * d.k) * sizeof(A);
  const dim3 block(kTile, kRows);
  const unsigned grid = (unsigned)(d.N * d.C * tiles_of(d));
  switch (d.k) {
    case 3: correlate_kernel<T, 3><<<grid, block, shm, st>>>(d, in, w, bias, out); break;
    case 5: correlate_kernel<T, 5><<<grid, block, shm, st>>>(d, in, w, bias, out); break;
    case 7: correlate_kernel<T, 7><<<grid, block, shm, st>>>(d, in, w, bias, out); break;
    default: correlate_kernel<T, 0><<<grid, block, shm, st>>>(d, in, w, bias, out); break;
  }
  return (int)cudaGetLastError();
}

template <typename T>
int launch_weight_grad(const S3DepthwiseDims& d, const T* in, const T* go,
                       typename Acc<T>::type* partial, cudaStream_t st) {
  using A = typename Acc<T>::type;
  const size_t shm = region_bytes(d, sizeof(A)) + (size_t)(kWarps * d.k * d.k) * sizeof(A);
  const dim3 block(kTile, kRows);
  const unsigned grid = (unsigned)(d.N * d.C * tiles_of(d));
  switch (d.k) {
    case 3: weight_grad_kernel<T, 3><<<grid, block, shm, st>>>(d, in, go, partial); break;
    case 5: weight_grad_kernel<T, 5><<<grid, block, shm, st>>>(d, in, go, partial); break;
    case 7: weight_grad_kernel<T, 7><<<grid, block, shm, st>>>(d, in, go, partial); break;
    default: weight_grad_kernel<T, 0><<<grid, block, shm, st>>>(d, in, go, partial); break;
  }
  return (int)cudaGetLastError();
}

}  // namespace

extern "C" {

// Tiles per plane: the weight gradient's partials are (N·C·tiles, k²).
int64_t s3ops_cuda_dw_tiles(const S3DepthwiseDims* d) { return tiles_of(*d); }

// Shared memory one block needs (the larger of the two kernels), so ops.cpp can decline shapes
// whose dilated kernel does not fit (48 KiB without opting in) and use libtorch's instead.
// `elem`: bytes of the sums' type (4 for float32 and bfloat16, 8 for float64).
int64_t s3ops_cuda_dw_shared_bytes(const S3DepthwiseDims* d, int64_t elem) {
  return (int64_t)(region_bytes(*d, (size_t)elem) + (size_t)(kWarps * d->k * d->k * elem));
}

// dtype: 0 = float32, 1 = float64, 2 = bfloat16. Device pointers of contiguous tensors; bias
// may be null; `stream` is a cudaStream_t. Returns a cudaError_t (0 = success;
// cudaErrorInvalidValue for another dtype code).
int s3ops_cuda_dw_correlate(int dtype, const S3DepthwiseDims* d, const void* in, const void* w,
                            const void* bias, void* out, void* stream) {
  if (d->N * d->C * d->Ho * d->Wo == 0) return 0;
  const cudaStream_t st = (cudaStream_t)stream;
  if (dtype == 0) {
    return launch_correlate(*d, (const float*)in, (const float*)w, (const float*)bias,
                            (float*)out, st);
  }
  if (dtype == 2) {
    using B = Bf16;
    return launch_correlate(*d, (const B*)in, (const B*)w, (const B*)bias, (B*)out, st);
  }
  if (dtype == 1) {
    return launch_correlate(*d, (const double*)in, (const double*)w, (const double*)bias,
                            (double*)out, st);
  }
  return (int)cudaErrorInvalidValue;
}

// `partial` holds the sums' type: float32 for dtype 0 and 2, float64 for 1.
int s3ops_cuda_dw_weight_grad(int dtype, const S3DepthwiseDims* d, const void* in,
                              const void* go, void* partial, void* stream) {
  if (d->N * d->C * d->Ho * d->Wo == 0) return 0;
  const cudaStream_t st = (cudaStream_t)stream;
  if (dtype == 0) {
    return launch_weight_grad(*d, (const float*)in, (const float*)go, (float*)partial, st);
  }
  if (dtype == 2) {
    using B = Bf16;
    return launch_weight_grad(*d, (const B*)in, (const B*)go, (float*)partial, st);
  }
  if (dtype == 1) {
    return launch_weight_grad(*d, (const double*)in, (const double*)go, (double*)partial, st);
  }
  return (int)cudaErrorInvalidValue;
}

}  // extern "C"
