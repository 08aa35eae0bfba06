// Body of the per-chunk kernels (the math is stated in kernels.h). No include guard: kernels.cpp
// includes it three times, inside namespaces avx512 / avx2 / scalar, the first two inside
// `#pragma GCC target` regions, after defining randn_fill() and kl_f32() for that ISA. The plain
// loops below are written for the compiler's auto-vectorizer (-O3 -fno-math-errno), so each copy
// is vectorized for its ISA; __restrict holds because the ops never pass overlapping buffers.

constexpr int64_t kChunk = 480;  // ξ buffer per chunk (1.9 KB, L1), a multiple of every ISA's block

// Defined after this body by the includer (simd/kl_vec.h, or kl_libm<float> in the portable build).
inline KlPartial kl_f32(const float* w, const float* ls2, float* gw, float* gls2, int64_t n, const float* thr);
// Likewise (simd/sigma2_vec.h, or sigma2_libm<float>).
inline void sigma2_f32(const float* w, const float* ls2, float thr, float* wm, float* s2, uint8_t* state,
                       int64_t n);

// Splits the local indices [0, n) of a chunk starting at flat index `first` of an (outer, C, inner)
// array into runs of one bias slot pattern and calls fn(i0, i1, c, stride): inner == 1, a piece of
// one row, slots c, c + 1, ... (stride 1); inner > 1, a piece of one (o, c) plane, slot c (stride 0).
template <typename Fn>
inline void for_bias_runs(int64_t first, int64_t n, int64_t C, int64_t inner, Fn&& fn) {
  int64_t i = 0;
  if (inner == 1) {
    int64_t c = first % C;
    while (i < n) {
      const int64_t len = n - i < C - c ? n - i : C - c;
      fn(i, i + len, c, int64_t{1});
      i += len;
      c = 0;
    }
  } else {
    int64_t c = (first / inner) % C, j = first % inner;
    while (i < n) {
      const int64_t len = n - i < inner - j ? n - i : inner - j;
      fn(i, i + len, c, int64_t{0});
      i += len;
      j = 0;
      c = c + 1 == C ? 0 : c + 1;
    }
  }
}

template <typename T>
void lrt_forward(T* __restrict mu_y, T* __restrict s2_std, const T* __restrict bias, int64_t C, int64_t inner,
                 int64_t first, philox::Key key, int64_t n) {
  alignas(64) float xi[kChunk];
  const T eps = static_cast<T>(1e-8);
  for (int64_t off = 0; off < n; off += kChunk) {
    const int64_t len = n - off < kChunk ? n - off : kChunk;
    randn_fill(key, static_cast<uint32_t>(first + off), xi, len);
    T* __restrict m = mu_y + off;
    T* __restrict s = s2_std + off;
    if (bias == nullptr) {
      for (int64_t i = 0; i < len; ++i) {
        const T sd = std::sqrt(s[i] + eps);
        s[i] = sd;
        m[i] = m[i] + sd * static_cast<T>(xi[i]);
      }
      continue;
    }
    for_bias_runs(first + off, len, C, inner, [&](int64_t i0, int64_t i1, int64_t c, int64_t stride) {
      if (stride != 0) {
        const T* __restrict b = bias + c;
        for (int64_t i = i0; i < i1; ++i) {
          const T sd = std::sqrt(s[i] + eps);
          s[i] = sd;
          m[i] = (m[i] + b[i - i0]) + sd * static_cast<T>(xi[i]);
        }
      } else {
        const T b = bias[c];
        for (int64_t i = i0; i < i1; ++i) {
          const T sd = std::sqrt(s[i] + eps);
          s[i] = sd;
          m[i] = (m[i] + b) + sd * static_cast<T>(xi[i]);
        }
      }
    });
  }
}

template <typename T>
void lrt_backward_gs2(const T* __restrict g, const T* __restrict sd, T* __restrict gs2, double* __restrict gb,
                      int64_t C, int64_t inner, int64_t first, philox::Key key, int64_t n) {
  alignas(64) float xi[kChunk];
  for (int64_t off = 0; off < n; off += kChunk) {
    const int64_t len = n - off < kChunk ? n - off : kChunk;
    randn_fill(key, static_cast<uint32_t>(first + off), xi, len);
    const T* __restrict gc = g + off;
    const T* __restrict s = sd + off;
    T* __restrict o = gs2 + off;
    for (int64_t i = 0; i < len; ++i) o[i] = (gc[i] * static_cast<T>(xi[i])) / (static_cast<T>(2) * s[i]);
  }
  if (gb == nullptr) return;
  for_bias_runs(first, n, C, inner, [&](int64_t i0, int64_t i1, int64_t c, int64_t stride) {
    if (stride != 0) {
      double* __restrict acc = gb + c;
      for (int64_t i = i0; i < i1; ++i) acc[i - i0] += static_cast<double>(g[i]);
    } else {
      double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // 8 independent sums: vectorizable, no reassociation
      int64_t i = i0;
      for (; i + 8 <= i1; i += 8)
        for (int j = 0; j < 8; ++j) acc[j] += static_cast<double>(g[i + j]);
      for (; i < i1; ++i) acc[0] += static_cast<double>(g[i]);
      gb[c] += ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    }
  });
}

