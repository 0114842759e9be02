// Runs this crate's CUDA kernels on the CPU, for tests: most sessions that work on the kernels
// have no GPU, and a kernel that has never run is a kernel nobody knows to be right.
//
// build.rs compiles each csrc/*_cuda.cu a second time with the host C++ compiler, this header
// first, its entry points renamed s3ops_simt_* (cuda_common.cuh's S3_ENTRY). The ops' C++ then runs
// the same host code it runs for CUDA tensors on CPU tensors, with these kernels, on a thread
// that asked for it (`s3ops_set_simt`, s3net_ops::simt in Rust). What it emulates:
//  * a launch runs its blocks one after another; a block's threads are fibers of the calling
//    thread (a few instructions to switch on x86-64, ucontext elsewhere), each running until it waits at a barrier or returns; __syncthreads and
//    the warp shuffles are barriers over the block's or the warp's threads that have not
//    returned. Deterministic: no thread of the OS runs a second kernel thread at once, so
//    atomicAdd is a plain add;
//  * the threads of even blocks start in increasing order, those of odd blocks in decreasing
//    order, so a thread reading shared memory that another thread writes without a barrier in
//    between reads it unwritten in one order or the other;
//  * dynamic shared memory starts filled with 0xff bytes (NaN as float32, float64 and
//    bfloat16), so a value read before it is written poisons the result;
//  * what the GPU refuses fails here too: more than 1024 threads per block, more than 48 KiB
//    of dynamic shared memory (the kernels do not opt in to more), a grid over CUDA's limits;
//    and what the GPU leaves undefined is reported: threads of a block waiting at different
//    __syncthreads, a shuffle over a partial warp, threads that wait forever.
// Not emulated: the memory model beyond that order (races between blocks), out-of-bounds
// accesses, alignment faults, timing. The GPU checks still decide; this finds the logic errors
// before one.
#pragma once

#include <math.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// One copy per OS thread (tests emulate kernels on several at once), and a thread runs its
// blocks one at a time.
#define __shared__ static thread_local
#define S3_DYNAMIC_SHARED(name) unsigned char* name = ::simt::dynamic_shared()
#define S3_LAUNCH(grid, block, shm, stream, ...) ::simt::launch(grid, block, shm, __VA_ARGS__)
#define S3_ENTRY(name) s3ops_simt_##name
#define __syncthreads() ::simt::sync_block(__LINE__)
#define threadIdx (::simt::state().thread)
#define blockIdx (::simt::state().block_idx)
#define blockDim (::simt::state().block_dim)
#define gridDim (::simt::state().grid_dim)
#define warpSize 32

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint2 {
  unsigned x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) float4 {
  float x, y, z, w;
};

typedef struct CUstream_st* cudaStream_t;
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};

inline unsigned __float_as_uint(float v) {
  unsigned u;
  std::memcpy(&u, &v, sizeof u);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}

