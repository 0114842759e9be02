// CUDA kernels of a per-channel bias: added in place to a convolution's output (then, as one
// pass, a residual added or a gate applied), and its gradient, the sum of the output gradient
// over every pixel of every image; and the gate's backward.
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

// What follows the bias in bias_add (BiasThen in kernel_entries.h): nothing; a residual added,
// other[q][i] + y; or a gate, y kept as it is and out[q][i] = other[q][i] · y. Each rounds
// as the libtorch op it stands for does after the bias's own rounding (float32 sums, rounded
// once per op), so a fused 1×1 conv has the same bits as the conv, then the add or multiply.
// Why: the I-LKA block's gate `u · mix(…)` and its residual `x + pw2(…)` were two more passes
// over 67 MB maps each in a 16-network step (README, "Speed").
enum : int { kThenNothing = 0, kThenResidual = 1, kThenGate = 2 };

// y[q][i] += bias[q mod channels], rounded once, then MODE. VEC: 16-byte accesses (elems a
// multiple of the vector length, y, other and out aligned). Each thread handles kUnroll
// accesses a block apart, all loads issued before any store (one at a time left the kernel at
// half the memory bandwidth).
constexpr int kUnroll = 4;
template <typename S, bool VEC, int MODE>
__global__ void __launch_bounds__(kThreads)
    bias_add(S* __restrict__ y, const S* __restrict__ bias, const S* __restrict__ other,
             S* __restrict__ out, int64_t planes, int64_t elems, int64_t channels) {
  using A = typename Acc<S>::type;
  using U = typename std::conditional<VEC, Vec<S>, S>::type;
  constexpr int V = VEC ? vec_len<S>() : 1;
  const int64_t n = elems / V, step = (int64_t)gridDim.x * kThreads * kUnroll;
  for (int64_t q = blockIdx.y; q < planes; q += gridDim.y) {
    const A b = widen(bias[q % channels]);
    U* row = reinterpret_cast<U*>(y + q * elems);
    const U* orow = reinterpret_cast<const U*>(MODE == kThenNothing ? y : other + q * elems);
    U* grow = reinterpret_cast<U*>(MODE == kThenGate ? out + q * elems : y);
    for (int64_t i0 = blockIdx.x * (int64_t)kThreads * kUnroll + threadIdx.x; i0 < n; i0 += step) {
      U v[kUnroll], o[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = i0 + u * kThreads;
        if (i < n) {
          v[u] = row[i];
          if constexpr (MODE != kThenNothing) o[u] = orow[i];
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = i0 + u * kThreads;
        if (i >= n) continue;
        S* ve = reinterpret_cast<S*>(&v[u]);
        const S* oe = reinterpret_cast<const S*>(&o[u]);
        U g;
        S* ge = reinterpret_cast<S*>(&g);
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const S z = store_as<S>(widen(ve[e]) + b);
          if constexpr (MODE == kThenResidual) {
            ve[e] = store_as<S>(widen(oe[e]) + widen(z));
          } else {
            ve[e] = z;
          }
          if constexpr (MODE == kThenGate) ge[e] = store_as<S>(widen(oe[e]) * widen(z));
        }
        row[i] = v[u];
        if constexpr (MODE == kThenGate) grow[i] = g;
      }
    }
  }
}

