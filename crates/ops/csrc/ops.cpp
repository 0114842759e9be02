// The ops of s3net: depthwise and deformable 2-D convolution (CPU kernels here, CUDA kernels in
// the .cu files) and a stack's 1×1 convolutions, each a torch::autograd::Function with its own
// forward and backward, exposed to Rust through a few extern "C" functions that take and return
// `at::Tensor*` (tch's C_tensor) and never throw.
//
// The CUDA paths call their kernels through a table (Kernels): the GPU's, or for CPU tensors on
// a thread that asked for it (s3ops_set_simt) the same kernels built on simt.h's emulation, so
// the tests run these paths where no GPU is (on_kernels decides which path a tensor takes).
//
// Portability: this file is compiled with plain -O3 (no -march). The hot per-plane loops are
// instantiated twice, once for baseline x86-64 and once with target("avx2,fma"), and picked at
// run time with __builtin_cpu_supports. at::parallel_for expands to `#pragma omp parallel` in
// this libtorch build (OpenMP backend), hence -fopenmp.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/profiler_kineto.h>

#ifdef S3OPS_CUDA
#include <ATen/core/CachingHostAllocator.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
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
#include <set>
#include <string>
#include <vector>

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

#define S3_INLINE inline __attribute__((always_inline))
#define S3_AVX2 __attribute__((target("avx2,fma")))
#define S3_AVX512 __attribute__((target("avx2,fma,avx512f,avx512vl")))

namespace {

// bfloat16 or float16.
bool is_half_width(const at::Tensor& t) {
  return t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf;
}

bool cpu_has_avx2() {
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
bool cpu_has_avx512() {
#if defined(__x86_64__)
  static const bool has = cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512vl") &&
                          std::getenv("S3OPS_NO_AVX512") == nullptr;
  return has;
#else
  return false;
#endif
}

// ============================================================================================
// Depthwise convolution
// ============================================================================================
//
// One plane: out[ho][wo] += sum_{i,j} w[i*k+j] * in[ho - p + i*d][wo - p + j*d] (zero outside).
// `p` may be negative (used by the input gradient, a correlation with the flipped kernel).
//
// The network's kernels (k = 3, 5, 7) take the fast path: the plane is first copied into a
// buffer with zero columns on both sides, so that every tap of every output column reads
// inside it and a whole row is one branch-free loop; the output is then built in chunks of
// eight 32-byte vectors held in registers across all k² taps, and the weight gradient keeps
// one vector accumulator per kernel column. Before, the edges of each row ran scalar with
// bounds checks (a quarter of the row's time at k = 7, d = 3) and every kernel row loaded and
// stored the output row again. Other kernel sizes take the plain loops below.

// B bytes of T, one register (32 for AVX2, 16 for the baseline SSE2 path), loadable and
// storable at any address aligned for T.
template <typename T, int B>
struct Vec {
  typedef T type __attribute__((vector_size(B), aligned(sizeof(T))));
  static constexpr int lanes = B / sizeof(T);
};

// A plane copied with zero columns on both sides: column c of the input is at c + left, and a
// tap of output column wo (for wo below `cols`, the output width rounded up to whole chunks)
// at wo - p + j*d + left, always inside [0, width).
struct PaddedRows {
  int64_t left, width, cols;
};

S3_INLINE PaddedRows padded_rows(int64_t W, int64_t Wo, int64_t k, int64_t p, int64_t d,
                                 int64_t chunk) {
  const int64_t cols = (Wo + chunk - 1) / chunk * chunk;
  const int64_t left = std::max<int64_t>(p, 0);
  return {left, std::max(left + W, cols - p + (k - 1) * d + left), cols};
}

template <typename T>
S3_INLINE const T* pad_plane(const T* in, int64_t H, int64_t W, const PaddedRows& g,
                             std::vector<T>& buf) {
  buf.resize(H * g.width);
  for (int64_t r = 0; r < H; ++r) {
    T* row = buf.data() + r * g.width;
    std::fill(row, row + g.left, T(0));
    std::memcpy(row + g.left, in + r * W, W * sizeof(T));
    std::fill(row + g.left + W, row + g.width, T(0));
  }
  return buf.data();
}

// Fast correlation of one plane for a kernel of KC×KC. Each output value is the bias already
// in `out` plus the taps in row-major order, one rounding per tap as in the plain loop (a tap
// outside the image adds an exact zero), so both paths give the same bits.
template <typename T, int VB, int KC>
S3_INLINE void dw_corr_plane_fast(const T* in, int64_t H, int64_t W, const T* __restrict w,
                                  int64_t p, int64_t d, T* __restrict out, int64_t Ho,
                                  int64_t Wo, std::vector<T>& buf) {
  using V = typename Vec<T, VB>::type;
  constexpr int L = Vec<T, VB>::lanes, A = 8;
  constexpr int64_t chunk = L * A;
  const PaddedRows g = padded_rows(W, Wo, KC, p, d, chunk);
  const T* pad = pad_plane(in, H, W, g, buf);
  T wl[KC * KC];
  for (int t = 0; t < KC * KC; ++t) wl[t] = w[t];
  for (int64_t ho = 0; ho < Ho; ++ho) {
    T* orow = out + ho * Wo;
    for (int64_t c0 = 0; c0 < g.cols; c0 += chunk) {
      const bool whole = c0 + chunk <= Wo;
      V acc[A];
      for (int a = 0; a < A; ++a) {
        if (whole) {
          acc[a] = *(const V*)(orow + c0 + a * L);
        } else {
          for (int l = 0; l < L; ++l) acc[a][l] = c0 + a * L + l < Wo ? orow[c0 + a * L + l] : T(0);
        }
      }
      for (int i = 0; i < KC; ++i) {
        const int64_t r = ho - p + i * d;
        if (r < 0 || r >= H) continue;
        const T* src = pad + r * g.width + g.left - p + c0;
        for (int j = 0; j < KC; ++j) {
          const T wv = wl[i * KC + j];
          const T* s = src + j * d;
          for (int a = 0; a < A; ++a) acc[a] += wv * *(const V*)(s + a * L);
        }
      }
      for (int a = 0; a < A; ++a) {
        if (whole) {
          *(V*)(orow + c0 + a * L) = acc[a];
        } else {
          for (int l = 0; l < L && c0 + a * L + l < Wo; ++l) orow[c0 + a * L + l] = acc[a][l];
        }
      }
    }
  }
}

template <typename T>
S3_INLINE void dw_corr_plane_plain(const T* __restrict in, int64_t H, int64_t W,
                                   const T* __restrict w, int64_t k, int64_t p, int64_t d,
                                   T* __restrict out, int64_t Ho, int64_t Wo) {
  for (int64_t ho = 0; ho < Ho; ++ho) {
    T* __restrict orow = out + ho * Wo;
    for (int64_t i = 0; i < k; ++i) {
      const int64_t r = ho - p + i * d;
      if (r < 0 || r >= H) continue;
      const T* __restrict irow = in + r * W;
      for (int64_t wo = 0; wo < Wo; ++wo) {
        T acc = orow[wo];
        for (int64_t j = 0; j < k; ++j) {
          const int64_t c = wo - p + j * d;
          if (c >= 0 && c < W) acc += w[i * k + j] * irow[c];
        }
        orow[wo] = acc;
      }
    }
  }
}

template <typename T, int VB>
S3_INLINE void dw_corr_plane_k(const T* in, int64_t H, int64_t W, const T* w, int64_t k, int64_t p,
                               int64_t d, T* out, int64_t Ho, int64_t Wo, std::vector<T>& buf) {
  switch (k) {
    case 3: dw_corr_plane_fast<T, VB, 3>(in, H, W, w, p, d, out, Ho, Wo, buf); break;
    case 5: dw_corr_plane_fast<T, VB, 5>(in, H, W, w, p, d, out, Ho, Wo, buf); break;
    case 7: dw_corr_plane_fast<T, VB, 7>(in, H, W, w, p, d, out, Ho, Wo, buf); break;
    default: dw_corr_plane_plain<T>(in, H, W, w, k, p, d, out, Ho, Wo); break;
  }
}

template <typename T>
void dw_corr_plane_base(const T* in, int64_t H, int64_t W, const T* w, int64_t k, int64_t p,
                        int64_t d, T* out, int64_t Ho, int64_t Wo, std::vector<T>& buf) {
  dw_corr_plane_k<T, 16>(in, H, W, w, k, p, d, out, Ho, Wo, buf);
}
template <typename T>
S3_AVX2 void dw_corr_plane_avx2(const T* in, int64_t H, int64_t W, const T* w, int64_t k,
                                int64_t p, int64_t d, T* out, int64_t Ho, int64_t Wo,
                                std::vector<T>& buf) {
  dw_corr_plane_k<T, 32>(in, H, W, w, k, p, d, out, Ho, Wo, buf);
}

// Weight gradient of one plane: acc[i*k+j] += sum_{ho,wo} go[ho][wo] * in[ho-p+i*d][wo-p+j*d].
// Each row's dot products are summed in T, rows are accumulated in double.
//
// Fast path (KC×KC): for one output row and kernel row, the KC dot products share each loaded
// vector of the gradient and keep KC·U vector accumulators (U vectors of columns at a time,
// enough independent sums to keep both FMA units busy). The gradient row is read through a
// zero-padded copy when its width is not a whole number of chunks.
template <typename T, int VB, int KC>
S3_INLINE void dw_wgrad_plane_fast(const T* in, int64_t H, int64_t W, const T* go, int64_t Ho,
                                   int64_t Wo, int64_t p, int64_t d, double* __restrict acc,
                                   std::vector<T>& buf, std::vector<T>& gbuf) {
  using V = typename Vec<T, VB>::type;
  constexpr int L = Vec<T, VB>::lanes, U = KC <= 3 ? 4 : KC <= 5 ? 2 : 1;
  constexpr int64_t chunk = L * U;
  const PaddedRows g = padded_rows(W, Wo, KC, p, d, chunk);
  const T* pad = pad_plane(in, H, W, g, buf);
  const bool copy_rows = g.cols != Wo;
  if (copy_rows) gbuf.assign(g.cols, T(0));
  for (int64_t ho = 0; ho < Ho; ++ho) {
    const T* grow = go + ho * Wo;
    if (copy_rows) {
      std::memcpy(gbuf.data(), grow, Wo * sizeof(T));
      grow = gbuf.data();
    }
    for (int i = 0; i < KC; ++i) {
      const int64_t r = ho - p + i * d;
      if (r < 0 || r >= H) continue;
      const T* src = pad + r * g.width + g.left - p;
      V s[U][KC];
      for (int u = 0; u < U; ++u)
        for (int j = 0; j < KC; ++j) s[u][j] = V{};
      for (int64_t c0 = 0; c0 < g.cols; c0 += chunk) {
        for (int u = 0; u < U; ++u) {
          const V gv = *(const V*)(grow + c0 + u * L);
          for (int j = 0; j < KC; ++j) s[u][j] += gv * *(const V*)(src + c0 + u * L + j * d);
        }
      }
      for (int j = 0; j < KC; ++j) {
        V t = s[0][j];
        for (int u = 1; u < U; ++u) t += s[u][j];
        T sum = 0;
        for (int l = 0; l < L; ++l) sum += t[l];
        acc[i * KC + j] += (double)sum;
      }
    }
  }
}

template <typename T>
S3_INLINE void dw_wgrad_plane_plain(const T* __restrict in, int64_t H, int64_t W,
                                    const T* __restrict go, int64_t Ho, int64_t Wo, int64_t k,
                                    int64_t p, int64_t d, double* __restrict acc) {
  for (int64_t ho = 0; ho < Ho; ++ho) {
    const T* __restrict g = go + ho * Wo;
    for (int64_t i = 0; i < k; ++i) {
      const int64_t r = ho - p + i * d;
      if (r < 0 || r >= H) continue;
      const T* __restrict irow = in + r * W;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t s = j * d - p;
        const int64_t lo = std::max<int64_t>(0, -s);
        const int64_t hi = std::min<int64_t>(Wo, W - s);
        if (lo >= hi) continue;
        const T* __restrict x = irow + s;
        T sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t wo = lo; wo < hi; ++wo) sum += g[wo] * x[wo];
        acc[i * k + j] += (double)sum;
      }
    }
  }
}

template <typename T, int VB>
S3_INLINE void dw_wgrad_plane_k(const T* in, int64_t H, int64_t W, const T* go, int64_t Ho,
                                int64_t Wo, int64_t k, int64_t p, int64_t d, double* acc,
                                std::vector<T>& buf, std::vector<T>& gbuf) {
  switch (k) {
    case 3: dw_wgrad_plane_fast<T, VB, 3>(in, H, W, go, Ho, Wo, p, d, acc, buf, gbuf); break;
    case 5: dw_wgrad_plane_fast<T, VB, 5>(in, H, W, go, Ho, Wo, p, d, acc, buf, gbuf); break;
    case 7: dw_wgrad_plane_fast<T, VB, 7>(in, H, W, go, Ho, Wo, p, d, acc, buf, gbuf); break;
    default: dw_wgrad_plane_plain<T>(in, H, W, go, Ho, Wo, k, p, d, acc); break;
  }
}

template <typename T>
void dw_wgrad_plane_base(const T* in, int64_t H, int64_t W, const T* go, int64_t Ho, int64_t Wo,
                         int64_t k, int64_t p, int64_t d, double* acc, std::vector<T>& buf,
                         std::vector<T>& gbuf) {
  dw_wgrad_plane_k<T, 16>(in, H, W, go, Ho, Wo, k, p, d, acc, buf, gbuf);
}
template <typename T>
S3_AVX2 void dw_wgrad_plane_avx2(const T* in, int64_t H, int64_t W, const T* go, int64_t Ho,
                                 int64_t Wo, int64_t k, int64_t p, int64_t d, double* acc,
                                 std::vector<T>& buf, std::vector<T>& gbuf) {
  dw_wgrad_plane_k<T, 32>(in, H, W, go, Ho, Wo, k, p, d, acc, buf, gbuf);
}

}  // namespace
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
namespace {

// The kernels of csrc/*_cuda.cu: built by nvcc for the GPU, and by the host compiler on simt.h's
// emulation, which runs them on the CPU for the tests of a machine without a GPU.
struct Kernels {
#define S3_KERNEL(R, name, params) R(*name) params;
#include "kernel_entries.h"
#undef S3_KERNEL
};
const Kernels kSimtKernels = {
#define S3_KERNEL(R, name, params) &s3ops_simt_##name,
#include "kernel_entries.h"
#undef S3_KERNEL
};
#ifdef S3OPS_CUDA
const Kernels kCudaKernels = {
#define S3_KERNEL(R, name, params) &s3ops_cuda_##name,
#include "kernel_entries.h"
#undef S3_KERNEL
};
#endif

// Whether this thread runs the ops' CUDA paths on CPU tensors, with the kernels emulated
// (s3ops_set_simt). Per thread, so a test can compare both paths, and other tests running at
// the same time are not touched. Autograd runs a CPU graph's backward on the calling thread.
thread_local bool t_simt = false;

// Whether `t` takes the ops' kernel path: a CUDA tensor, or a CPU tensor on a thread that
// emulates the kernels.
bool on_kernels(const at::Tensor& t) {
#ifdef S3OPS_CUDA
  if (t.is_cuda()) return true;
#endif
  return t_simt && t.device().is_cpu();
}

// Whether `t` takes the CPU kernels that stand beside the GPU ones (PointwiseFn's, PlaneNormFn's):
// a CPU tensor off the emulated GPU paths, float32 or float64.
bool cpu_kernels_take(const at::Tensor& t) {
  return t.device().is_cpu() && !on_kernels(t) &&
         (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble);
}

// The kernels that run on `t`'s device: the GPU's, or the emulation's for CPU tensors.
const Kernels& kernels(const at::Tensor& t) {
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
cudaStream_t current_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}
#endif

// The stream the kernels run on for `t`: the current CUDA stream of its GPU; none (null) for the
// emulation.
void* kernel_stream(const at::Tensor& t) {
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
// The fourth: the deformable conv's input gradient summed per tile in shared memory
// (deform_cuda.cu's col2im_tiled_kernel) instead of with four global atomics per column value;
// off until a GPU has timed it.
// The fifth: the I-LKA block's gate and residual add folded into the 1×1 convs before them
// (PointwiseFn's epilogue), read by the Rust side; the same bits either way.
Switch g_switches[] = {Switch("S3NET_CUDA_PIXEL_LOSSES", true), Switch("S3NET_DW_COLUMNS", false),
                       Switch("S3NET_SPLIT_K_KERNEL", true), Switch("S3NET_DEFORM_TILED", false),
                       Switch("S3NET_FUSED_EPILOGUES", true)};
constexpr int kSwitchDwColumns = 1, kSwitchSplitKKernel = 2, kSwitchDeformTiled = 3;

bool dw_columns() { return g_switches[kSwitchDwColumns].on(); }

// Contiguous planes in and out, the output overwritten.
S3DepthwiseDims dw_dims(const at::Tensor& in, int64_t k, int64_t p, int64_t d, int64_t Ho,
                        int64_t Wo) {
  return {in.size(0), in.size(1), in.size(2), in.size(3), k, p, d, Ho, Wo, 0, 0, 0, 0, 0,
          dw_columns() ? 1 : 0};
}

// The depthwise kernels' dtype code, and the type they add in (float32 for bfloat16).
int dw_cuda_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? 1 : t.scalar_type() == at::kBFloat16 ? 2 : 0;
}
// Whether the kernels take `t`: on their path (on_kernels) and float32, float64 or bfloat16,
// the types dw_cuda_dtype codes.
bool kernels_take(const at::Tensor& t) {
  const auto k = t.scalar_type();
  return on_kernels(t) && (k == at::kFloat || k == at::kDouble || k == at::kBFloat16);
}
at::ScalarType dw_sum_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Whether the CUDA kernels take this shape: a block keeps its dilated input tile in shared
// memory, at most 48 KiB without opting in, and the blocks (one per plane and 64×64 tile of
// the input-sized gradient or the output) must fit a 1-D grid. Others go to libtorch
// (s3ops_depthwise_conv2d).
bool dw_cuda_fits(const at::Tensor& in, int64_t k, int64_t p, int64_t d) {
  const int64_t grow = std::max<int64_t>(0, 2 * p - d * (k - 1));  // output larger than input
  const S3DepthwiseDims dims = dw_dims(in, k, p, d, in.size(2) + grow, in.size(3) + grow);
  const Kernels& kn = kernels(in);
  const int64_t blocks = in.size(0) * in.size(1) * kn.dw_blocks_per_plane(&dims);
  const int64_t sum_bytes = dw_sum_type(in) == at::kDouble ? 8 : 4;
  return kn.dw_shared_bytes(&dims, sum_bytes) <= (int64_t(48) << 10) &&
         blocks < (int64_t(1) << 31);
}

// cudaErrorInvalidConfiguration, which a launcher returns when it declines a shape before
// launching (this file does not include the CUDA runtime's headers in every build).
constexpr int cudaErrorInvalidConfigurationCode = 9;

// Turns a kernel launcher's status into an exception naming the op and the kernel (`t`: a tensor
// on the device it ran for).
void kernel_check(const char* op, int rc, const char* what, const at::Tensor& t) {
  TORCH_CHECK(rc == 0, op, ": ", t.is_cuda() ? "CUDA " : "emulated CUDA ", what,
              " kernel failed: ", kernels(t).error_string(rc));
}

// Whether the bias kernels (bias_cuda.cu) take this tensor: on the kernels' path (on_kernels),
// float32, float64 or bfloat16, contiguous.
bool bias_cuda_ok(const at::Tensor& t) { return kernels_take(t) && t.is_contiguous(); }

// What the bias kernel does after the bias (bias_cuda.cu's kThen*; PointwiseFn's epilogue):
// nothing, `other + y`, or `out = other · y` with y kept.
enum BiasThen : int { kThenNothing = 0, kThenResidual = 1, kThenGate = 2 };

// y (planes of `elems` values, plane q of channel q mod C) += bias (C), in place, one pass;
// then `then` with `other` (y's layout, contiguous) and, for a gate, into `out` (the same).
void bias_add_cuda(at::Tensor& y, const at::Tensor& bias, int64_t elems,
                   BiasThen then = kThenNothing, const at::Tensor& other = at::Tensor(),
                   at::Tensor* out = nullptr) {
  KernelGuard guard(y);
  const auto b = bias.contiguous();
  const int64_t C = b.numel(), planes = elems > 0 ? y.numel() / elems : 0;
  const int rc = kernels(y).bias_add(dw_cuda_dtype(y), y.data_ptr(), b.data_ptr(),
                                     other.defined() ? other.data_ptr() : nullptr,
                                     out ? out->data_ptr() : nullptr, then, planes, elems, C,
                                     kernel_stream(y));
  kernel_check("bias", rc, "add", y);
}

// The gate's backward on the kernels' path: (g · u, g · z), each rounded once; all contiguous.
std::pair<at::Tensor, at::Tensor> gate_grad_cuda(const at::Tensor& g, const at::Tensor& u,
                                                 const at::Tensor& z) {
  KernelGuard guard(g);
  auto gz = at::empty_like(g), gu = at::empty_like(g);
  const int rc = kernels(g).gate_grad(dw_cuda_dtype(g), g.data_ptr(), u.data_ptr(), z.data_ptr(),
                                      gz.data_ptr(), gu.data_ptr(), g.numel(), kernel_stream(g));
  kernel_check("pointwise_conv2d", rc, "gate gradient", g);
  return {gz, gu};
}

// The bias gradient (C) from go (planes of `elems` values, plane q of channel q mod C): one
// pass over go into per-chunk partial sums in float32 (float64 for float64), added here and
// returned unrounded.
at::Tensor bias_grad_cuda(const at::Tensor& go, int64_t elems, int64_t C) {
  KernelGuard guard(go);
  const int64_t planes = elems > 0 ? go.numel() / elems : 0;
  auto partial = at::empty({C, kernels(go).bias_grad_chunks(elems)},
                           go.options().dtype(dw_sum_type(go)));
  const int rc = kernels(go).bias_grad(dw_cuda_dtype(go), go.data_ptr(), partial.data_ptr(),
                                      planes, elems, C, kernel_stream(go));
  kernel_check("bias", rc, "gradient", go);
  return partial.sum(1);
}

// The CUDA correlation over the planes `dims` describes, from `in` to `out` (device pointers
// laid out as its mappings say; `like` gives dtype, device and stream), per-channel kernels w
// (C, k*k), plus bias (C) when given.
void dw_correlate_cuda(const S3DepthwiseDims& dims, const at::Tensor& like, const void* in,
                       const at::Tensor& w, const at::Tensor* bias, void* out) {
  KernelGuard guard(like);
  const int rc = kernels(like).dw_correlate(dw_cuda_dtype(like), &dims, in, w.data_ptr(),
                                         bias ? bias->data_ptr() : nullptr, out,
                                         kernel_stream(like));
  kernel_check("depthwise_conv2d", rc, "correlate", like);
}

// out (N, C, Ho, Wo) = correlation of in (N, C, H, W) with per-channel kernels w (C, k*k),
// padding p (any sign), dilation d; initialised with bias (C) when given.
at::Tensor dw_correlate(const at::Tensor& in, const at::Tensor& w, const at::Tensor* bias,
                        int64_t k, int64_t p, int64_t d, int64_t Ho, int64_t Wo) {
  const int64_t N = in.size(0), C = in.size(1), H = in.size(2), W = in.size(3);
  auto out = at::empty({N, C, Ho, Wo}, in.options());
  if (out.numel() == 0) return out;
  if (on_kernels(in)) {
    dw_correlate_cuda(dw_dims(in, k, p, d, Ho, Wo), in, in.data_ptr(), w, bias, out.data_ptr());
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES(in.scalar_type(), "s3net_depthwise", [&] {
    using T = scalar_t;
    const T* ip = in.data_ptr<T>();
    const T* wp = w.data_ptr<T>();
    const T* bp = bias ? bias->data_ptr<T>() : nullptr;
    T* op = out.data_ptr<T>();
    auto fn = cpu_has_avx2() ? &dw_corr_plane_avx2<T> : &dw_corr_plane_base<T>;
    at::parallel_for(0, N * C, 1, [&](int64_t b0, int64_t b1) {
      std::vector<T> buf;  // the padded plane, reused by this thread's planes
      for (int64_t nc = b0; nc < b1; ++nc) {
        const int64_t c = nc % C;
        T* o = op + nc * Ho * Wo;
        std::fill(o, o + Ho * Wo, bp ? bp[c] : T(0));
        fn(ip + nc * H * W, H, W, wp + c * k * k, k, p, d, o, Ho, Wo, buf);
      }
    });
  });
  return out;
}

// grad_weight (C, 1, k, k) and grad_bias (C) of the depthwise conv on CUDA, for the planes that
// `dims` describes: the input `in`'s (contiguous), the output gradient at `go` (laid out as
// dims' output mapping says). One kernel writes a partial sum per (plane, block, tap), the
// bias's among them, summed here: deterministic, no atomics.
at::Tensor dw_weight_grad_cuda(const S3DepthwiseDims& dims, const at::Tensor& in, const void* go,
                               at::Tensor* gb) {
  const int64_t N = dims.N, C = dims.C, k = dims.k;
  KernelGuard guard(in);
  // The last of the k² + 1 partials of a block is the bias's.
  const int64_t blocks = kernels(in).dw_partials_per_plane(&dims);
  auto partial = at::empty({N, C, blocks, k * k + 1}, in.options().dtype(dw_sum_type(in)));
  if (partial.numel() == 0) {
    if (gb) *gb = at::zeros({C}, in.options());
    return at::zeros({C, 1, k, k}, in.options());
  }
  const int rc = kernels(in).dw_weight_grad(dw_cuda_dtype(in), &dims, in.data_ptr(), go,
                                           partial.data_ptr(), kernel_stream(in));
  kernel_check("depthwise_conv2d", rc, "weight-gradient", in);
  const auto sums = partial.sum(at::IntArrayRef{0, 2});  // (C, k² + 1)
  if (gb) *gb = sums.select(1, k * k).to(in.scalar_type()).contiguous();
  return sums.narrow(1, 0, k * k).to(in.scalar_type()).contiguous().view({C, 1, k, k});
}

// grad_weight (C, 1, k, k) of the depthwise conv. On CUDA the same kernel sums the bias
// gradient (C) as it reads go, and sets `gb` to it when `gb` is given; elsewhere `gb` is left
// as it is (undefined) for the caller to compute.
at::Tensor dw_weight_grad(const at::Tensor& in, const at::Tensor& go, int64_t k, int64_t p,
                          int64_t d, at::Tensor* gb = nullptr) {
  const int64_t N = in.size(0), C = in.size(1), H = in.size(2), W = in.size(3);
  const int64_t Ho = go.size(2), Wo = go.size(3);
  if (on_kernels(in)) return dw_weight_grad_cuda(dw_dims(in, k, p, d, Ho, Wo), in, go.data_ptr(), gb);
  auto gw = at::zeros({C, 1, k, k}, in.options());
  AT_DISPATCH_FLOATING_TYPES(in.scalar_type(), "s3net_depthwise_wgrad", [&] {
    using T = scalar_t;
    const T* ip = in.data_ptr<T>();
    const T* gp = go.data_ptr<T>();
    T* wp = gw.data_ptr<T>();
    auto fn = cpu_has_avx2() ? &dw_wgrad_plane_avx2<T> : &dw_wgrad_plane_base<T>;
    at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
      std::vector<double> acc(k * k);
      std::vector<T> buf, gbuf;  // padded plane and gradient row, reused by this thread
      for (int64_t c = c0; c < c1; ++c) {
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t n = 0; n < N; ++n) {
          fn(ip + (n * C + c) * H * W, H, W, gp + (n * C + c) * Ho * Wo, Ho, Wo, k, p, d,
             acc.data(), buf, gbuf);
        }
        for (int64_t t = 0; t < k * k; ++t) wp[c * k * k + t] = (T)acc[t];
      }
    });
  });
  return gw;
}

