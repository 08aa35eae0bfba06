// Vectorized fp32 σ² pass (the math: kernels.h, ElementwiseKernels::sigma2) over the ISA wrapper V.
// No include guard: included inside each ISA region of kernels.cpp after vec_math.h.
//
// Per weight: s2 = vexp_full(ls2); with clipping w2 = w·w (rounded) + 1e-8 (rounded), raw = ls2 −
// vlog(w2), la = clamp(raw, ±10) (NaN stays NaN), m = [la < thr], wm = w·m, s2 = s2·m. The tail of
// a call (n not a multiple of W) runs the same lanes on a zero-padded copy, so every weight gets
// the same bits wherever a call starts (the occupancy and the masks do not depend on the chunking).
//
// Most weights of a clipped layer lie far from the threshold. With thr in (−10, 10] (where the
// clamp cannot change the comparison), a vector whose every lane is surely kept or surely dropped
// by the bracket d = ls2 − vlog_lower(w2) (vec_math.h), with finite w2 and ls2 < 88 (exp finite),
// skips the log; when all its lanes are dropped also the exp (σ²m = +0). The others run the exact
// lanes. Both give the same bits: the mask is the same, and so are wm = w·m, σ²m and the state.

// lo / hi: thr ∓ the bracket's slacks; fast: thr in (−10, 10].
inline void sigma2_lanes(const float* w, const float* ls2, V::F thr, V::F lo, V::F hi, bool fast, float* wm,
                         float* s2, uint8_t* state) {
  const V::F l = V::load(ls2);
  if (state == nullptr) {
    V::store(s2, vexp_full(l));
    return;
  }
  const V::F wv = V::load(w);
  const V::F w2 = V::add(V::mul(wv, wv), V::set1(1e-8f));  // two roundings, as torch
  if (fast) {
    const V::F d = V::sub(l, vlog_lower(w2));
    const V::M kept = V::lt(d, lo);
    const V::M sure = V::mand(V::mor(kept, V::ge(d, hi)),
                              V::mand(V::lt(w2, V::set1(INFINITY)), V::lt(l, V::set1(88.0f))));  // NaN: not sure
    if (V::bits(sure) == V::kAllBits) {
      const V::F m = V::mask_to_one(kept);
      V::store(wm, V::mul(wv, m));
      V::store(s2, V::bits(kept) == 0 ? V::zero() : V::mul(vexp_full(l), m));
      V::store_bytes(state, V::cvt_i32(m));
      return;
    }
  }
  const V::F raw = V::sub(l, vlog<true>(w2));
  const V::F la = V::min(V::set1(10.0f), V::max(V::set1(-10.0f), raw));
  const V::M keep = V::lt(la, thr);
  const V::F m = V::mask_to_one(keep);
  const V::F a = V::mul(wv, m), b = V::mul(vexp_full(l), m);
  V::store(wm, a);
  V::store(s2, b);
  // state: 1 kept; dropped: a + b is ±0, or NaN when θ·0 or σ²·0 is (then 2, else 0).
  const V::F t = V::add(a, b);
  const V::F st = V::select(keep, V::set1(1.0f), V::select(V::lt(t, V::set1(1.0f)), V::zero(), V::set1(2.0f)));
  V::store_bytes(state, V::cvt_i32(st));
}

inline void sigma2_f32(const float* w, const float* ls2, float thr, float* wm, float* s2, uint8_t* state,
                       int64_t n) {
  const V::F t = V::set1(thr), lo = V::set1(thr - kSureBelow), hi = V::set1(thr + kSureAtLeast);
  const bool fast = thr > -10.0f && thr <= 10.0f;
  int64_t i = 0;
  for (; i + V::W <= n; i += V::W)
    sigma2_lanes(state ? w + i : nullptr, ls2 + i, t, lo, hi, fast, state ? wm + i : nullptr, s2 + i,
                 state ? state + i : nullptr);
  if (i == n) return;
  const int64_t r = n - i;
  alignas(64) float bw[V::W] = {}, bl[V::W] = {}, bwm[V::W], bs2[V::W];
  alignas(64) uint8_t bst[V::W];
  for (int64_t j = 0; j < r; ++j) {
    bl[j] = ls2[i + j];
    if (state) bw[j] = w[i + j];
  }
  sigma2_lanes(bw, bl, t, lo, hi, fast, bwm, bs2, state ? bst : nullptr);
  for (int64_t j = 0; j < r; ++j) {
    s2[i + j] = bs2[j];
    if (state) {
      wm[i + j] = bwm[j];
      state[i + j] = bst[j];
    }
  }
}
