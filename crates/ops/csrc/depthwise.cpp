// ============================================================================================
// Depthwise convolution, and the I-LKA block's three parallel depthwise convolutions
// (BranchesFn, below)
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
// A plane copied with zero columns on both sides: column c of the input is at c + left, and a
// tap of output column wo (for wo below `cols`, the output width rounded up to whole chunks)
// at wo - p + j*d + left, always inside [0, width).

#include "common.h"

namespace s3ops {
namespace {

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

bool dw_columns() { return g_switches[kSwitchDwColumns].on(); }

// Contiguous planes in and out, the output overwritten.
S3DepthwiseDims dw_dims(const at::Tensor& in, int64_t k, int64_t p, int64_t d, int64_t Ho,
                        int64_t Wo) {
  return {in.size(0), in.size(1), in.size(2), in.size(3), k, p, d, Ho, Wo, 0, 0, 0, 0, 0,
          dw_columns() ? 1 : 0};
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
}  // namespace s3ops

using namespace s3ops;

extern "C" {

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

}  // extern "C"
