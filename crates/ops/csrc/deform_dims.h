// Shape and geometry of one deformable convolution, shared by the C++ (ops.cpp) and CUDA
// (deform_cuda.cu) halves of the op. Plain data: it crosses the boundary between the two
// compilers by pointer.
#pragma once
#include <cstdint>

struct S3DeformDims {
  // N images of C×H×W, O output channels, a kh×kw kernel (K = kh·kw taps), Ho×Wo outputs,
  // stride (sh, sw), padding (ph, pw), dilation (dh, dw).
  int64_t N, C, H, W, O, kh, kw, K, Ho, Wo, sh, sw, ph, pw, dh, dw;
};
