// fp32 log, exp and cos over the ISA wrapper V (isa_avx2.h / isa_avx512.h), Cephes-style
// polynomials (S. Moshier, Cephes Math Library: logf, expf, sinf, cosf): max error about 1 ulp on
// the ranges stated below, which are the ranges the kernels use. No include guard: included inside
// each ISA region of kernels.cpp after V is defined.

// The polynomials are evaluated in Estrin's scheme (pairs combined with x², x⁴, x⁸) rather than by
// Horner's rule: the kernels are bound by the latency of these dependency chains, not by the
// number of operations (Horner: one FMA latency per coefficient).

// log(x) for finite x > 0 (normal numbers). With kSpecial, +inf -> +inf and NaN -> NaN as well.
// x = m 2^e, m in [sqrt(1/2), sqrt(2)); log x = e ln2 + log1p(f), f = m - 1,
// log1p(f) = f - f²/2 + f³ P(f) (degree-8 P), ln2 split in 0.693359375 - 2.12194440e-4.
template <bool kSpecial = false>
inline V::F vlog(V::F x) {
  const V::I bits = V::as_i(x);
  const V::I e = V::sub32(V::srl32<23>(bits), V::i32(126));                 // x = m 2^e, m in [0.5, 1)
  V::F m = V::as_f(V::ior(V::iand(bits, V::i32(0x007fffff)), V::i32(0x3f000000)));
  const V::M small = V::lt(m, V::set1(0.707106781186547524f));
  const V::F fe = V::sub(V::cvt_f32(e), V::mask_to_one(small));            // e - 1 when m < sqrt(1/2)
  m = V::add(V::sub(m, V::set1(1.0f)), V::select(small, m, V::zero()));    // f = 2m - 1 or m - 1
  const V::F z = V::mul(m, m);
  const V::F z2 = V::mul(z, z);
  const V::F m3 = V::mul(z, m);
  // P(f) = p8 f^8 + ... + p0, p8 = 7.0376836292e-2, ..., p0 = 3.3333331174e-1.
  const V::F q0 = V::fmadd(V::set1(-2.4999993993e-1f), m, V::set1(3.3333331174e-1f));
  const V::F q1 = V::fmadd(V::set1(-1.6668057665e-1f), m, V::set1(2.0000714765e-1f));
  const V::F q2 = V::fmadd(V::set1(-1.2420140846e-1f), m, V::set1(1.4249322787e-1f));
  const V::F q3 = V::fmadd(V::set1(-1.1514610310e-1f), m, V::set1(1.1676998740e-1f));
  const V::F r0 = V::fmadd(q1, z, q0);
  const V::F r1 = V::fmadd(q3, z, q2);
  const V::F r1b = V::fmadd(V::set1(7.0376836292e-2f), z2, r1);             // + p8 f^8 = p8 z2 z2
  const V::F poly = V::fmadd(r1b, z2, r0);
  const V::F y = V::fmadd(poly, m3, V::fmadd(fe, V::set1(-2.12194440e-4f), V::mul(V::set1(-0.5f), z)));
  V::F r = V::fmadd(fe, V::set1(0.693359375f), V::add(m, y));
  if (kSpecial) r = V::select(V::lt(x, V::set1(INFINITY)), r, x);
  return r;
}

// A bracket of log(x) from the bits alone, for finite x > 0 (normal numbers): x = 2^e (1 + f)
// reads as the integer 2^23 (e + 127 + f), and log2(1 + f) − f lies in [0, 0.0861], so
// L = (bits · 2^-23 − 127) ln2 satisfies log x − 0.0597 ≤ L ≤ log x + 6.2e-6 (both bounds checked
// in fp64 on every 7th float of [1e-8, 3.4e38], with these roundings of the constants, of the
// conversion and of the FMA). The clipped σ² pass and the KL decide most weights with it and run
// the exact vlog only where log α lies too close to a threshold.
inline V::F vlog_lower(V::F x) {
  return V::fmadd(V::cvt_f32(V::as_i(x)), V::set1(0.693147180559945f / 8388608.0f), V::set1(-88.0296919311f));
}
// So for r = l − log x (fp32, with the exact vlog) and d = l − vlog_lower(x), and a bound t with
// |t| ≤ 20: d ≥ t + kSureAtLeast ⇒ r ≥ t, and d < t − kSureBelow ⇒ r < t (the slacks cover the
// bracket, 0.0597 and 6.2e-6, plus vlog's error and the roundings, ~2e-5).
constexpr float kSureAtLeast = 0.0703125f;  // 9/128
constexpr float kSureBelow = 0.0078125f;    // 1/128

