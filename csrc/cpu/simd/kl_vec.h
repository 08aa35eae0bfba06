// Vectorized fp32 sparse-VD KL chunk over the ISA wrapper V (formulas: kl_cpu.cpp's header).
// No include guard: included inside each ISA region of kernels.cpp after vec_math.h; needs
// kl_libm<float> (kernels_body.h) declared before, for the tail.
//
// Per weight: w2 = θ² + 1e-8, raw = log σ² − log w2, la = clamp(raw, ±10), z = k2 + k3·la,
// t = e^{−|la|} ∈ (4.5e-5, 1], ez = e^{−z};
//   KL      = k1·σ(−z) + ½·softplus(−la),   σ(−z) = ez/(1 + ez),
//             softplus(−la) = max(−la, 0) + log1p(t),  log1p(t) = 2 atanh(s) = 2s + 2s·u·P(u),
//             s = t/(2 + t) ∈ (0, 1/3], u = s² (P: degree-4 least-squares fit; ~3 ulp in all)
//   ∂la     = −(k1·k3·σ(z)σ(−z) + ½·σ(−la)) · [−10 < raw < 10],
//             σ(z)σ(−z) = ez/(1 + ez)²,  σ(−la) = (la ≥ 0 ? t : 1)/(1 + t)
//   ∂log σ² = ∂la,  ∂θ = ∂la · (−2θ) / w2.
// One reciprocal (V::rcp: rcp14 + a Newton step on AVX-512, a division on AVX2) gives
// 1/((1+t)(2+t)(1+ez)), from which the three reciprocals follow by products (the product lies in
// [2, 2.7e6]); 1/w2 has its own (θ is unbounded: 0 for θ² > 2^126, where −2θ/w2 < 1e-18). One log and two
// exps per weight. NaN in θ or log σ² propagates into the KL and the gradients as in the reference
// (the (la − la) terms), and sets the chunk's non-finite flag, which ±inf sets too. With a
// threshold (kl_f32's thr) the lanes kept at evaluation are counted from the same la (kept_bits).

// la_out: log α of the lanes (for the kept count).
template <bool kGrad>
inline V::F kl_lanes(V::F w, V::F l, float* gw, float* gls2, V::F& la_out) {
  const V::F one = V::set1(1.0f), zero = V::zero();
  const V::F w2 = V::fmadd(w, w, V::set1(1e-8f));
  const V::F raw = V::sub(l, vlog<true>(w2));
  const V::F la = V::min(V::set1(10.0f), V::max(V::set1(-10.0f), raw));  // NaN stays NaN
  la_out = la;
  const V::F nan_term = V::sub(la, la);                                   // 0, or NaN
  const V::F neg_la = V::sub(zero, la);
  const V::F t = vexp(V::min(la, neg_la));                                // e^{-|la|}
  const V::F ez = vexp(V::fnmadd(la, V::set1(1.48695f), V::set1(-1.87320f)));
  const V::F p1 = V::add(one, t), p2 = V::add(V::set1(2.0f), t), p3 = V::add(one, ez);
  const V::F p12 = V::mul(p1, p2);
  const V::F r = V::rcp(V::mul(p12, p3));
  const V::F inv_p3 = V::mul(r, p12);
  const V::F r12 = V::mul(r, p3);
  const V::F sgm = V::mul(t, V::mul(r12, p1));                            // s = t / (2 + t)
  const V::F u = V::mul(sgm, sgm);
  const V::F poly = V::fmadd(V::fmadd(V::set1(0.11609610915184021f), u, V::set1(0.10853855311870575f)),
                             V::mul(V::mul(u, u), u),
                             V::fmadd(V::fmadd(V::set1(0.14296139776706696f), u, V::set1(0.19999854266643524f)), u,
                                      V::set1(0.3333333432674408f)));
  const V::F two_s = V::add(sgm, sgm);
  const V::F log1p_t = V::fmadd(V::mul(two_s, u), poly, two_s);
  const V::F softplus = V::add(V::max(neg_la, zero), log1p_t);
  const V::F sig_neg_z = V::mul(ez, inv_p3);
  const V::F kl = V::add(V::fmadd(V::set1(0.63576f), sig_neg_z, V::mul(V::set1(0.5f), softplus)), nan_term);
  if (kGrad) {
    const V::F inv_p1 = V::mul(r12, p2);
    const V::F sig_neg_la = V::mul(V::select(V::lt(la, zero), one, t), inv_p1);
    const V::F s = V::fmadd(V::set1(0.63576f * 1.48695f), V::mul(sig_neg_z, inv_p3), V::mul(V::set1(0.5f), sig_neg_la));
    const V::F inside = V::mask_to_one(V::mand(V::gt(raw, V::set1(-10.0f)), V::lt(raw, V::set1(10.0f))));
    const V::F dla = V::add(V::mul(V::sub(zero, s), inside), nan_term);
    V::store(gls2, dla);
    V::store(gw, V::mul(dla, V::mul(V::mul(V::set1(-2.0f), w), V::rcp(w2))));
  }
  return kl;
}

