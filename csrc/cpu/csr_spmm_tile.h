// The SpMM row tiles of csr_linear_cpu.cpp for one vector ISA, written against its wrapper V
// (simd/isa_avx2.h: 8 floats per vector, simd/isa_avx512.h: 16). No include guard on purpose:
// csr_linear_cpu.cpp includes it once per ISA, inside a namespace and a `#pragma GCC target`
// region, after the wrapper and a flush_tile (the staged rows written to y, with the bias) of that
// ISA, so each copy compiles to that ISA and is called only after the run-time CPU check.

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
