// CUDA kernels of the stride-1 depthwise convolution (NCHW, one k×k kernel per channel, any
// padding and dilation): forward, and the two halves of its backward.
//
// Why our own: libtorch's depthwise kernels for these shapes (k = 3…7, dilation up to 3, 256²
// planes) ran an order of magnitude below the GPU's memory bandwidth (H200 profile in
// docs/gpu-checks/2026-11-26-h200-batch), and they are half of a batched fit's step.
//
// Layout of the work. A block of 16×16 threads owns a tile of 64×64 outputs of one plane. It
// first copies the input region the tile reads — (64 + span)² values, span = (k−1)·d, zero
// outside the plane — into shared memory with coalesced loads, several in flight per thread,
// so every input value comes from global memory about once however large the dilated kernel
// is. A thread then owns a strip of 4 neighbouring outputs in each of four rows (ty, ty + 16,
// ty + 32, ty + 48).
//  * correlate: out = bias + Σ_taps w · in. For each kernel row the thread reads the 4 + span
//    region values its strip needs once, as 16-byte loads, and does the k·4 multiply-adds from
//    registers; its k² weights sit in registers too. (The previous kernels, one output per
//    shared load, ran at about a tenth of the GPU's arithmetic rate: H200 profile in
//    docs/gpu-checks/2026-11-26-h200-depthwise.) The input gradient is the same correlation of the
//    output gradient with the flipped kernel and padding (k−1)·d − p (depthwise.cpp flips it).
//  * weight gradient: a block walks two tiles down a column of the plane, each thread adding
//    go · in into k² register sums over its 32 outputs, and go alone into one more (the bias
//    gradient, which thus costs no extra pass over go), then reduces them across the block
//    (warp shuffles, then the 8 warps) and writes one partial per (plane, block, tap) plus the
//    bias's; depthwise.cpp sums the partials with libtorch. No atomics: the result is deterministic.
// The network's geometries — k = 3, 5, 7 with dilations 1, 2, 3 as the I-LKA block uses them —
// are compiled with their kernel size and dilation fixed (the strips' register indices must be
// known at compile time); any other geometry runs a generic kernel reading shared memory tap
// by tap.
// bfloat16 planes are read and written as such, but the shared tile, the sums and the weight
// gradient's partials are float32: a 16-bit kernel with 16-bit sums would lose the taps' low
// bits. This file includes no torch header, and not cuda_bf16.h either (it needs CCCL headers
// the PyPI nvcc lacks): bfloat16 is its bits (cuda_common.cuh), so nvcc only needs the CUDA
// runtime headers.
// Planes need not be contiguous: S3DepthwiseDims can place them in groups (the I-LKA block's
// branches write, and read their gradients from, slices of one concatenated tensor), and the
// correlation can add to what its output holds (the branches' input gradients summed in place).
// depthwise.cpp's BranchesFn uses both.

#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kernel_dims.h"
#include "cuda_common.cuh"