// σ² pass (kernels.h) with the C library's exp and log: fp64 everywhere, fp32 in the portable build.
template <typename T>
void sigma2_libm(const T* __restrict w, const T* __restrict ls2, T thr, T* __restrict wm, T* __restrict s2,
                 uint8_t* __restrict state, int64_t n) {
  if (state == nullptr) {
    for (int64_t i = 0; i < n; ++i) s2[i] = std::exp(ls2[i]);
    return;
  }
  const T clamp = static_cast<T>(10), eps = static_cast<T>(1e-8);
  for (int64_t i = 0; i < n; ++i) {
    const T wi = w[i], li = ls2[i];
    const T w2 = wi * wi;  // -std=c++20: no FMA contraction, two roundings as torch's w * w + 1e-8
    const T raw = li - std::log(w2 + eps);
    const T la = std::isnan(raw) ? raw : std::min(clamp, std::max(-clamp, raw));
    const bool keep = la < thr;
    const T m = keep ? T(1) : T(0);
    const T a = wi * m, b = std::exp(li) * m;
    wm[i] = a;
    s2[i] = b;
    state[i] = keep ? uint8_t{1} : (a != T(0) || b != T(0)) ? uint8_t{2} : uint8_t{0};
  }
}

template <typename T>
void clip_grads(T* __restrict gw, T* __restrict t3, const uint8_t* __restrict state, const T* __restrict s2m,
                int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    gw[i] = gw[i] * static_cast<T>(state[i] == 1);
    t3[i] = t3[i] * s2m[i];
  }
}

// a[u] summed over its lanes, u < 4: out[u]. fp32: two rounds of in-lane pair sums (the shuffles
// of _mm256_hadd_ps), then the two 128-bit halves.
template <typename T, typename vec>
inline void hsum4(const vec (&a)[4], T (&out)[4]) {
  if constexpr (sizeof(T) == 4 && sizeof(vec) == 32) {
    typedef int32_t ivec __attribute__((vector_size(32)));
    const ivec even = {0, 2, 8, 10, 4, 6, 12, 14}, odd = {1, 3, 9, 11, 5, 7, 13, 15};
    const vec p = __builtin_shuffle(a[0], a[1], even) + __builtin_shuffle(a[0], a[1], odd);
    const vec q = __builtin_shuffle(a[2], a[3], even) + __builtin_shuffle(a[2], a[3], odd);
    const vec h = __builtin_shuffle(p, q, even) + __builtin_shuffle(p, q, odd);  // [Σ a_u lanes 0-3 | 4-7]
    for (int u = 0; u < 4; ++u) out[u] = h[u] + h[u + 4];
  } else {
    constexpr int V = sizeof(vec) / sizeof(T);
    for (int u = 0; u < 4; ++u) {
      T acc = 0;
      for (int l = 0; l < V; ++l) acc += a[u][l];
      out[u] = acc;
    }
  }
}

template <typename T>
void clip_sddmm(const T* __restrict gT, const T* __restrict gs2T, const T* __restrict xT, int64_t ld, int64_t K,
                const int64_t* __restrict crow, const int32_t* __restrict col, const uint8_t* __restrict keep,
                const T* __restrict s2, T* __restrict gw, T* __restrict t3, int64_t r0, int64_t r1) {
  // GCC vector extensions (32 bytes: one ymm under AVX2 / AVX-512, two xmm in the portable build).
  // Four kept weights of a row at a time share the loads of g and g_s2 (8 accumulators); the rows
  // of length ld (a multiple of 8, zero padded) need no tail; the four dot products are reduced
  // together (hsum4). A row's last group repeats its last weight (computed twice, written once).
  typedef T vec __attribute__((vector_size(32)));
  constexpr int64_t V = 32 / sizeof(T);
  auto load = [](const T* p) {
    vec v;
    std::memcpy(&v, p, sizeof v);
    return v;
  };
  for (int64_t r = r0; r < r1; ++r) {
    T* __restrict gwr = gw + r * K;
    T* __restrict t3r = t3 + r * K;
    for (int64_t c = 0; c < K; ++c) gwr[c] = T(0);
    for (int64_t c = 0; c < K; ++c) t3r[c] = T(0);
    const T* __restrict g = gT + r * ld;
    const T* __restrict s = gs2T + r * ld;
    const int64_t e = crow[r + 1];
    for (int64_t j = crow[r]; j < e; j += 4) {
      int64_t c[4];
      const T* xr[4];
      for (int u = 0; u < 4; ++u) {
        c[u] = col[j + u < e ? j + u : e - 1];
        xr[u] = xT + c[u] * ld;
      }
      vec a[4] = {}, q[4] = {};
      for (int64_t b = 0; b < ld; b += V) {
        const vec gv = load(g + b), sv = load(s + b);
        for (int u = 0; u < 4; ++u) {
          const vec xv = load(xr[u] + b);
          a[u] += gv * xv;
          q[u] += sv * (xv * xv);
        }
      }
      T as[4], qs[4];
      hsum4(a, as);
      hsum4(q, qs);
      for (int u = 0; u < 4 && j + u < e; ++u) {
        gwr[c[u]] = as[u] * static_cast<T>(keep[j + u]);
        t3r[c[u]] = qs[u] * s2[j + u];
      }
    }
  }
}