// exp's core for |x| <= 110: x = n ln2 + r, |r| <= ln2/2, returns exp(r) = 1 + r + r² P(r)
// (degree-5 P) and sets fn = n; the caller applies 2^n.
inline V::F vexp_core(V::F x, V::F& fn) {
  fn = V::round(V::mul(x, V::set1(1.44269504088896341f)));
  V::F r = V::fnmadd(fn, V::set1(0.693359375f), x);
  r = V::fnmadd(fn, V::set1(-2.12194440e-4f), r);
  const V::F z = V::mul(r, r);
  const V::F z2 = V::mul(z, z);
  const V::F a = V::fmadd(V::set1(1.6666665459e-1f), r, V::set1(5.0000001201e-1f));
  const V::F b = V::fmadd(V::set1(8.3334519073e-3f), r, V::set1(4.1665795894e-2f));
  const V::F c = V::fmadd(V::set1(1.9875691500e-4f), r, V::set1(1.3981999507e-3f));
  const V::F poly = V::fmadd(c, z2, V::fmadd(b, z, a));
  return V::add(V::fmadd(poly, z, r), V::set1(1.0f));
}

// exp(x) for |x| <= 87 (the kernels use |x| < 20): vexp_core times 2^n (V::scale2).
inline V::F vexp(V::F x) {
  V::F fn;
  const V::F p = vexp_core(x, fn);
  return V::scale2(p, fn);
}

// cos(t) for t in [0, 8]: t = j pi/2 + r, |r| <= pi/4 (pi/2 in two fp32 parts, FMA), then
// cos(t) = cos r, -sin r, -cos r, sin r for j mod 4 = 0, 1, 2, 3.
inline V::F vcos_small(V::F t) {
  const V::I j = V::cvt_i32(V::mul(t, V::set1(0.636619772367581343f)));
  const V::F fj = V::cvt_f32(j);
  V::F r = V::fnmadd(fj, V::set1(1.57079637050628662109375f), t);
  r = V::fnmadd(fj, V::set1(-4.37113900018624283e-8f), r);
  const V::F z = V::mul(r, r);
  const V::F z2 = V::mul(z, z);
  // sin r = r + r z (S1 + S2 z + S3 z²),  cos r = 1 - z/2 + z² (C1 + C2 z + C3 z²)
  const V::F sp = V::fmadd(V::set1(-1.9515295891e-4f), z2, V::fmadd(V::set1(8.3321608736e-3f), z, V::set1(-1.6666654611e-1f)));
  const V::F s = V::fmadd(sp, V::mul(r, z), r);
  const V::F cp = V::fmadd(V::set1(2.443315711809948e-5f), z2,
                           V::fmadd(V::set1(-1.388731625493765e-3f), z, V::set1(4.166664568298827e-2f)));
  const V::F c = V::fmadd(cp, z2, V::fnmadd(V::set1(0.5f), z, V::set1(1.0f)));
  return V::negate_by_bit1(V::add32(j, V::i32(1)), V::pick_by_bit0(j, s, c));  // j mod 4 in {1, 2}: negate
}

// exp(x) over the whole fp32 range, for σ² = exp(log σ²) (log σ² is a free parameter): vexp_core
// of x clamped to [-110, 89], with 2^n applied in two exact halves (|n| <= 159 does not fit one
// scale2), so exp overflows to +inf above ~88.72 and underflows (through the subnormals, one
// rounding) to 0 below ~-103.97; exp(+inf) = +inf, exp(-inf) = 0, NaN -> NaN.
inline V::F vexp_full(V::F x) {
  const V::F xc = V::min(V::set1(89.0f), V::max(V::set1(-110.0f), x));  // NaN stays NaN (data second)
  V::F fn;
  const V::F p = vexp_core(xc, fn);
  const V::F hi = V::round(V::mul(fn, V::set1(0.5f)));
  const V::F res = V::mul(V::scale2(p, hi), V::scale2(V::set1(1.0f), V::sub(fn, hi)));
  return V::select(V::lt(x, V::set1(INFINITY)), res, V::add(x, x));  // +inf -> +inf, NaN -> NaN
}