void dw_check(const at::Tensor& input, const at::Tensor& weight,
              const std::optional<at::Tensor>& bias, int64_t pad, int64_t dil) {
  TORCH_CHECK(input.dim() == 4, "depthwise_conv2d: input must be 4-D (N, C, H, W), got ",
              input.sizes());
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble ||
                  (input.scalar_type() == at::kBFloat16 && on_kernels(input)),
              "depthwise_conv2d: input must be float32, float64, bfloat16 or float16, got ",
              input.scalar_type());
#ifdef S3OPS_CUDA
  TORCH_CHECK(input.device().is_cpu() || input.device().is_cuda(), "depthwise_conv2d: input on ",
              input.device(), ": only CPU and CUDA kernels exist");
#else
  TORCH_CHECK(input.device().is_cpu(), "depthwise_conv2d: input on ", input.device(),
              ": this build has no CUDA kernel (nvcc was not found when it was compiled)");
#endif
  const int64_t C = input.size(1);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == C && weight.size(1) == 1 &&
                  weight.size(2) == weight.size(3) && weight.size(2) >= 1,
              "depthwise_conv2d: weight must be (C, 1, k, k) with C = ", C, ", got ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == input.scalar_type() && weight.device() == input.device(),
              "depthwise_conv2d: weight dtype/device must match the input");
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == C, "depthwise_conv2d: bias must be (", C,
                "), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == input.scalar_type() && bias->device() == input.device(),
                "depthwise_conv2d: bias dtype/device must match the input");
  }
  TORCH_CHECK(pad >= 0 && dil >= 1, "depthwise_conv2d: need padding >= 0 and dilation >= 1, got ",
              pad, ", ", dil);
  const int64_t k = weight.size(2);
  const int64_t Ho = input.size(2) + 2 * pad - dil * (k - 1);
  const int64_t Wo = input.size(3) + 2 * pad - dil * (k - 1);
  TORCH_CHECK(Ho >= 1 && Wo >= 1, "depthwise_conv2d: kernel ", k, "x", k, " dilation ", dil,
              " padding ", pad, " does not fit a ", input.size(2), "x", input.size(3), " input");
}

struct DepthwiseFn : public torch::autograd::Function<DepthwiseFn> {
  static at::Tensor forward(AutogradContext* ctx, at::Tensor input, at::Tensor weight,
                            std::optional<at::Tensor> bias, int64_t pad, int64_t dil) {
    const bool need_in = input.requires_grad(), need_w = weight.requires_grad();
    const bool need_b = bias && bias->requires_grad();
    auto x = input.contiguous();
    auto w = weight.contiguous();
    at::Tensor b;
    if (bias) b = bias->contiguous();
    const int64_t k = w.size(2);
    const int64_t Ho = x.size(2) + 2 * pad - dil * (k - 1);
    const int64_t Wo = x.size(3) + 2 * pad - dil * (k - 1);
    auto out = dw_correlate(x, w, bias ? &b : nullptr, k, pad, dil, Ho, Wo);
    // Save only what backward needs: the input for grad_weight, the weight for grad_input.
    ctx->save_for_backward({need_w ? x : at::Tensor(), need_in ? w : at::Tensor()});
    ctx->saved_data["pad"] = pad;
    ctx->saved_data["dil"] = dil;
    ctx->saved_data["k"] = k;
    ctx->saved_data["H"] = x.size(2);
    ctx->saved_data["W"] = x.size(3);
    ctx->saved_data["need_in"] = need_in;
    ctx->saved_data["need_w"] = need_w;
    ctx->saved_data["need_b"] = need_b;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const int64_t p = ctx->saved_data["pad"].toInt(), d = ctx->saved_data["dil"].toInt();
    const int64_t k = ctx->saved_data["k"].toInt();
    const int64_t H = ctx->saved_data["H"].toInt(), W = ctx->saved_data["W"].toInt();
    auto go = grads[0].contiguous();
    at::Tensor gi, gw, gb;
    if (ctx->saved_data["need_in"].toBool()) {
      // grad_input = correlation of grad_out with the flipped kernel, padding (k-1)d - p.
      auto wf = saved[1].flip({2, 3}).contiguous();
      gi = dw_correlate(go, wf, nullptr, k, (k - 1) * d - p, d, H, W);
    }
    const bool need_b = ctx->saved_data["need_b"].toBool();
    if (ctx->saved_data["need_w"].toBool()) {
      gw = dw_weight_grad(saved[0], go, k, p, d, need_b ? &gb : nullptr);
    }
    if (need_b && !gb.defined()) gb = go.sum({0, 2, 3});
    return {gi, gw, gb, at::Tensor(), at::Tensor()};
  }
};


// ============================================================================================
// The I-LKA block's three parallel depthwise convolutions, concatenated per network
// ============================================================================================
//
// out (N, M·3c, H, W) from in (N, M·c, H, W): network j's 3c output channels hold branch 0's
// c channels, then branch 1's, then branch 2's, each a 'same' depthwise conv of network j's
// input channels. What cat(conv0(a), conv1(a), conv2(a)) per network computes, without its
// copies: the kernels write their outputs straight into their slices of the concatenation and
// read their output gradients from those slices, and the input gradient's three parts are
// added by the kernels themselves (the second and third accumulate into the first) instead of
// by autograd. A 16-network step copied and added a few hundred MB per block for these.
// On CUDA in f32, f64 and bf16 when every branch fits the kernels; on the CPU in f32 and f64
// (16-bit inputs widened once by the caller), each plane's three branches one after the other
// while its input is in cache: there the cat, its backward's copies and autograd's adds took
// about 5 % of a fit's step. Elsewhere the three depthwise ops and a cat
// (s3ops_depthwise_branches).

constexpr int kBranches = 3;

// Plane q of the input (N, M·c, H, W) → its plane of branch b in the output (N, M·3c, H, W):
// network j = (q / c) mod M keeps its branches' c planes side by side.
S3_INLINE int64_t branch_plane(int64_t q, int b, int64_t c) {
  return (q / c) * kBranches * c + b * c + q % c;
}

// The CPU halves of BranchesFn on contiguous x (N, C = M·c, H, W), the branches' weights
// (C, 1, k, k), biases (C) and geo (padding and dilation of each, then M), all of type T.
template <typename T>
void branches_forward_cpu(const at::Tensor& x, const at::Tensor (&ws)[kBranches],
                          const at::Tensor (&bs)[kBranches], const std::vector<int64_t>& geo,
                          at::Tensor& out) {
  const int64_t C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  const int64_t c = C / geo[2 * kBranches];
  const T* ip = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  auto fn = cpu_has_avx2() ? &dw_corr_plane_avx2<T> : &dw_corr_plane_base<T>;
  at::parallel_for(0, x.size(0) * C, 1, [&](int64_t q0, int64_t q1) {
    std::vector<T> buf;
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t ch = q % C;
      for (int b = 0; b < kBranches; ++b) {
        const int64_t k = ws[b].size(2);
        T* o = op + branch_plane(q, b, c) * HW;
        std::fill(o, o + HW, bs[b].data_ptr<T>()[ch]);
        fn(ip + q * HW, H, W, ws[b].data_ptr<T>() + ch * k * k, k, geo[2 * b], geo[2 * b + 1], o,
           H, W, buf);
      }
    }
  });
}

// grad_input: per plane, the three branches' output gradients correlated with their flipped
// kernels (wf), padding (k−1)·d − p, added into one plane.
template <typename T>
void branches_input_grad_cpu(const at::Tensor& go, const at::Tensor (&wf)[kBranches],
                             const std::vector<int64_t>& geo, at::Tensor& gi) {
  const int64_t C = gi.size(1), H = gi.size(2), W = gi.size(3), HW = H * W;
  const int64_t c = C / geo[2 * kBranches];
  const T* gp = go.data_ptr<T>();
  T* ip = gi.data_ptr<T>();
  auto fn = cpu_has_avx2() ? &dw_corr_plane_avx2<T> : &dw_corr_plane_base<T>;
  at::parallel_for(0, gi.size(0) * C, 1, [&](int64_t q0, int64_t q1) {
    std::vector<T> buf;
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t ch = q % C;
      T* g = ip + q * HW;
      std::fill(g, g + HW, T(0));
      for (int b = 0; b < kBranches; ++b) {
        const int64_t k = wf[b].size(2), p = geo[2 * b], d = geo[2 * b + 1];
        fn(gp + branch_plane(q, b, c) * HW, H, W, wf[b].data_ptr<T>() + ch * k * k, k,
           (k - 1) * d - p, d, g, H, W, buf);
      }
    }
  });
}

// Branch b's weight gradient (C, 1, k, k) into gw and, when gb is defined, its bias gradient
// (C): per channel, over the N images, each plane's taps and sum added in double.
template <typename T>
void branches_weight_grad_cpu(const at::Tensor& x, const at::Tensor& go, int b,
                              const std::vector<int64_t>& geo, at::Tensor& gw, at::Tensor& gb) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  const int64_t c = C / geo[2 * kBranches], k = gw.size(2), p = geo[2 * b], d = geo[2 * b + 1];
  const T* ip = x.data_ptr<T>();
  const T* gp = go.data_ptr<T>();
  T* wp = gw.data_ptr<T>();
  T* bp = gb.defined() ? gb.data_ptr<T>() : nullptr;
  auto fn = cpu_has_avx2() ? &dw_wgrad_plane_avx2<T> : &dw_wgrad_plane_base<T>;
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    std::vector<double> acc(k * k);
    std::vector<T> buf, gbuf;
    for (int64_t ch = c0; ch < c1; ++ch) {
      std::fill(acc.begin(), acc.end(), 0.0);
      double bias = 0;
      for (int64_t n = 0; n < N; ++n) {
        const int64_t q = n * C + ch;
        const T* g = gp + branch_plane(q, b, c) * HW;
        fn(ip + q * HW, H, W, g, H, W, k, p, d, acc.data(), buf, gbuf);
        if (bp) {
          T s = 0;
#pragma omp simd reduction(+ : s)
          for (int64_t i = 0; i < HW; ++i) s += g[i];
          bias += (double)s;
        }
      }
      for (int64_t t = 0; t < k * k; ++t) wp[ch * k * k + t] = (T)acc[t];
      if (bp) bp[ch] = (T)bias;
    }
  });
}

struct BranchesFn : public torch::autograd::Function<BranchesFn> {
  // geo: pad and dilation of each branch, then the number of networks M.
  static at::Tensor forward(AutogradContext* ctx, at::Tensor input, at::Tensor w0, at::Tensor b0,
                            at::Tensor w1, at::Tensor b1, at::Tensor w2, at::Tensor b2,
                            std::vector<int64_t> geo) {
    auto x = input.contiguous();
    const at::Tensor ws[kBranches] = {w0.contiguous(), w1.contiguous(), w2.contiguous()};
    const at::Tensor bs[kBranches] = {b0.contiguous(), b1.contiguous(), b2.contiguous()};
    const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
    const int64_t c = C / geo[2 * kBranches], HW = H * W, elem = x.element_size();
    auto out = at::empty({N, kBranches * C, H, W}, x.options());
    if (!on_kernels(x)) {
      AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "s3net_branches", [&] {
        branches_forward_cpu<scalar_t>(x, ws, bs, geo, out);
      });
    }
    for (int b = 0; b < kBranches && on_kernels(x); ++b) {
      S3DepthwiseDims dims = dw_dims(x, ws[b].size(2), geo[2 * b], geo[2 * b + 1], H, W);
      dims.out_group = c;
      dims.out_gstride = kBranches * c * HW;
      dw_correlate_cuda(dims, x, x.data_ptr(), ws[b], &bs[b],
                        (char*)out.data_ptr() + b * c * HW * elem);
    }
    ctx->save_for_backward({x, ws[0], ws[1], ws[2]});
    ctx->saved_data["geo"] = geo;
    const at::Tensor* params[2 * kBranches] = {&w0, &b0, &w1, &b1, &w2, &b2};
    std::vector<int64_t> flags(1, input.requires_grad());
    for (auto* t : params) flags.push_back(t->requires_grad());
    ctx->saved_data["need"] = flags;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto sv = ctx->get_saved_variables();
    const auto geo = ctx->saved_data["geo"].toIntVector();
    const auto need = ctx->saved_data["need"].toIntVector();
    const at::Tensor& x = sv[0];
    const int64_t H = x.size(2), W = x.size(3), C = x.size(1);
    const int64_t c = C / geo[2 * kBranches], HW = H * W, elem = x.element_size();
    auto go = grads[0].contiguous();  // (N, 3·M·c, H, W)
    const auto slice = [&](int b) { return (const char*)go.data_ptr() + b * c * HW * elem; };
    variable_list r(8);
    if (!on_kernels(x)) {
      AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "s3net_branches_backward", [&] {
        if (need[0]) {
          const at::Tensor wf[kBranches] = {sv[1].flip({2, 3}).contiguous(),
                                            sv[2].flip({2, 3}).contiguous(),
                                            sv[3].flip({2, 3}).contiguous()};
          auto gi = at::empty_like(x);
          branches_input_grad_cpu<scalar_t>(go, wf, geo, gi);
          r[0] = gi;
        }
        for (int b = 0; b < kBranches; ++b) {
          const bool need_w = need[1 + 2 * b], need_b = need[2 + 2 * b];
          if (!need_w && !need_b) continue;
          auto gw = at::empty_like(sv[1 + b]);
          auto gb = need_b ? at::empty({C}, x.options()) : at::Tensor();
          branches_weight_grad_cpu<scalar_t>(x, go, b, geo, gw, gb);
          if (need_w) r[1 + 2 * b] = gw;
          if (need_b) r[2 + 2 * b] = gb;
        }
      });
      return r;
    }
    if (need[0]) {
      // Σ over branches of the correlation of its output gradient with its flipped kernel,
      // padding (k−1)·d − p; branches 1 and 2 add to what branch 0 wrote.
      auto gi = at::empty_like(x);
      for (int b = 0; b < kBranches; ++b) {
        const int64_t k = sv[1 + b].size(2), p = geo[2 * b], d = geo[2 * b + 1];
        S3DepthwiseDims dims = dw_dims(x, k, (k - 1) * d - p, d, H, W);
        dims.in_group = c;
        dims.in_gstride = kBranches * c * HW;
        dims.accumulate = b > 0;
        dw_correlate_cuda(dims, x, slice(b), sv[1 + b].flip({2, 3}).contiguous(), nullptr,
                          gi.data_ptr());
      }
      r[0] = gi;
    }
    for (int b = 0; b < kBranches; ++b) {
      const bool need_w = need[1 + 2 * b], need_b = need[2 + 2 * b];
      if (!need_w && !need_b) continue;
      const int64_t k = sv[1 + b].size(2);
      S3DepthwiseDims dims = dw_dims(x, k, geo[2 * b], geo[2 * b + 1], H, W);
      dims.out_group = c;
      dims.out_gstride = kBranches * c * HW;
      at::Tensor gb;
      auto gw = dw_weight_grad_cuda(dims, x, slice(b), &gb);
      if (need_w) r[1 + 2 * b] = gw;
      if (need_b) r[2 + 2 * b] = gb;
    }
    return r;
  }
};

// y (planes of `elems` values, plane q of channel q mod C, contiguous) += bias (C) in place: one
// vectorised pass on CUDA (bias_cuda.cu), libtorch's broadcasting add elsewhere.
void add_bias(at::Tensor& y, const at::Tensor& bias, int64_t elems) {
  if (bias_cuda_ok(y) && bias.scalar_type() == y.scalar_type()) {
    bias_add_cuda(y, bias, elems);
    return;
  }
  const int64_t C = bias.numel();
  y.view({-1, C, elems}).add_(bias.reshape({1, C, 1}));
}

// The gradient (C) of such a bias from go laid out like y, as `kind` (the bias's type).
at::Tensor bias_grad(const at::Tensor& go, int64_t elems, int64_t C, at::ScalarType kind) {
  if (bias_cuda_ok(go)) return bias_grad_cuda(go, elems, C).to(kind);
  return go.reshape({-1, C, elems}).sum(at::IntArrayRef{0, 2}).to(kind);
}

// ============================================================================================
// BatchNorm with statistics per (image, channel) plane
// ============================================================================================
//
// y = (x − mean) / sqrt(var + eps) · γ[c] + β[c], mean and (biased) var over each H×W plane of
// x (N, C, H, W): BatchNorm in training mode applied to each image on its own. On CUDA
// (float32, float64, bfloat16 planes; γ, β and their gradients float32, float64 for float64)
// norm_cuda.cu's kernels, on the CPU (float32, float64) the same arithmetic below; elsewhere
// libtorch's batch_norm over the N·C planes as channels of one image, as the network did before.

// The CPU halves of PlaneNormFn (float32, float64), the same arithmetic as norm_cuda.cu's:
// each plane's two sums (forward: Σ(x − K), Σ(x − K)², K its first value; backward: Σdy,
// Σdy·(x − mean)), then one affine pass. Why not libtorch's: its CPU BatchNorm read each plane
// three times (mean, variance, normalisation) and took about 2 ms per 1×32×256² map, 23 ms of
// a step; here a plane is summed and then, from the second-level cache, transformed, planes in
// parallel. Sums in float32 (float64 planes: float64) per run of kNormRun values, the runs
// added in float64 in order: deterministic.
constexpr int64_t kNormRun = 1024;