// dst (cols, ld) = src (rows, cols)ᵀ, row-major both, for the rows [c0, c1) of dst; the columns
// [rows, ld) of those rows are set to 0 (ld ≥ rows: padding for fixed-width loops). fp32: 8x8
// blocks transposed in registers (simd/transpose8.h); a strip of 8 columns of src reads every row
// once (its other half-line is hit in L1 by the next strip); the edges and fp64 one element at a time.
template <typename T>
void transpose(const T* __restrict src, int64_t rows, int64_t cols, T* __restrict dst, int64_t ld, int64_t c0,
               int64_t c1) {
  for (int64_t c = c0; c < c1; ++c)
    for (int64_t r = rows; r < ld; ++r) dst[c * ld + r] = T(0);
  int64_t c = c0;
  if constexpr (sizeof(T) == 4) {
    typedef T vec __attribute__((vector_size(32)));
    for (; c + 8 <= c1; c += 8) {
      int64_t r = 0;
      for (; r + 8 <= rows; r += 8) {
        vec a[8];
        for (int i = 0; i < 8; ++i) std::memcpy(&a[i], src + (r + i) * cols + c, sizeof(vec));
        transpose8x8(a);  // a[j] = src[r .. r + 8, c + j]
        for (int j = 0; j < 8; ++j) std::memcpy(dst + (c + j) * ld + r, &a[j], sizeof(vec));
      }
      for (; r < rows; ++r) {
        for (int j = 0; j < 8; ++j) dst[(c + j) * ld + r] = src[r * cols + c + j];
      }
    }
  }
  for (; c < c1; ++c) {
    for (int64_t r = 0; r < rows; ++r) dst[c * ld + r] = src[r * cols + c];
  }
}

template <typename T>
void add_2x_mul(T* __restrict acc, const T* __restrict x, const T* __restrict t, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] = acc[i] + (static_cast<T>(2) * x[i]) * t[i];
}

template <typename T>
void mul_inplace(T* __restrict a, const T* __restrict b, int64_t n) {
  for (int64_t i = 0; i < n; ++i) a[i] = a[i] * b[i];
}

template <typename T>
void square(const T* __restrict x, T* __restrict out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * x[i];
}

// KL in the working precision with the C library's functions: fp64 everywhere, and fp32 in the
// portable build and for the SIMD kernels' tails. Same formulas as kl_f32 (kl_cpu.cpp's header).
template <typename T>
KlPartial kl_libm(const T* __restrict w, const T* __restrict ls2, T* __restrict gw, T* __restrict gls2, int64_t n,
                   const T* thr) {
  const T k1 = static_cast<T>(0.63576), k2 = static_cast<T>(1.87320), k3 = static_cast<T>(1.48695);
  const T clamp = static_cast<T>(10), eps = static_cast<T>(1e-8), one = 1, half = static_cast<T>(0.5);
  double total = 0;
  bool bad = false;
  int64_t kept = 0;
  for (int64_t i = 0; i < n; ++i) {
    const T wi = w[i], li = ls2[i];
    bad |= !std::isfinite(wi) || !std::isfinite(li);
    const T w2 = wi * wi + eps;
    const T raw = li - std::log(w2);
    const T la = std::isnan(raw) ? raw : std::min(clamp, std::max(-clamp, raw));
    if (thr != nullptr) kept += (la < *thr) || !std::isfinite(wi) || !(li < kLogMax<T>);
    const T z = k2 + k3 * la;
    const T ez = std::exp(-z);  // σ(z) = 1/(1+ez), σ(-z) = ez/(1+ez)
    const T el = std::exp(-la);
    total += static_cast<double>(k1 * (ez / (one + ez)) + half * std::log1p(el));
    if (gw != nullptr) {
      const T sz = one / (one + ez);
      T dla = -(k1 * k3 * (sz * (ez * sz)) + half * (el / (one + el)));
      dla = dla * static_cast<T>((raw > -clamp) && (raw < clamp));
      gls2[i] = dla;
      gw[i] = dla * ((static_cast<T>(-2) * wi) / w2);
    }
  }
  return {total, bad, kept};
}

template <typename T>
constexpr ElementwiseKernels<T> make_elementwise(void (*sigma2)(const T*, const T*, T, T*, T*, uint8_t*, int64_t),
                                                 KlPartial (*kl)(const T*, const T*, T*, T*, int64_t, const T*)) {
  return {&lrt_forward<T>, &lrt_backward_gs2<T>, sigma2, &clip_grads<T>, &add_2x_mul<T>, &mul_inplace<T>,
          &square<T>, &transpose<T>, &clip_sddmm<T>, kl};
}

inline Kernels make_kernels(const char* isa) {
  return {isa, &randn_fill, make_elementwise<float>(&sigma2_f32, &kl_f32),
          make_elementwise<double>(&sigma2_libm<double>, &kl_libm<double>)};
}
