// Thin AVX2+FMA wrapper `V`, the same vocabulary as isa_avx512.h (read its header). No include guard:
// kernels.cpp includes it inside a namespace and a `#pragma GCC target("avx2,fma")` region.
struct V {
  static constexpr int W = 8;
  using F = __m256;
  using I = __m256i;
  using M = __m256;  // all-ones / all-zeros float lanes

  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F a) { _mm256_storeu_ps(p, a); }
  static F set1(float a) { return _mm256_set1_ps(a); }
  static F zero() { return _mm256_setzero_ps(); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F div(F a, F b) { return _mm256_div_ps(a, b); }
  // 1/b: a division (rcpps + one Newton step leaves ~2^-22, too coarse for the KL's documented
  // accuracy).
  static F rcp(F b) { return _mm256_div_ps(_mm256_set1_ps(1.0f), b); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F fnmadd(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
  static F max(F a, F b) { return _mm256_max_ps(a, b); }
  static F min(F a, F b) { return _mm256_min_ps(a, b); }
  static F sqrt(F a) { return _mm256_sqrt_ps(a); }
  static F round(F a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static F scale2(F a, F n) {  // a 2^n for an integral float n, |n| <= 126: add n to the exponent bits
    return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(a), _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23)));
  }
  static M lt(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  static M gt(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
  static M ge(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_GE_OQ); }
  static M mand(M a, M b) { return _mm256_and_ps(a, b); }
  static M mor(M a, M b) { return _mm256_or_ps(a, b); }
  static int bits(M m) { return _mm256_movemask_ps(m); }  // bit j: lane j
  static constexpr int kAllBits = 0xFF;
  static F iota() { return _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7); }  // lane j: j
  // base + j for each lane j whose bit is set in `b`, in order, at dst[0, count); writes all W slots
  // of dst (those from count on are junk); returns count.
  static int compress_lanes(int32_t* dst, int b, int32_t base) {
    const __m256i j = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(kCompress8.lanes[b])));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_add_epi32(j, _mm256_set1_epi32(base)));
    return kCompress8.count[b];
  }
  static F select(M m, F t, F f) { return _mm256_blendv_ps(f, t, m); }
  static F mask_to_one(M m) { return _mm256_and_ps(m, _mm256_set1_ps(1.0f)); }
  static float hsum(F a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }

  static F as_f(I a) { return _mm256_castsi256_ps(a); }
  static I as_i(F a) { return _mm256_castps_si256(a); }
  static I i32(int32_t a) { return _mm256_set1_epi32(a); }
  static I add32(I a, I b) { return _mm256_add_epi32(a, b); }
  static I sub32(I a, I b) { return _mm256_sub_epi32(a, b); }
  static I iand(I a, I b) { return _mm256_and_si256(a, b); }
  static I ior(I a, I b) { return _mm256_or_si256(a, b); }
  static I ixor(I a, I b) { return _mm256_xor_si256(a, b); }
  template <int S> static I srl32(I a) { return _mm256_srli_epi32(a, S); }
  template <int S> static I sll32(I a) { return _mm256_slli_epi32(a, S); }
  template <int S> static I sra32(I a) { return _mm256_srai_epi32(a, S); }
  static F pick_by_bit0(I j, F a, F b) {
    return _mm256_blendv_ps(b, a, as_f(_mm256_slli_epi32(j, 31)));  // blendv reads the sign bit
  }
  static F negate_by_bit1(I k, F a) { return _mm256_xor_ps(a, as_f(_mm256_slli_epi32(_mm256_and_si256(k, i32(2)), 30))); }
  static F cvt_f32(I a) { return _mm256_cvtepi32_ps(a); }
  // The low byte of each 32-bit lane, W bytes at p (lanes in 0..255).
  static void store_bytes(uint8_t* p, I a) {
    const I lo4 = _mm256_shuffle_epi8(a, _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                                          0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1));
    const __m128i b = _mm_unpacklo_epi32(_mm256_castsi256_si128(lo4), _mm256_extracti128_si256(lo4, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p), b);
  }
  static I cvt_i32(F a) { return _mm256_cvtps_epi32(a); }

  static I u64(uint64_t a) { return _mm256_set1_epi64x(static_cast<long long>(a)); }
  static I mul32(I a, I b) { return _mm256_mul_epu32(a, b); }
  static I hi32(I p) { return _mm256_srli_epi64(p, 32); }
  static I xor3(I a, I b, I c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); }
  // shuffle_ps(a, b, 0x88) takes, per 128-bit half, the low words of a's two 64-bit lanes, then
  // b's: [a.q0 a.q1 b.q0 b.q1 | a.q2 a.q3 b.q2 b.q3]. So a holds elements {0,1,4,5}, b {2,3,6,7}.
  static void counters(uint32_t base, I& a, I& b) {
    const I vb = _mm256_set1_epi64x(static_cast<long long>(base));
    a = _mm256_add_epi64(vb, _mm256_set_epi64x(5, 4, 1, 0));
    b = _mm256_add_epi64(vb, _mm256_set_epi64x(7, 6, 3, 2));
  }
  static I pack_lo(I a, I b) {
    return _mm256_castps_si256(_mm256_shuffle_ps(_mm256_castsi256_ps(a), _mm256_castsi256_ps(b), 0x88));
  }
};
