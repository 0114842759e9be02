// What the ops' translation units share (csrc/*.cpp): the libtorch headers, the CPU feature
// checks, the table of CUDA kernels (the GPU's or simt.h's emulation) and how a tensor picks
// its path, the process-wide kernel switches, the bias and gate kernels' host side, and the C
// boundary's error handling. Everything is in namespace s3ops; each op's file keeps its own
// helpers in an unnamed namespace inside it and its C entry points at the end.
//
// Portability: the ops are compiled with plain -O3 (no -march). The hot per-plane loops are
// instantiated twice, once for baseline x86-64 and once with target("avx2,fma"), and picked at
// run time with __builtin_cpu_supports. at::parallel_for expands to `#pragma omp parallel` in
// this libtorch build (OpenMP backend), hence -fopenmp.

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/csrc/autograd/custom_function.h>

#ifdef S3OPS_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "kernel_dims.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

#define S3_INLINE inline __attribute__((always_inline))
#define S3_AVX2 __attribute__((target("avx2,fma")))
#define S3_AVX512 __attribute__((target("avx2,fma,avx512f,avx512vl")))

namespace s3ops {


// bfloat16 or float16.
inline bool is_half_width(const at::Tensor& t) {
  return t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf;
}

inline bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  // S3OPS_NO_AVX2=1 forces the baseline x86-64 code path (to test it on AVX2 machines).
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          std::getenv("S3OPS_NO_AVX2") == nullptr;
  return has;
#else
  return false;
#endif
}

// AVX-512 with 32 vector registers (AVX512VL lets 256-bit code use all of them): the 1×1 conv's
// register tile needs more than AVX2's 16. Off wherever AVX2 is (S3OPS_NO_AVX2=1 included), and
// with S3OPS_NO_AVX512=1, to test the AVX2 path on such a machine.
inline bool cpu_has_avx512() {
#if defined(__x86_64__)
  static const bool has = cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512vl") &&
                          std::getenv("S3OPS_NO_AVX512") == nullptr;
  return has;
#else
  return false;
#endif
}


// B bytes of T, one register (32 for AVX2, 16 for the baseline SSE2 path), loadable and
// storable at any address aligned for T.
template <typename T, int B>
struct Vec {
  typedef T type __attribute__((vector_size(B), aligned(sizeof(T))));
  static constexpr int lanes = B / sizeof(T);
};

}  // namespace s3ops

extern "C" {
#define S3_KERNEL(R, name, params) R s3ops_simt_##name params;
#include "kernel_entries.h"
#undef S3_KERNEL
#ifdef S3OPS_CUDA
#define S3_KERNEL(R, name, params) R s3ops_cuda_##name params;
#include "kernel_entries.h"
#undef S3_KERNEL
#endif
}

namespace s3ops {

// The kernels of csrc/*_cuda.cu: built by nvcc for the GPU, and by the host compiler on simt.h's
// emulation, which runs them on the CPU for the tests of a machine without a GPU.
struct Kernels {
#define S3_KERNEL(R, name, params) R(*name) params;
#include "kernel_entries.h"
#undef S3_KERNEL
};
inline const Kernels kSimtKernels = {
#define S3_KERNEL(R, name, params) &s3ops_simt_##name,
#include "kernel_entries.h"
#undef S3_KERNEL
};
#ifdef S3OPS_CUDA
inline const Kernels kCudaKernels = {
#define S3_KERNEL(R, name, params) &s3ops_cuda_##name,
#include "kernel_entries.h"
#undef S3_KERNEL
};
#endif

// Whether this thread runs the ops' CUDA paths on CPU tensors, with the kernels emulated
// (s3ops_set_simt). Per thread, so a test can compare both paths, and other tests running at
// the same time are not touched. Autograd runs a CPU graph's backward on the calling thread.
inline thread_local bool t_simt = false;

// Whether `t` takes the ops' kernel path: a CUDA tensor, or a CPU tensor on a thread that
// emulates the kernels.
inline bool on_kernels(const at::Tensor& t) {
#ifdef S3OPS_CUDA
  if (t.is_cuda()) return true;
#endif
  return t_simt && t.device().is_cpu();
}

// Whether `t` takes the CPU kernels that stand beside the GPU ones (PointwiseFn's, PlaneNormFn's):
// a CPU tensor off the emulated GPU paths, float32 or float64.
inline bool cpu_kernels_take(const at::Tensor& t) {
  return t.device().is_cpu() && !on_kernels(t) &&
         (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble);
}

// The kernels that run on `t`'s device: the GPU's, or the emulation's for CPU tensors.
inline const Kernels& kernels(const at::Tensor& t) {
#ifdef S3OPS_CUDA
  if (t.is_cuda()) return kCudaKernels;
#endif
  return kSimtKernels;
}

// Makes `t`'s GPU the current one for the kernels that follow (c10::cuda::CUDAGuard); nothing
// for CPU tensors.
class KernelGuard {
 public:
  explicit KernelGuard(const at::Tensor& t) {
#ifdef S3OPS_CUDA
    if (t.is_cuda()) guard_.emplace(t.device());
#else
    (void)t;
#endif
  }

