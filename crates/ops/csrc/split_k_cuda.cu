// CUDA kernel of the split reductions behind the weight gradients (pointwise.cpp, gemm_nt_split_k):
//
//   parts[b][s][i][j] = Σ_{l < L} a[b][i][s·L + l] · c[b][j][s·L + l]
//
// for a (B, P, K) and c (B, Q, K), K = S·L: one product of a chunk of L pixels per (image b,
// chunk s), each added in the sums' type (float32 for float32 and bfloat16, float64 for
// float64) and written, to be summed over s by the caller (deterministic, no atomics).
//
// Why our own: the 1×1 convolutions of a stack and the deformable conv need Σ_pixels go · xᵀ
// with a tiny result (32 × 32, 32 × 96, 32 × 288) per image. cuBLAS runs the chunks of one image
// per launch, 64 small products each, a launch of 8–21 µs: 288 + 128 + 32 launches per 1.5
// steps of a 16-network bfloat16 stack, 7.9 % of its GPU time
// (docs/gpu-checks/2026-11-27-h100-fusions). Here every chunk of every image is a
// block of one launch; the operands are read once, from their own layout.
//
// A block takes a 32 × 32 tile of one product's result and stages 64 pixels of the tile's 32
// rows of a and of c at a time in shared memory, pixel-major, widened to the sums' type. Its 256 threads are 4 lanes of 64: a thread owns 4 × 4
// results and adds every fourth staged pixel, reading its 4 values of a and of c as one 16-byte
// vector each (a warp's 32 threads read 4 distinct vectors of a and 8 of c: one shared-memory
// cycle each) for 16 multiply-adds. The 4 lanes' sums are added in lane order at the end. The
// tiles of one chunk's product are neighbouring blocks (blockIdx.x = chunk · tiles + tile), so
// the chunk's rows that several tiles read come from L2 after the first.

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_common.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kTile = 32;           // rows of a (and of c) per block
constexpr int kPixels = 64;         // pixels staged at a time
constexpr int kPitch = kTile + 4;   // a staged pixel's row: 16-byte aligned, fewer bank conflicts
constexpr int kLanes = kThreads / 64;

// Four consecutive values of the sums' type from or to shared memory (one 16-byte access for
// float32, 16-byte aligned).
template <typename A>
__device__ __forceinline__ void load4(const A* p, A out[4]) {
#pragma unroll
  for (int e = 0; e < 4; ++e) out[e] = p[e];
}
template <>
__device__ __forceinline__ void load4<float>(const float* p, float out[4]) {
  const float4 v = *reinterpret_cast<const float4*>(p);
  out[0] = v.x;
  out[1] = v.y;
  out[2] = v.z;
  out[3] = v.w;
}
template <typename A>
__device__ __forceinline__ void store4(A* p, const A v[4]) {
#pragma unroll
  for (int e = 0; e < 4; ++e) p[e] = v[e];
}
template <>
__device__ __forceinline__ void store4<float>(float* p, const float v[4]) {
  *reinterpret_cast<float4*>(p) = float4{v[0], v[1], v[2], v[3]};
}

