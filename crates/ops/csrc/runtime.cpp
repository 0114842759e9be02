// What a fit asks of the device beyond the ops: momentum SGD over all parameters, per-thread CUDA
// streams, a cap on the caching allocator, CUDA graphs, copies to the host that do not wait
// for later work, libtorch's profiler, the kernel switches, and the emulation's on/off.

#include "common.h"

#include <torch/csrc/autograd/profiler_kineto.h>

#ifdef S3OPS_CUDA
#include <ATen/core/CachingHostAllocator.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#endif

#include <set>

using namespace s3ops;

namespace s3ops {
namespace {

// Whether sgd_cuda.cu's kernel takes these parameters: each on the kernels' device (a GPU, or
// the emulation), contiguous, float32 or float64, its velocity and gradient of its own type and
// on its device. Anything else (a CPU fit, a strided gradient) keeps libtorch's ops.
bool fused_sgd_takes(const std::vector<at::Tensor>& p, const std::vector<at::Tensor>& v,
                     const std::vector<at::Tensor>& g) {
  const at::ScalarType k = p[0].scalar_type();
  if (k != at::kFloat && k != at::kDouble) return false;
  for (size_t i = 0; i < p.size(); ++i) {
    for (const at::Tensor* t : {&p[i], &v[i], &g[i]}) {
      if (!on_kernels(*t) || t->device() != p[0].device() || t->scalar_type() != k ||
          !t->is_contiguous() || t->numel() != p[i].numel())
        return false;
    }
  }
  return true;
}

// The step as sgd_cuda.cu's kernel, kSgdMax parameters a launch, on the current stream.
void fused_sgd(const std::vector<at::Tensor>& p, const std::vector<at::Tensor>& v,
               const std::vector<at::Tensor>& g, double lr, double momentum) {
  const Kernels& k = kernels(p[0]);
  const KernelGuard guard(p[0]);
  void* stream = kernel_stream(p[0]);
  const int dtype = p[0].scalar_type() == at::kDouble ? 1 : 0;
  for (size_t first = 0; first < p.size(); first += kSgdMax) {
    S3SgdTensors t{};
    t.n = (int64_t)std::min(p.size() - first, (size_t)kSgdMax);
    for (int64_t i = 0; i < t.n; ++i) {
      t.p[i] = p[first + i].data_ptr();
      t.v[i] = v[first + i].data_ptr();
      t.g[i] = g[first + i].data_ptr();
      t.numel[i] = p[first + i].numel();
      t.block_start[i + 1] = t.block_start[i] + (t.numel[i] + kSgdPerBlock - 1) / kSgdPerBlock;
    }
    kernel_check("sgd_step", k.sgd_step(dtype, &t, lr, momentum, stream), "SGD", p[0]);
  }
}

}  // namespace
}  // namespace s3ops

extern "C" {

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
    if (g_switches[kSwitchFusedSgd].on() && fused_sgd_takes(p, v, g)) {
      fused_sgd(p, v, g, lr, momentum);
    } else {
      at::_foreach_mul_(v, momentum);
      at::_foreach_add_(v, g);
      at::_foreach_sub_(p, at::_foreach_mul(v, lr));
    }
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

// Whether cuDNN's float32 convolutions (and RNNs) may round through TF32, libtorch's
// process-wide precision setting, set first unless `set` is negative (0: full float32, 1: TF32,
// libtorch's default). Returns the setting before the call (1: TF32). For tests that compare two
// orders of the same float32 sums: TF32's 2^-11 rounding hides a wrong sum that float32 shows.
int s3ops_cudnn_tf32(int set) {
  using at::Float32Backend, at::Float32Op, at::Float32Precision;
  auto& ctx = at::globalContext();
  const bool was = ctx.float32Precision(Float32Backend::CUDA, Float32Op::CONV) == Float32Precision::TF32;
  if (set >= 0) {
    const Float32Precision p = set ? Float32Precision::TF32 : Float32Precision::IEEE;
    ctx.setFloat32Precision(Float32Backend::CUDA, Float32Op::CONV, p);
    ctx.setFloat32Precision(Float32Backend::CUDA, Float32Op::RNN, p);
  }
  return was ? 1 : 0;
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
