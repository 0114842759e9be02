// CUDA kernels of the network's BatchNorm: training mode, statistics per (image, channel)
// plane — what BatchNorm computes for a batch of one image, applied to each image of a batch
// (a GPU step runs an image and its transformed copy as a batch of two, and each must see its
// own statistics) — then a per-channel scale γ and shift β.
//
// Why our own: libtorch runs this (as BatchNorm over N·C channels of one image) with one block
// per plane and 2-byte loads, at 0.6–1.2 TB/s, and its three kernels were 9–10 % of a
// 16-network bfloat16 step (H100 profile, docs/gpu-checks/2026-11-27-h100-fusions). Here every
// pass is a grid of (chunk, plane) blocks reading 16-byte vectors:
//  * forward: plane_sums (Σ(x−K), Σ(x−K)² per chunk, K the plane's first value, which keeps
//    the variance's cancellation small), stats_forward (one thread per plane: mean, 1/σ, and
//    the plane's scale γ/σ), plane_affine (y = (x − mean)·scale + β);
//  * backward: plane_sums (Σdy, Σdy·(x − mean)), stats_backward (the coefficients of
//    dx = A·dy + B·(x − mean) + E, and the plane's share of dγ and dβ), plane_affine again.
// Sums are float32 (float64 for float64 planes), partials summed in a fixed order: no atomics,
// deterministic. Layout: `planes` planes of `elems` contiguous values; plane q is channel
// q mod C.

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cuda_common.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;

// The block's sum of a and b (every thread gets them), through `red` (2 × warps values).
template <typename A>
__device__ __forceinline__ void block_sum2(A& a, A& b, A* red) {
  a = warp_sum(a);
  b = warp_sum(b);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    red[warp] = a;
    red[kThreads / 32 + warp] = b;
  }
  __syncthreads();
  a = A(0);
  b = A(0);
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) {
    a += red[w];
    b += red[kThreads / 32 + w];
  }
  __syncthreads();
}

// Per block (chunk, plane): partial[(plane · chunks + chunk) · 2 + {0, 1}] =
//  * GRAD false: Σ (u − K) and Σ (u − K)², K = u's first value in the plane;
//  * GRAD true:  Σ w and Σ w · (u − mean[plane]).
template <typename S, bool VEC, bool GRAD>
__global__ void __launch_bounds__(kThreads)
    plane_sums(const S* __restrict__ u, const S* __restrict__ w,
               const typename Acc<S>::type* __restrict__ mean,
               typename Acc<S>::type* __restrict__ partial, int64_t planes, int64_t elems,
               int64_t chunk) {
  using A = typename Acc<S>::type;
  constexpr int V = VEC ? vec_len<S>() : 1;
  __shared__ A red[2 * kThreads / 32];
  const int64_t lo = blockIdx.x * chunk, hi = lo + chunk < elems ? lo + chunk : elems;
  for (int64_t q = blockIdx.y; q < planes; q += gridDim.y) {
    const S* up = u + q * elems;
    const S* wp = GRAD ? w + q * elems : nullptr;
    const A k = GRAD ? mean[q] : widen(up[0]);
    A s1 = A(0), s2 = A(0);
    for (int64_t i = lo / V + threadIdx.x; i < hi / V; i += kThreads) {
      S uv[V], wv[V];
      if constexpr (VEC) {
        *reinterpret_cast<Vec<S>*>(uv) = reinterpret_cast<const Vec<S>*>(up)[i];
        if constexpr (GRAD) *reinterpret_cast<Vec<S>*>(wv) = reinterpret_cast<const Vec<S>*>(wp)[i];
      } else {
        uv[0] = up[i];
        if constexpr (GRAD) wv[0] = wp[i];
      }
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const A d = widen(uv[e]) - k;
        if constexpr (GRAD) {
          const A g = widen(wv[e]);
          s1 += g;
          s2 += g * d;
        } else {
          s1 += d;
          s2 += d * d;
        }
      }
    }
    block_sum2(s1, s2, red);
    if (threadIdx.x == 0) {
      A* o = partial + (q * gridDim.x + blockIdx.x) * 2;
      o[0] = s1;
      o[1] = s2;
    }
  }
}