 private:
#ifdef S3OPS_CUDA
  std::optional<c10::cuda::CUDAGuard> guard_;
#endif
};

#ifdef S3OPS_CUDA
inline cudaStream_t current_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}
#endif

// The stream the kernels run on for `t`: the current CUDA stream of its GPU; none (null) for the
// emulation.
inline void* kernel_stream(const at::Tensor& t) {
#ifdef S3OPS_CUDA
  if (t.is_cuda()) return current_stream(t);
#endif
  (void)t;
  return nullptr;
}

// A process-wide on/off setting for a kernel choice: its default unless its environment
// variable is "1" (on) or "0" (off), read at first use, or set.
class Switch {
 public:
  constexpr Switch(const char* var, bool by_default) : var_(var), default_(by_default) {}
  bool on() {
    int v = state_.load(std::memory_order_relaxed);
    if (v < 0) {
      const char* e = std::getenv(var_);
      const bool want = e && std::strcmp(e, "1") == 0   ? true
                        : e && std::strcmp(e, "0") == 0 ? false
                                                        : default_;
      int unset = -1;
      // Another thread may have decided meanwhile: keep theirs.
      state_.compare_exchange_strong(unset, want ? 1 : 0);
      v = state_.load(std::memory_order_relaxed);
    }
    return v == 1;
  }
  void set(bool on) { state_.store(on ? 1 : 0); }

 private:
  const char* var_;
  bool default_;
  std::atomic<int> state_{-1};  // -1: not read yet
};

// The settings s3ops_switch reads and sets, by index: pixel_losses' CUDA kernel (read by the
// Rust side before it calls the op; on: 13 % more bfloat16 and 8 % more float32 batched fits per
// second on an H200, 2026-11-28), the depthwise CUDA kernels' column layout for the I-LKA
// block's geometries (S3DepthwiseDims::columns; see depthwise_cuda.cu; off: 1.4 % slower in
// bfloat16 and no faster in float32 there), and the split reductions' own kernel in place of
// cuBLAS's chunk products for 32- and 64-bit operands when their layout is left to choose
// (gemm_nt_split_k; split_k_cuda.cu; on: 5–6 % more float32 fits per second, while for bfloat16
// it was 10–12 % slower than the strided GEMMs, which auto keeps for 16-bit operands).
// The fourth: the I-LKA block's gate and residual add folded into the 1×1 convs before them
// (PointwiseFn's epilogue), read by the Rust side; the same bits either way, and 1.00–1.02 times
// the unfused ops' fits per second on an H200 (2026-11-30).
// The fifth: the momentum-SGD step as one kernel of our own (sgd_cuda.cu) instead of libtorch's
// multi-tensor ops; the same bits; off until a GPU has timed it. The sixth: a stack's stem as
// im2col's columns and a stacked 1×1 conv (PointwiseFn), read by the Rust side; off until timed.
inline Switch g_switches[] = {Switch("S3NET_CUDA_PIXEL_LOSSES", true), Switch("S3NET_DW_COLUMNS", false),
                       Switch("S3NET_SPLIT_K_KERNEL", true), Switch("S3NET_FUSED_EPILOGUES", true),
                       Switch("S3NET_FUSED_SGD", false), Switch("S3NET_STEM_COLUMNS", false)};
inline constexpr int kSwitchDwColumns = 1, kSwitchSplitKKernel = 2, kSwitchFusedSgd = 4;

// The depthwise kernels' dtype code, and the type they add in (float32 for bfloat16).
inline int dw_cuda_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? 1 : t.scalar_type() == at::kBFloat16 ? 2 : 0;
}
// Whether the kernels take `t`: on their path (on_kernels) and float32, float64 or bfloat16,
// the types dw_cuda_dtype codes.
inline bool kernels_take(const at::Tensor& t) {
  const auto k = t.scalar_type();
  return on_kernels(t) && (k == at::kFloat || k == at::kDouble || k == at::kBFloat16);
}
inline at::ScalarType dw_sum_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Turns a kernel launcher's status into an exception naming the op and the kernel (`t`: a tensor
// on the device it ran for).
inline void kernel_check(const char* op, int rc, const char* what, const at::Tensor& t) {
  TORCH_CHECK(rc == 0, op, ": ", t.is_cuda() ? "CUDA " : "emulated CUDA ", what,
              " kernel failed: ", kernels(t).error_string(rc));
}