// Over n values: Σ(u − k) and Σ(u − k)² when w is null (the forward's), else Σw and
// Σw·(u − k) (the backward's, k the mean).
template <typename T>
S3_INLINE void plane_two_sums(const T* __restrict u, const T* __restrict w, T k, int64_t n,
                              double& s1, double& s2) {
  s1 = s2 = 0;
  for (int64_t r0 = 0; r0 < n; r0 += kNormRun) {
    const int64_t r1 = std::min(n, r0 + kNormRun);
    T a = 0, b = 0;
    if (w) {
#pragma omp simd reduction(+ : a, b)
      for (int64_t i = r0; i < r1; ++i) {
        a += w[i];
        b += w[i] * (u[i] - k);
      }
    } else {
#pragma omp simd reduction(+ : a, b)
      for (int64_t i = r0; i < r1; ++i) {
        const T d = u[i] - k;
        a += d;
        b += d * d;
      }
    }
    s1 += (double)a;
    s2 += (double)b;
  }
}

// y = (x − mean)·γ/σ + β per plane; mean and 1/σ (biased variance) into mean, invstd.
template <typename T>
void plane_norm_forward_cpu(const at::Tensor& x, const at::Tensor& g, const at::Tensor& b,
                            double eps, at::Tensor& y, at::Tensor& mean, at::Tensor& invstd) {
  const int64_t C = x.size(1), planes = x.size(0) * C, n = x.size(2) * x.size(3);
  const T *xp = x.data_ptr<T>(), *gp = g.data_ptr<T>(), *bp = b.data_ptr<T>();
  T *yp = y.data_ptr<T>(), *mp = mean.data_ptr<T>(), *ip = invstd.data_ptr<T>();
  at::parallel_for(0, planes, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const T* u = xp + q * n;
      double s1, s2;
      plane_two_sums<T>(u, nullptr, u[0], n, s1, s2);
      const T dm = T(s1 / n), var = std::max(T(s2 / n) - dm * dm, T(0));
      const T inv = T(1) / std::sqrt(var + T(eps)), m = u[0] + dm;
      const T scale = gp[q % C] * inv, shift = bp[q % C];
      mp[q] = m;
      ip[q] = inv;
      T* o = yp + q * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) o[i] = (u[i] - m) * scale + shift;
    }
  });
}

// dx = a·dy + cb·(x − mean) + ce per plane, and the plane's shares of dγ (Σdy·x̂) and dβ (Σdy).
template <typename T>
void plane_norm_backward_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& g,
                             const at::Tensor& mean, const at::Tensor& invstd, at::Tensor& dx,
                             at::Tensor& dg, at::Tensor& db) {
  const int64_t C = x.size(1), planes = x.size(0) * C, n = x.size(2) * x.size(3);
  const T *dyp = dy.data_ptr<T>(), *xp = x.data_ptr<T>(), *gp = g.data_ptr<T>();
  const T *mp = mean.data_ptr<T>(), *ip = invstd.data_ptr<T>();
  T *dxp = dx.data_ptr<T>(), *dgp = dg.data_ptr<T>(), *dbp = db.data_ptr<T>();
  at::parallel_for(0, planes, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const T *u = xp + q * n, *w = dyp + q * n;
      double sdy, sdyx;
      plane_two_sums<T>(u, w, mp[q], n, sdy, sdyx);
      const T inv = ip[q], a = gp[q % C] * inv, m = mp[q];
      const T cb = -a * inv * inv * T(sdyx) / T(n), ce = -a * T(sdy) / T(n);
      dgp[q] = T(sdyx) * inv;
      dbp[q] = T(sdy);
      T* o = dxp + q * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) o[i] = a * w[i] + cb * (u[i] - m) + ce;
    }
  });
}

struct PlaneNormFn : public torch::autograd::Function<PlaneNormFn> {
  static at::Tensor forward(AutogradContext* ctx, at::Tensor input, at::Tensor gamma,
                            at::Tensor beta, double eps) {
    auto x = input.contiguous();
    const auto g = gamma.contiguous(), b = beta.contiguous();
    const int64_t C = x.size(1), planes = x.size(0) * C, elems = x.size(2) * x.size(3);
    auto y = at::empty_like(x);
    const auto sums = x.options().dtype(dw_sum_type(x));
    auto mean = at::empty({planes}, sums), invstd = at::empty({planes}, sums);
    ctx->saved_data["need"] = std::vector<int64_t>{input.requires_grad(), gamma.requires_grad(),
                                                   beta.requires_grad()};
    if (cpu_kernels_take(x)) {
      AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "s3net_plane_norm", [&] {
        plane_norm_forward_cpu<scalar_t>(x, g, b, eps, y, mean, invstd);
      });
      ctx->save_for_backward({x, g, mean, invstd});
      return y;
    }
    KernelGuard guard(x);
    auto scratch = at::empty({kernels(x).plane_norm_scratch(planes, elems)}, sums);
    const int rc = kernels(x).plane_norm_forward(
        dw_cuda_dtype(x), x.data_ptr(), y.data_ptr(), g.data_ptr(), b.data_ptr(), mean.data_ptr(),
        invstd.data_ptr(), scratch.data_ptr(), planes, elems, C, eps, kernel_stream(x));
    kernel_check("plane_norm", rc, "forward", x);
    ctx->save_for_backward({x, g, mean, invstd});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto sv = ctx->get_saved_variables();
    const at::Tensor &x = sv[0], &g = sv[1], &mean = sv[2], &invstd = sv[3];
    const auto need = ctx->saved_data["need"].toIntVector();
    auto dy = grads[0].contiguous();
    const int64_t N = x.size(0), C = x.size(1), planes = N * C, elems = x.size(2) * x.size(3);
    auto dx = at::empty_like(x);
    auto dg = at::empty({planes}, mean.options()), db = at::empty({planes}, mean.options());
    if (cpu_kernels_take(x)) {
      AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "s3net_plane_norm_backward", [&] {
        plane_norm_backward_cpu<scalar_t>(dy, x, g, mean, invstd, dx, dg, db);
      });
      return {need[0] ? dx : at::Tensor(), need[1] ? dg.view({N, C}).sum(0).to(g.scalar_type()) : at::Tensor(),
              need[2] ? db.view({N, C}).sum(0).to(g.scalar_type()) : at::Tensor(), at::Tensor()};
    }
    KernelGuard guard(x);
    auto scratch = at::empty({kernels(x).plane_norm_scratch(planes, elems)}, mean.options());
    const int rc = kernels(x).plane_norm_backward(
        dw_cuda_dtype(x), dy.data_ptr(), x.data_ptr(), g.data_ptr(), mean.data_ptr(),
        invstd.data_ptr(), dx.data_ptr(), dg.data_ptr(), db.data_ptr(), scratch.data_ptr(), planes,
        elems, C, kernel_stream(x));
    kernel_check("plane_norm", rc, "backward", x);
    // Each channel's γ and β gradients: its planes' shares added, image by image.
    return {need[0] ? dx : at::Tensor(), need[1] ? dg.view({N, C}).sum(0).to(g.scalar_type()) : at::Tensor(),
            need[2] ? db.view({N, C}).sum(0).to(g.scalar_type()) : at::Tensor(), at::Tensor()};
  }
};

// libtorch's batch_norm, one image at a time in effect: the N·C planes as the channels of one
// image, γ and β repeated per image (for N = 1, BatchNorm itself).
at::Tensor plane_norm_libtorch(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                               double eps) {
  const int64_t n = x.size(0);
  if (n == 1) return at::batch_norm(x, gamma, beta, {}, {}, true, 0.1, eps, true);
  auto y = at::batch_norm(x.flatten(0, 1).unsqueeze(0), gamma.repeat({n}), beta.repeat({n}), {},
                          {}, true, 0.1, eps, true);
  return y.view(x.sizes());
}

// ============================================================================================
// Stacked 1×1 convolutions
// ============================================================================================
//
// M independent 1×1 convolutions over (N, M·C, H, W), network j reading channels j·C..(j+1)·C:
// forward y = W_j · x_j (+ b) as one batched GEMM. The point is the weight gradient,
// Σ_pixels go · xᵀ: a GEMM with a tiny (O × C) result and a reduction over N·H·W, which cuBLAS
// ran as one 32×32 tile per network looping over all 65 536 pixels — a third of a batched
// step on an H100 (ncu, docs/gpu-checks/2026-11-26-h100). Splitting the reduction into chunks
// of pixels gives the GPU N·M·chunks independent products in one launch.
// On the CPU (float32, float64) the op serves every 1×1 conv of a fit, a lone network's too:
// the forward and the input gradient are pointwise_cpu's kernel on the NCHW planes as they are
// (oneDNN reordered each map into its blocked layout and back), the weight gradient one GEMM
// per image and network (see PointwiseFn).

// Length of the chunks the reduction over K pixels is cut into: a divisor of K near 1024, so
// the chunks tile it exactly; K itself (no split) for small planes or when no divisor fits.
int64_t reduction_chunk(int64_t K) {
  if (K <= 8192) return K;
  for (int64_t L = 1024; L >= 256; --L) {
    if (K % L == 0) return L;
  }
  for (int64_t L = 1025; L <= 4096; ++L) {
    if (K % L == 0) return L;
  }
  return K;
}

// How gemm_nt_split_k reads its chunks (process-wide; s3ops_set_split_k):
//  * copied: a and b are copied into chunk-major layout and ONE batched GEMM runs all B·S
//    chunk products: one launch keeps the whole GPU busy;
//  * strided: B batched GEMMs of S chunk products each, reading a and b where they are (a
//    chunk of row-major rows is a strided batch for cuBLAS): no copies, B launches;
//  * kernel: our own kernel (split_k_cuda.cu), every chunk of every image in one launch, the
//    operands read where they are; float32, float64 and bfloat16 operands on the kernels' path
//    (the others take auto's choice);
//  * auto (the default): strided for 16-bit operands, our kernel for the rest (copied where the
//    kernel does not take them or S3NET_SPLIT_K_KERNEL=0, g_switches). Measured on an H200
//    (batched fits of 16 and 32 networks): bfloat16 strided 6 % faster than copied and 10–12 %
//    faster than the kernel; float32 strided 3 % slower than copied (its copies are cheaper
//    than its extra launches relative to the GEMMs' time; 16-bit copies are relatively
//    dearer), the kernel 5–6 % faster than copied (2026-11-28).
enum SplitK : int { kSplitAuto = 0, kSplitCopied = 1, kSplitStrided = 2, kSplitKernel = 3 };
std::atomic<int> g_split_k{kSplitAuto};

// (B, P, Q) = Σ over K of a (B, P, K) · b (B, Q, K)ᵀ for contiguous a and b, in the sums'
// type: float32 for 16-bit operands (which the caller rounds once, after any sum of its own),
// else theirs. The K axis is cut into S chunks of L (reduction_chunk) whose products are
// summed at the end: a reduction over tens of thousands of pixels with a tiny result would
// otherwise run as one tile per product. Deterministic, no atomics. 16-bit products come out
// of cuBLAS as float32 (its accumulators, unrounded); libtorch's CPU GEMMs cannot do that, so
// there the operands are widened first.
at::Tensor gemm_nt_split_k(const at::Tensor& a, const at::Tensor& b) {
  const int64_t B = a.size(0), P = a.size(1), K = a.size(2), Q = b.size(1);
  const int64_t L = reduction_chunk(K), S = K / L;
  const int mode = g_split_k.load(std::memory_order_relaxed);
  const bool ours = mode == kSplitKernel ||
                    (mode == kSplitAuto && a.element_size() >= 4 && g_switches[kSwitchSplitKKernel].on());
  if (S > 1 && ours && kernels_take(a)) {
    const auto ac = a.contiguous(), bc = b.contiguous();
    KernelGuard guard(a);
    auto parts = at::empty({B, S, P, Q}, a.options().dtype(dw_sum_type(a)));
    const int rc = kernels(a).split_k_products(dw_cuda_dtype(a), ac.data_ptr(), bc.data_ptr(),
                                               parts.data_ptr(), B, P, Q, K, L, kernel_stream(a));
    kernel_check("split_k", rc, "chunk products", a);
    return parts.sum(1);
  }
  const bool half = is_half_width(a), widen_first = half && !a.is_cuda();
  const auto kind = widen_first ? at::kFloat : a.scalar_type();
  // Products of (n, R1, L) · (n, L, R2) into `out` (n, R1, R2), in the sums' type.
  auto product_into = [&](at::Tensor out, const at::Tensor& x, const at::Tensor& y) {
    if (half && !widen_first) {
      at::bmm_out(out, x, y, at::kFloat);
    } else {
      at::bmm_out(out, x, y);
    }
  };
  const auto sum_kind = half ? at::kFloat : kind;
  if (S == 1) {
    auto out = at::empty({B, P, Q}, a.options().dtype(sum_kind));
    product_into(out, a.to(kind), b.to(kind).transpose(1, 2));
    return out;
  }
  at::Tensor parts = at::empty({B, S, P, Q}, a.options().dtype(sum_kind));
  const int layout = mode == kSplitKernel ? kSplitAuto : mode;  // operands the kernel declines
  if (layout == kSplitStrided || (layout == kSplitAuto && half)) {
    for (int64_t i = 0; i < B; ++i) {
      auto ai = a[i].view({P, S, L}).transpose(0, 1).to(kind);  // (S, P, L), strides (L, K, 1)
      auto bi = b[i].view({Q, S, L}).permute({1, 2, 0}).to(kind);  // (S, L, Q), (L, 1, K)
      product_into(parts[i], ai, bi);
    }
  } else {
    // (B·S, R, L) from (B, R, K): chunk s of every row side by side, as `kind`.
    auto chunked = [&](const at::Tensor& t) {
      const int64_t R = t.size(1);
      auto r = at::empty({B, S, R, L}, t.options().dtype(kind));
      r.copy_(t.view({B, R, S, L}).transpose(1, 2));
      return r.view({B * S, R, L});
    };
    product_into(parts.view({B * S, P, Q}), chunked(a), chunked(b).transpose(1, 2));
  }
  return parts.sum(1);
}

// The CPU product of PointwiseFn on NCHW planes: y[n, j·O + o, p] = b[j·O + o] + Σ_c w[j, o, c] ·
// x[n, j·C + c, p] for a stack of M networks (b may be null). Why not libtorch's: oneDNN runs
// a 1×1 conv on its blocked layout, so each one reordered its NCHW input in and its output
// back, and the backward the saved input and the gradients again: about 56 ms of a 0.29 s
// fit step (ONEDNN_VERBOSE, README "Speed"), more than the convolutions themselves. MKL's
// GEMM on the planes as they are was slower still: rows 256 KB apart thrash its caches. Here
// each block of kPwBlock pixels of the C input rows is first copied into a small buffer (read
// in order, then reused from the first-level caches by every output), and RO outputs × RP
// vectors of pixels are summed in registers. Each output adds its bias, then the channels in
// order: the same sum whatever the block, thread or vector width.
constexpr int64_t kPwBlock = 128;

// What follows a 1×1 conv's sum (PointwiseFn's epilogue; kThen* above): nothing, `other + y`,
// or z = y kept and `other · y` returned. `other` and `z` lie like y (null when unused).
template <typename T>
struct PwThen {
  BiasThen then;
  const T* other;
  T* z;
  // The same, `at` values further on (a tile's or a block's place in y).
  PwThen at(int64_t at) const {
    return {then, other ? other + at : nullptr, z ? z + at : nullptr};
  }
};

// Writes a 1×1 conv's vector `v` at y[i] through the epilogue: other + v (the add it stands
// for, whose operands come in this order), or z[i] = v and other · v. The vector type is
// Vec<T, VB>::type named as such: passed as a template argument (deduced, explicit, or through
// std::conditional) it loses its typedef's alignment of one element, and the stores became
// aligned ones that fault on a plane's unaligned vectors.
template <typename T, int VB>
S3_INLINE void pw_store(T* __restrict y, int64_t i, const typename Vec<T, VB>::type& value,
                        const PwThen<T>& then) {
  using V = typename Vec<T, VB>::type;
  V v = value;  // by reference: a 32-byte vector by value draws GCC's note on its ABI
  if (then.then == kThenResidual) {
    v = *(const V*)(then.other + i) + v;
  } else if (then.then == kThenGate) {
    *(V*)(then.z + i) = v;
    v = *(const V*)(then.other + i) * v;
  }
  *(V*)(y + i) = v;
}

// The same for a single value.
template <typename T>
S3_INLINE void pw_store_one(T* __restrict y, int64_t i, T v, const PwThen<T>& then) {
  if (then.then == kThenResidual) {
    v = then.other[i] + v;
  } else if (then.then == kThenGate) {
    then.z[i] = v;
    v = then.other[i] * v;
  }
  y[i] = v;
}

template <typename T, int VB, int RO, int RP>
S3_INLINE void pw_tile(const T* __restrict pack, int64_t C, const T* __restrict w,
                       const T* bias, T* __restrict y, int64_t P, const PwThen<T>& then) {
  using V = typename Vec<T, VB>::type;
  constexpr int L = Vec<T, VB>::lanes;
  V acc[RO][RP];
  for (int r = 0; r < RO; ++r)
    for (int q = 0; q < RP; ++q) acc[r][q] = V{} + (bias ? bias[r] : T(0));
  for (int64_t c = 0; c < C; ++c) {
    V xv[RP];
    for (int q = 0; q < RP; ++q) xv[q] = *(const V*)(pack + c * kPwBlock + q * L);
    for (int r = 0; r < RO; ++r) {
      const T wv = w[r * C + c];
      for (int q = 0; q < RP; ++q) acc[r][q] += wv * xv[q];
    }
  }
  for (int r = 0; r < RO; ++r)
    for (int q = 0; q < RP; ++q) pw_store<T, VB>(y, r * P + q * L, acc[r][q], then);
}

// One block of `len` (≤ kPwBlock) pixels from p0 of one image and network: x (C, P), w (O, C),
// bias (O) or null, y (O, P) and the epilogue's planes laid out like it; `pack` holds
// C·kPwBlock values.
template <typename T, int VB, int RO, int RP>
S3_INLINE void pw_block(const T* x, int64_t P, int64_t C, const T* w, const T* bias, int64_t O,
                        T* y, int64_t p0, int64_t len, T* pack, const PwThen<T>& then) {
  constexpr int64_t step = RP * Vec<T, VB>::lanes;
  for (int64_t c = 0; c < C; ++c) std::memcpy(pack + c * kPwBlock, x + c * P + p0, len * sizeof(T));
  // The next block's C row pieces, one per plane, P values apart: more streams than the
  // hardware prefetchers follow, so the copy above waits on its cache misses (this copy and the
  // depthwise kernels' plane copies took 8–9 % of a CPU fit step's samples in `memcpy`). Asked
  // for now, they arrive while this block computes (a step 1.5 % faster in five alternating
  // pairs of 12-step runs: within this VM's noise, kept because it costs nothing).
  if (p0 + len < P) {
    const int64_t next = std::min(kPwBlock, P - p0 - len) * (int64_t)sizeof(T);
    for (int64_t c = 0; c < C; ++c) {
      const char* row = (const char*)(x + c * P + p0 + len);
      for (int64_t b = 0; b < next; b += 64) __builtin_prefetch(row + b);
    }
  }
  const int64_t full = len / step * step;
  int64_t o = 0;
  for (; o + RO <= O; o += RO) {
    for (int64_t p = 0; p < full; p += step)
      pw_tile<T, VB, RO, RP>(pack + p, C, w + o * C, bias ? bias + o : nullptr, y + o * P + p0 + p,
                             P, then.at(o * P + p0 + p));
  }
  for (; o < O; ++o) {
    for (int64_t p = 0; p < full; p += step)
      pw_tile<T, VB, 1, RP>(pack + p, C, w + o * C, bias ? bias + o : nullptr, y + o * P + p0 + p,
                            P, then.at(o * P + p0 + p));
  }
  for (o = 0; o < O; ++o) {
    for (int64_t p = full; p < len; ++p) {
      T sum = bias ? bias[o] : T(0);
      for (int64_t c = 0; c < C; ++c) sum += w[o * C + c] * pack[c * kPwBlock + p];
      pw_store_one(y, o * P + p0 + p, sum, then);
    }
  }
}

#define S3_PW_ARGS                                                                            \
  const T *x, int64_t P, int64_t C, const T *w, const T *bias, int64_t O, T *y, int64_t p0,     \
      int64_t len, T *pack, const PwThen<T> &then
#define S3_PW_PASS x, P, C, w, bias, O, y, p0, len, pack, then
template <typename T>
void pw_block_base(S3_PW_ARGS) { pw_block<T, 16, 4, 2>(S3_PW_PASS); }
template <typename T>
S3_AVX2 void pw_block_avx2(S3_PW_ARGS) { pw_block<T, 32, 8, 1>(S3_PW_PASS); }
template <typename T>
S3_AVX512 void pw_block_avx512(S3_PW_ARGS) { pw_block<T, 32, 8, 2>(S3_PW_PASS); }

// x (N, M, C, P) contiguous, w (M, O, C) contiguous, bias (M·O) or undefined → (N, M, O, P);
// then `then` with `other` (N, M, O, P, contiguous; undefined for nothing): for a gate, the
// value before it goes to `*z` (made here) and other · value is returned.
at::Tensor pointwise_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias,
                         BiasThen then = kThenNothing, const at::Tensor& other = at::Tensor(),
                         at::Tensor* z = nullptr) {
  const int64_t N = x.size(0), M = x.size(1), C = x.size(2), P = x.size(3), O = w.size(1);
  auto y = at::empty({N, M, O, P}, x.options());
  if (then == kThenGate) *z = at::empty_like(y);
  if (y.numel() == 0) return y;
  if (C == 0) {
    // No sum: the bias alone (or zeros), then the epilogue as libtorch's op.
    auto v = bias.defined() ? y.copy_(bias.view({1, M, O, 1}).expand_as(y)) : y.zero_();
    if (then == kThenResidual) return other + v;
    if (then == kThenGate) return other * z->copy_(v);
    return v;
  }
  const int64_t blocks = (P + kPwBlock - 1) / kPwBlock;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "s3net_pointwise", [&] {
    using T = scalar_t;
    const T* xp = x.data_ptr<T>();
    const T* wp = w.data_ptr<T>();
    const T* bp = bias.defined() ? bias.data_ptr<T>() : nullptr;
    T* yp = y.data_ptr<T>();
    const PwThen<T> all{then, then != kThenNothing ? other.data_ptr<T>() : nullptr,
                        then == kThenGate ? z->data_ptr<T>() : nullptr};
    auto fn = cpu_has_avx512() ? &pw_block_avx512<T>
              : cpu_has_avx2() ? &pw_block_avx2<T>
                               : &pw_block_base<T>;
    at::parallel_for(0, N * M * blocks, 16, [&](int64_t i0, int64_t i1) {
      std::vector<T> pack(C * kPwBlock);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t nm = i / blocks, j = nm % M, p0 = (i % blocks) * kPwBlock;
        fn(xp + nm * C * P, P, C, wp + j * O * C, bp ? bp + j * O : nullptr, O, yp + nm * O * P,
           p0, std::min(kPwBlock, P - p0), pack.data(), all.at(nm * O * P));
      }
    });
  });
  return y;
}