// The lanes kept at evaluation (bit j: lane j), the rule of kernels.h ElementwiseKernels::kl:
// log α < thr, or θ not finite, or log σ² not below kLogMax (NaN, +inf, or e^{log σ²} = inf).
// The last two in one compare: log σ² + (θ − θ) is log σ² for a finite θ and NaN otherwise.
// la: the lanes' clamped log α.
inline int kept_bits(V::F w, V::F l, V::F la, V::F thr) {
  const int below = V::bits(V::lt(la, thr));
  const int ordinary = V::bits(V::lt(V::add(l, V::sub(w, w)), V::set1(kLogMax<float>)));
  return (below | ~ordinary) & V::kAllBits;
}

// Clamped lanes: where raw log α lies outside (−10, 10), KL is the constant KL(±10) and both
// gradients are 0 (∂θ = 0·(−2θ/w2): a signed zero, NaN for |θ| ≥ 2^127). A weight that crossed
// the clamp gets no KL gradient, and under train-time clipping no data gradient either, so the
// dropped weights of a sparsifying net gather there. kl_f32 therefore classifies each block of
// kBlock vectors first, without a log: the lanes whose bracket of raw log α (vlog_lower, vec_math.h)
// lies wholly outside (−10, 10) get those constants, and only the others (those within ~0.07 of
// the clamp's edges, NaN, θ² = inf) go through kl_lanes, gathered W at a time by index and scattered back —
// the same bits per weight as kl_lanes on all of them; only the order of the KL's fp32 partial sums
// differs. A block with more than a third of its lanes inside runs kl_lanes on all its vectors
// instead, and then the next 1, 3, 7, ... (at most kMaxSkip) blocks do so without classifying, so
// a dense layer pays for one classification in kMaxSkip + 1 blocks. Indices are int32: callers pass
// chunks (kl_cpu.cpp: 16384 weights).
//
// With kCount, also the number of lanes kept at evaluation (kept_bits; `thr` the threshold): a
// clamped lane has log α = ±10 exactly, so it is kept when ±10 < thr (or log σ² ≥ kLogMax); the
// other lanes compare the log α kl_lanes computed. A popcount per vector, no extra pass.
template <bool kGrad, bool kCount>
inline KlPartial kl_vectors(const float* w, const float* ls2, float* gw, float* gls2, int64_t nvec, float thr) {
  constexpr int64_t kBlock = 16;   // vectors per block; also summed in fp32 lanes before adding into fp64
  constexpr int kMaxSkip = 31;
  V::F la;
  const V::F kl_hi = kl_lanes<false>(V::set1(1.0f), V::set1(20.0f), nullptr, nullptr, la);   // KL(10)
  const V::F kl_lo = kl_lanes<false>(V::set1(1.0f), V::set1(-20.0f), nullptr, nullptr, la);  // KL(−10)
  const V::F thr_v = V::set1(thr);
  const int keep_hi = 10.0f < thr ? V::kAllBits : 0, keep_lo = -10.0f < thr ? V::kAllBits : 0;
  int64_t kept = 0;
  const V::F zero = V::zero();
  alignas(64) int32_t idx[kBlock * V::W + V::W];
  alignas(64) float tw[V::W], tl[V::W], tgw[V::W], tgls2[V::W];
  double total = 0;
  V::F bad = zero;
  int skip = 0, backoff = 0;
  for (int64_t v0 = 0; v0 < nvec; v0 += kBlock) {
    const int64_t nv = std::min<int64_t>(kBlock, nvec - v0);
    V::F acc = zero;
    int64_t kept_out = 0;  // the classified clamped lanes kept (dropped with acc if the block runs direct)
    bool direct = skip > 0;
    if (direct) {
      --skip;
    } else {
      int64_t k = 0;
      for (int64_t v = v0; v < v0 + nv; ++v) {
        const int64_t i = v * V::W;
        const V::F wv = V::load(w + i), lv = V::load(ls2 + i);
        bad = V::add(bad, V::add(V::sub(wv, wv), V::sub(lv, lv)));  // NaN in a lane once θ or log σ² is not finite
        const V::F w2 = V::fmadd(wv, wv, V::set1(1e-8f));
        const V::F d = V::sub(lv, vlog_lower(w2));  // brackets raw log α (vec_math.h)
        const V::M hi = V::ge(d, V::set1(10.0f + kSureAtLeast));
        const V::M out = V::mand(V::mor(hi, V::lt(d, V::set1(-10.0f - kSureBelow))),
                                 V::lt(w2, V::set1(INFINITY)));  // NaN lanes and θ² = inf: inside
        acc = V::add(acc, V::select(out, V::select(hi, kl_hi, kl_lo), zero));
        if (kCount) {
          const int hb = V::bits(hi), big = ~V::bits(V::lt(lv, V::set1(kLogMax<float>))) & V::kAllBits;
          kept_out += __builtin_popcount(V::bits(out) & ((hb & keep_hi) | (~hb & keep_lo) | big));
        }
        k += V::compress_lanes(idx + k, ~V::bits(out) & V::kAllBits, static_cast<int32_t>(i));
        if (kGrad) {
          V::store(gls2 + i, zero);
          V::store(gw + i, V::mul(zero, V::mul(V::set1(-2.0f), wv)));
        }
      }
      if (3 * k > nv * V::W) {
        direct = true;
        backoff = std::min(2 * backoff + 1, kMaxSkip);
        skip = backoff;
        acc = zero;
      } else {
        backoff = 0;
        kept += kept_out;
        // Groups of W indices; the last one padded with its first index, whose lanes are then
        // computed twice (not summed) and written twice with the same bits: fixed trip counts.
        for (int64_t q = 0; q < k; q += V::W) {
          const int64_t cnt = std::min<int64_t>(V::W, k - q);
          int32_t* g = idx + q;
          for (int64_t t = cnt; t < V::W; ++t) g[t] = g[0];
          for (int t = 0; t < V::W; ++t) {
            tw[t] = w[g[t]];
            tl[t] = ls2[g[t]];
          }
          const V::F wg = V::load(tw), lg = V::load(tl);
          const V::F kl = kl_lanes<kGrad>(wg, lg, tgw, tgls2, la);
          acc = V::add(acc, V::select(V::lt(V::iota(), V::set1(static_cast<float>(cnt))), kl, zero));
          if (kCount) kept += __builtin_popcount(kept_bits(wg, lg, la, thr_v) & ((1 << cnt) - 1));
          if (kGrad) {
            for (int t = 0; t < V::W; ++t) {
              gw[g[t]] = tgw[t];
              gls2[g[t]] = tgls2[t];
            }
          }
        }
      }
    }
    if (direct) {
      for (int64_t v = v0; v < v0 + nv; ++v) {
        const int64_t i = v * V::W;
        const V::F wv = V::load(w + i), lv = V::load(ls2 + i);
        bad = V::add(bad, V::add(V::sub(wv, wv), V::sub(lv, lv)));
        acc = V::add(acc, kl_lanes<kGrad>(wv, lv, kGrad ? gw + i : nullptr, kGrad ? gls2 + i : nullptr, la));
        if (kCount) kept += __builtin_popcount(kept_bits(wv, lv, la, thr_v));
      }
    }
    total += static_cast<double>(V::hsum(acc));
  }
  const float b = V::hsum(bad);
  return KlPartial{total, !(b == 0.0f), kept};
}

inline KlPartial kl_f32(const float* w, const float* ls2, float* gw, float* gls2, int64_t n, const float* thr) {
  const int64_t nvec = n / V::W, i = nvec * V::W;
  KlPartial out;
  if (thr != nullptr) {
    out = gw != nullptr ? kl_vectors<true, true>(w, ls2, gw, gls2, nvec, *thr)
                        : kl_vectors<false, true>(w, ls2, nullptr, nullptr, nvec, *thr);
  } else {
    out = gw != nullptr ? kl_vectors<true, false>(w, ls2, gw, gls2, nvec, 0.0f)
                        : kl_vectors<false, false>(w, ls2, nullptr, nullptr, nvec, 0.0f);
  }
  if (i < n) {
    const KlPartial tail =
        kl_libm<float>(w + i, ls2 + i, gw ? gw + i : nullptr, gls2 ? gls2 + i : nullptr, n - i, thr);
    out.sum += tail.sum;
    out.nonfinite |= tail.nonfinite;
    out.kept += tail.kept;
  }
  return out;
}