template <typename S>
__global__ void __launch_bounds__(kThreads, 2)
    chunk_products(const S* __restrict__ a, const S* __restrict__ c,
                   typename Acc<S>::type* __restrict__ parts, int64_t B, int64_t P, int64_t Q,
                   int64_t K, int64_t L) {
  using A = typename Acc<S>::type;
  // Staging (two 64 × kPitch arrays), reused at the end for the lanes' sums (3 × 64 × 16).
  __shared__ __align__(16) A buf[2 * kPixels * kPitch];
  static_assert(2 * kPixels * kPitch >= (kLanes - 1) * 64 * 16, "room for the lanes' sums");
  A* as = buf;
  A* cs = buf + kPixels * kPitch;

  const int t = threadIdx.x, lane = t / 64, ty = (t % 64) / 8, tx = t % 8;
  const int64_t tiles_q = (Q + kTile - 1) / kTile, tiles = ((P + kTile - 1) / kTile) * tiles_q;
  const int64_t chunks = gridDim.x / tiles, s = blockIdx.x / tiles, tile = blockIdx.x % tiles;
  const int64_t i0 = tile / tiles_q * kTile, j0 = tile % tiles_q * kTile;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const S* ab = a + (b * P + i0) * K + s * L;
    const S* cb = c + (b * Q + j0) * K + s * L;
    A acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = A(0);
    }
    for (int64_t k0 = 0; k0 < L; k0 += kPixels) {
      // Pixel-major copies of the tile's rows. A thread takes one pixel of 4 neighbouring rows
      // and stores them as one 16-byte vector (a warp's stores then fill every bank); a warp's
      // loads of one row are 32 consecutive pixels.
      {
        const int px = t % kPixels;
        const bool in = k0 + px < L;
#pragma unroll
        for (int g = t / kPixels; g < kTile / 4; g += kThreads / kPixels) {
          A va[4], vc[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = 4 * g + e;
            va[e] = in && i0 + r < P ? widen(ab[r * K + k0 + px]) : A(0);
            vc[e] = in && j0 + r < Q ? widen(cb[r * K + k0 + px]) : A(0);
          }
          store4(as + px * kPitch + 4 * g, va);
          store4(cs + px * kPitch + 4 * g, vc);
        }
      }
      __syncthreads();
#pragma unroll 4
      for (int px = lane; px < kPixels; px += kLanes) {
        A av[4], cv[4];
        load4(as + px * kPitch + ty * 4, av);
        load4(cs + px * kPitch + tx * 4, cv);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * cv[j];
        }
      }
      __syncthreads();  // the staging buffers are refilled (or reused below)
    }
    // Lanes 1..3 hand their sums to lane 0, which adds them in lane order and writes.
    A* red = buf;
    if (lane > 0) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) red[((lane - 1) * 64 + t % 64) * 16 + i * 4 + j] = acc[i][j];
      }
    }
    __syncthreads();
    if (lane == 0) {
      for (int l = 1; l < kLanes; ++l) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] += red[((l - 1) * 64 + t) * 16 + i * 4 + j];
        }
      }
      A* out = parts + (b * chunks + s) * P * Q;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t row = i0 + ty * 4 + i;
        if (row >= P) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int64_t col = j0 + tx * 4 + j;
          if (col < Q) out[row * Q + col] = acc[i][j];
        }
      }
    }
    __syncthreads();  // red is the next image's staging
  }
}

template <typename S>
int launch(const S* a, const S* c, typename Acc<S>::type* parts, int64_t B, int64_t P, int64_t Q,
           int64_t K, int64_t L, cudaStream_t st) {
  const int64_t blocks = K / L * ((P + kTile - 1) / kTile) * ((Q + kTile - 1) / kTile);
  if (blocks > 0x7fffffff) return (int)cudaErrorInvalidValue;
  const dim3 grid((unsigned)blocks, grid_rows(B));
  S3_LAUNCH(grid, kThreads, 0, st, chunk_products<S>)(a, c, parts, B, P, Q, K, L);
  return (int)cudaGetLastError();
}

}  // namespace

extern "C" {

// dtype: 0 = float32, 1 = float64, 2 = bfloat16. a (B, P, K) and c (B, Q, K) contiguous, K a
// multiple of L; parts (B, K / L, P, Q) in the sums' type (float32 for dtypes 0 and 2, float64
// for 1), every value written. Returns a cudaError_t (0 = success; cudaErrorInvalidValue for a
// bad dtype, K not a multiple of L, or more than 2³¹ − 1 chunk tiles of 32 × 32 per image).
int S3_ENTRY(split_k_products)(int dtype, const void* a, const void* c, void* parts, int64_t B,
                                int64_t P, int64_t Q, int64_t K, int64_t L, void* stream) {
  if (L <= 0 || K % L != 0) return (int)cudaErrorInvalidValue;
  if (B * P * Q * K == 0) return 0;
  const cudaStream_t st = (cudaStream_t)stream;
  if (dtype == 0) return launch((const float*)a, (const float*)c, (float*)parts, B, P, Q, K, L, st);
  if (dtype == 1) return launch((const double*)a, (const double*)c, (double*)parts, B, P, Q, K, L, st);
  if (dtype == 2) return launch((const Bf16*)a, (const Bf16*)c, (float*)parts, B, P, Q, K, L, st);
  return (int)cudaErrorInvalidValue;
}

}  // extern "C"