// Whether the bias kernels (bias_cuda.cu) take this tensor: on the kernels' path (on_kernels),
// float32, float64 or bfloat16, contiguous.
inline bool bias_cuda_ok(const at::Tensor& t) { return kernels_take(t) && t.is_contiguous(); }

// What the bias kernel does after the bias (bias_cuda.cu's kThen*; PointwiseFn's epilogue):
// nothing, `other + y`, or `out = other · y` with y kept.
enum BiasThen : int { kThenNothing = 0, kThenResidual = 1, kThenGate = 2 };

// y (planes of `elems` values, plane q of channel q mod C) += bias (C), in place, one pass;
// then `then` with `other` (y's layout, contiguous) and, for a gate, into `out` (the same).
void bias_add_cuda(at::Tensor& y, const at::Tensor& bias, int64_t elems,
                   BiasThen then = kThenNothing, const at::Tensor& other = at::Tensor(),
                   at::Tensor* out = nullptr);

// The gate's backward on the kernels' path: (g · u, g · z), each rounded once; all contiguous.
std::pair<at::Tensor, at::Tensor> gate_grad_cuda(const at::Tensor& g, const at::Tensor& u,
                                                 const at::Tensor& z);

// The bias gradient (C) from go (planes of `elems` values, plane q of channel q mod C): one
// pass over go into per-chunk partial sums in float32 (float64 for float64), added here and
// returned unrounded.
at::Tensor bias_grad_cuda(const at::Tensor& go, int64_t elems, int64_t C);

// y (planes of `elems` values, plane q of channel q mod C, contiguous) += bias (C) in place: one
// vectorised pass on CUDA (bias_cuda.cu), libtorch's broadcasting add elsewhere.
void add_bias(at::Tensor& y, const at::Tensor& bias, int64_t elems);

// The gradient (C) of such a bias from go laid out like y, as `kind` (the bias's type).
at::Tensor bias_grad(const at::Tensor& go, int64_t elems, int64_t C, at::ScalarType kind);

// (B, P, Q) = Σ over K of a (B, P, K) · b (B, Q, K)ᵀ, the reduction split into chunks: the
// weight gradients' long sums over pixels (pointwise.cpp, where it is defined and why; the
// deformable conv's CUDA weight gradient uses it too).
at::Tensor gemm_nt_split_k(const at::Tensor& a, const at::Tensor& b);

// ============================================================================================
// The C boundary
// ============================================================================================

inline char* dup_msg(const char* m) { return strdup(m ? m : "unknown error"); }

// The body of every C entry point: a C++ exception becomes a non-zero return and a malloc'd
// message in *err (freed by s3ops_free_err). Each op's entry point also opens a profiler scope
// named s3net::<op> (RECORD_FUNCTION; free when no profiler runs), so an operator-level trace
// (`s3net bench fit --trace`) charges the kernels our ops launch in their forward to them:
// without it, a GPU trace left 31 % of a step's kernel time to no op (2026-11-28). Their
// backward runs inside the autograd node the engine records.
#define S3_PROTECT(...)                                       \
  try {                                                      \
    __VA_ARGS__                                              \
  } catch (const c10::Error& e) {                            \
    *err = dup_msg(e.what_without_backtrace());              \
    return 1;                                                \
  } catch (const std::exception& e) {                        \
    *err = dup_msg(e.what());                                \
    return 1;                                                \
  } catch (...) {                                            \
    *err = dup_msg("unknown C++ exception");                 \
    return 1;                                                \
  }

// 16-bit floats (bfloat16, float16) that an op has no kernel for (the CPU kernels, the
// deformable conv's CUDA kernels) are computed in float32 and the result rounded back to the
// input's type: each value they hold is exact in float32, so this gives what a kernel reading
// 16-bit values and adding in float32 gives, at the cost of float32 copies in memory. `native`:
// the op reads them itself.
inline at::Tensor widen(const at::Tensor& t, bool native = false) {
  return is_half_width(t) && !native ? t.to(at::kFloat) : t;
}
inline std::optional<at::Tensor> widen(const at::Tensor* t, bool native = false) {
  if (!t) return std::nullopt;
  return widen(*t, native);
}
inline at::Tensor narrow_to(const at::Tensor& r, const at::Tensor& like) {
  return is_half_width(like) ? r.to(like.scalar_type()) : r;
}

}  // namespace s3ops
