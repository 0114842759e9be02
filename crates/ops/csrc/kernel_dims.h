// Shapes and geometry of the ops whose kernels live in the .cu files, shared by the C++
// (ops.cpp) and CUDA (deform_cuda.cu, depthwise_cuda.cu) halves. Plain data: they cross the
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
};
