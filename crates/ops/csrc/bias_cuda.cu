// CUDA kernels of a per-channel bias: added in place to a convolution's output, and its
// gradient, the sum of the output gradient over every pixel of every image.
//
// Why our own: libtorch runs `y += bias.view(1, C, 1)` as a broadcasting elementwise kernel
// that does not vectorise (stride 0 along the pixels), at about a third of the memory
// bandwidth, and `go.sum({0, 2})` over the image and pixel axes as a strided reduction at a
// fifth of it; a 16-network step runs each about ten times on 67 MB maps (H200 profile,
// docs/gpu-checks/2026-11-26-h200-depthwise). Here a block owns a slice of one plane (a row
// of blockIdx.y), so the channel is known without a division per element and every access is
// a 16-byte vector.
//
// Layout: `planes` planes of `elems` contiguous values; plane q belongs to channel
// q mod `channels` (an (N, C, H·W) tensor: planes = N·C; a stack's (N, M·O, H·W): channels
// M·O; per-image biases (N, O): channels = N·O).

#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda_common.cuh"

namespace {

constexpr int kThreads = 256;

// y[q][i] += bias[q mod channels], rounded once. VEC: 16-byte accesses (elems a multiple of the
// vector length, y aligned). Each thread handles kUnroll accesses a block apart, all loads
// issued before any store (one at a time left the kernel at half the memory bandwidth).
constexpr int kUnroll = 4;
template <typename S, bool VEC>
__global__ void __launch_bounds__(kThreads)
    bias_add(S* __restrict__ y, const S* __restrict__ bias, int64_t planes, int64_t elems,
             int64_t channels) {
  using A = typename Acc<S>::type;
  using U = typename std::conditional<VEC, Vec<S>, S>::type;
  constexpr int V = VEC ? vec_len<S>() : 1;
  const int64_t n = elems / V, step = (int64_t)gridDim.x * kThreads * kUnroll;
  for (int64_t q = blockIdx.y; q < planes; q += gridDim.y) {
    const A b = widen(bias[q % channels]);
    U* row = reinterpret_cast<U*>(y + q * elems);
    for (int64_t i0 = blockIdx.x * (int64_t)kThreads * kUnroll + threadIdx.x; i0 < n; i0 += step) {
      U v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = i0 + u * kThreads;
        if (i < n) v[u] = row[i];
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = i0 + u * kThreads;
        if (i >= n) continue;
        if constexpr (VEC) {
#pragma unroll
          for (int e = 0; e < V; ++e) v[u].v[e] = store_as<S>(widen(v[u].v[e]) + b);
        } else {
          v[u] = store_as<S>(widen(v[u]) + b);
        }
        row[i] = v[u];
      }
    }
  }
}

// partial[ch][chunk] = Σ over the planes of channel ch of go over the chunk's `chunk` values,
// in the sums' type; block (chunk, ch). Deterministic: a fixed order, no atomics.
template <typename S, bool VEC>
__global__ void __launch_bounds__(kThreads)
    bias_grad(const S* __restrict__ go, typename Acc<S>::type* __restrict__ partial,
              int64_t planes, int64_t elems, int64_t channels, int64_t chunk) {
  using A = typename Acc<S>::type;
  constexpr int V = VEC ? vec_len<S>() : 1;
  __shared__ A red[kThreads / 32];
  const int64_t chunks = gridDim.x, lo = blockIdx.x * chunk;
  const int64_t hi = lo + chunk < elems ? lo + chunk : elems;
  for (int64_t ch = blockIdx.y; ch < channels; ch += gridDim.y) {
    A s = A(0);
    for (int64_t q = ch; q < planes; q += channels) {
      const S* row = go + q * elems;
      for (int64_t i = lo / V + threadIdx.x; i < hi / V; i += kThreads) {
        if constexpr (VEC) {
          const Vec<S> x = reinterpret_cast<const Vec<S>*>(row)[i];
#pragma unroll
          for (int e = 0; e < V; ++e) s += widen(x.v[e]);
        } else {
          s += widen(row[i]);
        }
      }
    }
    s = warp_sum(s);
    if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
      A t = A(0);
#pragma unroll
      for (int w = 0; w < kThreads / 32; ++w) t += red[w];
      partial[ch * chunks + blockIdx.x] = t;
    }
    __syncthreads();  // red is reused by the next channel
  }
}