namespace simt {

// Switching between a kernel thread's stack and the scheduler's. On x86-64 our own switch: it
// saves what the System V ABI says a callee keeps (rbx, rbp, r12–r15, the SSE and x87 control
// words) on the current stack and moves to the other; ucontext's swapcontext would make two
// system calls per switch (the signal mask), which made the emulation several times slower.
#if defined(__x86_64__)
extern "C" void s3_simt_switch(void** save_sp, void* load_sp);
// Weak: every translation unit built on this header carries a copy; the linker keeps one.
__asm__(
    ".pushsection .text\n"
    ".weak s3_simt_switch\n"
    ".type s3_simt_switch, @function\n"
    "s3_simt_switch:\n"
    "  pushq %rbp\n"
    "  pushq %rbx\n"
    "  pushq %r12\n"
    "  pushq %r13\n"
    "  pushq %r14\n"
    "  pushq %r15\n"
    "  subq $8, %rsp\n"
    "  stmxcsr (%rsp)\n"
    "  fnstcw 4(%rsp)\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  ldmxcsr (%rsp)\n"
    "  fldcw 4(%rsp)\n"
    "  addq $8, %rsp\n"
    "  popq %r15\n"
    "  popq %r14\n"
    "  popq %r13\n"
    "  popq %r12\n"
    "  popq %rbx\n"
    "  popq %rbp\n"
    "  ret\n"
    ".size s3_simt_switch, .-s3_simt_switch\n"
    ".popsection\n");

struct Context {
  void* sp = nullptr;
};
// A context that starts `entry` (which must never return) on the stack [stack, stack + size).
inline void start_context(Context& c, char* stack, size_t size, void (*entry)()) {
  auto top = reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t(15);
  auto* p = reinterpret_cast<uint64_t*>(top);
  p[-1] = 0;                                        // entry's return address: none
  p[-2] = reinterpret_cast<uint64_t>(entry);        // where the first switch returns to
  for (int r = 3; r <= 8; ++r) p[-r] = 0;           // rbp, rbx, r12–r15
  p[-9] = 0x1f80 | (uint64_t(0x037f) << 32);        // default MXCSR and x87 control word
  c.sp = p - 9;  // entry then starts with rsp ≡ 8 (mod 16), as after a call
}
inline void switch_context(Context& from, Context& to) { s3_simt_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};
inline void start_context(Context& c, char* stack, size_t size, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

constexpr unsigned kMaxThreads = 1024;
constexpr size_t kMaxDynamicShared = 48 << 10;
constexpr size_t kStack = 128 << 10;

// One kernel thread: its fiber and where it waits.
struct Fiber {
  Context ctx;
  char* stack = nullptr;
  dim3 thread;
  unsigned linear = 0;
  bool done = false;
  // The barrier it waits at: 0 none, 1 its block's, 2 its warp's; and the generation of that
  // barrier it waits to see pass.
  int waits = 0;
  uint64_t gen = 0;
};

// A barrier over a group of threads that have not returned.
struct Barrier {
  unsigned arrived = 0, live = 0;
  uint64_t gen = 0;
  int line = 0;  // where the current generation's first thread arrived (block barriers)
};

// What the kernel code of the calling OS thread sees, and the scheduler's state.
struct State {
  dim3 thread, block_idx, block_dim, grid_dim;
  Fiber* cur = nullptr;
  Context sched;
  std::vector<Fiber> fibers;
  Barrier block;
  std::vector<Barrier> warps;
  std::vector<uint64_t> lanes;  // the values a shuffle exchanges, one per thread
  std::vector<unsigned char> shared;
  void (*body)(void*) = nullptr;
  void* arg = nullptr;
  std::string error;  // the first thing the emulation found wrong in this launch
  int last = 0;       // what cudaGetLastError hands out next
  std::string last_message;  // what went wrong in the launch that failed last
  uint64_t launches = 0;      // kernels this thread has run, for tests to see they did

  ~State() {
    for (Fiber& f : fibers)
      if (f.stack) munmap(f.stack, kStack);
  }
};

inline State& state() {
  static thread_local State s;
  return s;
}

inline void fail(const std::string& why) {
  State& s = state();
  if (s.error.empty()) s.error = why;
}

inline unsigned char* dynamic_shared() { return state().shared.data(); }

// Back to the scheduler until the barrier `which` (1 the block's, 2 the warp's) has passed
// generation `gen`.
inline void wait(int which, uint64_t gen) {
  State& s = state();
  Fiber* f = s.cur;
  f->waits = which;
  f->gen = gen;
  switch_context(f->ctx, s.sched);
}

inline void arrive(Barrier& b, int which) {
  const uint64_t gen = b.gen;
  if (++b.arrived == b.live) {
    b.arrived = 0;
    ++b.gen;
    return;
  }
  wait(which, gen);
}

inline void sync_block(int line) {
  State& s = state();
  Barrier& b = s.block;
  if (b.arrived == 0) {
    b.line = line;
  } else if (b.line != line) {
    fail("threads of a block wait at different __syncthreads (lines " + std::to_string(b.line) +
         " and " + std::to_string(line) + ")");
  }
  arrive(b, 1);
}

inline unsigned warp_width(const State& s, unsigned warp) {
  const unsigned n = s.block_dim.x * s.block_dim.y * s.block_dim.z;
  return n - warp * 32 < 32 ? n - warp * 32 : 32;
}

template <typename T>
T shfl_down(unsigned mask, T v, int delta) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "a shuffle moves at most 8 bytes here");
  State& s = state();
  const unsigned me = s.cur->linear, warp = me / 32, lane = me % 32;
  const unsigned width = warp_width(s, warp);
  Barrier& b = s.warps[warp];
  const unsigned all = width == 32 ? 0xffffffffu : (1u << width) - 1u;
  if (mask != all || b.live != width) fail("__shfl_down_sync over a partial warp");
  std::memcpy(&s.lanes[me], &v, sizeof(T));
  arrive(b, 2);
  T r = v;
  if (lane + (unsigned)delta < width) std::memcpy(&r, &s.lanes[me + delta], sizeof(T));
  arrive(b, 2);  // nobody writes its lane again before every lane has read
  return r;
}

inline void fiber_main() {
  State& s = state();
  Fiber* f = s.cur;
  s.body(s.arg);
  f->done = true;
  // A returned thread no longer counts at its block's and warp's barriers.
  auto leave = [](Barrier& b) {
    if (--b.live > 0 && b.arrived == b.live) {
      b.arrived = 0;
      ++b.gen;
    }
  };
  leave(s.block);
  leave(s.warps[f->linear / 32]);
  switch_context(f->ctx, s.sched);  // never resumed
  __builtin_unreachable();
}