// Plane q's two sums, its chunks' partials added in order.
template <typename A>
__device__ __forceinline__ void chunk_sums(const A* partial, int64_t q, int64_t chunks, A& s1,
                                           A& s2) {
  s1 = A(0);
  s2 = A(0);
  for (int64_t c = 0; c < chunks; ++c) {
    s1 += partial[(q * chunks + c) * 2];
    s2 += partial[(q * chunks + c) * 2 + 1];
  }
}

// One thread per plane, from the forward sums: mean, 1/σ (biased variance, as BatchNorm
// normalises) and the plane's scale γ[c]/σ.
template <typename S, typename A>
__global__ void stats_forward(const A* __restrict__ partial, int64_t chunks, const S* __restrict__ x,
                              const A* __restrict__ gamma, A* __restrict__ mean,
                              A* __restrict__ invstd, A* __restrict__ scale, int64_t planes,
                              int64_t elems, int64_t channels, double eps) {
  for (int64_t q = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; q < planes;
       q += (int64_t)blockDim.x * gridDim.x) {
    A s1, s2;
    chunk_sums(partial, q, chunks, s1, s2);
    const A n = A(elems), dm = s1 / n;
    A var = s2 / n - dm * dm;
    var = var > A(0) ? var : A(0);
    const A inv = A(1) / sqrt(var + A(eps));
    mean[q] = widen(x[q * elems]) + dm;
    invstd[q] = inv;
    scale[q] = gamma[q % channels] * inv;
  }
}

// One thread per plane, from the backward sums Σdy and Σdy·(x − mean): the coefficients of
// dx = a·dy + b·(x − mean) + e, and the plane's shares of dγ (Σdy·x̂) and dβ (Σdy).
template <typename A>
__global__ void stats_backward(const A* __restrict__ partial, int64_t chunks,
                               const A* __restrict__ gamma, const A* __restrict__ invstd,
                               A* __restrict__ ca, A* __restrict__ cb, A* __restrict__ ce,
                               A* __restrict__ dgamma, A* __restrict__ dbeta, int64_t planes,
                               int64_t elems, int64_t channels) {
  for (int64_t q = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; q < planes;
       q += (int64_t)blockDim.x * gridDim.x) {
    A sdy, sdyx;
    chunk_sums(partial, q, chunks, sdy, sdyx);
    const A n = A(elems), inv = invstd[q], a = gamma[q % channels] * inv;
    ca[q] = a;
    cb[q] = -a * inv * inv * sdyx / n;
    ce[q] = -a * sdy / n;
    dgamma[q] = sdyx * inv;
    dbeta[q] = sdy;
  }
}

// Per-plane coefficients of plane_affine.
template <typename A>
struct Coefs {
  const A* mean;  // subtracted from u
  const A* mul;   // multiplies u − mean
  const A* add;   // added: add[q] when per_plane, else add[q mod channels]
  const A* wmul;  // multiplies w (W only)
  bool per_plane;
  int64_t channels;
};

