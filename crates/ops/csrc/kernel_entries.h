// The entry points of the kernels in csrc/*_cuda.cu, one line each:
// S3_KERNEL(return type, name, (parameters)). common.h reads this list with S3_KERNEL defined
// three ways: to declare s3ops_cuda_<name> (the GPU build, nvcc) and s3ops_simt_<name> (the
// same sources on the CPU emulation of simt.h), and to make the table of either that the ops'
// host code calls through. No include guard: it is meant to be read more than once.
//
// Each takes device pointers (host pointers for the emulation) and a cudaStream_t as void*, and
// returns a cudaError_t as int (0 = success); see the .cu files for what each computes.

// depthwise_cuda.cu
S3_KERNEL(int64_t, dw_partials_per_plane, (const S3DepthwiseDims* d))
S3_KERNEL(int64_t, dw_blocks_per_plane, (const S3DepthwiseDims* d))
S3_KERNEL(int64_t, dw_shared_bytes, (const S3DepthwiseDims* d, int64_t elem))
S3_KERNEL(int, dw_correlate, (int dtype, const S3DepthwiseDims* d, const void* in, const void* w,
                              const void* bias, void* out, void* stream))
S3_KERNEL(int, dw_weight_grad, (int dtype, const S3DepthwiseDims* d, const void* in,
                                const void* go, void* partial, void* stream))
// bias_cuda.cu
S3_KERNEL(int64_t, bias_grad_chunks, (int64_t elems))
S3_KERNEL(int, bias_add, (int dtype, void* y, const void* bias, const void* other, void* out,
                          int then, int64_t planes, int64_t elems, int64_t channels,
                          void* stream))
S3_KERNEL(int, gate_grad, (int dtype, const void* g, const void* u, const void* z, void* gz,
                           void* gu, int64_t n, void* stream))
S3_KERNEL(int, bias_grad, (int dtype, const void* go, void* partial, int64_t planes,
                           int64_t elems, int64_t channels, void* stream))
// norm_cuda.cu
S3_KERNEL(int64_t, plane_norm_scratch, (int64_t planes, int64_t elems))
S3_KERNEL(int, plane_norm_forward, (int dtype, const void* x, void* y, const void* gamma,
                                    const void* beta, void* mean, void* invstd, void* scratch,
                                    int64_t planes, int64_t elems, int64_t channels, double eps,
                                    void* stream))
S3_KERNEL(int, plane_norm_backward, (int dtype, const void* dy, const void* x,
                                     const void* gamma, const void* mean, const void* invstd,
                                     void* dx, void* dgamma, void* dbeta, void* scratch,
                                     int64_t planes, int64_t elems, int64_t channels,
                                     void* stream))
// losses_cuda.cu
S3_KERNEL(int, pixel_losses, (int dtype, const void* x, const int64_t* given, int64_t* target,
                              void* lse, int cont, double* rows, int64_t M, int64_t K, int64_t H,
                              int64_t W, void* stream))
S3_KERNEL(int, pixel_losses_grad, (int dtype, const void* x, const int64_t* target,
                                   const void* lse, const void* coef, int cont, void* grad,
                                   int64_t M, int64_t K, int64_t H, int64_t W, void* stream))
// deform_cuda.cu
S3_KERNEL(int, deform_im2col, (int dtype, const S3DeformDims* d, const void* x, const void* off,
                               const void* mask, void* cols, void* stream))
S3_KERNEL(int, deform_col2im, (int dtype, const S3DeformDims* d, const void* x, const void* off,
                               const void* mask, const void* gcols, void* gi, void* goff,
                               void* gmask, void* stream))
// split_k_cuda.cu
S3_KERNEL(int, split_k_products, (int dtype, const void* a, const void* c, void* parts, int64_t B,
                                  int64_t P, int64_t Q, int64_t K, int64_t L, void* stream))
// sgd_cuda.cu
S3_KERNEL(int, sgd_step, (int dtype, const S3SgdTensors* t, double lr, double momentum,
                          void* stream))
S3_KERNEL(const char*, error_string, (int code))