// Runs body(arg) as every thread of every block of the grid.
inline void run(dim3 grid, dim3 block, size_t shm, void (*body)(void*), void* arg) {
  State& s = state();
  s.error.clear();
  const uint64_t threads = (uint64_t)block.x * block.y * block.z;
  if (threads == 0 || threads > kMaxThreads || block.z > 64 || grid.x == 0 || grid.y == 0 ||
      grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
    s.last = cudaErrorInvalidConfiguration;
    s.last_message = "invalid launch configuration";
    return;
  }
  if (shm > kMaxDynamicShared) {
    s.last = cudaErrorInvalidValue;
    s.last_message = "more dynamic shared memory than a kernel gets without opting in";
    return;
  }
  const unsigned n = (unsigned)threads;
  ++s.launches;
  // Grown, never shrunk: a fiber keeps its stack for the thread's later launches.
  if (s.fibers.size() < n) s.fibers.resize(n);
  for (unsigned i = 0; i < n; ++i) {
    Fiber& f = s.fibers[i];
    if (!f.stack) {
      void* p = mmap(nullptr, kStack, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (p == MAP_FAILED) {
        s.last = cudaErrorLaunchFailure;
        s.last_message = "no memory for the emulated threads' stacks";
        return;
      }
      f.stack = static_cast<char*>(p);
    }
  }
  s.warps.assign((n + 31) / 32, Barrier{});
  s.lanes.assign(n, 0);
  s.block_dim = block;
  s.grid_dim = grid;
  s.body = body;
  s.arg = arg;
  uint64_t parity = 0;
  for (unsigned bz = 0; bz < grid.z && s.error.empty(); ++bz)
    for (unsigned by = 0; by < grid.y && s.error.empty(); ++by)
      for (unsigned bx = 0; bx < grid.x && s.error.empty(); ++bx, ++parity) {
        s.block_idx = dim3(bx, by, bz);
        s.shared.assign(shm, 0xff);
        s.block = Barrier{};
        s.block.live = n;
        for (unsigned w = 0; w < s.warps.size(); ++w) {
          s.warps[w] = Barrier{};
          s.warps[w].live = warp_width(s, w);
        }
        for (unsigned i = 0; i < n; ++i) {
          Fiber& f = s.fibers[i];
          f.linear = i;
          f.thread = dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
          f.done = false;
          f.waits = 0;
          start_context(f.ctx, f.stack, kStack, fiber_main);
        }
        // Round robin until every thread has returned; a round in which none could move is a
        // deadlock.
        unsigned left = n;
        while (left > 0 && s.error.empty()) {
          bool moved = false;
          for (unsigned j = 0; j < n; ++j) {
            Fiber& f = s.fibers[parity % 2 ? n - 1 - j : j];
            if (f.done) continue;
            if (f.waits) {
              const Barrier& b = f.waits == 1 ? s.block : s.warps[f.linear / 32];
              if (b.gen == f.gen) continue;
              f.waits = 0;
            }
            s.cur = &f;
            s.thread = f.thread;
            switch_context(s.sched, f.ctx);
            moved = true;
            if (f.done) --left;
          }
          if (!moved) fail("threads wait at a barrier the others never reach");
        }
        s.cur = nullptr;
      }
  if (!s.error.empty()) {
    s.last = cudaErrorLaunchFailure;
    s.last_message = "emulated kernel: " + s.error;
  }
}

// `kernel<<<grid, block, shm, stream>>>(args...)`: S3_LAUNCH(grid, block, shm, stream,
// kernel)(args...) keeps the arguments as the kernel's parameter types, as a launch does.
template <typename... P>
struct Launch {
  dim3 grid, block;
  size_t shm;
  void (*kernel)(P...);

  template <typename... A>
  void operator()(A&&... a) const {
    std::tuple<P...> args(static_cast<P>(std::forward<A>(a))...);
    struct Call {
      void (*kernel)(P...);
      std::tuple<P...>* args;
    } call{kernel, &args};
    run(grid, block, shm,
        [](void* p) {
          auto* c = static_cast<Call*>(p);
          std::apply(c->kernel, *c->args);
        },
        &call);
  }
};

template <typename... P>
Launch<P...> launch(dim3 grid, dim3 block, size_t shm, void (*kernel)(P...)) {
  return Launch<P...>{grid, block, shm, kernel};
}

}  // namespace simt

template <typename T>
T __shfl_down_sync(unsigned mask, T v, int delta) {
  return ::simt::shfl_down(mask, v, delta);
}

template <typename T>
T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}

inline cudaError_t cudaGetLastError() {
  simt::State& s = simt::state();
  const int e = s.last;
  s.last = 0;
  return (cudaError_t)e;
}

inline const char* cudaGetErrorString(cudaError_t e) {
  if (e == cudaSuccess) return "no error";
  const std::string& m = simt::state().last_message;
  if (!m.empty()) return m.c_str();
  return e == cudaErrorInvalidValue ? "invalid argument" : "emulated kernel failed";
}

// Kernels the calling thread has run on the emulation so far (every translation unit built on
// this header carries a copy; the linker keeps one).
extern "C" __attribute__((weak)) uint64_t s3ops_simt_launches() { return simt::state().launches; }