// out = (u − mean)·mul + add (+ w·wmul when W), per plane; kUnroll accesses per thread, all
// loads issued before any store.
template <typename S, bool VEC, bool W>
__global__ void __launch_bounds__(kThreads)
    plane_affine(const S* __restrict__ u, const S* __restrict__ w, S* __restrict__ out,
                 const Coefs<typename Acc<S>::type> k, int64_t planes, int64_t elems) {
  using A = typename Acc<S>::type;
  using U = typename std::conditional<VEC, Vec<S>, S>::type;
  constexpr int V = VEC ? vec_len<S>() : 1;
  const int64_t n = elems / V, step = (int64_t)gridDim.x * kThreads * kUnroll;
  for (int64_t q = blockIdx.y; q < planes; q += gridDim.y) {
    const A m = k.mean[q], s = k.mul[q], t = k.per_plane ? k.add[q] : k.add[q % k.channels];
    const A c = W ? k.wmul[q] : A(0);
    const U* up = reinterpret_cast<const U*>(u + q * elems);
    const U* wp = W ? reinterpret_cast<const U*>(w + q * elems) : nullptr;
    U* op = reinterpret_cast<U*>(out + q * elems);
    for (int64_t i0 = blockIdx.x * (int64_t)kThreads * kUnroll + threadIdx.x; i0 < n; i0 += step) {
      U uv[kUnroll], wv[kUnroll];
#pragma unroll
      for (int j = 0; j < kUnroll; ++j) {
        const int64_t i = i0 + j * kThreads;
        if (i < n) {
          uv[j] = up[i];
          if constexpr (W) wv[j] = wp[i];
        }
      }
#pragma unroll
      for (int j = 0; j < kUnroll; ++j) {
        const int64_t i = i0 + j * kThreads;
        if (i >= n) continue;
        const S* ue = reinterpret_cast<const S*>(&uv[j]);
        const S* we = reinterpret_cast<const S*>(&wv[j]);
        U o;
        S* oe = reinterpret_cast<S*>(&o);
#pragma unroll
        for (int e = 0; e < V; ++e) {
          A v = (widen(ue[e]) - m) * s + t;
          if constexpr (W) v += widen(we[e]) * c;
          oe[e] = store_as<S>(v);
        }
        op[i] = o;
      }
    }
  }
}

unsigned plane_grid(int64_t planes) {
  const int64_t b = (planes + kThreads - 1) / kThreads;
  return (unsigned)(b < 65535 ? (b > 0 ? b : 1) : 65535);
}

// Chunks a plane's sums are split into: about 8192 values a block, at most 64.
int64_t chunks_of(int64_t elems) {
  const int64_t c = (elems + 8191) / 8192;
  return c < 1 ? 1 : (c > 64 ? 64 : c);
}

template <typename S, bool GRAD>
void launch_sums(const S* u, const S* w, const typename Acc<S>::type* mean,
                 typename Acc<S>::type* partial, int64_t planes, int64_t elems, cudaStream_t st) {
  const int64_t chunks = chunks_of(elems), chunk = (elems + chunks - 1) / chunks;
  const bool vec = vectorised(u, elems, sizeof(S)) && (!GRAD || vectorised(w, elems, sizeof(S))) &&
                   chunk % vec_len<S>() == 0;
  const dim3 grid((unsigned)chunks, grid_rows(planes));
  if (vec) {
    S3_LAUNCH(grid, kThreads, 0, st, plane_sums<S, true, GRAD>)(u, w, mean, partial, planes, elems, chunk);
  } else {
    S3_LAUNCH(grid, kThreads, 0, st, plane_sums<S, false, GRAD>)(u, w, mean, partial, planes, elems, chunk);
  }
}

template <typename S, bool W>
void launch_affine(const S* u, const S* w, S* out, const Coefs<typename Acc<S>::type>& k,
                   int64_t planes, int64_t elems, cudaStream_t st) {
  const bool vec = vectorised(u, elems, sizeof(S)) && vectorised(out, elems, sizeof(S)) &&
                   (!W || vectorised(w, elems, sizeof(S)));
  const int64_t n = vec ? elems / vec_len<S>() : elems;
  const int64_t bx = (n + kThreads * kUnroll - 1) / (kThreads * kUnroll);
  const dim3 grid((unsigned)(bx < 1024 ? (bx > 0 ? bx : 1) : 1024), grid_rows(planes));
  if (vec) {
    S3_LAUNCH(grid, kThreads, 0, st, plane_affine<S, true, W>)(u, w, out, k, planes, elems);
  } else {
    S3_LAUNCH(grid, kThreads, 0, st, plane_affine<S, false, W>)(u, w, out, k, planes, elems);
  }
}

