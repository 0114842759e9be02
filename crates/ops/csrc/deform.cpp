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

#include "common.h"

namespace s3ops {
namespace {

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
      const int rc = kernels(x).deform_col2im(dtype, &d, xp, op, mp, gcols.data_ptr(), gip, gop,
                                              gmp, st);
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

}  // namespace
}  // namespace s3ops

using namespace s3ops;

extern "C" {

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

}  // extern "C"
