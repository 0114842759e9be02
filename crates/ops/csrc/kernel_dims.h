// Shapes and geometry of the ops whose kernels live in the .cu files, shared by the C++
// (csrc/<op>.cpp) and CUDA (deform_cuda.cu, depthwise_cuda.cu) halves. Plain data: they cross the
// boundary between the two compilers by pointer.
#pragma once
#include <cstdint>

struct S3DeformDims {
  // N images of C×H×W, O output channels, a kh×kw kernel (K = kh·kw taps), Ho×Wo outputs,
  // stride (sh, sw), padding (ph, pw), dilation (dh, dw).
  int64_t N, C, H, W, O, kh, kw, K, Ho, Wo, sh, sw, ph, pw, dh, dw;
};

struct S3DepthwiseDims {
  // N·C planes of H×W (channel = plane mod C), one k×k kernel per channel, stride 1, padding p
  // (any sign: the input gradient runs as a correlation with padding (k−1)·d − p), dilation d,
  // Ho×Wo outputs.
  int64_t N, C, H, W, k, p, d, Ho, Wo;
  // Where plane q lives, for the input and for the output-shaped tensor (the output, or the
  // output gradient the weight gradient reads): contiguous (q · plane size) when the group is
  // 0, else in groups of `group` planes whose starts are `gstride` elements apart:
  // (q / group) · gstride + (q mod group) · plane size. Lets the I-LKA block's three branches
  // write into, and read their gradients from, slices of one concatenated tensor.
  int64_t in_group, in_gstride, out_group, out_gstride;
  // Correlation only: add to what the output holds instead of overwriting it.
  int64_t accumulate;
  // Which layout of the work the CUDA kernels of the I-LKA block's geometries use: 0 strips
  // along rows (each thread 4 neighbouring outputs in 4 rows, 16-byte shared-memory reads),
  // 1 columns (each thread 16 outputs down a column, 4-byte reads shared by a column's taps);
  // see depthwise_cuda.cu.
  int64_t columns;
};

// One launch of sgd_cuda.cu's fused momentum-SGD step: up to kSgdMax parameters, each with its
// velocity and gradient (contiguous, one type for all), and the first block of each
// (`block_start[i]`; `block_start[n]` is the grid). Passed by value as the kernel's argument
// (about 2 KB, under the 4 KB a kernel's arguments may take), so a step's pointers need no copy
// to the GPU and a CUDA graph replays them as captured.
constexpr int kSgdMax = 48;
// The values of one parameter a block of the kernel takes (256 threads × 4): block_start's steps.
constexpr int64_t kSgdPerBlock = 1024;
struct S3SgdTensors {
  int64_t n;
  void* p[kSgdMax];
  void* v[kSgdMax];
  const void* g[kSgdMax];
  int64_t numel[kSgdMax];
  int64_t block_start[kSgdMax + 1];
};