// The weight gradient of the CPU 1×1 conv: gw[o][c] = Σ_p gy[o][p] · x[c][p], both operands
// NCHW planes. MKL's GEMM took 1.45–1.7 ms for 32 × 32 channels over 256² pixels and 4.3 ms
// for 32 × 96 (two threads); these loops about 1.0 and 3.4. Why: the pixel axis is the sum's
// axis and the planes' contiguous one, so RO outputs × RC inputs each keep a vector of
// per-lane partial sums in registers over a whole stretch of pixels, loading each plane's
// vector once per tile and reducing across lanes only at the end of the stretch.
constexpr int64_t kWgStretch = 2048;

template <typename T, int VB, int RO, int RC>
S3_INLINE void wg_tile(const T* __restrict gy, const T* __restrict x, int64_t P, int64_t p0,
                       int64_t p1, T* __restrict gw, int64_t C) {
  using V = typename Vec<T, VB>::type;
  constexpr int L = Vec<T, VB>::lanes;
  V acc[RO][RC];
  for (int r = 0; r < RO; ++r)
    for (int q = 0; q < RC; ++q) acc[r][q] = V{};
  int64_t p = p0;
  for (; p + L <= p1; p += L) {
    V xv[RC];
    for (int q = 0; q < RC; ++q) xv[q] = *(const V*)(x + q * P + p);
    for (int r = 0; r < RO; ++r) {
      const V g = *(const V*)(gy + r * P + p);
      for (int q = 0; q < RC; ++q) acc[r][q] += g * xv[q];
    }
  }
  for (int r = 0; r < RO; ++r) {
    for (int q = 0; q < RC; ++q) {
      T sum = 0;
      for (int l = 0; l < L; ++l) sum += acc[r][q][l];
      for (int64_t t = p; t < p1; ++t) sum += gy[r * P + t] * x[q * P + t];
      gw[r * C + q] += sum;
    }
  }
}

// gw (O, C) += the products over pixels [p0, p1), stretch by stretch (a stretch of the O + C
// planes stays in the second-level cache while every tile reads it).
template <typename T, int VB, int RO, int RC>
S3_INLINE void wg_range(const T* gy, const T* x, int64_t O, int64_t C, int64_t P, int64_t p0,
                        int64_t p1, T* gw) {
  for (int64_t s = p0; s < p1; s += kWgStretch) {
    const int64_t e = std::min(s + kWgStretch, p1);
    int64_t o = 0;
    for (; o + RO <= O; o += RO) {
      int64_t c = 0;
      for (; c + RC <= C; c += RC) wg_tile<T, VB, RO, RC>(gy + o * P, x + c * P, P, s, e, gw + o * C + c, C);
      for (; c < C; ++c) wg_tile<T, VB, RO, 1>(gy + o * P, x + c * P, P, s, e, gw + o * C + c, C);
    }
    for (; o < O; ++o) {
      int64_t c = 0;
      for (; c + RC <= C; c += RC) wg_tile<T, VB, 1, RC>(gy + o * P, x + c * P, P, s, e, gw + o * C + c, C);
      for (; c < C; ++c) wg_tile<T, VB, 1, 1>(gy + o * P, x + c * P, P, s, e, gw + o * C + c, C);
    }
  }
}

#define S3_WG_ARGS \
  const T *gy, const T *x, int64_t O, int64_t C, int64_t P, int64_t p0, int64_t p1, T *gw
// Tiles sized to the registers: 16 vector accumulators of 32 with AVX-512, 8 of 16 below.
template <typename T>
void wg_range_base(S3_WG_ARGS) { wg_range<T, 16, 2, 4>(gy, x, O, C, P, p0, p1, gw); }
template <typename T>
S3_AVX2 void wg_range_avx2(S3_WG_ARGS) { wg_range<T, 32, 2, 4>(gy, x, O, C, P, p0, p1, gw); }
template <typename T>
S3_AVX512 void wg_range_avx512(S3_WG_ARGS) { wg_range<T, 64, 4, 4>(gy, x, O, C, P, p0, p1, gw); }

// go (N, M, O, P), x (N, M, C, P), both contiguous → gw (M, O, C). Each (image, network) pair's
// pixels are split into one range per thread; the ranges' sums are added in order, then the
// images' in order. The split depends on P and the thread count only, so a network's gradient
// has the same bits alone and in a stack (as the fit's batching tests require).
at::Tensor pointwise_wgrad_cpu(const at::Tensor& go, const at::Tensor& x) {
  const int64_t N = go.size(0), M = go.size(1), O = go.size(2), P = go.size(3), C = x.size(2);
  auto gw = at::zeros({M, O, C}, go.options());
  if (N == 0 || P == 0 || O == 0 || C == 0) return gw;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), P / 1024));
  auto partial = at::empty({parts, O, C}, go.options());
  AT_DISPATCH_FLOATING_TYPES(go.scalar_type(), "s3net_pointwise_wgrad", [&] {
    using T = scalar_t;
    auto fn = cpu_has_avx512() ? &wg_range_avx512<T>
              : cpu_has_avx2() ? &wg_range_avx2<T>
                               : &wg_range_base<T>;
    const T* gp = go.data_ptr<T>();
    const T* xp = x.data_ptr<T>();
    T* pp = partial.data_ptr<T>();
    T* gwp = gw.data_ptr<T>();
    for (int64_t j = 0; j < M; ++j) {
      for (int64_t n = 0; n < N; ++n) {
        const T* g = gp + (n * M + j) * O * P;
        const T* xx = xp + (n * M + j) * C * P;
        at::parallel_for(0, parts, 1, [&](int64_t a, int64_t b) {
          for (int64_t k = a; k < b; ++k) {
            T* acc = pp + k * O * C;
            std::fill(acc, acc + O * C, T(0));
            fn(g, xx, O, C, P, P * k / parts, P * (k + 1) / parts, acc);
          }
        });
        T* dst = gwp + j * O * C;
        for (int64_t k = 0; k < parts; ++k)
          for (int64_t i = 0; i < O * C; ++i) dst[i] += pp[k * O * C + i];
      }
    }
  });
  return gw;
}

// The epilogue of a 1×1 conv on the kernels' path, after at::matmul's y (N, M, O, HW): the
// bias and `then` in one pass of the bias kernel; without a bias or off the kernels, the
// libtorch ops the epilogue stands for. Returns the output; for a gate, y becomes z.
at::Tensor pointwise_then(at::Tensor& y, const std::optional<at::Tensor>& bias, int64_t HW,
                          BiasThen then, const at::Tensor& other) {
  if (bias && bias_cuda_ok(y) && bias->scalar_type() == y.scalar_type() &&
      (then == kThenNothing || bias_cuda_ok(other))) {
    at::Tensor out = then == kThenGate ? at::empty_like(y) : at::Tensor();
    bias_add_cuda(y, *bias, HW, then, other, then == kThenGate ? &out : nullptr);
    return then == kThenGate ? out : y;
  }
  if (bias) add_bias(y, *bias, HW);
  if (then == kThenResidual) return other + y;
  if (then == kThenGate) return other * y;
  return y;
}

struct PointwiseFn : public torch::autograd::Function<PointwiseFn> {
  // `other` and `then`: what follows the conv (BiasThen; s3ops_pointwise_conv2d): the output is
  // conv + other (a residual) or other · conv (a gate), with the bits of the conv followed by
  // libtorch's add or multiply, and their gradients.
  static at::Tensor forward(AutogradContext* ctx, at::Tensor input, at::Tensor weight,
                            std::optional<at::Tensor> bias, int64_t models,
                            std::optional<at::Tensor> other, int64_t then_code) {
    const int64_t N = input.size(0), M = models, C = input.size(1) / M;
    const int64_t H = input.size(2), W = input.size(3), O = weight.size(0) / M;
    const auto then = static_cast<BiasThen>(then_code);
    auto x = input.contiguous().view({N, M, C, H * W});
    auto w = weight.contiguous().view({M, O, C});
    const at::Tensor o = then == kThenNothing ? at::Tensor() : other->contiguous().view({N, M, O, H * W});
    at::Tensor y, z;  // (N, M, O, HW); z: a gate's input
    if (cpu_kernels_take(x)) {
      y = pointwise_cpu(x, w, bias ? bias->contiguous() : at::Tensor(), then, o, &z);
    } else {
      z = at::matmul(w, x);
      y = pointwise_then(z, bias, H * W, then, o);
    }
    const bool gate = then == kThenGate;
    ctx->save_for_backward({weight.requires_grad() ? x : at::Tensor(),
                            input.requires_grad() ? w : at::Tensor(),
                            gate && other->requires_grad() ? z : at::Tensor(),
                            gate ? o : at::Tensor()});
    ctx->saved_data["shape"] = std::vector<int64_t>{N, M, C, O, H, W};
    ctx->saved_data["need_b"] = bias && bias->requires_grad();
    ctx->saved_data["then"] = then_code;
    ctx->saved_data["need_other"] = then != kThenNothing && other->requires_grad();
    return y.view({N, M * O, H, W});
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto sv = ctx->get_saved_variables();
    auto d = ctx->saved_data["shape"].toIntVector();
    const int64_t N = d[0], M = d[1], C = d[2], O = d[3], H = d[4], W = d[5], HW = H * W;
    const auto then = static_cast<BiasThen>(ctx->saved_data["then"].toInt());
    const bool need_other = ctx->saved_data["need_other"].toBool();
    auto go = grads[0].contiguous().view({N, M, O, HW});
    at::Tensor g_other;
    if (then == kThenResidual && need_other) {
      g_other = grads[0];
    } else if (then == kThenGate) {
      // y = u · z: the conv's gradient g · u, the gate's g · z (as libtorch's multiply).
      const at::Tensor& u = sv[3];
      const at::Tensor& z = sv[2];
      if (need_other && bias_cuda_ok(go) && bias_cuda_ok(u) && bias_cuda_ok(z)) {
        auto [gz, gu] = gate_grad_cuda(go, u, z);
        go = gz;
        g_other = gu.view({N, M * O, H, W});
      } else {
        if (need_other) g_other = (go * z).view({N, M * O, H, W});
        go = go * u;
      }
    }
    at::Tensor gi, gw, gb;
    if (sv[1].defined()) {
      const auto wt = sv[1].transpose(1, 2);  // (M, C, O)
      gi = (cpu_kernels_take(go) ? pointwise_cpu(go, wt.contiguous(), at::Tensor())
                                        : at::matmul(wt, go))
               .view({N, M * C, H, W});
    }
    if (sv[0].defined() && cpu_kernels_take(go)) {
      // Per (image, network): go (O, HW) · x (C, HW)ᵀ on the planes as they are (the split
      // reductions below serve a GPU), added over the images in order; a network's result
      // does not depend on the stack it trains in (see pointwise_wgrad_cpu).
      gw = pointwise_wgrad_cpu(go, sv[0]).view({M * O, C, 1, 1});
    } else if (sv[0].defined()) {
      // Per (image, network): go (O, HW) · x (C, HW)ᵀ, then summed over the images.
      // In the sums' type (float32 for 16-bit) until here: rounded once.
      auto g = gemm_nt_split_k(go.view({N * M, O, HW}), sv[0].view({N * M, C, HW}));
      gw = g.view({N, M * O, C}).sum(0).to(go.scalar_type()).view({M * O, C, 1, 1});
    }
    if (ctx->saved_data["need_b"].toBool()) gb = bias_grad(go, HW, M * O, go.scalar_type());
    return {gi, gw, gb, at::Tensor(), g_other, at::Tensor()};
  }
};

void pointwise_check(const at::Tensor& x, const at::Tensor& w,
                     const std::optional<at::Tensor>& b, int64_t models) {
  const char* nm = "pointwise_conv2d: ";
  TORCH_CHECK(models >= 1, nm, "need at least one network, got ", models);
  TORCH_CHECK(x.dim() == 4 && x.size(1) % models == 0, nm,
              "input must be (N, M·C, H, W) with M = ", models, ", got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble || is_half_width(x),
              nm, "input must be float32, float64, bfloat16 or float16, got ", x.scalar_type());
  const int64_t C = x.size(1) / models;
  TORCH_CHECK(w.dim() == 4 && w.size(0) % models == 0 && w.size(1) == C && w.size(2) == 1 &&
                  w.size(3) == 1,
              nm, "weight must be (M·O, ", C, ", 1, 1) with M = ", models, ", got ", w.sizes());
  TORCH_CHECK(w.scalar_type() == x.scalar_type() && w.device() == x.device(), nm,
              "weight dtype/device must match the input");
  if (b) {
    TORCH_CHECK(b->dim() == 1 && b->size(0) == w.size(0), nm, "bias must be [", w.size(0),
                "], got ", b->sizes());
    TORCH_CHECK(b->scalar_type() == x.scalar_type() && b->device() == x.device(), nm,
                "bias dtype/device must match the input");
  }
}

// ============================================================================================
// Deformable convolution (DCNv2), torchvision.ops.deform_conv2d semantics
// ============================================================================================
//
// Work is split into tiles of `tl` consecutive output pixels of one image. Per tile:
//  * geometry: for every tap kk and pixel t, the four bilinear corners (plane index and weight;
//    a corner outside the image gets weight 0 and index 0) and, for backward, the derivative
//    coefficients of the sample w.r.t. y and x;
//  * forward: columns (tl, K*C) = mask * bilinear sample, then out[:, tile] = W2 (O, K*C) .
//    cols^T (+ bias) with one libtorch GEMM;
//  * backward: grad_W2 += go_tile . cols, gcols = go_tile^T . W2, then per (pixel, tap, c) the
//    offset / mask gradients (accumulated per tile, written once) and the input gradient
//    (scattered into a per-thread buffer, summed at the end: no races).

using DeformShape = S3DeformDims;

template <typename T>
struct DeformTile {
  int64_t cap;                 // K * tile capacity; corner q of element e lives at q*cap + e
  std::vector<int32_t> idx;    // 4*cap
  std::vector<T> w;            // 4*cap bilinear weights (times mask in forward)
  std::vector<T> cy, cx;       // 4*cap d(sample)/dy, d(sample)/dx coefficients (backward)
  std::vector<T> m;            // cap: mask values (backward)
  std::vector<T> gy, gx, gm;   // cap: per-tile offset / mask gradient accumulators
  std::vector<T> by, bx;       // tile: each pixel's kernel origin (row, column)
  DeformTile(int64_t cap_, int64_t tile, bool backward)
      : cap(cap_), idx(4 * cap_), w(4 * cap_), by(tile), bx(tile) {
    if (backward) {
      cy.resize(4 * cap_);
      cx.resize(4 * cap_);
      m.resize(cap_);
      gy.resize(cap_);
      gx.resize(cap_);
      gm.resize(cap_);
    }
  }
};

// One tap's row of a tile: pixels t < tl. A function of its own so that its pointers are
// `__restrict` parameters; as locals of the caller gcc ignores that and gives up on the
// vectorisation (more alias checks than it will version for).
template <typename T, bool Backward, bool HasMask>
S3_INLINE void deform_geometry_tap(int64_t tl, const T* __restrict by, const T* __restrict bx,
                                   T di, T dj, const T* __restrict offy,
                                   const T* __restrict offx, const T* __restrict mk, int32_t H,
                                   int32_t W, int32_t* __restrict i0, int32_t* __restrict i1,
                                   int32_t* __restrict i2, int32_t* __restrict i3,
                                   T* __restrict w0, T* __restrict w1, T* __restrict w2,
                                   T* __restrict w3, T* __restrict cy0, T* __restrict cy1,
                                   T* __restrict cy2, T* __restrict cy3, T* __restrict cx0,
                                   T* __restrict cx1, T* __restrict cx2, T* __restrict cx3,
                                   T* __restrict mp) {
  const T Hf = (T)H, Wf = (T)W;
  for (int64_t t = 0; t < tl; ++t) {
    const T y = by[t] + di + offy[t];
    const T x = bx[t] + dj + offx[t];
    const T m = HasMask ? mk[t] : T(1);
    const bool in = (y > T(-1)) & (y < Hf) & (x > T(-1)) & (x < Wf);
    // Clamped into [-1, H] x [-1, W] (NaN to -1) so the integer conversion is defined; not
    // `in ? y : 0`, which makes gcc build a select of masks it cannot vectorise.
    const T y1 = y > T(-1) ? y : T(-1), x1 = x > T(-1) ? x : T(-1);
    const T yc = y1 < Hf ? y1 : Hf, xc = x1 < Wf ? x1 : Wf;
    const T yf = std::floor(yc), xf = std::floor(xc);
    const int32_t yl = (int32_t)yf, xl = (int32_t)xf;
    const T ly = yc - yf, lx = xc - xf, hy = T(1) - ly, hx = T(1) - lx;
    // Compared as floats, like `in`: masks of one width for the vectoriser.
    const bool vy0 = in & (yf >= T(0)), vy1 = in & (yf < Hf - T(1));
    const bool vx0 = xf >= T(0), vx1 = xf < Wf - T(1);
    const bool v0 = vy0 & vx0, v1 = vy0 & vx1, v2 = vy1 & vx0, v3 = vy1 & vx1;
    const int32_t r = yl * W + xl;
    i0[t] = v0 ? r : 0;
    i1[t] = v1 ? r + 1 : 0;
    i2[t] = v2 ? r + W : 0;
    i3[t] = v3 ? r + W + 1 : 0;
    const T a = Backward ? T(1) : m;  // the forward folds the mask into the weights
    w0[t] = v0 ? a * (hy * hx) : T(0);
    w1[t] = v1 ? a * (hy * lx) : T(0);
    w2[t] = v2 ? a * (ly * hx) : T(0);
    w3[t] = v3 ? a * (ly * lx) : T(0);
    if (Backward) {
      cy0[t] = v0 ? -hx : T(0);
      cy1[t] = v1 ? -lx : T(0);
      cy2[t] = v2 ? hx : T(0);
      cy3[t] = v3 ? lx : T(0);
      cx0[t] = v0 ? -hy : T(0);
      cx1[t] = v1 ? hy : T(0);
      cx2[t] = v2 ? -ly : T(0);
      cx3[t] = v3 ? ly : T(0);
      mp[t] = m;
    }
  }
}

// Geometry of one tile. off_n: (2K, Ho*Wo) of image n; mask_n: (K, Ho*Wo) or null.
//
// Written branch-free over the tile's pixels (selects, no early exits) so that the compiler
// vectorises it in the AVX2 and AVX-512 copies below: the scalar version, with its branches and
// a libm `floor` call in the baseline x86-64 code, took 18 % of the op's time at C = 32 (perf
// samples), more than building the columns. Same values as that version, bit for bit. A
// sample at NaN or outside (-1, H) x (-1, W) has all four weights 0 (torchvision's rule for
// the outside; NaN would otherwise reach an integer conversion).
template <typename T, bool Backward, bool HasMask>
S3_INLINE void deform_geometry_impl(const DeformShape& s, const T* off_n, const T* mask_n,
                                    int64_t p0, int64_t tl, DeformTile<T>& b) {
  const int64_t HWo = s.Ho * s.Wo, cap = b.cap;
  // The tile's sampling grid without offsets: row and column of each pixel's kernel origin.
  T* by = b.by.data();
  T* bx = b.bx.data();
  {
    int64_t ho = p0 / s.Wo, wo = p0 % s.Wo;
    for (int64_t t = 0; t < tl; ++t) {
      by[t] = (T)(ho * s.sh - s.ph);
      bx[t] = (T)(wo * s.sw - s.pw);
      if (++wo == s.Wo) { wo = 0; ++ho; }
    }
  }
  for (int64_t kk = 0; kk < s.K; ++kk) {
    const int64_t e = kk * tl;
    int32_t* i = b.idx.data() + e;
    T* w = b.w.data() + e;
    T* cy = Backward ? b.cy.data() + e : nullptr;
    T* cx = Backward ? b.cx.data() + e : nullptr;
    deform_geometry_tap<T, Backward, HasMask>(
        tl, by, bx, (T)((kk / s.kw) * s.dh), (T)((kk % s.kw) * s.dw),
        off_n + (2 * kk) * HWo + p0, off_n + (2 * kk + 1) * HWo + p0,
        HasMask ? mask_n + kk * HWo + p0 : nullptr, (int32_t)s.H, (int32_t)s.W, i, i + cap,
        i + 2 * cap, i + 3 * cap, w, w + cap, w + 2 * cap, w + 3 * cap, cy,
        cy ? cy + cap : nullptr, cy ? cy + 2 * cap : nullptr, cy ? cy + 3 * cap : nullptr, cx,
        cx ? cx + cap : nullptr, cx ? cx + 2 * cap : nullptr, cx ? cx + 3 * cap : nullptr,
        Backward ? b.m.data() + e : nullptr);
  }
}

// The four variants (forward or backward, with or without a mask), chosen per tile.
template <typename T>
S3_INLINE void deform_geometry_variant(const DeformShape& s, const T* off_n, const T* mask_n,
                                       int64_t p0, int64_t tl, bool backward, DeformTile<T>& b) {
  if (backward) {
    if (mask_n) deform_geometry_impl<T, true, true>(s, off_n, mask_n, p0, tl, b);
    else deform_geometry_impl<T, true, false>(s, off_n, mask_n, p0, tl, b);
  } else {
    if (mask_n) deform_geometry_impl<T, false, true>(s, off_n, mask_n, p0, tl, b);
    else deform_geometry_impl<T, false, false>(s, off_n, mask_n, p0, tl, b);
  }
}

#define S3_DEFORM_GEOM_ARGS                                                                  \
  const DeformShape &s, const T *off_n, const T *mask_n, int64_t p0, int64_t tl, bool backward, \
      DeformTile<T> &b
#define S3_DEFORM_GEOM_PASS s, off_n, mask_n, p0, tl, backward, b