template <typename S>
int launch_add(S* y, const S* bias, int64_t planes, int64_t elems, int64_t channels,
               cudaStream_t st) {
  const bool vec = vectorised(y, elems, sizeof(S));
  const int64_t n = vec ? elems / vec_len<S>() : elems;
  const int64_t bx = (n + kThreads * kUnroll - 1) / (kThreads * kUnroll);
  const dim3 grid((unsigned)(bx < 1024 ? bx : 1024), grid_rows(planes));
  if (vec) {
    S3_LAUNCH(grid, kThreads, 0, st, bias_add<S, true>)(y, bias, planes, elems, channels);
  } else {
    S3_LAUNCH(grid, kThreads, 0, st, bias_add<S, false>)(y, bias, planes, elems, channels);
  }
  return (int)cudaGetLastError();
}

template <typename S>
int launch_grad(const S* go, typename Acc<S>::type* partial, int64_t planes, int64_t elems,
                int64_t channels, int64_t chunks, cudaStream_t st) {
  const int64_t chunk = (elems + chunks - 1) / chunks;
  // Chunk bounds on whole vectors, so no vector straddles two chunks.
  const bool vec = vectorised(go, elems, sizeof(S)) && chunk % vec_len<S>() == 0;
  const dim3 grid((unsigned)chunks, grid_rows(channels));
  if (vec) {
    S3_LAUNCH(grid, kThreads, 0, st, bias_grad<S, true>)(go, partial, planes, elems, channels, chunk);
  } else {
    S3_LAUNCH(grid, kThreads, 0, st, bias_grad<S, false>)(go, partial, planes, elems, channels, chunk);
  }
  return (int)cudaGetLastError();
}

}  // namespace

extern "C" {

// Chunks each plane's sum is split into: the gradient kernel's partials are (channels, this).
// About 8192 values a block, at most 64 chunks.
int64_t S3_ENTRY(bias_grad_chunks)(int64_t elems) {
  int64_t c = (elems + 8191) / 8192;
  return c < 1 ? 1 : (c > 64 ? 64 : c);
}

// dtype: 0 = float32, 1 = float64, 2 = bfloat16. y: planes × elems values (contiguous), bias:
// `channels` values of the same type. Returns a cudaError_t (0 = success).
int S3_ENTRY(bias_add)(int dtype, void* y, const void* bias, int64_t planes, int64_t elems,
                        int64_t channels, void* stream) {
  if (planes * elems == 0) return 0;
  const cudaStream_t st = (cudaStream_t)stream;
  if (dtype == 0) return launch_add((float*)y, (const float*)bias, planes, elems, channels, st);
  if (dtype == 1) return launch_add((double*)y, (const double*)bias, planes, elems, channels, st);
  if (dtype == 2) return launch_add((Bf16*)y, (const Bf16*)bias, planes, elems, channels, st);
  return (int)cudaErrorInvalidValue;
}

// partial: channels × s3ops_cuda_bias_grad_chunks(elems) values of the sums' type (float32 for
// dtype 0 and 2, float64 for 1), every one written.
int S3_ENTRY(bias_grad)(int dtype, const void* go, void* partial, int64_t planes, int64_t elems,
                         int64_t channels, void* stream) {
  const cudaStream_t st = (cudaStream_t)stream;
  const int64_t chunks = S3_ENTRY(bias_grad_chunks)(elems);
  if (dtype == 0) {
    return launch_grad((const float*)go, (float*)partial, planes, elems, channels, chunks, st);
  }
  if (dtype == 1) {
    return launch_grad((const double*)go, (double*)partial, planes, elems, channels, chunks, st);
  }
  if (dtype == 2) {
    return launch_grad((const Bf16*)go, (float*)partial, planes, elems, channels, chunks, st);
  }
  return (int)cudaErrorInvalidValue;
}

}  // extern "C"