namespace {

constexpr int kTW = 64;                 // outputs per tile row
constexpr int kTH = 64;                 // output rows per tile
constexpr int kBX = 16, kBY = 16;       // block: kBX × kBY threads
constexpr int kThreads = kBX * kBY;
constexpr int kStrip = kTW / kBX;       // outputs per thread and row (4)
constexpr int kRowsPer = kTH / kBY;     // rows per thread (4: ty, ty + kBY, …)
constexpr int kWarps = kThreads / 32;
constexpr int kWgTiles = 2;             // tiles a weight-gradient block walks down a column

// Shared-memory row length of the region: the tile's width plus the span, rounded up to whole
// 16-byte groups so that every strip's reads stay inside the row.
__host__ __device__ __forceinline__ int region_row(int span) { return (kTW + span + 3) / 4 * 4; }

struct Tile {
  int64_t plane;  // plane index
  int y0, x0;     // first output row / column of the block's (first) tile
  int span;       // (k − 1)·d
  int rw;         // region row length in shared memory
};

// Offset of plane q's first element (see S3DepthwiseDims: contiguous, or in groups).
__device__ __forceinline__ int64_t plane_at(int64_t q, int64_t group, int64_t gstride,
                                            int64_t elems) {
  return group > 0 ? (q / group) * gstride + (q % group) * elems : q * elems;
}
__device__ __forceinline__ int64_t in_plane(const S3DepthwiseDims& d, int64_t q) {
  return plane_at(q, d.in_group, d.in_gstride, d.H * d.W);
}
__device__ __forceinline__ int64_t out_plane(const S3DepthwiseDims& d, int64_t q) {
  return plane_at(q, d.out_group, d.out_gstride, d.Ho * d.Wo);
}

// Block → (plane, tile). `rows` output rows per block: kTH for the correlation, kTH·kWgTiles
// for the weight gradient.
__device__ __forceinline__ Tile tile_of(const S3DepthwiseDims& d, int rows) {
  const int64_t tx = (d.Wo + kTW - 1) / kTW, ty = (d.Ho + rows - 1) / rows;
  const int64_t b = blockIdx.x, per_plane = tx * ty;
  const int64_t t = b % per_plane;
  Tile g;
  g.plane = b / per_plane;
  g.y0 = (int)((t / tx) * rows);
  g.x0 = (int)((t % tx) * kTW);
  g.span = (int)((d.k - 1) * d.d);
  g.rw = region_row(g.span);
  return g;
}

// Copies the input region of the kTH output rows from y0 (origin (y0 − p, x0 − p), (kTH + span)
// rows of g.rw values) into `s`, widened to the sums' type, zeros outside the plane. RW: the
// row length when known at compile time (0: g.rw). Each thread issues kBatch independent
// global loads before it stores any: one load, then its store, at a time left the kernels
// waiting on memory latency (H200, docs/gpu-checks/2026-11-26-h200-depthwise).
constexpr int kBatch = 8;
template <int RW, typename S, typename A>
__device__ __forceinline__ void load_region(const S3DepthwiseDims& d, const Tile& g, int y0,
                                            const S* __restrict__ src, A* s) {
  const int tid = threadIdx.y * kBX + threadIdx.x;
  const int rw = RW > 0 ? RW : g.rw, n = (kTH + g.span) * rw;
  const int H = (int)d.H, W = (int)d.W, oy = y0 - (int)d.p, ox = g.x0 - (int)d.p;
  for (int base = 0; base < n; base += kBatch * kThreads) {
    A v[kBatch];
#pragma unroll
    for (int e = 0; e < kBatch; ++e) {
      const int i = base + e * kThreads + tid;
      const int y = oy + i / rw, x = ox + i % rw;
      v[e] = (i < n && y >= 0 && y < H && x >= 0 && x < W) ? widen(src[(int64_t)y * W + x]) : A(0);
    }
#pragma unroll
    for (int e = 0; e < kBatch; ++e) {
      const int i = base + e * kThreads + tid;
      if (i < n) s[i] = v[e];
    }
  }
}

// The N values of `p` (16-byte aligned when A is float) into registers.
template <int N, typename A>
__device__ __forceinline__ void load_strip(const A* p, A (&v)[N]) {
  static_assert(N % 4 == 0, "strips are read in groups of four");
  if constexpr (std::is_same<A, float>::value) {
#pragma unroll
    for (int c = 0; c < N / 4; ++c) {
      const float4 f = reinterpret_cast<const float4*>(p)[c];
      v[4 * c] = f.x;
      v[4 * c + 1] = f.y;
      v[4 * c + 2] = f.z;
      v[4 * c + 3] = f.w;
    }
  } else {
#pragma unroll
    for (int c = 0; c < N; ++c) v[c] = p[c];
  }
}

// Writes a thread's strip of kStrip outputs of one row (added to what is there when `add`):
// one vector access when the strip lies inside the plane and is aligned for it, else element
// by element up to the plane's edge.
template <typename S, typename A>
__device__ __forceinline__ void store_strip(S* row, int x, int Wo, const A (&acc)[kStrip],
                                            bool add) {
  S v[kStrip];
  S* o = row + x;
  constexpr int bytes = (int)sizeof(S) * kStrip;
  if constexpr (bytes == 16 || bytes == 8) {
    using V = typename std::conditional<bytes == 16, uint4, uint2>::type;
    if (x + kStrip <= Wo && (reinterpret_cast<uintptr_t>(o) % bytes) == 0) {
      V pack;
      static_assert(sizeof(V) == sizeof(v), "a strip is one vector");
      if (add) {
        pack = *reinterpret_cast<const V*>(o);
        memcpy(v, &pack, sizeof(V));
#pragma unroll
        for (int q = 0; q < kStrip; ++q) v[q] = store_as<S>(widen(v[q]) + acc[q]);
      } else {
#pragma unroll
        for (int q = 0; q < kStrip; ++q) v[q] = store_as<S>(acc[q]);
      }
      memcpy(&pack, v, sizeof(V));
      *reinterpret_cast<V*>(o) = pack;
      return;
    }
  }
#pragma unroll
  for (int q = 0; q < kStrip; ++q)
    if (x + q < Wo) o[q] = store_as<S>(add ? widen(o[q]) + acc[q] : acc[q]);
}

// For each kernel row i, the kLen region values the thread's strip in tile row `oy` reads
// (registers `v`), handed to `use(i, v)`: the inner loop both fixed kernels share.
template <int KS, int DIL, int kLen, typename T, typename F>
__device__ __forceinline__ void for_each_kernel_row(const T* region, int rw, int oy, int cx,
                                                    F&& use) {
#pragma unroll
  for (int i = 0; i < KS; ++i) {
    T v[kLen];
    load_strip<kLen>(region + (oy + i * DIL) * rw + cx, v);
    use(i, v);
  }
}

// Channel c's KS² weights into registers `wr`, widened; returns its bias (0 without one).
template <int KS, typename S, typename T>
__device__ __forceinline__ T channel_taps(const S* __restrict__ w, const S* __restrict__ bias,
                                          int64_t c, T (&wr)[KS * KS]) {
#pragma unroll
  for (int t = 0; t < KS * KS; ++t) wr[t] = widen(w[c * KS * KS + t]);
  return bias ? widen(bias[c]) : T(0);
}

// Two layouts of a tile's work among its threads, for the geometries compiled with KS and DIL
// fixed (dims.columns picks one):
//  * strips: each thread 4 neighbouring outputs in each of 4 rows. Per kernel row it reads the
//    4 + span region values of its strip as 16-byte loads (a warp's takes 4 shared-memory
//    cycles) for 4·k multiply-adds: these reads bound the kernels (six loads per 28
//    multiply-adds in the 7×7 one; H100 profile in docs/gpu-checks/2026-11-27-h100-fusions);
//  * columns: each thread kColRows outputs down one column. A kernel column's kColRows + span
//    values, read once (4 bytes per lane, a warp's lanes 32 neighbouring columns: one cycle),
//    serve all k of its rows: 34 reads per 112 multiply-adds in the 7×7 one, 2.8× fewer read
//    cycles per multiply-add. Sums run in another order (same values up to rounding).
constexpr int kColRows = 16;  // outputs per thread down its column
static_assert(kThreads == kTW * (kTH / kColRows), "a block's threads cover its tile's columns");

// The thread's column (0…kTW−1) and first row within the tile, in the column layout.
__device__ __forceinline__ int column_x() { return (int)((threadIdx.y * kBX + threadIdx.x) % kTW); }
__device__ __forceinline__ int column_y() {
  return (int)((threadIdx.y * kBX + threadIdx.x) / kTW) * kColRows;
}

// For each kernel column j, the kColRows + span region values of the thread's column
// (registers `v`), handed to `use(j, v)`: the column layout's inner loop.
template <int KS, int DIL, int kRW, typename T, typename F>
__device__ __forceinline__ void for_each_kernel_column(const T* region, int oy, int cx, F&& use) {
  constexpr int kLen = kColRows + (KS - 1) * DIL;
#pragma unroll
  for (int j = 0; j < KS; ++j) {
    T v[kLen];
    const T* col = region + oy * kRW + cx + j * DIL;
#pragma unroll
    for (int r = 0; r < kLen; ++r) v[r] = col[r * kRW];
    use(j, v);
  }
}

// Correlation with the kernel size KS and dilation DIL fixed at compile time, in either layout.
template <typename S, int KS, int DIL, bool COLUMNS, typename T = typename Acc<S>::type>
__global__ void __launch_bounds__(kThreads)
    correlate_fixed(S3DepthwiseDims d, const S* __restrict__ in, const S* __restrict__ w,
                    const S* __restrict__ bias, S* __restrict__ out) {
  constexpr int kSpan = (KS - 1) * DIL;
  constexpr int kRW = (kTW + kSpan + 3) / 4 * 4;  // region_row(kSpan)
  S3_DYNAMIC_SHARED(smem);
  T* region = reinterpret_cast<T*>(smem);
  const Tile g = tile_of(d, kTH);
  T wr[KS * KS];
  const T b0 = channel_taps<KS>(w, bias, g.plane % d.C, wr);
  load_region<kRW>(d, g, g.y0, in + in_plane(d, g.plane), region);
  __syncthreads();
  S* plane_out = out + out_plane(d, g.plane);
  const bool add = d.accumulate != 0;
  if constexpr (COLUMNS) {
    constexpr int kLen = kColRows + kSpan;
    const int cx = column_x(), oy = column_y();
    T acc[kColRows];
#pragma unroll
    for (int q = 0; q < kColRows; ++q) acc[q] = b0;
    for_each_kernel_column<KS, DIL, kRW>(region, oy, cx, [&](int j, const T(&v)[kLen]) {
#pragma unroll
      for (int i = 0; i < KS; ++i)
#pragma unroll
        for (int q = 0; q < kColRows; ++q) acc[q] += wr[i * KS + j] * v[q + i * DIL];
    });
    const int x = g.x0 + cx;
    if (x >= d.Wo) return;  // no barrier follows
#pragma unroll
    for (int q = 0; q < kColRows; ++q) {
      S* o = plane_out + (int64_t)(g.y0 + oy + q) * d.Wo + x;
      if (g.y0 + oy + q < d.Ho) *o = store_as<S>(add ? widen(*o) + acc[q] : acc[q]);
    }
  } else {
    constexpr int kLen = (kStrip + kSpan + 3) / 4 * 4;  // region values a strip row reads
    const int cx = threadIdx.x * kStrip;
#pragma unroll
    for (int rr = 0; rr < kRowsPer; ++rr) {
      const int oy = threadIdx.y + rr * kBY;
      T acc[kStrip];
#pragma unroll
      for (int q = 0; q < kStrip; ++q) acc[q] = b0;
      for_each_kernel_row<KS, DIL, kLen>(region, g.rw, oy, cx, [&](int i, const T(&v)[kLen]) {
#pragma unroll
        for (int j = 0; j < KS; ++j)
#pragma unroll
          for (int q = 0; q < kStrip; ++q) acc[q] += wr[i * KS + j] * v[j * DIL + q];
      });
      const int y = g.y0 + oy;
      if (y < d.Ho) store_strip(plane_out + (int64_t)y * d.Wo, g.x0 + cx, (int)d.Wo, acc, add);
    }
  }
}

// Any other kernel size and dilation: the same tiles, taps read from shared memory.
template <typename S, typename T = typename Acc<S>::type>
__global__ void __launch_bounds__(kThreads)
    correlate_any(S3DepthwiseDims d, const S* __restrict__ in, const S* __restrict__ w,
                  const S* __restrict__ bias, S* __restrict__ out) {
  S3_DYNAMIC_SHARED(smem);
  T* region = reinterpret_cast<T*>(smem);
  const Tile g = tile_of(d, kTH);
  const int k = (int)d.k, kk = k * k, dil = (int)d.d;
  const int rows = kTH + g.span;
  T* sw = region + rows * g.rw;
  const int64_t c = g.plane % d.C;
  const int tid = threadIdx.y * kBX + threadIdx.x;
  for (int i = tid; i < kk; i += kThreads) sw[i] = widen(w[c * kk + i]);
  load_region<0>(d, g, g.y0, in + in_plane(d, g.plane), region);
  __syncthreads();
  const T b0 = bias ? widen(bias[c]) : T(0);
  const int cx = threadIdx.x * kStrip;
  S* plane_out = out + out_plane(d, g.plane);
  const bool add = d.accumulate != 0;
  for (int rr = 0; rr < kRowsPer; ++rr) {
    const int oy = threadIdx.y + rr * kBY;
    T acc[kStrip];
#pragma unroll
    for (int q = 0; q < kStrip; ++q) acc[q] = b0;
    for (int i = 0; i < k; ++i) {
      const T* s = region + (oy + i * dil) * g.rw + cx;
      for (int j = 0; j < k; ++j) {
        const T wv = sw[i * k + j];
#pragma unroll
        for (int q = 0; q < kStrip; ++q) acc[q] += wv * s[j * dil + q];
      }
    }
    const int y = g.y0 + oy;
    if (y < d.Ho) store_strip(plane_out + (int64_t)y * d.Wo, g.x0 + cx, (int)d.Wo, acc, add);
  }
}

// The thread's strip of output gradients in row y (zeros outside the plane).
template <typename S, typename T>
__device__ __forceinline__ void grad_strip(const S* __restrict__ gp, const S3DepthwiseDims& d,
                                           int y, int x, T (&g)[kStrip]) {
#pragma unroll
  for (int q = 0; q < kStrip; ++q)
    g[q] = (y < d.Ho && x + q < d.Wo) ? widen(gp[(int64_t)y * d.Wo + x + q]) : T(0);
}

// The block's partials from its warps' sums (`red`: kWarps × taps, after a barrier): one
// value per tap, written at this block's row of `partial`.
template <typename T>
__device__ __forceinline__ void write_partials(const T* red, int taps, T* __restrict__ partial) {
  const int tid = threadIdx.y * kBX + threadIdx.x;
  for (int t = tid; t < taps; t += kThreads) {
    T v = T(0);
#pragma unroll
    for (int q = 0; q < kWarps; ++q) v += red[q * taps + t];
    partial[(int64_t)blockIdx.x * taps + t] = v;
  }
}

// Adds the block's sums (one per thread and tap, `acc`) across the block and writes them as
// this block's partials. `red` holds kWarps × KK sums.
template <int KK, typename T>
__device__ __forceinline__ void block_partials(const T (&acc)[KK], T* red,
                                               T* __restrict__ partial) {
  const int tid = threadIdx.y * kBX + threadIdx.x, warp = tid / 32, lane = tid % 32;
#pragma unroll
  for (int t = 0; t < KK; ++t) {
    const T v = warp_sum(acc[t]);
    if (lane == 0) red[warp * KK + t] = v;
  }
  __syncthreads();
  write_partials(red, KK, partial);
}

// partial[(plane · blocks + block) · (k² + 1) + tap] = Σ over the block's outputs of go · in at
// the tap, and at tap k² Σ go, in the sums' type T; KS and DIL fixed at compile time, in either
// layout (see correlate_fixed).
template <typename S, int KS, int DIL, bool COLUMNS, typename T = typename Acc<S>::type>
__global__ void __launch_bounds__(kThreads, 2)
    weight_grad_fixed(S3DepthwiseDims d, const S* __restrict__ in, const S* __restrict__ go,
                      T* __restrict__ partial) {
  constexpr int kSpan = (KS - 1) * DIL, kK = KS * KS;
  constexpr int kRW = (kTW + kSpan + 3) / 4 * 4;
  S3_DYNAMIC_SHARED(smem);
  T* region = reinterpret_cast<T*>(smem);
  const Tile g = tile_of(d, kTH * kWgTiles);
  T* red = region + (kTH + kSpan) * g.rw;
  const S* src = in + in_plane(d, g.plane);
  const S* gp = go + out_plane(d, g.plane);
  T acc[kK + 1];
#pragma unroll
  for (int t = 0; t <= kK; ++t) acc[t] = T(0);
  for (int tile = 0; tile < kWgTiles; ++tile) {
    const int y0 = g.y0 + tile * kTH;
    if (y0 >= d.Ho) break;  // the same for the whole block
    if (tile > 0) __syncthreads();  // everyone is done with the previous region
    load_region<kRW>(d, g, y0, src, region);
    __syncthreads();
    if constexpr (COLUMNS) {
      constexpr int kLen = kColRows + kSpan;
      const int cx = column_x(), oy = column_y(), x = g.x0 + cx;
      T gv[kColRows];
#pragma unroll
      for (int q = 0; q < kColRows; ++q) {
        const int64_t y = y0 + oy + q;
        gv[q] = (y < d.Ho && x < d.Wo) ? widen(gp[y * d.Wo + x]) : T(0);
        acc[kK] += gv[q];
      }
      for_each_kernel_column<KS, DIL, kRW>(region, oy, cx, [&](int j, const T(&v)[kLen]) {
#pragma unroll
        for (int i = 0; i < KS; ++i)
#pragma unroll
          for (int q = 0; q < kColRows; ++q) acc[i * KS + j] += gv[q] * v[q + i * DIL];
      });
    } else {
      constexpr int kLen = (kStrip + kSpan + 3) / 4 * 4;
      const int cx = threadIdx.x * kStrip;
#pragma unroll
      for (int rr = 0; rr < kRowsPer; ++rr) {
        const int oy = threadIdx.y + rr * kBY;
        T gv[kStrip];
        grad_strip(gp, d, y0 + oy, g.x0 + cx, gv);
#pragma unroll
        for (int q = 0; q < kStrip; ++q) acc[kK] += gv[q];
        for_each_kernel_row<KS, DIL, kLen>(region, g.rw, oy, cx, [&](int i, const T(&v)[kLen]) {
#pragma unroll
          for (int j = 0; j < KS; ++j)
#pragma unroll
            for (int q = 0; q < kStrip; ++q) acc[i * KS + j] += gv[q] * v[j * DIL + q];
        });
      }
    }
  }
  block_partials(acc, red, partial);
}

// Any other kernel size and dilation, the same partials. k² is not known at compile time, so
// each warp reduces a tap at a time and keeps its running sums in shared memory.
template <typename S, typename T = typename Acc<S>::type>
__global__ void __launch_bounds__(kThreads)
    weight_grad_any(S3DepthwiseDims d, const S* __restrict__ in, const S* __restrict__ go,
                    T* __restrict__ partial) {
  S3_DYNAMIC_SHARED(smem);
  T* region = reinterpret_cast<T*>(smem);
  const Tile g = tile_of(d, kTH * kWgTiles);
  const int k = (int)d.k, kk = k * k, dil = (int)d.d;
  const int taps = kk + 1;                  // the kernel's, then the bias's
  T* red = region + (kTH + g.span) * g.rw;  // kWarps × taps
  const S* src = in + in_plane(d, g.plane);
  const S* gp = go + out_plane(d, g.plane);
  const int cx = threadIdx.x * kStrip, tid = threadIdx.y * kBX + threadIdx.x;
  const int warp = tid / 32, lane = tid % 32;
  // Per tap, each warp's running sum (lane 0 keeps it), reset here.
  for (int t = tid; t < kWarps * taps; t += kThreads) red[t] = T(0);
  for (int tile = 0; tile < kWgTiles; ++tile) {
    const int y0 = g.y0 + tile * kTH;
    if (y0 >= d.Ho) break;
    __syncthreads();
    load_region<0>(d, g, y0, src, region);
    __syncthreads();
    T gv[kRowsPer][kStrip];
#pragma unroll
    for (int rr = 0; rr < kRowsPer; ++rr)
      grad_strip(gp, d, y0 + threadIdx.y + rr * kBY, g.x0 + cx, gv[rr]);
    for (int t = 0; t < taps; ++t) {
      T v = T(0);
      if (t < kk) {
        const int i = t / k, j = t % k;
#pragma unroll
        for (int rr = 0; rr < kRowsPer; ++rr) {
          const T* s = region + (threadIdx.y + rr * kBY + i * dil) * g.rw + cx + j * dil;
#pragma unroll
          for (int q = 0; q < kStrip; ++q) v += gv[rr][q] * s[q];
        }
      } else {
#pragma unroll
        for (int rr = 0; rr < kRowsPer; ++rr)
#pragma unroll
          for (int q = 0; q < kStrip; ++q) v += gv[rr][q];
      }
      v = warp_sum(v);
      if (lane == 0) red[warp * taps + t] += v;
    }
  }
  __syncthreads();
  write_partials(red, taps, partial);
}

int64_t correlate_tiles(const S3DepthwiseDims& d) {
  return ((d.Ho + kTH - 1) / kTH) * ((d.Wo + kTW - 1) / kTW);
}

int64_t weight_grad_blocks(const S3DepthwiseDims& d) {
  const int64_t rows = kTH * kWgTiles;
  return ((d.Ho + rows - 1) / rows) * ((d.Wo + kTW - 1) / kTW);
}

size_t region_bytes(const S3DepthwiseDims& d, size_t elem) {
  const int64_t span = (d.k - 1) * d.d;
  return (size_t)((kTH + span) * region_row((int)span)) * elem;
}

size_t correlate_shared(const S3DepthwiseDims& d, size_t elem) {
  return region_bytes(d, elem) + (size_t)(d.k * d.k) * elem;
}

size_t weight_grad_shared(const S3DepthwiseDims& d, size_t elem) {
  return region_bytes(d, elem) + (size_t)(kWarps * (d.k * d.k + 1)) * elem;
}

// The geometries compiled with their kernel size and dilation fixed (the I-LKA block's); the
// rest run the *_any kernels.
#define S3_DW_FIXED_CASES(X) X(3, 1) X(5, 1) X(5, 2) X(7, 3)

template <typename T>
int launch_correlate(const S3DepthwiseDims& d, const T* in, const T* w, const T* bias, T* out,
                     cudaStream_t st) {
  using A = typename Acc<T>::type;
  const size_t shm = correlate_shared(d, sizeof(A));
  const dim3 block(kBX, kBY);
  const unsigned grid = (unsigned)(d.N * d.C * correlate_tiles(d));
#define S3_CASE(K, D)                                                                      \
  if (d.k == K && d.d == D) {                                                              \
    if (d.columns) {                                                                       \
      S3_LAUNCH(grid, block, shm, st, correlate_fixed<T, K, D, true>)(d, in, w, bias, out); \
    } else {                                                                               \
      S3_LAUNCH(grid, block, shm, st, correlate_fixed<T, K, D, false>)(d, in, w, bias, out); \
    }                                                                                      \
    return (int)cudaGetLastError();                                                        \
  }
  S3_DW_FIXED_CASES(S3_CASE)
#undef S3_CASE
  S3_LAUNCH(grid, block, shm, st, correlate_any<T>)(d, in, w, bias, out);
  return (int)cudaGetLastError();
}

template <typename T>
int launch_weight_grad(const S3DepthwiseDims& d, const T* in, const T* go,
                       typename Acc<T>::type* partial, cudaStream_t st) {
  using A = typename Acc<T>::type;
  const size_t shm = weight_grad_shared(d, sizeof(A));
  const dim3 block(kBX, kBY);
  const unsigned grid = (unsigned)(d.N * d.C * weight_grad_blocks(d));
#define S3_CASE(K, D)                                                                  \
  if (d.k == K && d.d == D) {                                                          \
    if (d.columns) {                                                                   \
      S3_LAUNCH(grid, block, shm, st, weight_grad_fixed<T, K, D, true>)(d, in, go, partial); \
    } else {                                                                           \
      S3_LAUNCH(grid, block, shm, st, weight_grad_fixed<T, K, D, false>)(d, in, go, partial); \
    }                                                                                  \
    return (int)cudaGetLastError();                                                    \
  }
  S3_DW_FIXED_CASES(S3_CASE)
#undef S3_CASE
  S3_LAUNCH(grid, block, shm, st, weight_grad_any<T>)(d, in, go, partial);
  return (int)cudaGetLastError();
}

}  // namespace

