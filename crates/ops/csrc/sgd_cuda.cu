// CUDA kernel of the momentum-SGD step (runtime.cpp, s3ops_sgd_step; S3NET_FUSED_SGD=1):
//
//   v = momentum·v + g;  p −= lr·v
//
// over every parameter of a stack in one pass and one launch, each value read and written once.
// libtorch's multi-tensor ops, which the step runs otherwise, take four passes (v·momentum,
// + g, a temporary lr·v, p − it), 0.97 ms of kernels in three steps of a 16-network bfloat16
// stack on an H200 (2026-11-30, 1.9 % of its GPU time), most of it the free offsets (18 planes
// of 256² per network). The same four roundings in the same order, none contracted into a
// fused multiply-add, so the same bits as those ops.
//
// A block takes 1024 consecutive values of one parameter (256 threads × 4); blocks are
// numbered through the parameters in order (S3SgdTensors::block_start), and a block finds its
// parameter by a scan over at most kSgdMax starts that every thread of it makes alike.

#include <cuda_runtime.h>

#include <cstdint>

#include "kernel_dims.h"
#include "cuda_common.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 4;
constexpr int64_t kPerBlock = kSgdPerBlock;
static_assert(kThreads * kPerThread == kPerBlock, "a block's threads cover its values once");

// Products and sums rounded on their own (nvcc would otherwise fuse v·lr into p − v·lr).
#ifdef __CUDACC__
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
#else
// The emulation: the host compiler builds it for baseline x86-64, which has no fused
// multiply-add to contract into.
template <typename T>
inline T mul_rn(T a, T b) { return a * b; }
template <typename T>
inline T add_rn(T a, T b) { return a + b; }
template <typename T>
inline T sub_rn(T a, T b) { return a - b; }
#endif

template <typename T>
__global__ void __launch_bounds__(kThreads) sgd_kernel(S3SgdTensors t, T lr, T momentum) {
  const int64_t b = blockIdx.x;
  int i = 0;
  while (i + 1 < t.n && t.block_start[i + 1] <= b) ++i;
  T* p = static_cast<T*>(t.p[i]);
  T* v = static_cast<T*>(t.v[i]);
  const T* g = static_cast<const T*>(t.g[i]);
  const int64_t base = (b - t.block_start[i]) * kPerBlock + threadIdx.x;
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int64_t e = base + (int64_t)k * kThreads;
    if (e < t.numel[i]) {
      const T nv = add_rn(mul_rn(v[e], momentum), g[e]);
      v[e] = nv;
      p[e] = sub_rn(p[e], mul_rn(nv, lr));
    }
  }
}

}  // namespace

extern "C" {

// One step over the parameters of `t` (block_start in steps of kSgdPerBlock values; at most
// 2^31 − 1 blocks), dtype 0 float32, 1 float64. lr and momentum are rounded to the parameters' type first,
// as libtorch's ops round a scalar. Returns a cudaError_t (0 = success).
int S3_ENTRY(sgd_step)(int dtype, const S3SgdTensors* t, double lr, double momentum,
                       void* stream) {
  const int64_t blocks = t->block_start[t->n];
  if (t->n <= 0 || blocks == 0) return 0;
  if (t->n > kSgdMax || blocks > 0x7fffffff) return (int)cudaErrorInvalidValue;
  const cudaStream_t st = (cudaStream_t)stream;
  if (dtype == 0) {
    S3_LAUNCH((unsigned)blocks, kThreads, 0, st, sgd_kernel<float>)(*t, (float)lr, (float)momentum);
  } else if (dtype == 1) {
    S3_LAUNCH((unsigned)blocks, kThreads, 0, st, sgd_kernel<double>)(*t, lr, momentum);
  } else {
    return (int)cudaErrorInvalidValue;
  }
  return (int)cudaGetLastError();
}

}  // extern "C"