template <typename T>
void deform_geometry_base(S3_DEFORM_GEOM_ARGS) { deform_geometry_variant<T>(S3_DEFORM_GEOM_PASS); }
template <typename T>
S3_AVX2 void deform_geometry_avx2(S3_DEFORM_GEOM_ARGS) {
  deform_geometry_variant<T>(S3_DEFORM_GEOM_PASS);
}
template <typename T>
S3_AVX512 void deform_geometry_avx512(S3_DEFORM_GEOM_ARGS) {
  deform_geometry_variant<T>(S3_DEFORM_GEOM_PASS);
}

// The widest copy of the geometry this CPU runs.
template <typename T>
void deform_geometry(S3_DEFORM_GEOM_ARGS) {
  static const auto fn = cpu_has_avx512() ? &deform_geometry_avx512<T>
                         : cpu_has_avx2() ? &deform_geometry_avx2<T>
                                          : &deform_geometry_base<T>;
  fn(S3_DEFORM_GEOM_PASS);
}

// Layout changes between NCHW and the kernels' channels-last maps. libtorch's strided copy took
// 2.1 ms one way and 1.1 ms back for a 1×32×256² map (two threads, warm); these go block by
// block of 16 pixels, so each channel's stretch is read (or written) in one run and the block's
// pixels stay in the first-level cache: about 0.8 ms one way on one thread.
constexpr int64_t kLayoutBlock = 16;

// x (N, C, H, W), any strides -> a new (N, H, W, C) contiguous tensor.
at::Tensor to_channels_last(const at::Tensor& x_in) {
  const auto x = x_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  auto out = at::empty({N, x.size(2), x.size(3), C}, x.options());
  if (out.numel() == 0) return out;
  const int64_t nb = (HW + kLayoutBlock - 1) / kLayoutBlock;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "s3net_to_channels_last", [&] {
    const scalar_t* src = x.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, N * nb, 64, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t n = b / nb, p0 = (b % nb) * kLayoutBlock;
        const int64_t p1 = std::min(p0 + kLayoutBlock, HW);
        const scalar_t* sn = src + n * C * HW;
        scalar_t* dn = dst + n * HW * C;
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t* sc = sn + c * HW;
          for (int64_t p = p0; p < p1; ++p) dn[p * C + c] = sc[p];
        }
      }
    });
  });
  return out;
}

// (N, C, H, W) contiguous = the sum of `parts`, each (N, H, W, C) contiguous: the per-thread
// input gradients of the deformable conv's backward, added and turned back in one pass.
at::Tensor sum_to_nchw(const std::vector<at::Tensor>& parts) {
  const auto& p0t = parts.front();
  const int64_t N = p0t.size(0), H = p0t.size(1), W = p0t.size(2), C = p0t.size(3);
  const int64_t HW = H * W;
  auto out = at::empty({N, C, H, W}, p0t.options());
  if (out.numel() == 0) return out;
  const int64_t nb = (HW + kLayoutBlock - 1) / kLayoutBlock;
  AT_DISPATCH_FLOATING_TYPES(p0t.scalar_type(), "s3net_sum_to_nchw", [&] {
    using T = scalar_t;
    std::vector<const T*> src;
    for (const auto& t : parts) src.push_back(t.data_ptr<T>());
    T* dst = out.data_ptr<T>();
    at::parallel_for(0, N * nb, 64, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t n = b / nb, q0 = (b % nb) * kLayoutBlock;
        const int64_t q1 = std::min(q0 + kLayoutBlock, HW);
        T* dn = dst + n * C * HW;
        for (int64_t c = 0; c < C; ++c) {
          for (int64_t p = q0; p < q1; ++p) {
            T v = src[0][(n * HW + p) * C + c];
            for (size_t k = 1; k < src.size(); ++k) v += src[k][(n * HW + p) * C + c];
            dn[c * HW + p] = v;
          }
        }
      }
    });
  });
  return out;
}

// The input is used channels-last, (N, H, W, C), so that a bilinear corner is a contiguous run
// of C values: building the columns and scattering the input gradient are then plain vector
// loops over c with no gathers, and the per-tap geometry is read once per pixel, not once per
// channel. Columns are stored transposed, colsT (tl, K*C) with index t*K*C + kk*C + c, and the
// weight is permuted to match, W2 (O, K*C) = weight.permute(0, 2, 3, 1).

// colsT[t][kk*C + c] = (m ? m[e] : 1) * sum_q w[q][e] * x_n[idx[q][e]*C + c],  e = kk*tl + t.
template <typename T>
S3_INLINE void deform_cols_impl(const T* __restrict x_n, int64_t C, int64_t K, int64_t tl,
                                int64_t cap, const int32_t* __restrict idx,
                                const T* __restrict w, const T* __restrict m,
                                T* __restrict colsT) {
  const int64_t KC = K * C;
  for (int64_t t = 0; t < tl; ++t) {
    for (int64_t kk = 0; kk < K; ++kk) {
      const int64_t e = kk * tl + t;
      const T s = m ? m[e] : T(1);
      const T a0 = s * w[e], a1 = s * w[cap + e], a2 = s * w[2 * cap + e], a3 = s * w[3 * cap + e];
      const T* __restrict p0 = x_n + (int64_t)idx[e] * C;
      const T* __restrict p1 = x_n + (int64_t)idx[cap + e] * C;
      const T* __restrict p2 = x_n + (int64_t)idx[2 * cap + e] * C;
      const T* __restrict p3 = x_n + (int64_t)idx[3 * cap + e] * C;
      T* __restrict dst = colsT + t * KC + kk * C;
      for (int64_t c = 0; c < C; ++c) dst[c] = a0 * p0[c] + a1 * p1[c] + a2 * p2[c] + a3 * p3[c];
    }
  }
}

template <typename T>
void deform_cols_base(const T* x_n, int64_t C, int64_t K, int64_t tl, int64_t cap,
                      const int32_t* idx, const T* w, const T* m, T* colsT) {
  deform_cols_impl<T>(x_n, C, K, tl, cap, idx, w, m, colsT);
}
template <typename T>
S3_AVX2 void deform_cols_avx2(const T* x_n, int64_t C, int64_t K, int64_t tl, int64_t cap,
                              const int32_t* idx, const T* w, const T* m, T* colsT) {
  deform_cols_impl<T>(x_n, C, K, tl, cap, idx, w, m, colsT);
}

// s[q] = Σ_c g[c] · p_q[c] for the four corners of a sample. For float and C a multiple of 8
// the four sums run in 8-lane vectors and are reduced together by two rounds of pairwise
// shuffles: gcc reduced each one separately, through the stack, which took about a fifth of
// the backward's sampling time at C = 32.
template <typename T>
S3_INLINE void corner_dots(const T* __restrict g, const T* __restrict p0, const T* __restrict p1,
                           const T* __restrict p2, const T* __restrict p3, int64_t C, T* s) {
  if constexpr (std::is_same_v<T, float>) {
    if (C % 8 == 0) {
      using V = Vec<float, 32>::type;
      typedef int32_t M __attribute__((vector_size(32)));
      V a0{}, a1{}, a2{}, a3{};
      for (int64_t c = 0; c < C; c += 8) {
        const V gv = *(const V*)(g + c);
        a0 += gv * *(const V*)(p0 + c);
        a1 += gv * *(const V*)(p1 + c);
        a2 += gv * *(const V*)(p2 + c);
        a3 += gv * *(const V*)(p3 + c);
      }
      // Pairs of lanes, then pairs of pairs: u = [a0, a1, a2, a3 over lanes 0-3 | same, 4-7].
      const M even = {0, 8, 2, 10, 4, 12, 6, 14}, odd = {1, 9, 3, 11, 5, 13, 7, 15};
      const V t01 = __builtin_shuffle(a0, a1, even) + __builtin_shuffle(a0, a1, odd);
      const V t23 = __builtin_shuffle(a2, a3, even) + __builtin_shuffle(a2, a3, odd);
      const M lo = {0, 1, 8, 9, 4, 5, 12, 13}, hi = {2, 3, 10, 11, 6, 7, 14, 15};
      const V u = __builtin_shuffle(t01, t23, lo) + __builtin_shuffle(t01, t23, hi);
      for (int q = 0; q < 4; ++q) s[q] = u[q] + u[q + 4];
      return;
    }
  }
  T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t c = 0; c < C; ++c) {
    s0 += g[c] * p0[c];
    s1 += g[c] * p1[c];
    s2 += g[c] * p2[c];
    s3 += g[c] * p3[c];
  }
  s[0] = s0; s[1] = s1; s[2] = s2; s[3] = s3;
}

// Backward through the sampling for one tile; gcolsT (tl, K*C) is the gradient of the columns.
// coord: gm[e] = sample value . gcol, gy/gx[e] = mask * d(sample)/dy,dx . gcol (dots over c);
// gi_n (may be null, channels-last): gi[idx_q*C + c] += mask * w_q * gcol[c].
template <typename T>
S3_INLINE void deform_bwd_impl(const T* __restrict x_n, int64_t C, int64_t K, int64_t tl,
                               int64_t cap, const int32_t* __restrict idx,
                               const T* __restrict w, const T* __restrict cy,
                               const T* __restrict cx, const T* __restrict m,
                               const T* __restrict gcolsT, bool coord, T* __restrict gy,
                               T* __restrict gx, T* __restrict gm, T* gi_n) {
  const int64_t KC = K * C;
  for (int64_t t = 0; t < tl; ++t) {
    for (int64_t kk = 0; kk < K; ++kk) {
      const int64_t e = kk * tl + t;
      const T* __restrict g = gcolsT + t * KC + kk * C;
      const int64_t o0 = (int64_t)idx[e] * C, o1 = (int64_t)idx[cap + e] * C;
      const int64_t o2 = (int64_t)idx[2 * cap + e] * C, o3 = (int64_t)idx[3 * cap + e] * C;
      if (coord) {
        T sq[4];
        corner_dots<T>(g, x_n + o0, x_n + o1, x_n + o2, x_n + o3, C, sq);
        const T s0 = sq[0], s1 = sq[1], s2 = sq[2], s3 = sq[3];
        const int64_t q1 = cap + e, q2 = 2 * cap + e, q3 = 3 * cap + e;
        gm[e] = w[e] * s0 + w[q1] * s1 + w[q2] * s2 + w[q3] * s3;
        gy[e] = m[e] * (cy[e] * s0 + cy[q1] * s1 + cy[q2] * s2 + cy[q3] * s3);
        gx[e] = m[e] * (cx[e] * s0 + cx[q1] * s1 + cx[q2] * s2 + cx[q3] * s3);
      }
      if (gi_n) {
        const T me = m[e];
        // Separate loops: invalid corners all point at pixel 0 (with weight 0) and may alias.
        const int64_t offs[4] = {o0, o1, o2, o3};
        for (int q = 0; q < 4; ++q) {
          const T a = me * w[q * cap + e];
          if (a == T(0)) continue;
          T* __restrict gp = gi_n + offs[q];
          for (int64_t c = 0; c < C; ++c) gp[c] += a * g[c];
        }
      }
    }
  }
}

#define S3_DEFORM_BWD_ARGS                                                                   \
  const T *x_n, int64_t C, int64_t K, int64_t tl, int64_t cap, const int32_t *idx, const T *w, \
      const T *cy, const T *cx, const T *m, const T *gcolsT, bool coord, T *gy, T *gx, T *gm, \
      T *gi_n
#define S3_DEFORM_BWD_PASS x_n, C, K, tl, cap, idx, w, cy, cx, m, gcolsT, coord, gy, gx, gm, gi_n

template <typename T>
void deform_bwd_base(S3_DEFORM_BWD_ARGS) {
  deform_bwd_impl<T>(S3_DEFORM_BWD_PASS);
}
template <typename T>
S3_AVX2 void deform_bwd_avx2(S3_DEFORM_BWD_ARGS) {
  deform_bwd_impl<T>(S3_DEFORM_BWD_PASS);
}

// Output pixels per tile: the column buffer (K*C x tile) about 512 KiB, and at least ~4 tiles
// per thread when the batch allows it. S3OPS_DEFORM_TILE overrides (for tuning).
int64_t deform_tile(const DeformShape& s, size_t elem) {
  const int64_t CK = s.C * s.K;
  int64_t t = (int64_t)(1 << 19) / std::max<int64_t>(1, CK * (int64_t)elem);
  t = std::min<int64_t>(std::max<int64_t>(t, 64), 4096);
  if (const char* env = std::getenv("S3OPS_DEFORM_TILE")) t = std::max<int64_t>(1, std::atoll(env));
  const int64_t HWo = s.Ho * s.Wo;
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  const int64_t per = (s.N * HWo + 4 * nt - 1) / (4 * nt);
  t = std::min(t, std::max<int64_t>(per, 16));
  return std::max<int64_t>(1, std::min(t, HWo));
}

// x_cl: channels-last contiguous (N, H, W, C); W2: (O, K*C), or (N, O, K*C) per image.
at::Tensor deform_forward(const DeformShape& s, const at::Tensor& x_cl, const at::Tensor& off,
                          const at::Tensor& mask, const at::Tensor& W2,
                          const at::Tensor& bias) {
  const int64_t HW = s.H * s.W, HWo = s.Ho * s.Wo, CK = s.C * s.K;
  auto out = at::empty({s.N, s.O, s.Ho, s.Wo}, x_cl.options());
  if (out.numel() == 0) return out;
  auto out3 = out.view({s.N, s.O, HWo});
  // Shared weights: W2 (O, K*C), bias (O). Per-image weights: W2 (N, O, K*C), bias (N, O).
  const bool per_image = W2.dim() == 3;
  at::Tensor b2 = bias.defined() ? bias.view({per_image ? s.N : 1, s.O, 1}) : at::Tensor();
  const int64_t T_tile = deform_tile(s, x_cl.element_size());
  const int64_t ntiles = (HWo + T_tile - 1) / T_tile;
  AT_DISPATCH_FLOATING_TYPES(x_cl.scalar_type(), "s3net_deform_fwd", [&] {
    using T = scalar_t;
    const T* xp = x_cl.data_ptr<T>();
    const T* op = off.data_ptr<T>();
    const T* mp = mask.defined() ? mask.data_ptr<T>() : nullptr;
    auto colsfn = cpu_has_avx2() ? &deform_cols_avx2<T> : &deform_cols_base<T>;
    at::parallel_for(0, s.N * ntiles, 1, [&](int64_t b0, int64_t b1) {
      at::NoGradGuard no_grad;
      DeformTile<T> buf(s.K * T_tile, T_tile, false);
      auto cols_full = at::empty({T_tile * CK}, x_cl.options());
      for (int64_t it = b0; it < b1; ++it) {
        const int64_t n = it / ntiles, p0 = (it % ntiles) * T_tile;
        const int64_t tl = std::min(T_tile, HWo - p0);
        deform_geometry<T>(s, op + n * 2 * s.K * HWo, mp ? mp + n * s.K * HWo : nullptr, p0, tl,
                           false, buf);
        colsfn(xp + n * HW * s.C, s.C, s.K, tl, buf.cap, buf.idx.data(), buf.w.data(), nullptr,
               cols_full.data_ptr<T>());
        auto colsT = cols_full.narrow(0, 0, tl * CK).view({tl, CK});
        auto ov = out3.select(0, n).narrow(1, p0, tl);
        const auto Wn = per_image ? W2.select(0, n) : W2;
        if (b2.defined()) {
          at::addmm_out(ov, b2.select(0, per_image ? n : 0).expand({s.O, tl}), Wn, colsT.t());
        } else {
          at::mm_out(ov, Wn, colsT.t());
        }
      }
    });
  });
  return out;
}

// Returns {grad_input, grad_offset, grad_mask, grad_W2 (shaped like W2), grad_bias}; undefined where
// not needed. grad_input is NCHW.
std::vector<at::Tensor> deform_backward(const DeformShape& s, const at::Tensor& x_cl,
                                        const at::Tensor& off, const at::Tensor& mask,
                                        const at::Tensor& W2, const at::Tensor& go,
                                        bool need_in, bool need_off, bool need_mask,
                                        bool need_w, bool need_b) {
  const int64_t HW = s.H * s.W, HWo = s.Ho * s.Wo, CK = s.C * s.K;
  at::Tensor gi, goff, gmask, gw, gb;
  need_mask = need_mask && mask.defined();
  if (need_in) gi = at::zeros_like(x_cl);  // (N, H, W, C) until the end
  // gi and the other threads' buffers, summed into the NCHW result at the end.
  std::vector<at::Tensor> gi_parts{gi};
  if (need_off) goff = at::zeros_like(off);
  if (need_mask) gmask = at::zeros_like(mask);
  const bool per_image = W2.dim() == 3;
  if (need_w) gw = at::zeros_like(W2);
  if (need_b) gb = per_image ? go.sum({2, 3}) : go.sum({0, 2, 3});
  const bool coord = need_off || need_mask;
  if ((need_in || coord || need_w) && go.numel() > 0) {
    auto go3 = go.view({s.N, s.O, HWo});
    const int64_t T_tile = deform_tile(s, x_cl.element_size());
    const int64_t ntiles = (HWo + T_tile - 1) / T_tile;
    const int64_t nthr = std::max<int64_t>(1, at::get_num_threads());
    std::vector<at::Tensor> gi_bufs(nthr), gw_bufs(nthr);
    AT_DISPATCH_FLOATING_TYPES(x_cl.scalar_type(), "s3net_deform_bwd", [&] {
      using T = scalar_t;
      const T* xp = x_cl.data_ptr<T>();
      const T* op = off.data_ptr<T>();
      const T* mp = mask.defined() ? mask.data_ptr<T>() : nullptr;
      T* goffp = need_off ? goff.data_ptr<T>() : nullptr;
      T* gmaskp = need_mask ? gmask.data_ptr<T>() : nullptr;
      const bool avx2 = cpu_has_avx2();
      auto colsfn = avx2 ? &deform_cols_avx2<T> : &deform_cols_base<T>;
      auto bwdfn = avx2 ? &deform_bwd_avx2<T> : &deform_bwd_base<T>;
      at::parallel_for(0, s.N * ntiles, 1, [&](int64_t b0, int64_t b1) {
        at::NoGradGuard no_grad;
        const int64_t tid = at::get_thread_num();
        TORCH_CHECK(tid >= 0 && tid < nthr, "deform_conv2d backward: unexpected thread id ", tid);
        // Thread 0 accumulates straight into the results; the others into their own buffers.
        at::Tensor gi_t, gw_t;
        if (need_in) gi_t = tid == 0 ? gi : (gi_bufs[tid] = at::zeros_like(x_cl));
        if (need_w) gw_t = tid == 0 ? gw : (gw_bufs[tid] = at::zeros_like(W2));
        T* gip = need_in ? gi_t.data_ptr<T>() : nullptr;
        DeformTile<T> buf(s.K * T_tile, T_tile, true);
        auto cols_full = need_w ? at::empty({T_tile * CK}, x_cl.options()) : at::Tensor();
        auto gcols_full = at::empty({T_tile * CK}, x_cl.options());
        for (int64_t it = b0; it < b1; ++it) {
          const int64_t n = it / ntiles, p0 = (it % ntiles) * T_tile;
          const int64_t tl = std::min(T_tile, HWo - p0);
          deform_geometry<T>(s, op + n * 2 * s.K * HWo, mp ? mp + n * s.K * HWo : nullptr, p0,
                             tl, true, buf);
          auto go_tile = go3.select(0, n).narrow(1, p0, tl);  // (O, tl), row stride HWo
          const T* x_n = xp + n * HW * s.C;
          if (need_w) {
            colsfn(x_n, s.C, s.K, tl, buf.cap, buf.idx.data(), buf.w.data(), buf.m.data(),
                   cols_full.data_ptr<T>());
            (per_image ? gw_t.select(0, n) : gw_t)
                .addmm_(go_tile, cols_full.narrow(0, 0, tl * CK).view({tl, CK}));
          }
          if (!(need_in || coord)) continue;
          auto gcolsT = gcols_full.narrow(0, 0, tl * CK).view({tl, CK});
          at::mm_out(gcolsT, go_tile.t(), per_image ? W2.select(0, n) : W2);
          bwdfn(x_n, s.C, s.K, tl, buf.cap, buf.idx.data(), buf.w.data(), buf.cy.data(),
                buf.cx.data(), buf.m.data(), gcols_full.data_ptr<T>(), coord, buf.gy.data(),
                buf.gx.data(), buf.gm.data(), gip ? gip + n * HW * s.C : nullptr);
          if (!coord) continue;
          for (int64_t kk = 0; kk < s.K; ++kk) {
            const T* gy = buf.gy.data() + kk * tl;
            const T* gx = buf.gx.data() + kk * tl;
            const T* gm = buf.gm.data() + kk * tl;
            if (goffp) {
              std::copy(gy, gy + tl, goffp + (n * 2 * s.K + 2 * kk) * HWo + p0);
              std::copy(gx, gx + tl, goffp + (n * 2 * s.K + 2 * kk + 1) * HWo + p0);
            }
            if (gmaskp) std::copy(gm, gm + tl, gmaskp + (n * s.K + kk) * HWo + p0);
          }
        }
      });
    });
    for (int64_t t = 1; t < nthr; ++t) {
      if (gw_bufs[t].defined()) gw.add_(gw_bufs[t]);
      if (gi_bufs[t].defined()) gi_parts.push_back(gi_bufs[t]);
    }
  }
  if (gi.defined()) gi = sum_to_nchw(gi_parts);
  return {gi, goff, gmask, gw, gb};
}
DeformShape deform_check(const at::Tensor& x, const at::Tensor& off,
                         const std::optional<at::Tensor>& mask, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, const int64_t* g) {
  const char* nm = "deform_conv2d: ";
  TORCH_CHECK(x.dim() == 4, nm, "input must be 4-D (N, C, H, W), got ", x.sizes());
  // bfloat16 features reach here only on CUDA (s3ops_deform_conv2d widens them elsewhere), with
  // float32 offsets, mask, weight and bias.
  const bool bf16 = x.scalar_type() == at::kBFloat16 && on_kernels(x);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble || bf16, nm,
              "input must be float32, float64, bfloat16 or float16, got ", x.scalar_type());
#ifdef S3OPS_CUDA
  TORCH_CHECK(x.device().is_cpu() || x.device().is_cuda(), nm, "input on ", x.device(),
              ": only CPU and CUDA kernels exist");
#else
  TORCH_CHECK(x.device().is_cpu(), nm, "input on ", x.device(),
              ": this build has no CUDA kernel (nvcc was not found when it was compiled)");