extern "C" {

// Partials per plane of the weight gradient: its partials are (N·C·this, k² + 1), the last
// column the bias gradient's.
int64_t S3_ENTRY(dw_partials_per_plane)(const S3DepthwiseDims* d) { return weight_grad_blocks(*d); }

// Blocks per plane of the larger of the two kernels' grids, so depthwise.cpp can keep the grid 1-D.
int64_t S3_ENTRY(dw_blocks_per_plane)(const S3DepthwiseDims* d) { return correlate_tiles(*d); }

// Shared memory one block needs (the larger of the two kernels), so depthwise.cpp can decline shapes
// whose dilated kernel does not fit (48 KiB without opting in) and use libtorch's instead.
// `elem`: bytes of the sums' type (4 for float32 and bfloat16, 8 for float64).
int64_t S3_ENTRY(dw_shared_bytes)(const S3DepthwiseDims* d, int64_t elem) {
  const size_t a = correlate_shared(*d, (size_t)elem), b = weight_grad_shared(*d, (size_t)elem);
  return (int64_t)(a > b ? a : b);
}

// dtype: 0 = float32, 1 = float64, 2 = bfloat16. Device pointers of contiguous tensors; bias
// may be null; `stream` is a cudaStream_t. Returns a cudaError_t (0 = success;
// cudaErrorInvalidValue for another dtype code).
int S3_ENTRY(dw_correlate)(int dtype, const S3DepthwiseDims* d, const void* in, const void* w,
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
int S3_ENTRY(dw_weight_grad)(int dtype, const S3DepthwiseDims* d, const void* in,
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
