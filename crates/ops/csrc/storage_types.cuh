// Storage types of the CUDA kernels and the types they add in: float32, float64, and bfloat16
// as its bits (cuda_bf16.h needs CCCL headers the PyPI nvcc lacks), widened to float32 for
// arithmetic and rounded back the way libtorch's c10::BFloat16 rounds. Shared by the .cu files
// (in an anonymous namespace: each object file has its own copy).
#pragma once
#include <cuda_runtime.h>

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

}  // namespace
