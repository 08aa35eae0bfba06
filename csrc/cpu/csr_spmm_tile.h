// The SpMM of csr_linear_cpu.cpp for one vector ISA (packing x, row tiles, writing y), written
// against its wrapper V (simd/isa_avx2.h: 8 floats per vector, simd/isa_avx512.h: 16). No include
// guard on purpose: csr_linear_cpu.cpp includes it once per ISA, inside a namespace and a
// `#pragma GCC target` region, after the wrapper and a transpose_tile (W x W floats in registers)
// of that ISA, so each copy compiles to that ISA and is called only after the run-time CPU check.

// One block of pack_block for fp32 rows with unit stride (tm a multiple of V::W): W x W blocks
// transposed in registers; the same flags (bit q of flags[g]: batch row t*tm + 8g + q has a
// non-finite value in the block).
inline void pack_tile_block(const float* x, int64_t M, int64_t K, int64_t sxm, int tm, float* dst, int64_t t,
                            int64_t kb, unsigned* flags) {
  constexpr int W = V::W;
  const int64_t k0 = kb * kPackBlock, k1 = std::min(K, k0 + kPackBlock);
  for (int i0 = 0; i0 < tm; i0 += W) {
    const float* src[W];
    bool full = true;
    for (int q = 0; q < W; ++q) {
      const int64_t m = t * tm + i0 + q;
      src[q] = m < M ? x + m * sxm : nullptr;
      full = full && m < M;
    }
    unsigned nf = 0;
    int64_t k = k0;
    if (full) {
      // z0 + z1 = sum of 0 * x over the block, lane q for row q: NaN iff the row has a non-finite value.
      typename V::F z0 = V::zero(), z1 = V::zero();
      for (; k + W <= k1; k += W) {
        typename V::F r[W];
#pragma GCC unroll 16
        for (int q = 0; q < W; ++q) r[q] = V::load(src[q] + k);
        transpose_tile(r);  // r[c] = x[m0 .. m0 + W, k + c]
#pragma GCC unroll 8
        for (int c = 0; c < W; c += 2) {
          z0 = V::fmadd(r[c], V::zero(), z0);
          z1 = V::fmadd(r[c + 1], V::zero(), z1);
        }
#pragma GCC unroll 16
        for (int c = 0; c < W; ++c) V::store(dst + (k + c) * tm + i0, r[c]);
      }
      const typename V::F z = V::add(z0, z1);
      nf = static_cast<unsigned>(~V::bits(V::ge(z, z)) & V::kAllBits);  // NaN lanes: z >= z is false
    }
    for (; k < k1; ++k) {
      for (int q = 0; q < W; ++q) {
        const float v = src[q] ? src[q][k] : 0.f;
        dst[k * tm + i0 + q] = v;
        nf |= static_cast<unsigned>(is_nonfinite(v)) << q;
      }
    }
    for (int g = 0; g < W / 8; ++g) flags[i0 / 8 + g] = (nf >> (8 * g)) & 0xFFu;
  }
}

// flush_rows for fp32 with W x W register transposes: y[i, rr] = buf[rr, i] + b[rr].
inline void flush_tile(const float* buf, int nr, int tm, int64_t mt, float* y, int64_t ldy, const float* b) {
  constexpr int W = V::W;
  if (mt != tm || nr % W != 0) {
    flush_rows(buf, nr, tm, mt, y, ldy, b);
    return;
  }
  for (int r0 = 0; r0 < nr; r0 += W) {
    const typename V::F bias = b ? V::load(b + r0) : V::zero();
    for (int i0 = 0; i0 < tm; i0 += W) {
      typename V::F r[W];
#pragma GCC unroll 16
      for (int q = 0; q < W; ++q) r[q] = V::load(buf + (r0 + q) * tm + i0);
      transpose_tile(r);  // r[c] = buf[r0 .. r0 + W, i0 + c]
#pragma GCC unroll 16
      for (int c = 0; c < W; ++c) V::store(y + (i0 + c) * ldy + r0, V::add(r[c], bias));
    }
  }
}

// acc[0:TM] = sum_{j in [j, e)} v_j * xp[c_j, 0:TM], TM = NV * V::W: NV vectors per nonzero, U
// nonzeros per step (U * NV independent FMA chains). xp rows are 32- or 64-byte aligned (TM * 4
// bytes from an aligned tile). Column indices checked before.
template <int NV, int U, typename I>
inline void row_tile(const float* xp, const I* col, const float* val, int64_t j, int64_t e, float* out) {
  constexpr int TM = NV * V::W;
  typename V::F acc[U][NV];
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[u][v] = V::zero();
  }
  if constexpr (sizeof(I) == 2) {
    // 16-bit indices: four per 64-bit load (fewer load-port slots per nonzero); indices checked
    // in [0, K) before, so the unsigned 16 bits are the column
    constexpr int G = U > 4 ? U : 4;
    for (; j + G <= e; j += G) {
#pragma GCC unroll 2
      for (int h = 0; h < G; h += 4) {
        uint64_t q;
        std::memcpy(&q, col + j + h, sizeof(q));
#pragma GCC unroll 4
        for (int u = 0; u < 4; ++u) {
          const float* p = xp + static_cast<int64_t>((q >> (16 * u)) & 0xFFFFu) * TM;
          const typename V::F w = V::set1(val[j + h + u]);
#pragma GCC unroll 8
          for (int v = 0; v < NV; ++v) {
            acc[(h + u) % U][v] = V::fmadd(w, V::load(p + V::W * v), acc[(h + u) % U][v]);
          }
        }
      }
    }
  }
  for (; j + U <= e; j += U) {
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      const float* p = xp + static_cast<int64_t>(col[j + u]) * TM;
      const typename V::F w = V::set1(val[j + u]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[u][v] = V::fmadd(w, V::load(p + V::W * v), acc[u][v]);
    }
  }
  for (; j < e; ++j) {
    const float* p = xp + static_cast<int64_t>(col[j]) * TM;
    const typename V::F w = V::set1(val[j]);
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[0][v] = V::fmadd(w, V::load(p + V::W * v), acc[0][v]);
  }
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    typename V::F s = acc[0][v];
#pragma GCC unroll 8
    for (int u = 1; u < U; ++u) s = V::add(s, acc[u][v]);
    V::store(out + V::W * v, s);
  }
}

// spmm_part_generic for fp32 with this ISA: rows [r0, r1) of one tile, staged kRowBlock at a time.
template <int NV, int U, typename I, typename C>
void spmm_part(const float* xpt, const C* crow, const I* col, const float* val, const float* bias, float* y,
               int64_t ldy, int64_t mt, int64_t r0, int64_t r1) {
  constexpr int TM = NV * V::W;
  alignas(64) float buf[kRowBlock * TM];
  for (int64_t rb = r0; rb < r1; rb += kRowBlock) {
    const int nr = static_cast<int>(std::min<int64_t>(kRowBlock, r1 - rb));
    for (int rr = 0; rr < nr; ++rr) {
      row_tile<NV, U>(xpt, col, val, crow[rb + rr], crow[rb + rr + 1], buf + rr * TM);
    }
    flush_tile(buf, nr, TM, mt, y + rb, ldy, bias ? bias + rb : nullptr);
  }
}
