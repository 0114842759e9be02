// What the CUDA files share (in an anonymous namespace: each object file has its own copy):
//  * storage types and the types they add in: float32, float64, and bfloat16 as its bits
//    (cuda_bf16.h needs CCCL headers the PyPI nvcc lacks), widened to float32 for arithmetic
//    and rounded back the way libtorch's c10::BFloat16 rounds;
//  * 16-byte vectors of a storage type, and whether a plane can be read as such;
//  * a warp's sum, and the grid rows for a count of planes;
//  * the launch, shared-memory and entry-point macros that let simt.h run them on a CPU.
#pragma once
#include <cuda_runtime.h>

// How a kernel is launched, where a kernel's dynamic shared memory is and what the entry points
// are called: CUDA's own syntax under nvcc; simt.h (the CPU emulation the tests run) defines
// its own before this file is read.
#ifndef S3_LAUNCH
#define S3_LAUNCH(grid, block, shm, stream, ...) __VA_ARGS__<<<grid, block, shm, stream>>>
#endif
#ifndef S3_DYNAMIC_SHARED
#define S3_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif
#ifndef S3_ENTRY
#define S3_ENTRY(name) s3ops_cuda_##name
#endif

#include <cstdint>

namespace {

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

// Values per 16-byte vector of storage type S.
template <typename S>
__host__ __device__ constexpr int vec_len() {
  return 16 / (int)sizeof(S);
}

template <typename S>
struct alignas(16) Vec {
  S v[vec_len<S>()];
};

// Whether planes of `elems` values from `p` can be read as whole 16-byte vectors.
inline bool vectorised(const void* p, int64_t elems, int64_t elem_size) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && elems % (16 / elem_size) == 0;
}

// Grid rows (blockIdx.y) for n planes: at most CUDA's 65535, the kernels stride over the rest.
inline unsigned grid_rows(int64_t n) { return (unsigned)(n < 65535 ? (n > 0 ? n : 1) : 65535); }

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

}  // namespace
