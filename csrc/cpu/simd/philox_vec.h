// Vectorized ξ = tl.randn(seed, counter) (philox.h states the math), over the ISA wrapper V.
// No include guard: included inside each ISA region of kernels.cpp after V and vec_math.h.
//
// Layout: one Philox word per 64-bit lane, so vpmuludq (V::mul32) gives hi and lo of the 32x32
// product at once; the upper halves of the lanes hold garbage that no step reads (mul32 reads the
// low halves only, xor keeps halves apart, pack_lo() keeps the low halves). Per round and lane:
// 2 multiplies, 2 shifts, 2 three-way xors; round 0 (c1 = c2 = c3 = 0) and round 1 (c0 = key)
// need one multiply each, the last round only the one that feeds (c0, c1): 17 multiplies per
// element instead of 20. U independent groups of W elements are in flight to hide the multiply
// latency (U = 2: 4 state vectors of 4 words).

// Box–Muller of the two Philox words, W lanes of 32 bits each.
inline V::F box_muller(V::I w0, V::I w1) {
  const V::F scale = V::set1(philox::kUniformScale);
  const V::F u1 = V::max(V::set1(philox::kMinU1), V::mul(V::cvt_f32(V::ixor(w0, V::sra32<31>(w0))), scale));
  const V::F u2 = V::mul(V::cvt_f32(V::ixor(w1, V::sra32<31>(w1))), scale);
  const V::F radius = V::sqrt(V::mul(V::set1(-2.0f), vlog(u1)));
  return V::mul(radius, vcos_small(V::mul(V::set1(philox::kTwoPi), u2)));
}

// out[u] = ξ for the counters base + u W + (0 .. W-1), u < U.
template <int U>
inline void randn_block(philox::Key key, uint32_t base, V::F (&out)[U]) {
  constexpr int S = 2 * U;  // state vectors
  V::I c0[S], c1[S], c2[S], c3[S];
  for (int u = 0; u < U; ++u) V::counters(base + static_cast<uint32_t>(u * V::W), c0[2 * u], c0[2 * u + 1]);
  const V::I ra = V::u64(philox::kRoundA), rb = V::u64(philox::kRoundB);
  uint32_t k0 = key.k0, k1 = key.k1;
  // Round 0: c1 = c2 = c3 = 0, so c0' = k0, c2' = hi(A c0) ^ k1, c1' = 0, c3' = lo(A c0).
  for (int s = 0; s < S; ++s) {
    const V::I p = V::mul32(c0[s], ra);
    c2[s] = V::ixor(V::hi32(p), V::u64(k1));
    c3[s] = p;
  }
  // Round 1: c0 = k0 (the same in all lanes), c1 = 0: hi/lo(A c0) are scalars.
  const uint32_t key0 = k0;
  k0 += philox::kKeyA;
  k1 += philox::kKeyB;
  {
    const V::I hi_a = V::u64(philox::mulhi(philox::kRoundA, key0) ^ k1);
    const V::I lo_a = V::u64(philox::kRoundA * key0);
    for (int s = 0; s < S; ++s) {
      const V::I p = V::mul32(c2[s], rb);
      const V::I n2 = V::ixor(hi_a, c3[s]);
      c0[s] = V::ixor(V::hi32(p), V::u64(k0));
      c1[s] = p;
      c2[s] = n2;
      c3[s] = lo_a;
    }
  }
  k0 += philox::kKeyA;
  k1 += philox::kKeyB;
  // Rounds 2 .. 8: the full round.
  for (int r = 2; r < philox::kRounds - 1; ++r) {
    const V::I vk0 = V::u64(k0), vk1 = V::u64(k1);
    for (int s = 0; s < S; ++s) {
      const V::I pa = V::mul32(c0[s], ra);
      const V::I pb = V::mul32(c2[s], rb);
      c0[s] = V::xor3(V::hi32(pb), c1[s], vk0);
      c2[s] = V::xor3(V::hi32(pa), c3[s], vk1);
      c1[s] = pb;
      c3[s] = pa;
    }
    k0 += philox::kKeyA;
    k1 += philox::kKeyB;
  }
  // Round 9: only (c0, c1) are used.
  {
    const V::I vk0 = V::u64(k0);
    for (int s = 0; s < S; ++s) {
      const V::I pb = V::mul32(c2[s], rb);
      c0[s] = V::xor3(V::hi32(pb), c1[s], vk0);
      c1[s] = pb;
    }
  }
  for (int u = 0; u < U; ++u)
    out[u] = box_muller(V::pack_lo(c0[2 * u], c0[2 * u + 1]), V::pack_lo(c1[2 * u], c1[2 * u + 1]));
}

// out[i] = ξ(counter + i mod 2^32), i < n.
inline void randn_fill(philox::Key key, uint32_t counter, float* out, int64_t n) {
  constexpr int U = kRandnGroups;  // set per ISA by kernels.cpp
  constexpr int B = U * V::W;
  int64_t i = 0;
  for (; i + B <= n; i += B) {
    V::F r[U];
    randn_block<U>(key, counter + static_cast<uint32_t>(i), r);
    for (int u = 0; u < U; ++u) V::store(out + i + u * V::W, r[u]);
  }
  if (i < n) {  // tail: one more block into a buffer
    alignas(64) float tmp[B];
    V::F r[U];
    randn_block<U>(key, counter + static_cast<uint32_t>(i), r);
    for (int u = 0; u < U; ++u) V::store(tmp + u * V::W, r[u]);
    for (int64_t j = 0; i + j < n; ++j) out[i + j] = tmp[j];
  }
}