#endif
  const auto operand_type = bf16 ? at::kFloat : x.scalar_type();
  auto same = [&](const at::Tensor& t, const char* what) {
    TORCH_CHECK(t.scalar_type() == operand_type, nm, what, " dtype ", t.scalar_type(),
                " differs from the input's ", x.scalar_type());
    TORCH_CHECK(t.device() == x.device(), nm, what, " is on ", t.device(), ", the input on ",
                x.device());
  };
  same(off, "offset");
  same(weight, "weight");
  if (mask) same(*mask, "mask");
  if (bias) same(*bias, "bias");
  TORCH_CHECK(weight.dim() == 4 || weight.dim() == 5, nm,
              "weight must be (O, C, kh, kw), or (N, O, C, kh, kw) for per-image weights, got ",
              weight.sizes());
  // A 5-D weight holds one (O, C, kh, kw) kernel per image: N independent convolutions in one
  // call (the engine's batch of separately trained networks).
  const int64_t w0 = weight.dim() - 4;
  DeformShape s;
  s.N = x.size(0); s.C = x.size(1); s.H = x.size(2); s.W = x.size(3);
  s.O = weight.size(w0); s.kh = weight.size(w0 + 2); s.kw = weight.size(w0 + 3);
  s.K = s.kh * s.kw;
  TORCH_CHECK(w0 == 0 || weight.size(0) == s.N, nm, "per-image weight has ", weight.size(0),
              " kernels but the input has ", s.N, " images");
  s.sh = g[0]; s.sw = g[1]; s.ph = g[2]; s.pw = g[3]; s.dh = g[4]; s.dw = g[5];
  TORCH_CHECK(weight.size(w0 + 1) == s.C, nm, "weight has ", weight.size(w0 + 1),
              " input channels but the input has ", s.C);
  TORCH_CHECK(s.kh >= 1 && s.kw >= 1, nm, "empty kernel");
  TORCH_CHECK(s.sh >= 1 && s.sw >= 1 && s.dh >= 1 && s.dw >= 1 && s.ph >= 0 && s.pw >= 0, nm,
              "need stride >= 1, dilation >= 1, padding >= 0");
  const int64_t eh = s.H + 2 * s.ph - (s.dh * (s.kh - 1) + 1);
  const int64_t ew = s.W + 2 * s.pw - (s.dw * (s.kw - 1) + 1);
  TORCH_CHECK(eh >= 0 && ew >= 0, nm, "kernel ", s.kh, "x", s.kw, " does not fit a ", s.H, "x",
              s.W, " input");
  s.Ho = eh / s.sh + 1;
  s.Wo = ew / s.sw + 1;
  TORCH_CHECK(s.H * s.W < (int64_t(1) << 31), nm, "input planes larger than 2^31 elements");
  TORCH_CHECK(off.dim() == 4 && off.size(0) == s.N && off.size(1) == 2 * s.K &&
                  off.size(2) == s.Ho && off.size(3) == s.Wo,
              nm, "offset must be [", s.N, ", ", 2 * s.K, ", ", s.Ho, ", ", s.Wo, "], got ",
              off.sizes());
  if (mask) {
    TORCH_CHECK(mask->dim() == 4 && mask->size(0) == s.N && mask->size(1) == s.K &&
                    mask->size(2) == s.Ho && mask->size(3) == s.Wo,
                nm, "mask must be [", s.N, ", ", s.K, ", ", s.Ho, ", ", s.Wo, "], got ",
                mask->sizes());
  }
  if (bias && w0 == 0) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == s.O, nm, "bias must be [", s.O, "], got ",
                bias->sizes());
  }
  if (bias && w0 == 1) {
    TORCH_CHECK(bias->dim() == 2 && bias->size(0) == s.N && bias->size(1) == s.O, nm,
                "per-image bias must be [", s.N, ", ", s.O, "], got ", bias->sizes());
  }
  return s;
}

// --------------------------------------------------------------------------------------------
// CUDA: the gathers run in deform_cuda.cu, the GEMMs in libtorch (cuBLAS), all on the caller's
// current stream. x is NCHW here (contiguous), W2 (O, K*C) as on the CPU.
// --------------------------------------------------------------------------------------------


// The deformable kernels' dtype code: the features' type (bfloat16 features come with float32
// offsets and mask).
int deform_cuda_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? 1 : x.scalar_type() == at::kBFloat16 ? 2 : 0;
}

// Images per chunk, so that the column buffer (K*C x Ho*Wo per image) stays under ~256 MiB.
int64_t cuda_chunk(const DeformShape& s, size_t elem) {
  const int64_t per = std::max<int64_t>(1, s.K * s.C * s.Ho * s.Wo * (int64_t)elem);
  return std::max<int64_t>(1, std::min<int64_t>(s.N, (int64_t(256) << 20) / per));
}

// The same shape restricted to images [n0, n0 + nb): pointers are offset by the caller.
DeformShape sub(const DeformShape& s, int64_t nb) {
  DeformShape r = s;
  r.N = nb;
  return r;
}

void* ptr_or_null(const at::Tensor& t, int64_t n0, int64_t per_image) {
  if (!t.defined()) return nullptr;
  return (char*)t.data_ptr() + n0 * per_image * (int64_t)t.element_size();
}

at::Tensor cuda_cols(const DeformShape& s, const at::Tensor& x, const at::Tensor& off,
                     const at::Tensor& mask, int64_t n0, int64_t nb, void* st) {
  const int64_t HWo = s.Ho * s.Wo;
  auto cols = at::empty({nb, s.K * s.C, HWo}, x.options());
  const DeformShape d = sub(s, nb);
  const int dtype = deform_cuda_dtype(x);
  const int rc = kernels(x).deform_im2col(dtype, &d, ptr_or_null(x, n0, s.C * s.H * s.W),
                                          ptr_or_null(off, n0, 2 * s.K * HWo),
                                          ptr_or_null(mask, n0, s.K * HWo), cols.data_ptr(), st);
  kernel_check("deform_conv2d", rc, "im2col", x);
  return cols;
}

// Forward on CUDA. With `keep` (the weight's gradient will be wanted), every image's columns
// are built at once and returned for the backward, which needs them for the weight gradient:
// rebuilding them there was a second im2col per step (2.8 % of a 16-network bfloat16 step on
// an H100, docs/gpu-checks/2026-11-27-h100-fusions). They cost K·C·Ho·Wo values per image
// until the backward, about a tenth of what a fit holds at F = 32. Without `keep`, chunks of
// at most ~256 MiB of columns at a time, dropped after their GEMM.
std::pair<at::Tensor, at::Tensor> deform_forward_cuda(const DeformShape& s, const at::Tensor& x,
                                                      const at::Tensor& off, const at::Tensor& mask,
                                                      const at::Tensor& W2, const at::Tensor& bias,
                                                      bool keep) {
  KernelGuard guard(x);
  void* const st = kernel_stream(x);
  const int64_t HWo = s.Ho * s.Wo;
  auto out = at::empty({s.N, s.O, HWo}, x.options());
  // The GEMMs run in the features' type (bfloat16 ones on tensor cores, adding in float32).
  const auto Wg = W2.to(x.scalar_type());
  const int64_t chunk = keep ? s.N : cuda_chunk(s, x.element_size());
  at::Tensor kept;
  for (int64_t n0 = 0; n0 < s.N; n0 += chunk) {
    const int64_t nb = std::min(chunk, s.N - n0);
    auto cols = cuda_cols(s, x, off, mask, n0, nb, st);
    auto o = out.narrow(0, n0, nb);
    if (Wg.dim() == 3) {
      at::bmm_out(o, Wg.narrow(0, n0, nb), cols);  // per image: (nb, O, KC) x (nb, KC, HWo)
    } else {
      at::matmul_out(o, Wg, cols);  // (O, KC) x (nb, KC, HWo) -> (nb, O, HWo)
    }
    if (keep) kept = cols;
  }
  if (bias.defined()) add_bias(out, bias.to(x.scalar_type()), HWo);
  return {out.view({s.N, s.O, s.Ho, s.Wo}), kept};
}

// `cols_kept`: the forward's columns of every image, kept when the weight needed a gradient.
std::vector<at::Tensor> deform_backward_cuda(const DeformShape& s, const at::Tensor& x,
                                             const at::Tensor& off, const at::Tensor& mask,
                                             const at::Tensor& W2, const at::Tensor& cols_kept,
                                             const at::Tensor& go,
                                             bool need_in, bool need_off, bool need_mask,
                                             bool need_w, bool need_b) {
  KernelGuard guard(x);
  void* const st = kernel_stream(x);
  const int64_t HWo = s.Ho * s.Wo, CK = s.C * s.K;
  need_mask = need_mask && mask.defined();
  at::Tensor gi, goff, gmask, gw, gb;
  // The input gradient is summed with atomics in the positions' type (float32 for bfloat16
  // features) and rounded at the end; the others are in their operands' types.
  if (need_in) gi = at::zeros(x.sizes(), off.options());
  // col2im writes every offset and mask gradient (one thread per image, tap and pixel).
  if (need_off) goff = at::empty_like(off);
  if (need_mask) gmask = at::empty_like(mask);
  const bool per_image = W2.dim() == 3;
  if (need_b) {
    gb = bias_grad(go, HWo, per_image ? s.N * s.O : s.O, W2.scalar_type())
             .view(per_image ? at::IntArrayRef{s.N, s.O} : at::IntArrayRef{s.O});
  }
  const int dtype = deform_cuda_dtype(x);
  const auto Wg = W2.to(x.scalar_type());
  auto go3 = go.view({s.N, s.O, HWo});
  if (need_w) {
    TORCH_CHECK(cols_kept.defined(), "deform_conv2d: the forward kept no columns");
    // (N, O, KC), every image at once from the kept columns: a reduction over all Ho·Wo
    // pixels with a tiny result, which cuBLAS ran as one 32×32 tile per image (14 % of a
    // 16-network step on an H100); split like the 1×1 convs' weight gradient.
    const auto gwb = gemm_nt_split_k(go3, cols_kept);
    gw = (per_image ? gwb : gwb.sum(0)).to(W2.scalar_type());
  }
  // The column gradients of at most ~256 MiB at a time.
  const int64_t chunk = cuda_chunk(s, x.element_size());
  for (int64_t n0 = 0; n0 < s.N; n0 += chunk) {
    const int64_t nb = std::min(chunk, s.N - n0);
    auto g = go3.narrow(0, n0, nb);
    if (need_in || need_off || need_mask) {
      auto Wt = per_image ? Wg.narrow(0, n0, nb).transpose(1, 2) : Wg.t();
      auto gcols = at::matmul(Wt, g).contiguous();  // (nb, KC, HWo)
      const DeformShape d = sub(s, nb);
      const void* xp = ptr_or_null(x, n0, s.C * s.H * s.W);
      const void* op = ptr_or_null(off, n0, 2 * s.K * HWo);
      const void* mp = ptr_or_null(mask, n0, s.K * HWo);
      void* gip = ptr_or_null(gi, n0, s.C * s.H * s.W);
      void* gop = ptr_or_null(goff, n0, 2 * s.K * HWo);
      void* gmp = ptr_or_null(gmask, n0, s.K * HWo);
      // The tiled kernel declines (invalid configuration, before launching) when not even one
      // channel's region fits its shared memory; col2im takes any geometry.
      int rc = cudaErrorInvalidConfigurationCode;
      if (g_switches[kSwitchDeformTiled].on()) {
        rc = kernels(x).deform_col2im_tiled(dtype, &d, xp, op, mp, gcols.data_ptr(), gip, gop,
                                            gmp, st);
      }
      if (rc == cudaErrorInvalidConfigurationCode) {
        rc = kernels(x).deform_col2im(dtype, &d, xp, op, mp, gcols.data_ptr(), gip, gop, gmp, st);
      }
      kernel_check("deform_conv2d", rc, "col2im", x);
    }
  }
  if (gi.defined()) gi = gi.to(x.scalar_type());
  return {gi, goff, gmask, gw, gb};
}

struct DeformFn : public torch::autograd::Function<DeformFn> {
  static at::Tensor forward(AutogradContext* ctx, at::Tensor input, at::Tensor offset,
                            std::optional<at::Tensor> mask, at::Tensor weight,
                            std::optional<at::Tensor> bias, int64_t sh, int64_t sw, int64_t ph,
                            int64_t pw, int64_t dh, int64_t dw, bool keep_columns) {
    const int64_t g[6] = {sh, sw, ph, pw, dh, dw};
    DeformShape s = deform_check(input, offset, mask, weight, bias, g);
    // Detached, contiguous copies: the kernels call libtorch ops from OpenMP worker threads,
    // where grad mode is not the caller's. The CPU kernel reads the input channels-last, the
    // CUDA kernel NCHW.
    const bool cuda = on_kernels(input);
    auto x_k = cuda ? input.detach().contiguous()
                    : to_channels_last(input.detach());  // (N, H, W, C)
    auto off = offset.detach().contiguous();
    auto m = mask ? mask->detach().contiguous() : at::Tensor();
    // (O, K*C), or (N, O, K*C) for per-image weights: tap-major, channel-minor rows.
    auto W2 = weight.dim() == 5
                  ? weight.detach().permute({0, 1, 3, 4, 2}).reshape({s.N, s.O, s.K * s.C}).contiguous()
                  : weight.detach().permute({0, 2, 3, 1}).reshape({s.O, s.K * s.C}).contiguous();
    auto b = bias ? bias->detach().contiguous() : at::Tensor();
    at::Tensor out, cols;
    if (cuda) {
      at::NoGradGuard no_grad;
      std::tie(out, cols) = deform_forward_cuda(s, x_k, off, m, W2, b, keep_columns);
    }
    if (!cuda) out = deform_forward(s, x_k, off, m, W2, b);
    ctx->save_for_backward({x_k, off, m, W2, cols});
    ctx->saved_data["shape"] = std::vector<int64_t>{s.N, s.C, s.H, s.W, s.O, s.kh, s.kw};
    ctx->saved_data["geometry"] = std::vector<int64_t>(g, g + 6);
    ctx->saved_data["kernels"] = cuda;  // the backward reads x_k in the layout chosen here
    ctx->saved_data["need_in"] = input.requires_grad();
    ctx->saved_data["need_off"] = offset.requires_grad();
    ctx->saved_data["need_mask"] = mask && mask->requires_grad();
    ctx->saved_data["need_w"] = weight.requires_grad();
    ctx->saved_data["need_b"] = bias && bias->requires_grad();
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto sv = ctx->get_saved_variables();
    auto g = ctx->saved_data["geometry"].toIntVector();
    auto d = ctx->saved_data["shape"].toIntVector();
    DeformShape s;
    s.N = d[0]; s.C = d[1]; s.H = d[2]; s.W = d[3]; s.O = d[4]; s.kh = d[5]; s.kw = d[6];
    s.K = s.kh * s.kw;
    s.sh = g[0]; s.sw = g[1]; s.ph = g[2]; s.pw = g[3]; s.dh = g[4]; s.dw = g[5];
    s.Ho = (s.H + 2 * s.ph - (s.dh * (s.kh - 1) + 1)) / s.sh + 1;
    s.Wo = (s.W + 2 * s.pw - (s.dw * (s.kw - 1) + 1)) / s.sw + 1;
    auto go = grads[0].detach().contiguous();
    const bool need_in = ctx->saved_data["need_in"].toBool();
    const bool need_off = ctx->saved_data["need_off"].toBool();
    const bool need_mask = ctx->saved_data["need_mask"].toBool();
    const bool need_w = ctx->saved_data["need_w"].toBool();
    const bool need_b = ctx->saved_data["need_b"].toBool();
    std::vector<at::Tensor> r;
    if (ctx->saved_data["kernels"].toBool()) {
      at::NoGradGuard no_grad;
      r = deform_backward_cuda(s, sv[0], sv[1], sv[2], sv[3], sv[4], go, need_in, need_off,
                               need_mask, need_w, need_b);
    }
    if (r.empty()) {
      r = deform_backward(s, sv[0], sv[1], sv[2], sv[3], go, need_in, need_off, need_mask,
                          need_w, need_b);
    }
    if (r[3].defined() && sv[3].dim() == 3) {
      r[3] = r[3].view({s.N, s.O, s.kh, s.kw, s.C}).permute({0, 1, 4, 2, 3}).contiguous();
    } else if (r[3].defined()) {
      r[3] = r[3].view({s.O, s.kh, s.kw, s.C}).permute({0, 3, 1, 2}).contiguous();
    }
    return {r[0], r[1], r[2], r[3], r[4], at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// ============================================================================================
// Per-pixel losses of a map of logits: cross-entropy and continuity
// ============================================================================================
//
// For logits (M, K, H, W), per image m:
//  * ce[m] = Σ_p (logsumexp_k x[m,:,p] − x[m,t_p,p]) / max(1, #valid p): cross-entropy against
//    a target t (M, H, W), pixels whose target is outside [0, K) (IGNORE) left out; without a
//    target, against the map's own argmax (first maximum on ties, NaN counting as a maximum,
//    as torch.argmax), which is returned;
//  * continuity[m] (asked for) = mean |x[y+1] − x[y]| + mean |x[:, x+1] − x[:, x]| over every
//    channel: the mean L1 of vertical and horizontal neighbour differences.
// Backward: ∂ce/∂x = (softmax − onehot(t)) / #valid at valid pixels; ∂continuity/∂x the signs of
// the differences on either side, over their counts.
//
// Why one op: the fit's response map gets both terms, and libtorch runs them as ~25 passes over
// it (argmax, log_softmax, the NLL and its backward's zero fill, the differences, their abs,
// the slices' backward fills and copies, autograd's adds of the three gradients). Here the
// forward reads the map once and the backward reads it once and writes its gradient once. On
// a GPU a 16-network step's response map is 134 MB (float32), so each pass saved counts; on
// the CPU the argmax alone over the strided channel axis took longer than the log_softmax.
//
// Sums per row in float64 (each row's partials in the logits' adding type, float32 or
// float64), the rows of an image added in order: deterministic, and the same for an image
// alone or in any batch. 16-bit logits are read as they are and added in float32; the
// gradient is rounded once. Kernels: CPU here (rows in parallel), CUDA in losses_cuda.cu.

// Sums one row y of image m writes into `rows` (its 4 values): Σ ce, #valid, Σ|dy|, Σ|dx|.
constexpr int kRowSums = 4;

// e^x in float32 without a library call, so that the row loops vectorise: 2^n · e^r with
// n = round(x·log₂e), r = x − n·ln 2 (ln 2 in two parts) and Cephes' degree-6 polynomial for
// e^r; within about 1 ulp of e^x (measured over [−87, 88]). x is clamped to [−87.3, 88.3] (e^x
// then 1e-38 rather than 0 below: the sums and gradients here never notice). 2^n is built from
// the bits of n + 1.5·2²³ (whose low bits hold n) in unsigned arithmetic, so a NaN, which the
// clamp keeps and the polynomial returns, is no undefined conversion on the way.
S3_INLINE float exp_row(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
  const float shift = 12582912.0f;  // 1.5 · 2²³: adding it rounds to an integer
  const float t = x * 1.44269504088896341f + shift;
  const float n = t - shift;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float q = 1.9875691500e-4f;
  q = q * r + 1.3981999507e-3f;
  q = q * r + 8.3334519073e-3f;
  q = q * r + 4.1665795894e-2f;
  q = q * r + 1.6666665459e-1f;
  q = q * r + 5.0000001201e-1f;
  const float e = q * r * r + r + 1.0f;
  const uint32_t bits = (__builtin_bit_cast(uint32_t, t) - 0x4B400000u + 127u) << 23;
  return e * __builtin_bit_cast(float, bits);
}
S3_INLINE double exp_row(double x) { return std::exp(x); }

// sign(v) (0 for 0 and NaN), branch-free so that the loops vectorise.
template <typename A>
S3_INLINE A sign_of(A v) {
  return static_cast<A>(v > A(0)) - static_cast<A>(v < A(0));
}

// ============================================================================================
// Argmax over the channel axis
// ============================================================================================
//
// labels (N, H, W) int64 = torch.argmax(x (N, K, H, W), 1): the first maximum, a NaN beating any
// number. Why: the default preset takes the clustering of the turned copy, a forward-only pass,
// as this argmax, and libtorch's CPU argmax over the strided channel axis took 9 ms for the
// 1×32×256² map of a step (3 % of it). Here each channel's stretch of a chunk of pixels is read
// once, in a loop that vectorises (the running maximum and index, one lane per pixel). CPU
// only (float32, float64, bfloat16 compared in float32); elsewhere libtorch's argmax.

constexpr int64_t kArgmaxChunk = 1024;

template <typename T, typename A>
S3_INLINE void argmax_chunk(const T* x, int64_t K, int64_t P, int64_t len, int64_t* out) {
  A mx[kArgmaxChunk];
  int32_t arg[kArgmaxChunk];
  for (int64_t i = 0; i < len; ++i) {
    mx[i] = static_cast<A>(x[i]);
    arg[i] = 0;
  }
  for (int64_t k = 1; k < K; ++k) {
    const T* __restrict p = x + k * P;
    for (int64_t i = 0; i < len; ++i) {
      const A v = static_cast<A>(p[i]);
      const bool take = v > mx[i] || (v != v && mx[i] == mx[i]);
      mx[i] = take ? v : mx[i];
      arg[i] = take ? static_cast<int32_t>(k) : arg[i];
    }
  }
  for (int64_t i = 0; i < len; ++i) out[i] = arg[i];
}
template <typename T, typename A>
void argmax_chunk_base(const T* x, int64_t K, int64_t P, int64_t len, int64_t* out) {
  argmax_chunk<T, A>(x, K, P, len, out);
}
template <typename T, typename A>
S3_AVX2 void argmax_chunk_avx2(const T* x, int64_t K, int64_t P, int64_t len, int64_t* out) {
  argmax_chunk<T, A>(x, K, P, len, out);
}

// x contiguous (N, K, H, W) on the CPU, K < 2³¹ → (N, H, W) int64.
at::Tensor argmax_channels_cpu(const at::Tensor& x) {
  const int64_t N = x.size(0), K = x.size(1), P = x.size(2) * x.size(3);
  auto out = at::empty({N, x.size(2), x.size(3)}, x.options().dtype(at::kLong));
  if (out.numel() == 0) return out;
  const int64_t chunks = (P + kArgmaxChunk - 1) / kArgmaxChunk;
  int64_t* op = out.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "argmax_channels", [&] {
    using T = scalar_t;
    using A = std::conditional_t<std::is_same_v<T, double>, double, float>;
    const T* xp = x.data_ptr<T>();
    auto fn = cpu_has_avx2() ? &argmax_chunk_avx2<T, A> : &argmax_chunk_base<T, A>;
    at::parallel_for(0, N * chunks, 16, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t n = b / chunks, i0 = (b % chunks) * kArgmaxChunk;
        fn(xp + n * K * P + i0, K, P, std::min(kArgmaxChunk, P - i0), op + n * P + i0);
      }
    });
  });
  return out;
}