// The gate's backward over n values: gz = g · u (the gradient of y = u · z for z) and gu = g · z,
// each rounded once, as libtorch's multiply backward computes them. VEC as above.
template <typename S, bool VEC>
__global__ void __launch_bounds__(kThreads)
    gate_grad(const S* __restrict__ g, const S* __restrict__ u, const S* __restrict__ z,
              S* __restrict__ gz, S* __restrict__ gu, int64_t n_values) {
  using U = typename std::conditional<VEC, Vec<S>, S>::type;
  constexpr int V = VEC ? vec_len<S>() : 1;
  const int64_t n = n_values / V;
  const U* gv = reinterpret_cast<const U*>(g);
  const U* uv = reinterpret_cast<const U*>(u);
  const U* zv = reinterpret_cast<const U*>(z);
  for (int64_t i = blockIdx.x * (int64_t)kThreads + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * kThreads) {
    U a = gv[i], b = uv[i], c = zv[i], r, t;
    const S* ae = reinterpret_cast<const S*>(&a);
    const S* be = reinterpret_cast<const S*>(&b);
    const S* ce = reinterpret_cast<const S*>(&c);
    S* re = reinterpret_cast<S*>(&r);
    S* te = reinterpret_cast<S*>(&t);
#pragma unroll
    for (int e = 0; e < V; ++e) {
      re[e] = store_as<S>(widen(ae[e]) * widen(be[e]));
      te[e] = store_as<S>(widen(ae[e]) * widen(ce[e]));
    }
    reinterpret_cast<U*>(gz)[i] = r;
    reinterpret_cast<U*>(gu)[i] = t;
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

template <typename S, int MODE>
void launch_add_mode(bool vec, dim3 grid, S* y, const S* bias, const S* other, S* out,
                     int64_t planes, int64_t elems, int64_t channels, cudaStream_t st) {
  if (vec) {
    S3_LAUNCH(grid, kThreads, 0, st, bias_add<S, true, MODE>)(y, bias, other, out, planes, elems, channels);
  } else {
    S3_LAUNCH(grid, kThreads, 0, st, bias_add<S, false, MODE>)(y, bias, other, out, planes, elems, channels);
  }
}

template <typename S>
int launch_add(S* y, const S* bias, const S* other, S* out, int then, int64_t planes,
               int64_t elems, int64_t channels, cudaStream_t st) {
  if (then != kThenNothing && (other == nullptr || (then == kThenGate && out == nullptr))) {
    return (int)cudaErrorInvalidValue;
  }
  const bool vec = vectorised(y, elems, sizeof(S)) &&
                   (then == kThenNothing || vectorised(other, elems, sizeof(S))) &&
                   (then != kThenGate || vectorised(out, elems, sizeof(S)));
  const int64_t n = vec ? elems / vec_len<S>() : elems;
  const int64_t bx = (n + kThreads * kUnroll - 1) / (kThreads * kUnroll);
  const dim3 grid((unsigned)(bx < 1024 ? bx : 1024), grid_rows(planes));
  if (then == kThenResidual) {
    launch_add_mode<S, kThenResidual>(vec, grid, y, bias, other, out, planes, elems, channels, st);
  } else if (then == kThenGate) {
    launch_add_mode<S, kThenGate>(vec, grid, y, bias, other, out, planes, elems, channels, st);
  } else if (then == kThenNothing) {
    launch_add_mode<S, kThenNothing>(vec, grid, y, bias, other, out, planes, elems, channels, st);
  } else {
    return (int)cudaErrorInvalidValue;
  }
  return (int)cudaGetLastError();
}

template <typename S>
int launch_gate_grad(const S* g, const S* u, const S* z, S* gz, S* gu, int64_t n,
                     cudaStream_t st) {
  const bool vec = vectorised(g, n, sizeof(S)) && vectorised(u, n, sizeof(S)) &&
                   vectorised(z, n, sizeof(S)) && vectorised(gz, n, sizeof(S)) &&
                   vectorised(gu, n, sizeof(S));
  const int64_t m = vec ? n / vec_len<S>() : n;
  const int64_t blocks = (m + kThreads - 1) / kThreads;
  const unsigned grid = (unsigned)(blocks < 65535 ? (blocks > 0 ? blocks : 1) : 65535);
  if (vec) {
    S3_LAUNCH(grid, kThreads, 0, st, gate_grad<S, true>)(g, u, z, gz, gu, n);
  } else {
    S3_LAUNCH(grid, kThreads, 0, st, gate_grad<S, false>)(g, u, z, gz, gu, n);
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
// `channels` values of the same type; then: 0 nothing more, 1 + other (y's layout, written to
// y), 2 y kept and out = other · y (other and out in y's layout). Returns a cudaError_t
// (0 = success).
int S3_ENTRY(bias_add)(int dtype, void* y, const void* bias, const void* other, void* out,
                        int then, int64_t planes, int64_t elems, int64_t channels, void* stream) {
  if (planes * elems == 0) return 0;
  const cudaStream_t st = (cudaStream_t)stream;
  if (dtype == 0) {
    return launch_add((float*)y, (const float*)bias, (const float*)other, (float*)out, then,
                      planes, elems, channels, st);
  }
  if (dtype == 1) {
    return launch_add((double*)y, (const double*)bias, (const double*)other, (double*)out, then,
                      planes, elems, channels, st);
  }
  if (dtype == 2) {
    return launch_add((Bf16*)y, (const Bf16*)bias, (const Bf16*)other, (Bf16*)out, then, planes,
                      elems, channels, st);
  }
  return (int)cudaErrorInvalidValue;
}

// The gate's backward (see gate_grad): n values each of g, u, z in, gz and gu out, all of
// `dtype` and contiguous.
int S3_ENTRY(gate_grad)(int dtype, const void* g, const void* u, const void* z, void* gz,
                         void* gu, int64_t n, void* stream) {
  if (n == 0) return 0;
  const cudaStream_t st = (cudaStream_t)stream;
  if (dtype == 0) {
    return launch_gate_grad((const float*)g, (const float*)u, (const float*)z, (float*)gz,
                            (float*)gu, n, st);
  }
  if (dtype == 1) {
    return launch_gate_grad((const double*)g, (const double*)u, (const double*)z, (double*)gz,
                            (double*)gu, n, st);
  }
  if (dtype == 2) {
    return launch_gate_grad((const Bf16*)g, (const Bf16*)u, (const Bf16*)z, (Bf16*)gz, (Bf16*)gu,
                            n, st);
  }
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
