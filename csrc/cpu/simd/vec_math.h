// fp32 log, exp and cos over the ISA wrapper V (isa_avx2.h / isa_avx512.h), Cephes-style
// polynomials (S. Moshier, Cephes Math Library: logf, expf, sinf, cosf): max error about 1 ulp on
// the ranges stated below, which are the ranges the kernels use. No include guard: included inside
// each ISA region of kernels.cpp after V is defined.

// log(x) for finite x > 0 (normal numbers). With kSpecial, +inf -> +inf and NaN -> NaN as well.
// x = m 2^e, m in [sqrt(1/2), sqrt(2)); log x = e ln2 + log1p(f), f = m - 1,
// log1p(f) = f - f^2/2 + f^3 P(f) (degree-8 P), ln2 split in 0.693359375 - 2.12194440e-4.
template <bool kSpecial = false>
inline V::F vlog(V::F x) {
  const V::I bits = V::as_i(x);
  V::I e = V::sub32(V::srl32<23>(bits), V::i32(126));                       // x = m 2^e, m in [0.5, 1)
  V::F m = V::as_f(V::ior(V::iand(bits, V::i32(0x007fffff)), V::i32(0x3f000000)));
  const V::M small = V::lt(m, V::set1(0.707106781186547524f));
  V::F fe = V::sub(V::cvt_f32(e), V::mask_to_one(small));                  // e - 1 when m < sqrt(1/2)
  m = V::add(V::sub(m, V::set1(1.0f)), V::select(small, m, V::zero()));    // f = 2m - 1 or m - 1
  const V::F z = V::mul(m, m);
  V::F y = V::set1(7.0376836292e-2f);
  y = V::fmadd(y, m, V::set1(-1.1514610310e-1f));
  y = V::fmadd(y, m, V::set1(1.1676998740e-1f));
  y = V::fmadd(y, m, V::set1(-1.2420140846e-1f));
  y = V::fmadd(y, m, V::set1(1.4249322787e-1f));
  y = V::fmadd(y, m, V::set1(-1.6668057665e-1f));
  y = V::fmadd(y, m, V::set1(2.0000714765e-1f));
  y = V::fmadd(y, m, V::set1(-2.4999993993e-1f));
  y = V::fmadd(y, m, V::set1(3.3333331174e-1f));
  y = V::mul(V::mul(y, m), z);
  y = V::fmadd(fe, V::set1(-2.12194440e-4f), y);
  y = V::fnmadd(V::set1(0.5f), z, y);
  V::F r = V::add(m, y);
  r = V::fmadd(fe, V::set1(0.693359375f), r);
  if (kSpecial) r = V::select(V::lt(x, V::set1(INFINITY)), r, x);
  return r;
}

// exp(x) for |x| <= 87 (the kernels use |x| < 20): x = n ln2 + r, |r| <= ln2/2,
// exp(r) = 1 + r + r^2/2 + r^3 P(r) (degree-5), times 2^n through the exponent bits.
inline V::F vexp(V::F x) {
  const V::I n = V::cvt_i32(V::mul(x, V::set1(1.44269504088896341f)));
  const V::F fn = V::cvt_f32(n);
  V::F r = V::fnmadd(fn, V::set1(0.693359375f), x);
  r = V::fnmadd(fn, V::set1(-2.12194440e-4f), r);
  const V::F z = V::mul(r, r);
  V::F y = V::set1(1.9875691500e-4f);
  y = V::fmadd(y, r, V::set1(1.3981999507e-3f));
  y = V::fmadd(y, r, V::set1(8.3334519073e-3f));
  y = V::fmadd(y, r, V::set1(4.1665795894e-2f));
  y = V::fmadd(y, r, V::set1(1.6666665459e-1f));
  y = V::fmadd(y, r, V::set1(5.0000001201e-1f));
  y = V::add(V::fmadd(y, z, r), V::set1(1.0f));
  return V::as_f(V::add32(V::as_i(y), V::sll32<23>(n)));
}

// cos(t) for t in [0, 8]: t = j pi/2 + r, |r| <= pi/4 (pi/2 in two fp32 parts, FMA), then
// cos(t) = cos r, -sin r, -cos r, sin r for j mod 4 = 0, 1, 2, 3.
inline V::F vcos_small(V::F t) {
  const V::I j = V::cvt_i32(V::mul(t, V::set1(0.636619772367581343f)));
  const V::F fj = V::cvt_f32(j);
  V::F r = V::fnmadd(fj, V::set1(1.57079637050628662109375f), t);
  r = V::fnmadd(fj, V::set1(-4.37113900018624283e-8f), r);
  const V::F z = V::mul(r, r);
  V::F s = V::set1(-1.9515295891e-4f);                                     // sin r = r + r z S(z)
  s = V::fmadd(s, z, V::set1(8.3321608736e-3f));
  s = V::fmadd(s, z, V::set1(-1.6666654611e-1f));
  s = V::fmadd(V::mul(s, z), r, r);
  V::F c = V::set1(2.443315711809948e-5f);                                 // cos r = 1 - z/2 + z^2 C(z)
  c = V::fmadd(c, z, V::set1(-1.388731625493765e-3f));
  c = V::fmadd(c, z, V::set1(4.166664568298827e-2f));
  c = V::fmadd(V::mul(c, z), z, V::fnmadd(V::set1(0.5f), z, V::set1(1.0f)));
  return V::negate_by_bit1(V::add32(j, V::i32(1)), V::pick_by_bit0(j, s, c));  // j mod 4 in {1, 2}: negate
}