template <typename S>
int forward(const S* x, S* y, const void* gamma, const void* beta, void* mean, void* invstd,
            void* scratch, int64_t planes, int64_t elems, int64_t channels, double eps,
            cudaStream_t st) {
  using A = typename Acc<S>::type;
  A* scale = (A*)scratch;
  A* partial = scale + planes;
  launch_sums<S, false>(x, nullptr, nullptr, partial, planes, elems, st);
  S3_LAUNCH(plane_grid(planes), kThreads, 0, st, stats_forward<S, A>)(
      partial, chunks_of(elems), x, (const A*)gamma, (A*)mean, (A*)invstd, scale, planes, elems,
      channels, eps);
  const Coefs<A> k{(const A*)mean, scale, (const A*)beta, nullptr, false, channels};
  launch_affine<S, false>(x, nullptr, y, k, planes, elems, st);
  return (int)cudaGetLastError();
}

template <typename S>
int backward(const S* dy, const S* x, const void* gamma, const void* mean, const void* invstd,
             S* dx, void* dgamma, void* dbeta, void* scratch, int64_t planes, int64_t elems,
             int64_t channels, cudaStream_t st) {
  using A = typename Acc<S>::type;
  A* ca = (A*)scratch;
  A* cb = ca + planes;
  A* ce = cb + planes;
  A* partial = ce + planes;
  launch_sums<S, true>(x, dy, (const A*)mean, partial, planes, elems, st);
  S3_LAUNCH(plane_grid(planes), kThreads, 0, st, stats_backward<A>)(
      partial, chunks_of(elems), (const A*)gamma, (const A*)invstd, ca, cb, ce, (A*)dgamma,
      (A*)dbeta, planes, elems, channels);
  const Coefs<A> k{(const A*)mean, cb, ce, ca, true, channels};
  launch_affine<S, true>(x, dy, dx, k, planes, elems, st);
  return (int)cudaGetLastError();
}

}  // namespace

extern "C" {

// Values of the sums' type (float32 for dtype 0 and 2, float64 for 1) the scratch buffer of
// either pass needs.
int64_t S3_ENTRY(plane_norm_scratch)(int64_t planes, int64_t elems) {
  return planes * (3 + 2 * chunks_of(elems));
}

// dtype: 0 = float32, 1 = float64, 2 = bfloat16 planes; gamma and beta (channels), mean and
// invstd (planes, written) in the sums' type. Returns a cudaError_t (0 = success).
int S3_ENTRY(plane_norm_forward)(int dtype, const void* x, void* y, const void* gamma,
                                  const void* beta, void* mean, void* invstd, void* scratch,
                                  int64_t planes, int64_t elems, int64_t channels, double eps,
                                  void* stream) {
  if (planes * elems == 0) return 0;
  const cudaStream_t st = (cudaStream_t)stream;
  if (dtype == 0) return forward((const float*)x, (float*)y, gamma, beta, mean, invstd, scratch, planes, elems, channels, eps, st);
  if (dtype == 1) return forward((const double*)x, (double*)y, gamma, beta, mean, invstd, scratch, planes, elems, channels, eps, st);
  if (dtype == 2) return forward((const Bf16*)x, (Bf16*)y, gamma, beta, mean, invstd, scratch, planes, elems, channels, eps, st);
  return (int)cudaErrorInvalidValue;
}

// dx from dy and the forward's x, mean and invstd; each plane's shares of dγ and dβ
// (planes, the sums' type, written; the caller adds the planes of each channel).
int S3_ENTRY(plane_norm_backward)(int dtype, const void* dy, const void* x, const void* gamma,
                                   const void* mean, const void* invstd, void* dx, void* dgamma,
                                   void* dbeta, void* scratch, int64_t planes, int64_t elems,
                                   int64_t channels, void* stream) {
  if (planes * elems == 0) return 0;
  const cudaStream_t st = (cudaStream_t)stream;
  if (dtype == 0) return backward((const float*)dy, (const float*)x, gamma, mean, invstd, (float*)dx, dgamma, dbeta, scratch, planes, elems, channels, st);
  if (dtype == 1) return backward((const double*)dy, (const double*)x, gamma, mean, invstd, (double*)dx, dgamma, dbeta, scratch, planes, elems, channels, st);
  if (dtype == 2) return backward((const Bf16*)dy, (const Bf16*)x, gamma, mean, invstd, (Bf16*)dx, dgamma, dbeta, scratch, planes, elems, channels, st);
  return (int)cudaErrorInvalidValue;
}

}  // extern "C"
