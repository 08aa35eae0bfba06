// Thin AVX-512F wrapper `V` used by the vectorized kernel bodies (vec_math.h, philox_vec.h,
// kernels_body.h). No include guard on purpose: kernels.cpp includes it once, inside a namespace and
// a `#pragma GCC target("avx512f")` region, so that every function below and every body function
// defined after it is compiled for AVX-512 (and only called after a run-time CPU check).
//
// Vocabulary shared with isa_avx2.h:
//   F: W floats; I: integer vector (W 32-bit lanes, or W/2 64-bit lanes); M: per-float-lane mask.
//   The Philox code keeps one 32-bit counter word per 64-bit lane (mul32 = vpmuludq multiplies the
//   low 32 bits of each 64-bit lane into a full 64-bit product), so one F of results needs two I of
//   state; pack_lo() gathers the low 32-bit halves of two such I into one I of W 32-bit lanes, in
//   element order, and counters() initialises the two I so that pack_lo() yields elements 0..W-1.
struct V {
  static constexpr int W = 16;
  using F = __m512;
  using I = __m512i;
  using M = __mmask16;

  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F a) { _mm512_storeu_ps(p, a); }
  static F set1(float a) { return _mm512_set1_ps(a); }
  static F zero() { return _mm512_setzero_ps(); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F div(F a, F b) { return _mm512_div_ps(a, b); }
  // 1/b within ~1 ulp for normal |b| <= 2^126 (rcp14: 2^-14, one Newton step: ~2^-28 + rounding),
  // 0 above (a result that would be subnormal); NaN -> NaN. Cheaper than a division (vdivps zmm
  // blocks port 0 for ~10 cycles).
  static F rcp(F b) {
    const F r = _mm512_rcp14_ps(b);
    return _mm512_mul_ps(r, _mm512_fnmadd_ps(b, r, _mm512_set1_ps(2.0f)));
  }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }    // a*b + c, one rounding
  static F fnmadd(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a*b, one rounding
  // max/min return the second operand when either is NaN: callers pass the data second to keep NaN.
  static F max(F a, F b) { return _mm512_max_ps(a, b); }
  static F min(F a, F b) { return _mm512_min_ps(a, b); }
  static F sqrt(F a) { return _mm512_sqrt_ps(a); }
  static F round(F a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static F scale2(F a, F n) { return _mm512_scalef_ps(a, n); }  // a 2^n for an integral float n
  static M lt(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  static M gt(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  static M ge(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }
  static M mand(M a, M b) { return static_cast<M>(a & b); }
  static M mor(M a, M b) { return static_cast<M>(a | b); }
  static int bits(M m) { return m; }  // bit j: lane j
  static constexpr int kAllBits = 0xFFFF;
  static F iota() { return _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0); }  // lane j: j
  // base + j for each lane j whose bit is set in `b`, in order, at dst[0, count); returns count.
  static int compress_lanes(int32_t* dst, int b, int32_t base) {
    const __m512i j = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    _mm512_mask_compressstoreu_epi32(dst, static_cast<__mmask16>(b), _mm512_add_epi32(j, _mm512_set1_epi32(base)));
    return kCompress8.count[b & 0xFF] + kCompress8.count[b >> 8];
  }
  static F select(M m, F t, F f) { return _mm512_mask_blend_ps(m, f, t); }  // m ? t : f
  static F mask_to_one(M m) { return _mm512_maskz_mov_ps(m, _mm512_set1_ps(1.0f)); }  // m ? 1 : 0
  static float hsum(F a) { return _mm512_reduce_add_ps(a); }

  // 32-bit integer lanes.
  static F as_f(I a) { return _mm512_castsi512_ps(a); }
  static I as_i(F a) { return _mm512_castps_si512(a); }
  static I i32(int32_t a) { return _mm512_set1_epi32(a); }
  static I add32(I a, I b) { return _mm512_add_epi32(a, b); }
  static I sub32(I a, I b) { return _mm512_sub_epi32(a, b); }
  static I iand(I a, I b) { return _mm512_and_si512(a, b); }
  static I ior(I a, I b) { return _mm512_or_si512(a, b); }
  static I ixor(I a, I b) { return _mm512_xor_si512(a, b); }
  template <int S> static I srl32(I a) { return _mm512_srli_epi32(a, S); }
  template <int S> static I sll32(I a) { return _mm512_slli_epi32(a, S); }
  template <int S> static I sra32(I a) { return _mm512_srai_epi32(a, S); }
  // odd_bit0 ? a : b, lane by lane, where odd_bit0 = the lowest bit of j.
  static F pick_by_bit0(I j, F a, F b) { return _mm512_mask_blend_ps(_mm512_test_epi32_mask(j, i32(1)), b, a); }
  // -a where bit 1 of k is set, else a.
  static F negate_by_bit1(I k, F a) {
    return as_f(_mm512_mask_xor_epi32(as_i(a), _mm512_test_epi32_mask(k, i32(2)), as_i(a), i32(INT32_MIN)));
  }
  static F cvt_f32(I a) { return _mm512_cvtepi32_ps(a); }      // int32 -> float, round to nearest
  // The low byte of each 32-bit lane, W bytes at p (lanes in 0..255).
  static void store_bytes(uint8_t* p, I a) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8(a)); }
  static I cvt_i32(F a) { return _mm512_cvtps_epi32(a); }      // float -> int32, round to nearest

  // 64-bit lanes (Philox state).
  static I u64(uint64_t a) { return _mm512_set1_epi64(static_cast<long long>(a)); }
  static I mul32(I a, I b) { return _mm512_mul_epu32(a, b); }  // lo32(a) * lo32(b), 64-bit lanes
  // hi32: the high word moved into the low half (vpshufd, port 5; the upper half keeps garbage).
  static I hi32(I p) { return _mm512_shuffle_epi32(p, _MM_PERM_CDAB); }
  static I xor3(I a, I b, I c) { return _mm512_ternarylogic_epi64(a, b, c, 0x96); }
  static void counters(uint32_t base, I& a, I& b) {
    const I vb = _mm512_set1_epi64(static_cast<long long>(base));
    a = _mm512_add_epi64(vb, _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0));
    b = _mm512_add_epi64(vb, _mm512_set_epi64(15, 14, 13, 12, 11, 10, 9, 8));
  }
  static I pack_lo(I a, I b) {
    const I idx = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    return _mm512_permutex2var_epi32(a, idx, b);
  }
};
