// The host side of the bias and gate kernels (bias_cuda.cu) that several ops share, and what the
// C boundary frees. Declared, with what each does, in common.h.

#include "common.h"

namespace s3ops {

void bias_add_cuda(at::Tensor& y, const at::Tensor& bias, int64_t elems, BiasThen then,
                   const at::Tensor& other, at::Tensor* out) {
  KernelGuard guard(y);
  const auto b = bias.contiguous();
  const int64_t C = b.numel(), planes = elems > 0 ? y.numel() / elems : 0;
  const int rc = kernels(y).bias_add(dw_cuda_dtype(y), y.data_ptr(), b.data_ptr(),
                                     other.defined() ? other.data_ptr() : nullptr,
                                     out ? out->data_ptr() : nullptr, then, planes, elems, C,
                                     kernel_stream(y));
  kernel_check("bias", rc, "add", y);
}

std::pair<at::Tensor, at::Tensor> gate_grad_cuda(const at::Tensor& g, const at::Tensor& u,
                                                 const at::Tensor& z) {
  KernelGuard guard(g);
  auto gz = at::empty_like(g), gu = at::empty_like(g);
  const int rc = kernels(g).gate_grad(dw_cuda_dtype(g), g.data_ptr(), u.data_ptr(), z.data_ptr(),
                                      gz.data_ptr(), gu.data_ptr(), g.numel(), kernel_stream(g));
  kernel_check("pointwise_conv2d", rc, "gate gradient", g);
  return {gz, gu};
}

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

void add_bias(at::Tensor& y, const at::Tensor& bias, int64_t elems) {
  if (bias_cuda_ok(y) && bias.scalar_type() == y.scalar_type()) {
    bias_add_cuda(y, bias, elems);
    return;
  }
  const int64_t C = bias.numel();
  y.view({-1, C, elems}).add_(bias.reshape({1, C, 1}));
}

at::Tensor bias_grad(const at::Tensor& go, int64_t elems, int64_t C, at::ScalarType kind) {
  if (bias_cuda_ok(go)) return bias_grad_cuda(go, elems, C).to(kind);
  return go.reshape({-1, C, elems}).sum(at::IntArrayRef{0, 2}).to(kind);
}

}  // namespace s3ops

extern "C" {

void s3ops_free_err(char* e) { free(e); }

}  // extern "C"