// Per-thread row buffers.
template <typename A>
struct RowBuffers {
  std::vector<A> mx, sum, dy, dx;
  std::vector<int64_t> arg;
  explicit RowBuffers(int64_t W) : mx(W), sum(W), dy(W), dx(W), arg(W) {}
};

// Row y of one image x (K, H, W): its lse, its argmax (into `target` unless `given`) and its
// four sums. Loops run along the row, each channel at a time, so they vectorise; the sums go
// through per-pixel buffers, added up in order at the end.
template <typename T, typename A>
S3_INLINE void pl_row_impl(const T* x, int64_t K, int64_t H, int64_t W, int64_t y,
                           const int64_t* given, int64_t* target, A* lse, bool cont, double* rows,
                           RowBuffers<A>& b) {
  const int64_t P = H * W, o = y * W;
  A* __restrict mx = b.mx.data();
  A* __restrict sum = b.sum.data();
  int64_t* __restrict arg = b.arg.data();
  for (int64_t i = 0; i < W; ++i) {
    mx[i] = static_cast<A>(x[o + i]);
    arg[i] = 0;
    sum[i] = A(0);
  }
  for (int64_t k = 1; k < K; ++k) {
    const T* p = x + k * P + o;
    // torch.argmax: the first maximum, a NaN beating any number. With a given target only the
    // maximum is needed.
    if (given) {
      for (int64_t i = 0; i < W; ++i) {
        const A v = static_cast<A>(p[i]);
        mx[i] = v > mx[i] || (v != v && mx[i] == mx[i]) ? v : mx[i];
      }
      continue;
    }
    for (int64_t i = 0; i < W; ++i) {
      const A v = static_cast<A>(p[i]);
      const bool take = v > mx[i] || (v != v && mx[i] == mx[i]);
      mx[i] = take ? v : mx[i];
      arg[i] = take ? k : arg[i];
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    const T* p = x + k * P + o;
    for (int64_t i = 0; i < W; ++i) sum[i] += exp_row(static_cast<A>(p[i]) - mx[i]);
  }
  double ce = 0, valid = 0;
  const int64_t* t = given ? given + o : arg;
  for (int64_t i = 0; i < W; ++i) {
    const A logs = std::log(sum[i]);
    lse[o + i] = mx[i] + logs;
    if (!given) target[o + i] = arg[i];
    if (t[i] < 0 || t[i] >= K) continue;
    // (max − x_t) + log Σ exp(x − max): exactly log Σ for the argmax, as log_softmax gives it.
    ce += static_cast<double>((mx[i] - static_cast<A>(x[t[i] * P + o + i])) + logs);
    valid += 1;
  }
  double dy = 0, dx = 0;
  if (cont) {
    A* __restrict by = b.dy.data();
    A* __restrict bx = b.dx.data();
    for (int64_t i = 0; i < W; ++i) by[i] = bx[i] = A(0);
    for (int64_t k = 0; k < K; ++k) {
      const T* p = x + k * P + o;
      if (y + 1 < H) {
        for (int64_t i = 0; i < W; ++i) by[i] += std::abs(static_cast<A>(p[i + W]) - static_cast<A>(p[i]));
      }
      for (int64_t i = 0; i + 1 < W; ++i) bx[i] += std::abs(static_cast<A>(p[i + 1]) - static_cast<A>(p[i]));
    }
    for (int64_t i = 0; i < W; ++i) {
      dy += by[i];
      dx += bx[i];
    }
  }
  double* r = rows + y * kRowSums;
  r[0] = ce;
  r[1] = valid;
  r[2] = dy;
  r[3] = dx;
}

// Row y's gradient, every channel. coef: a (ce's scale), by, bx (continuity's per difference).
// `scale` and `tk`: per-pixel buffers (a at valid pixels, else 0; the target, −1 if invalid).
template <typename T, typename A>
S3_INLINE void pl_grad_row_impl(const T* x, int64_t K, int64_t H, int64_t W, int64_t y,
                                const int64_t* target, const A* lse, const A* coef, bool cont,
                                T* grad, RowBuffers<A>& b) {
  const int64_t P = H * W, o = y * W;
  const A a = coef[0], cy = coef[1], cx = coef[2];
  A* __restrict d = b.sum.data();
  A* __restrict scale = b.mx.data();
  int64_t* __restrict tk = b.arg.data();
  const A* l = lse + o;
  for (int64_t i = 0; i < W; ++i) {
    const int64_t t = target[o + i];
    const bool valid = t >= 0 && t < K;
    scale[i] = valid ? a : A(0);
    tk[i] = valid ? t : -1;
  }
  for (int64_t k = 0; k < K; ++k) {
    const T* p = x + k * P + o;
    for (int64_t i = 0; i < W; ++i) {
      d[i] = scale[i] * (exp_row(static_cast<A>(p[i]) - l[i]) - (tk[i] == k ? A(1) : A(0)));
    }
    if (cont) {
      if (y > 0) {
        for (int64_t i = 0; i < W; ++i) d[i] += cy * sign_of(static_cast<A>(p[i]) - static_cast<A>(p[i - W]));
      }
      if (y + 1 < H) {
        for (int64_t i = 0; i < W; ++i) d[i] -= cy * sign_of(static_cast<A>(p[i + W]) - static_cast<A>(p[i]));
      }
      for (int64_t i = 1; i < W; ++i) d[i] += cx * sign_of(static_cast<A>(p[i]) - static_cast<A>(p[i - 1]));
      for (int64_t i = 0; i + 1 < W; ++i) d[i] -= cx * sign_of(static_cast<A>(p[i + 1]) - static_cast<A>(p[i]));
    }
    T* g = grad + k * P + o;
    for (int64_t i = 0; i < W; ++i) g[i] = static_cast<T>(d[i]);
  }
}

#define S3_PL_ROW_ARGS                                                                       \
  const T *x, int64_t K, int64_t H, int64_t W, int64_t y, const int64_t *given, int64_t *target, \
      A *lse, bool cont, double *rows, RowBuffers<A> &b
#define S3_PL_GRAD_ARGS                                                                     \
  const T *x, int64_t K, int64_t H, int64_t W, int64_t y, const int64_t *target, const A *lse, \
      const A *coef, bool cont, T *grad, RowBuffers<A> &b
template <typename T, typename A>
void pl_row_base(S3_PL_ROW_ARGS) { pl_row_impl<T, A>(x, K, H, W, y, given, target, lse, cont, rows, b); }
template <typename T, typename A>
S3_AVX2 void pl_row_avx2(S3_PL_ROW_ARGS) { pl_row_impl<T, A>(x, K, H, W, y, given, target, lse, cont, rows, b); }
template <typename T, typename A>
void pl_grad_row_base(S3_PL_GRAD_ARGS) { pl_grad_row_impl<T, A>(x, K, H, W, y, target, lse, coef, cont, grad, b); }
template <typename T, typename A>
S3_AVX2 void pl_grad_row_avx2(S3_PL_GRAD_ARGS) { pl_grad_row_impl<T, A>(x, K, H, W, y, target, lse, coef, cont, grad, b); }

// Rows in parallel; each row's sums land in its own slot, so no order depends on threads.
void pixel_losses_cpu(const at::Tensor& x, const int64_t* given, at::Tensor& target,
                      at::Tensor& lse, bool cont, at::Tensor& rows) {
  const int64_t M = x.size(0), K = x.size(1), H = x.size(2), W = x.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "pixel_losses", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    int64_t* tp = target.data_ptr<int64_t>();
    A* lp = lse.data_ptr<A>();
    double* rp = rows.data_ptr<double>();
    auto fn = cpu_has_avx2() ? &pl_row_avx2<scalar_t, A> : &pl_row_base<scalar_t, A>;
    at::parallel_for(0, M * H, 16, [&](int64_t lo, int64_t hi) {
      RowBuffers<A> b(W);
      for (int64_t r = lo; r < hi; ++r) {
        const int64_t m = r / H, y = r % H;
        fn(xp + m * K * H * W, K, H, W, y, given ? given + m * H * W : nullptr, tp + m * H * W,
           lp + m * H * W, cont, rp + m * H * kRowSums, b);
      }
    });
  });
}

void pixel_losses_grad_cpu(const at::Tensor& x, const at::Tensor& target, const at::Tensor& lse,
                           const at::Tensor& coef, bool cont, at::Tensor& grad) {
  const int64_t M = x.size(0), K = x.size(1), H = x.size(2), W = x.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "pixel_losses_backward", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const int64_t* tp = target.data_ptr<int64_t>();
    const A* lp = lse.data_ptr<A>();
    const A* cp = coef.data_ptr<A>();
    scalar_t* gp = grad.data_ptr<scalar_t>();
    auto fn = cpu_has_avx2() ? &pl_grad_row_avx2<scalar_t, A> : &pl_grad_row_base<scalar_t, A>;
    at::parallel_for(0, M * H, 16, [&](int64_t lo, int64_t hi) {
      RowBuffers<A> b(W);
      for (int64_t r = lo; r < hi; ++r) {
        const int64_t m = r / H, y = r % H, off = m * K * H * W;
        fn(xp + off, K, H, W, y, tp + m * H * W, lp + m * H * W, cp + m * 3, cont, gp + off, b);
      }
    });
  });
}

void pixel_losses_cuda(const at::Tensor& x, const int64_t* given, at::Tensor& target,
                       at::Tensor& lse, bool cont, at::Tensor& rows) {
  KernelGuard guard(x);
  const int rc = kernels(x).pixel_losses(dw_cuda_dtype(x), x.data_ptr(), given,
                                         target.data_ptr<int64_t>(), lse.data_ptr(), cont,
                                         rows.data_ptr<double>(), x.size(0), x.size(1), x.size(2),
                                         x.size(3), kernel_stream(x));
  kernel_check("pixel_losses", rc, "forward", x);
}
void pixel_losses_grad_cuda(const at::Tensor& x, const at::Tensor& target, const at::Tensor& lse,
                            const at::Tensor& coef, bool cont, at::Tensor& grad) {
  KernelGuard guard(x);
  const int rc = kernels(x).pixel_losses_grad(
      dw_cuda_dtype(x), x.data_ptr(), target.data_ptr<int64_t>(), lse.data_ptr(), coef.data_ptr(),
      cont, grad.data_ptr(), x.size(0), x.size(1), x.size(2), x.size(3), kernel_stream(x));
  kernel_check("pixel_losses", rc, "backward", x);
}

// Returns {ce (M), continuity (M; zeros when not asked), target (M, H, W) int64}; the first two
// in float32 (float64 for float64 logits).
struct PixelLossesFn : public torch::autograd::Function<PixelLossesFn> {
  static variable_list forward(AutogradContext* ctx, at::Tensor logits, std::optional<at::Tensor> given,
                               bool cont) {
    const auto x = logits.detach().contiguous();
    const int64_t M = x.size(0), K = x.size(1), H = x.size(2), W = x.size(3);
    const auto acc = x.options().dtype(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
    const auto g = given ? given->detach().contiguous() : at::Tensor();
    auto target = g.defined() ? g : at::empty({M, H, W}, x.options().dtype(at::kLong));
    auto lse = at::empty({M, H, W}, acc);
    auto rows = at::empty({M * H, kRowSums}, x.options().dtype(at::kDouble));
    const int64_t* gp = g.defined() ? g.data_ptr<int64_t>() : nullptr;
    if (on_kernels(x)) {
      pixel_losses_cuda(x, gp, target, lse, cont, rows);
    } else {
      pixel_losses_cpu(x, gp, target, lse, cont, rows);
    }
    const auto sums = rows.view({M, H, kRowSums}).sum(1);  // (M, 4), rows added in order
    const auto count = sums.select(1, 1).clamp_min(1.0);
    auto ce = (sums.select(1, 0) / count).to(acc.dtype());
    auto co = cont ? (sums.select(1, 2) / double(K * (H - 1) * W) +
                      sums.select(1, 3) / double(K * H * (W - 1)))
                         .to(acc.dtype())
                   : at::zeros({M}, acc);
    ctx->save_for_backward({x, target, lse, count});
    ctx->saved_data["cont"] = cont;
    ctx->mark_non_differentiable({target});
    return {ce, co, target};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto sv = ctx->get_saved_variables();
    const at::Tensor &x = sv[0], &target = sv[1], &lse = sv[2], &count = sv[3];
    const bool cont = ctx->saved_data["cont"].toBool();
    const int64_t M = x.size(0), K = x.size(1), H = x.size(2), W = x.size(3);
    const auto acc = lse.options();
    const auto zeros = [&] { return at::zeros({M}, count.options()); };
    const auto gce = grads[0].defined() ? grads[0].to(at::kDouble) : zeros();
    const auto gco = grads[1].defined() && cont ? grads[1].to(at::kDouble) : zeros();
    // Per image: ce's scale, and continuity's per vertical and per horizontal difference.
    const auto coef = at::stack({gce / count, gco / double(std::max<int64_t>(1, K * (H - 1) * W)),
                                 gco / double(std::max<int64_t>(1, K * H * (W - 1)))}, 1)
                          .to(acc.dtype())
                          .contiguous();
    auto grad = at::empty_like(x);
    if (on_kernels(x)) {
      pixel_losses_grad_cuda(x, target, lse, coef, cont, grad);
    } else {
      pixel_losses_grad_cpu(x, target, lse, coef, cont, grad);
    }
    return {grad, at::Tensor(), at::Tensor()};
  }
};

}  // namespace

// ============================================================================================
// C ABI

// ============================================================================================

namespace {
char* dup_msg(const char* m) { return strdup(m ? m : "unknown error"); }

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
at::Tensor widen(const at::Tensor& t, bool native = false) {
  return is_half_width(t) && !native ? t.to(at::kFloat) : t;
}
std::optional<at::Tensor> widen(const at::Tensor* t, bool native = false) {
  if (!t) return std::nullopt;
  return widen(*t, native);
}
at::Tensor narrow_to(const at::Tensor& r, const at::Tensor& like) {
  return is_half_width(like) ? r.to(like.scalar_type()) : r;
}
}  // namespace

extern "C" {

void s3ops_free_err(char* e) { free(e); }

}  // extern "C"
namespace {

// The depthwise conv through the fastest path that takes it: our kernels (CPU, CUDA), or
// libtorch's convolution for a dilated kernel too wide for a CUDA block's shared memory.
// 16-bit inputs the kernels do not read themselves are widened and the result rounded back.
at::Tensor depthwise_any(const at::Tensor& input, const at::Tensor& weight, const at::Tensor* bias,
                         int64_t pad, int64_t dil) {
  // The CUDA kernels read and write bfloat16 themselves.
  const bool native = on_kernels(input) && input.scalar_type() == at::kBFloat16;
  const at::Tensor x = widen(input, native), w = widen(weight, native);
  const std::optional<at::Tensor> b = widen(bias, native);
  dw_check(x, w, b, pad, dil);
  at::Tensor r;
  if (on_kernels(x) && !dw_cuda_fits(x, w.size(2), pad, dil)) {
    r = at::conv2d(x, w, b, 1, pad, dil, x.size(1));
  }
  if (!r.defined()) r = DepthwiseFn::apply(x, w, b, pad, dil);
  return narrow_to(r, input);
}

// Per-network blocks of channels joined: parts (N, M·c_i, H, W) → (N, M·Σc_i, H, W), network
// j's blocks side by side.
at::Tensor cat_per_model(const std::vector<at::Tensor>& parts, int64_t models) {
  std::vector<at::Tensor> split;
  for (const auto& t : parts) {
    split.push_back(t.reshape({t.size(0), models, t.size(1) / models, t.size(2), t.size(3)}));
  }
  auto c = at::cat(split, 2);
  return c.reshape({c.size(0), c.size(1) * c.size(2), c.size(3), c.size(4)});
}

}  // namespace
extern "C" {

// Each op below opens a profiler scope named s3net::<op> (RECORD_FUNCTION; free when no profiler
// runs), so an operator-level trace (`s3net bench fit --trace`) charges the kernels our ops
// launch in their forward to them: without it, a GPU trace left 31 % of a step's kernel time
// to no op (2026-11-28). Their backward runs inside the autograd node the engine records.

// Returns 0 and a new tensor in *out, or non-zero and a malloc'd message in *err.
int s3ops_depthwise_conv2d(const at::Tensor* input, const at::Tensor* weight,
                           const at::Tensor* bias, int64_t pad, int64_t dil, at::Tensor** out,
                           char** err) {
  S3_PROTECT({
    RECORD_FUNCTION("s3net::depthwise_conv2d", std::vector<c10::IValue>({*input, *weight}));
    *out = nullptr;
    *err = nullptr;
    *out = new at::Tensor(depthwise_any(*input, *weight, bias, pad, dil));
    return 0;
  })
}

// Three 'same' depthwise convs of one input, concatenated per network (BranchesFn). weights
// and biases: three each; geometry: padding and dilation of each.
int s3ops_depthwise_branches(const at::Tensor* input, const at::Tensor* const* weights,
                             const at::Tensor* const* biases, const int64_t* geometry,
                             int64_t models, at::Tensor** out, char** err) {
  S3_PROTECT({
    RECORD_FUNCTION("s3net::depthwise_branches", std::vector<c10::IValue>({*input}));
    *out = nullptr;
    *err = nullptr;
    const char* nm = "depthwise_branches: ";
    TORCH_CHECK(models >= 1, nm, "need at least one network, got ", models);
    TORCH_CHECK(input->dim() == 4 && input->size(1) % models == 0, nm,
                "input must be (N, M·C, H, W) with M = ", models, ", got ", input->sizes());
    // The checks see what the kernels will: a bfloat16 CUDA input as it is (the kernels read it
    // themselves; widening it here would copy 67 MB per block of a 16-network step for
    // nothing), other 16-bit inputs widened, as depthwise_any widens them.
    const bool native = on_kernels(*input) && input->scalar_type() == at::kBFloat16;
    // The CPU kernels take float32 and float64 planes, 16-bit ones widened once (here) and the
    // result rounded back once.
    const bool cpu = !on_kernels(*input) && input->device().is_cpu();
    bool fused = kernels_take(*input) || cpu;
    const at::Tensor checked = widen(*input, native);
    std::vector<int64_t> geo;
    for (int b = 0; b < 3; ++b) {
      const int64_t p = geometry[2 * b], d = geometry[2 * b + 1];
      TORCH_CHECK(weights[b] && biases[b], nm, "branch ", b, " needs a weight and a bias");
      dw_check(checked, widen(*weights[b], native), widen(biases[b], native), p, d);
      const int64_t k = weights[b]->size(2);
      TORCH_CHECK(2 * p == d * (k - 1), nm, "branch ", b, ": padding ", p, " with a ", k, "x", k,
                  " kernel of dilation ", d, " does not keep the size ('same' needs ",
                  d * (k - 1), " / 2)");
      fused = fused && (cpu || dw_cuda_fits(*input, k, p, d));
      geo.push_back(p);
      geo.push_back(d);
    }
    geo.push_back(models);
    at::Tensor r;
    if (fused && cpu) {
      r = narrow_to(BranchesFn::apply(checked, widen(*weights[0]), widen(*biases[0]),
                                      widen(*weights[1]), widen(*biases[1]), widen(*weights[2]),
                                      widen(*biases[2]), geo),
                    *input);
    } else if (fused) {
      r = BranchesFn::apply(*input, *weights[0], *biases[0], *weights[1], *biases[1], *weights[2],
                            *biases[2], geo);
    }
    if (!r.defined()) {
      // Each branch as depthwise_conv2d computes it (16-bit inputs widened and each result
      // rounded back), joined.
      std::vector<at::Tensor> parts;
      for (int b = 0; b < 3; ++b) {
        parts.push_back(depthwise_any(*input, *weights[b], biases[b], geo[2 * b], geo[2 * b + 1]));
      }
      r = cat_per_model(parts, models);
    }
    *out = new at::Tensor(std::move(r));
    return 0;
  })
}

// `then`: 0 the conv alone, 1 other + conv, 2 other · conv (BiasThen); `other` (the output's
// shape, dtype and device) for 1 and 2, else null.
int s3ops_pointwise_conv2d(const at::Tensor* input, const at::Tensor* weight,
                           const at::Tensor* bias, int64_t models, const at::Tensor* other,
                           int then, at::Tensor** out, char** err) {
  S3_PROTECT({
    RECORD_FUNCTION("s3net::pointwise_conv2d", std::vector<c10::IValue>({*input, *weight}));
    *out = nullptr;
    *err = nullptr;
    std::optional<at::Tensor> b, o;
    if (bias) b = *bias;
    if (other) o = *other;
    pointwise_check(*input, *weight, b, models);
    const char* nm = "pointwise_conv2d: ";
    TORCH_CHECK(then >= kThenNothing && then <= kThenGate, nm, "unknown epilogue ", then);
    TORCH_CHECK((then == kThenNothing) == !o, nm,
                then == kThenNothing ? "a tensor to add or multiply by needs an epilogue"
                                     : "the epilogue needs its tensor");
    if (o) {
      const std::vector<int64_t> shape{input->size(0), weight->size(0), input->size(2),
                                       input->size(3)};
      TORCH_CHECK(o->sizes() == at::IntArrayRef(shape), nm, "the ",
                  then == kThenResidual ? "residual" : "gate", " must be shaped like the output ",
                  at::IntArrayRef(shape), ", got ", o->sizes());
      TORCH_CHECK(o->scalar_type() == input->scalar_type() && o->device() == input->device(), nm,
                  "the ", then == kThenResidual ? "residual" : "gate",
                  "'s dtype/device must match the input");
    }
    at::Tensor r = PointwiseFn::apply(*input, *weight, b, models, o, then);
    *out = new at::Tensor(std::move(r));
    return 0;
  })
}

int s3ops_deform_conv2d(const at::Tensor* input, const at::Tensor* offset, const at::Tensor* mask,
                        const at::Tensor* weight, const at::Tensor* bias, const int64_t* geometry,
                        at::Tensor** out, char** err) {
  S3_PROTECT({
    RECORD_FUNCTION("s3net::deform_conv2d", std::vector<c10::IValue>({*input, *offset, *weight}));
    *out = nullptr;
    *err = nullptr;
    // On CUDA, bfloat16 features stay bfloat16 (the kernels read and write them, the GEMMs run
    // on them); positions, weight and bias are float32 whatever they came as.
    const bool native = on_kernels(*input) && input->scalar_type() == at::kBFloat16;
    const at::Tensor x = widen(*input, native), off = widen(*offset), w = widen(*weight);
    const std::optional<at::Tensor> m = widen(mask), b = widen(bias);
    deform_check(x, off, m, w, b, geometry);
    // The CUDA forward keeps its columns only for a backward that will want the weight's
    // gradient. Asked here, not inside the forward, where grad mode is always off: a
    // parameter still requires grad under no_grad (the model's forward-only pass over the
    // turned copy), and keeping would hold every image's columns at once for nothing.
    const bool keep = at::GradMode::is_enabled() && w.requires_grad();
    at::Tensor r = DeformFn::apply(x, off, m, w, b, geometry[0], geometry[1], geometry[2],
                                   geometry[3], geometry[4], geometry[5], keep);
    *out = new at::Tensor(narrow_to(r, *input));
    return 0;
  })
}

// Per image of logits (M, K, H, W): cross-entropy against `target` (M, H, W) int64, or against
// the logits' own argmax when `target` is null, and (when `continuity`) the continuity term
// (PixelLossesFn). outs: ce (M), continuity (M; null when not asked), target (M, H, W).
int s3ops_pixel_losses(const at::Tensor* logits, const at::Tensor* target, int continuity,
                       at::Tensor** outs, char** err) {
  S3_PROTECT({
    RECORD_FUNCTION("s3net::pixel_losses", std::vector<c10::IValue>({*logits}));
    outs[0] = outs[1] = outs[2] = nullptr;
    *err = nullptr;
    const char* nm = "pixel_losses: ";
    const at::Tensor& x = *logits;
    TORCH_CHECK(x.dim() == 4, nm, "logits must be 4-D (M, K, H, W), got ", x.sizes());
    const auto kind = x.scalar_type();
    TORCH_CHECK(kind == at::kFloat || kind == at::kDouble || kind == at::kBFloat16, nm,
                "logits must be float32, float64 or bfloat16, got ", kind);
    const int64_t M = x.size(0), K = x.size(1), H = x.size(2), W = x.size(3);
    TORCH_CHECK(K >= 1 && H >= 1 && W >= 1, nm, "logits need a channel and a pixel, got ",
                x.sizes());
    TORCH_CHECK(!continuity || (H >= 2 && W >= 2), nm,
                "the continuity term needs at least 2×2 pixels, got ", x.sizes());
#ifndef S3OPS_CUDA
    TORCH_CHECK(!x.is_cuda(), nm, "this build has no CUDA kernels (nvcc was not found)");
#endif
    TORCH_CHECK(x.is_cuda() || x.device().is_cpu(), nm, "logits on ", x.device(),
                ": only CPU and CUDA are supported");
    std::optional<at::Tensor> given;
    if (target) {
      TORCH_CHECK(target->scalar_type() == at::kLong, nm, "target must be int64, got ",
                  target->scalar_type());
      TORCH_CHECK(target->dim() == 3 && target->size(0) == M && target->size(1) == H &&
                      target->size(2) == W,
                  nm, "target must be (", M, ", ", H, ", ", W, "), got ", target->sizes());
      TORCH_CHECK(target->device() == x.device(), nm, "target is on ", target->device(),
                  " but the logits are on ", x.device());
      given = *target;
    }
    auto r = PixelLossesFn::apply(x, given, continuity != 0);
    outs[0] = new at::Tensor(std::move(r[0]));
    if (continuity) outs[1] = new at::Tensor(std::move(r[1]));
    outs[2] = new at::Tensor(std::move(r[2]));
    return 0;
  })
}

// torch.argmax(input, 1) of a 4-D input: our CPU kernel where it takes the input, else
// libtorch's. Never part of a graph (an argmax has no gradient).
int s3ops_argmax_channels(const at::Tensor* input, at::Tensor** out, char** err) {
  S3_PROTECT({
    RECORD_FUNCTION("s3net::argmax_channels", std::vector<c10::IValue>({*input}));
    *out = nullptr;
    *err = nullptr;
    const at::Tensor& x = *input;
    TORCH_CHECK(x.dim() == 4, "argmax_channels: input must be 4-D (N, K, H, W), got ", x.sizes());
    TORCH_CHECK(x.size(1) > 0, "argmax_channels: input has no channels: ", x.sizes());
    const auto kind = x.scalar_type();
    const bool ours = x.device().is_cpu() && !on_kernels(x) && x.size(1) < (int64_t(1) << 31) &&
                      (kind == at::kFloat || kind == at::kDouble || kind == at::kBFloat16);
    at::NoGradGuard no_grad;
    *out = new at::Tensor(ours ? argmax_channels_cpu(x.contiguous()) : at::argmax(x, 1));
    return 0;
  })
}

// BatchNorm in training mode with statistics per (image, channel) plane (see PlaneNormFn).
int s3ops_plane_norm(const at::Tensor* input, const at::Tensor* gamma, const at::Tensor* beta,
                     double eps, at::Tensor** out, char** err) {
  S3_PROTECT({
    RECORD_FUNCTION("s3net::plane_norm", std::vector<c10::IValue>({*input}));
    *out = nullptr;
    *err = nullptr;
    const char* nm = "plane_norm: ";
    const at::Tensor& x = *input;
    TORCH_CHECK(x.dim() == 4, nm, "input must be 4-D (N, C, H, W), got ", x.sizes());
    const int64_t C = x.size(1);
    TORCH_CHECK(gamma->dim() == 1 && gamma->size(0) == C && beta->dim() == 1 && beta->size(0) == C,
                nm, "gamma and beta must be (", C, "), got ", gamma->sizes(), " and ", beta->sizes());
    TORCH_CHECK(gamma->device() == x.device() && beta->device() == x.device(), nm,
                "gamma and beta must be on the input's device");
    TORCH_CHECK(eps > 0, nm, "eps must be positive, got ", eps);
    at::Tensor r;
    const auto kind = x.scalar_type();
    const auto params = kind == at::kDouble ? at::kDouble : at::kFloat;
    if ((kernels_take(x) || cpu_kernels_take(x)) && gamma->scalar_type() == params &&
        beta->scalar_type() == params &&
        x.size(2) * x.size(3) > 0) {
      r = PlaneNormFn::apply(x, *gamma, *beta, eps);
    }
    if (!r.defined()) r = plane_norm_libtorch(x, *gamma, *beta, eps);
    *out = new at::Tensor(std::move(r));
    return 0;
  })
}

// One step of momentum SGD (PyTorch's, without dampening or weight decay) over n parameters:
// v = momentum * v + grad; p -= lr * v; then every gradient is dropped for the next backward.
// Parameters without a gradient are skipped. Why here: a network has ~60 parameter tensors and
// the per-tensor loop costs ~300 small kernel launches per step, which dominate a GPU step;
// the _foreach_ ops do the same arithmetic, element for element, in a handful of launches.
int s3ops_sgd_step(const at::Tensor* const* params, const at::Tensor* const* velocity, int64_t n,
                   double lr, double momentum, char** err) {
  S3_PROTECT({
    RECORD_FUNCTION("s3net::sgd_step", std::vector<c10::IValue>());
    *err = nullptr;
    at::NoGradGuard no_grad;
    std::vector<at::Tensor> p, v, g;
    for (int64_t i = 0; i < n; ++i) {
      const at::Tensor& grad = params[i]->grad();
      if (!grad.defined()) continue;
      TORCH_CHECK(velocity[i]->sizes() == params[i]->sizes(), "sgd_step: velocity ", i,
                  " has shape ", velocity[i]->sizes(), ", its parameter ", params[i]->sizes());
      p.push_back(*params[i]);
      v.push_back(*velocity[i]);
      g.push_back(grad);
    }
    if (p.empty()) return 0;
    at::_foreach_mul_(v, momentum);
    at::_foreach_add_(v, g);
    at::_foreach_sub_(p, at::_foreach_mul(v, lr));
    // Dropped rather than zeroed: the next backward then hands each parameter its gradient
    // as it is, instead of zeroing it here and adding it there (one fill and one add per
    // parameter; for the free offsets of a 16-network stack 113 MB each, on a GPU about 3 % of
    // a step). Adding to zero is exact, so the values are the same.
    for (int64_t i = 0; i < n; ++i) params[i]->mutable_grad().reset();
    return 0;
  })
}

// Whether the calling thread runs the ops' CUDA paths on CPU tensors, the kernels emulated on
// the CPU (simt.h), from now on: for tests on a machine without a GPU. Returns the previous
// setting.
int s3ops_set_simt(int on) {
  const bool was = t_simt;
  t_simt = on != 0;
  return was ? 1 : 0;
}

// Setting `which` of g_switches: set to `set` (0 or 1) unless it is negative; returns whether
// it is on (1) or off (0), or -1 for an unknown index.
int s3ops_switch(int which, int set) {
  if (which < 0 || which >= int(sizeof(g_switches) / sizeof(g_switches[0]))) return -1;
  if (set >= 0) g_switches[which].set(set != 0);
  return g_switches[which].on() ? 1 : 0;
}

// 1 when the calling thread emulates the CUDA paths (s3ops_set_simt), else 0.
int s3ops_simt_on() { return t_simt ? 1 : 0; }

// 1 when this build carries the CUDA kernels (nvcc was found at build time), else 0.
int s3ops_cuda_compiled() {
#ifdef S3OPS_CUDA
  return 1;
#else
  return 0;
#endif
}

// Makes the calling thread's current CUDA stream on `device` a stream of libtorch's pool
// (`pool` != 0) or the device's default stream (`pool` == 0). Concurrent fits on one GPU then
// queue their kernels on different streams instead of serialising on one.
int s3ops_cuda_set_stream(int64_t device, int pool, char** err) {
  S3_PROTECT({
    *err = nullptr;
#ifdef S3OPS_CUDA
    const auto idx = static_cast<c10::DeviceIndex>(device);
    c10::cuda::setCurrentCUDAStream(pool ? c10::cuda::getStreamFromPool(false, idx)
                                         : c10::cuda::getDefaultCUDAStream(idx));
    return 0;
#else
    (void)device;
    (void)pool;
    *err = dup_msg("this build of s3net-ops has no CUDA support");
    return 1;
#endif
  })
}

#ifdef S3OPS_CUDA
// Sets up libtorch's CUDA state, its caching allocator among it, if nothing has used CUDA yet.
// Why: the allocator's per-device state is made lazily by the first CUDA tensor, and asking it
// before then fails with "Allocator not initialized for device" (the server caps a worker's
// memory before its first job; seen on an H200).
static void cuda_allocator_ready() { at::globalContext().lazyInitDevice(at::kCUDA); }
#endif

// Caps what libtorch's caching allocator may hold on `device` at `fraction` of its memory: an
// allocation beyond it fails as out of memory. Why: a GPU shared with other services (another
// inference server, a viewer) must not be filled by this one's batches.
int s3ops_cuda_set_memory_fraction(int64_t device, double fraction, char** err) {
  S3_PROTECT({
    *err = nullptr;
#ifdef S3OPS_CUDA
    cuda_allocator_ready();
    c10::cuda::CUDACachingAllocator::setMemoryFraction(fraction,
                                                       static_cast<c10::DeviceIndex>(device));
    return 0;
#else
    (void)device;
    (void)fraction;
    *err = dup_msg("this build of s3net-ops has no CUDA support");
    return 1;
#endif
  })
}

// libtorch's operator-level profiler (Kineto), the one torch.profiler drives: every aten op and
// autograd node with its input shapes and types, and on a GPU every kernel linked to the op
// that launched it (the ncu profile of gpu-check.sh names kernels only, so a copy or an add
// cannot be traced to the code that asked for it). Process-wide; ops queued on other threads
// (autograd's) are recorded too. `cuda`: record CUDA kernels as well (needs CUPTI, which the
// PyPI torch carries).
int s3ops_trace_start(int cuda, char** err) {
  S3_PROTECT({
    *err = nullptr;
    using torch::profiler::impl::ActivityType;
    using torch::profiler::impl::ProfilerConfig;
    using torch::profiler::impl::ProfilerState;
    std::set<ActivityType> activities{ActivityType::CPU};
    if (cuda) activities.insert(ActivityType::CUDA);
    const ProfilerConfig config(ProfilerState::KINETO, /*report_input_shapes=*/true);
    torch::autograd::profiler::prepareProfiler(config, activities);
    torch::autograd::profiler::enableProfiler(config, activities);
    return 0;
  })
}

// Stops the profiler s3ops_trace_start started and writes its Chrome trace (JSON) to `path`
// (nothing written when `path` is null).
int s3ops_trace_stop(const char* path, char** err) {
  S3_PROTECT({
    *err = nullptr;
    auto result = torch::autograd::profiler::disableProfiler();
    TORCH_CHECK(result, "trace: the profiler was not running");
    if (path) result->save(path);
    return 0;
  })
}

// Which layout gemm_nt_split_k uses from now on, process-wide (see g_split_k): 0 auto,
// 1 copied, 2 strided, 3 our kernel; anything else is auto.
void s3ops_set_split_k(int mode) {
  g_split_k.store(mode == kSplitCopied || mode == kSplitStrided || mode == kSplitKernel ? mode
                                                                                        : kSplitAuto);
}

// Bytes of GPU memory libtorch's caching allocator holds on `device`, in use or cached (what
// it would hand back to the GPU on emptying its caches is part of it).
int s3ops_cuda_reserved_bytes(int64_t device, int64_t* out, char** err) {
  S3_PROTECT({
    *err = nullptr;
#ifdef S3OPS_CUDA
    cuda_allocator_ready();
    const auto stats =
        c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
    *out = stats.reserved_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)]
               .current;
    return 0;
#else
    (void)device;
    *out = 0;
    *err = dup_msg("this build of s3net-ops has no CUDA support");
    return 1;
#endif
  })
}

// A copy of a small tensor to host memory, started now on the current stream and waited for
// later. Why: the fit reads each step's losses and label counts back to decide whether a job
// has ended, and a plain blocking copy waits for everything queued on the stream. Started
// before the next step is queued and waited for after, the copy lets the GPU run that next
// step while the host reads this one. On the CPU (or a build without CUDA) the copy is
// synchronous and the wait returns at once.
struct S3HostCopy {
  at::Tensor host;
#ifdef S3OPS_CUDA
  cudaEvent_t done = nullptr;
  ~S3HostCopy() {
    if (done) cudaEventDestroy(done);
  }
#endif
};

#ifdef S3OPS_CUDA
static void host_copy_check(cudaError_t rc) {
  TORCH_CHECK(rc == cudaSuccess, "copy to the host: ", cudaGetErrorString(rc));
}
#endif

int s3ops_host_copy_start(const at::Tensor* src, void** out, char** err) {
  S3_PROTECT({
    *out = nullptr;
    *err = nullptr;
    auto copy = std::make_unique<S3HostCopy>();
#ifdef S3OPS_CUDA
    if (src->is_cuda()) {
      c10::cuda::CUDAGuard guard(src->device());
      copy->host = at::empty(src->sizes(), src->options().device(at::kCPU).pinned_memory(true));
      copy->host.copy_(*src, /*non_blocking=*/true);
      host_copy_check(cudaEventCreateWithFlags(&copy->done, cudaEventDisableTiming));
      host_copy_check(cudaEventRecord(copy->done, current_stream(*src)));
    }
#endif
    if (!copy->host.defined()) copy->host = src->to(at::kCPU, /*non_blocking=*/false, /*copy=*/true);
    *out = copy.release();
    return 0;
  })
}

// Waits for the copy and returns the host tensor; the handle stays valid (free it separately).
int s3ops_host_copy_wait(void* handle, at::Tensor** out, char** err) {
  S3_PROTECT({
    *out = nullptr;
    *err = nullptr;
    auto* copy = static_cast<S3HostCopy*>(handle);
#ifdef S3OPS_CUDA
    if (copy->done) host_copy_check(cudaEventSynchronize(copy->done));
#endif
    *out = new at::Tensor(copy->host);
    return 0;
  })
}

void s3ops_host_copy_free(void* handle) { delete static_cast<S3HostCopy*>(handle); }

// CUDA graphs: a step of a fit is a few hundred small kernels whose queueing costs the host
// more time than the GPU needs to run them (a lone 256² fit on an H100). Captured once and
// replayed, the whole step is queued with one call. The caller captures the work it queues on
// its current stream between begin and end; it must be free of host synchronisation, and its
// tensors must stay where they are while the graph lives.
#ifdef S3OPS_CUDA
// libtorch's graph, with the one piece of its state that a failed capture leaves to us
// readable: whether `capture_end` succeeded. Only then does libtorch's reset() hand the
// graph's memory pools back (see S3Graph's destructor).
struct S3CudaGraph : at::cuda::CUDAGraph {
  bool ended() const { return capture_ended_; }
};

// Stops routing allocations to `pool` (the GPU's and pinned host memory's allocators both
// route a capturing stream's allocations to the graph's pool) and, with `release`, drops the
// capture's claim on the pool so that emptying it frees its blocks. For captures that did not
// end: a successful `capture_end` does the first, the graph's reset() the second. Each call
// on its own, as libtorch may have registered the pool with one allocator and not yet the
// other when the capture failed; one that was not registered just throws.
void unroute_pool(c10::DeviceIndex device, at::cuda::MempoolId_t pool, bool release) {
  auto quietly = [](auto f) {
    try {
      f();
    } catch (...) {
    }
  };
  auto host = [] { return at::getHostAllocator(at::kCUDA); };
  quietly([&] { c10::cuda::CUDACachingAllocator::endAllocateToPool(device, pool); });
  quietly([&] { host()->end_allocate_to_pool(pool); });
  if (!release) return;
  quietly([&] { c10::cuda::CUDACachingAllocator::releasePool(device, pool); });
  quietly([&] { host()->release_pool(pool); });
}
#endif

struct S3Graph {
#ifdef S3OPS_CUDA
  // Behind a pointer so that the destructor below can destroy it (once) before emptying its pool.
  std::unique_ptr<S3CudaGraph> graph = std::make_unique<S3CudaGraph>();
  at::cuda::MempoolId_t pool{0, 0};
  c10::DeviceIndex device = 0;
  // The stream the capture began on, once `capture_begin` returned (null before).
  cudaStream_t stream = nullptr;

  // Hands the blocks of the graph's memory pool back to the GPU. Why: libtorch keeps a dropped
  // graph's pool cached until some allocation runs out of memory, and a worker drops its graph
  // and captures a new one whenever its stack of jobs changes: two workers with stacks of up
  // to 4 jobs held 63-69 GB of an H100 after 40 jobs. A graph is dropped while no capture
  // runs (the caller's gate), so freeing here cannot disturb one. A capture that never ended
  // (abandoned) still holds its claim on the pool, which libtorch's reset() leaves alone:
  // without releasing it here, its blocks would stay reserved for the life of the process.
  ~S3Graph() {
    try {
      const bool abandoned = stream != nullptr && !graph->ended();
      graph.reset();
      if (pool.first == 0 && pool.second == 0) return;  // {0, 0} would empty every cache
      if (abandoned) unroute_pool(device, pool, true);
      c10::cuda::CUDACachingAllocator::emptyCache(pool);
    } catch (...) {
    }
  }
#endif
};

// Starts capturing the calling thread's work on its current stream of `device`, in a memory pool
// of the graph's own. Thread-local mode: other threads (another worker's fits, the autograd
// engine's thread) may allocate meanwhile.
int s3ops_graph_begin(int64_t device, void** out, char** err) {
  S3_PROTECT({
    *out = nullptr;
    *err = nullptr;
#ifdef S3OPS_CUDA
    auto g = std::make_unique<S3Graph>();
    g->device = static_cast<c10::DeviceIndex>(device);
    c10::cuda::CUDAGuard guard(g->device);
    g->pool = at::cuda::graph_pool_handle();
    try {
      g->graph->capture_begin(g->pool, cudaStreamCaptureModeThreadLocal);
    } catch (...) {
      // It may have routed the pool to the graph before CUDA refused the capture.
      unroute_pool(g->device, g->pool, true);
      g->pool = {0, 0};
      throw;
    }
    g->stream = c10::cuda::getCurrentCUDAStream(g->device).stream();
    *out = g.release();
    return 0;
#else
    (void)device;
    *err = dup_msg("this build of s3net-ops has no CUDA support");
    return 1;
#endif
  })
}

}  // extern "C"

// Runs `f` on the graph on its device, for the C calls that end a capture or replay one.
template <typename F>
int on_graph(void* handle, char** err, F f) {
  S3_PROTECT({
    *err = nullptr;
#ifdef S3OPS_CUDA
    auto* g = static_cast<S3Graph*>(handle);
    c10::cuda::CUDAGuard guard(g->device);
    f(*g->graph);
    return 0;
#else
    (void)handle;
    (void)f;
    *err = dup_msg("this build of s3net-ops has no CUDA support");
    return 1;
#endif
  })
}

extern "C" {

// Ends the capture and readies the graph for replay.
int s3ops_graph_end(void* handle, char** err) {
  return on_graph(handle, err, [](auto& graph) { graph.capture_end(); });
}

// After the captured work failed (an op threw, or synchronised and so invalidated the capture):
// ends the capture whatever its state, stops routing the stream's allocations to the graph's
// pool and clears CUDA's last error, so that the thread can go on without a graph.
void s3ops_graph_abort(void* handle) {
#ifdef S3OPS_CUDA
  auto* g = static_cast<S3Graph*>(handle);
  c10::cuda::CUDAGuard guard(g->device);
  try {
    g->graph->capture_end();
  } catch (...) {
    // capture_end threw before ending the pools' routing (the capture was invalidated, or it
    // refused to end at all): end it here, and the capture itself if the stream still
    // captures, or everything queued on it from now on would be recorded instead of run. The
    // pool's claim is released when the graph is dropped.
    unroute_pool(g->device, g->pool, false);
    cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
    if (g->stream && cudaStreamIsCapturing(g->stream, &st) == cudaSuccess &&
        st != cudaStreamCaptureStatusNone) {
      cudaGraph_t partial = nullptr;
      if (cudaStreamEndCapture(g->stream, &partial) == cudaSuccess && partial) {
        (void)cudaGraphDestroy(partial);
      }
    }
  }
  (void)cudaGetLastError();
  // The captured backward ran on libtorch's autograd thread for the device, and an invalidated
  // capture leaves its CUDA error there too: the next backward's first kernel check would
  // report it (seen as a cuDNN "execution failed" in the eager step after a failed capture).
  // A throwaway backward on that thread reads and clears it.
  for (int i = 0; i < 2; ++i) {
    try {
      c10::AutoGradMode grad(true);
      auto t = at::ones({1}, at::TensorOptions().device(at::kCUDA, g->device)).requires_grad_();
      (t * 2).sum().backward();
    } catch (...) {
    }
  }
#else
  (void)handle;
#endif
}

int s3ops_graph_replay(void* handle, char** err) {
  return on_graph(handle, err, [](auto& graph) { graph.replay(); });
}

void s3ops_graph_free(void* handle) { delete static_cast<S3Graph*>(handle); }

}  // extern "C"
