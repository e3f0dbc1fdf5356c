/* q4k integer-dot matmul (passes/quant/formats/q4k.py): the q4 arithmetic of qdot_common.h with
   s_g = D sc_g and m_g = Dm mz_g per 32 weights. Returns 0, or -1 when scratch memory ran out. */

#include "qdot_common.h"

/* ---- q4k (codes per 32, 8-bit scale / minimum codes under fp16 super-block scales) x q8 ---- */

#if !KILN_AVX2
/* the minimum's share: sum over super-blocks of m_sb * sum_{g in sb} mz_g * xg_g */
KILN_INLINE float q4k_min_term(const job* jb, int64_t m, int64_t n) {
  const int64_t nb = jb->K / 32, per = jb->sb / 32, nsb = jb->K / jb->sb;
  const int8_t* mz = jb->mz + n * nb;
  const uint16_t* sm = jb->sm + n * nsb;
  const float* xg = jb->xg + m * nb;
  float t = 0.f;
  for (int64_t b = 0; b < nsb; ++b) {
    float u = 0.f;
    for (int64_t g = b * per; g < (b + 1) * per; ++g) u += (float)mz[g] * xg[g];
    t += h2f(sm[b]) * u;
  }
  return t;
}
#endif

#if KILN_AVX2
/* the 8-bit codes of one super-block's groups (per = 2, 4, 6 or 8: never read past them), as 8
   floats, lanes past per zero; signed (minimum codes) or unsigned (scale codes) */
KILN_INLINE __m256 q4k_codes8(const void* p, int64_t per, int is_signed) {
  int64_t v = 0;
  if (per == 8) {
    memcpy(&v, p, 8);
  } else {
    uint32_t lo = 0;
    uint16_t hi = 0;
    if (per >= 4) memcpy(&lo, p, 4);
    if (per == 6) memcpy(&hi, (const char*)p + 4, 2);
    if (per == 2) memcpy(&lo, p, 2);
    v = (int64_t)lo | ((int64_t)hi << 32);
  }
  const __m128i b = _mm_cvtsi64_si128(v);
  return _mm256_cvtepi32_ps(is_signed ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b));
}

KILN_INLINE void q4k_tile(const job* jb, int64_t m0, int64_t n0, const int MR, const int NR) {
  const int64_t K = jb->K, nb = K / 32, per = jb->sb / 32, cps = jb->sb / 64, nsb = K / jb->sb;
  const __m256i lanes = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  const __m256i first = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)per), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256 acc[MR_MAX][NR_MAX];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) acc[i][r] = _mm256_setzero_ps();
  for (int64_t b = 0, c = 0; b < nsb; ++b) {
    __m256 s8[NR_MAX]; /* the super-block's group scales d * sc, lane g */
    { /* the minimum's share of this super-block: m_sb * sum_g mz_g * (d * sum(codes))_g, in the same accumulators */
      __m256 mzv[NR_MAX];
      for (int r = 0; r < NR; ++r) {
        s8[r] = _mm256_mul_ps(q4k_codes8(jb->sc + (n0 + r) * nb + b * per, per, 0), _mm256_set1_ps(h2f(jb->sd[(n0 + r) * nsb + b])));
        mzv[r] = _mm256_mul_ps(q4k_codes8(jb->mz + (n0 + r) * nb + b * per, per, 1), _mm256_set1_ps(h2f(jb->sm[(n0 + r) * nsb + b])));
      }
      for (int i = 0; i < MR; ++i) {
        const __m256 dsv = _mm256_maskload_ps(jb->ds + (m0 + i) * nb + b * per, first);
        for (int r = 0; r < NR; ++r) acc[i][r] = _mm256_fmadd_ps(mzv[r], dsv, acc[i][r]);
      }
    }
    for (int64_t cc = 0; cc < cps; ++cc, ++c) {
      const __m256i pick = _mm256_add_epi32(lanes, _mm256_set1_epi32((int)(2 * cc))); /* [s(2cc) x4, s(2cc+1) x4] */
      __m256i lo[NR_MAX], hi[NR_MAX];
      __m256 sw[NR_MAX];
      q4_chunk_codes(jb, n0, c, NR, lo, hi);
      for (int r = 0; r < NR; ++r) sw[r] = _mm256_permutevar8x32_ps(s8[r], pick);
      q4_chunk_acc(jb, m0, c, MR, NR, lo, hi, sw, acc);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) jb->y[(m0 + i) * jb->N + n0 + r] = hsum8(acc[i][r]);
}
#else
/* sdot / plain C: the q4 tile's integer block sums with a q4k block scale */
KILN_INLINE void q4k_tile(const job* jb, int64_t m0, int64_t n0, const int MR, const int NR) {
  const int64_t K = jb->K, nb = K / 32, per = jb->sb / 32, nsb = K / jb->sb;
  const uint8_t* q = (const uint8_t*)jb->q;
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) {
      const uint8_t* w = q + (n0 + r) * (K / 2);
      const int8_t* a = jb->qa + (m0 + i) * K;
      float acc = 0.f;
      for (int64_t sbk = 0; sbk < nsb; ++sbk) {
        const float dsb = h2f(jb->sd[(n0 + r) * nsb + sbk]);
        float part = 0.f;
        for (int64_t b = sbk * per; b < (sbk + 1) * per; ++b) {
          const int32_t sum = q4_block_isum(w, a, b);
          part += (float)sum * jb->d[(m0 + i) * nb + b] * (float)jb->sc[(n0 + r) * nb + b];
        }
        acc += dsb * part;
      }
      jb->y[(m0 + i) * jb->N + n0 + r] = acc + q4k_min_term(jb, m0 + i, n0 + r);
    }
}
#endif


static int q4k_task(int t, kiln_penv* env, void* cdata) {
  const job* jb = (const job*)cdata;
  int64_t n0, n1;
  task_rows(jb, t, env->num_task, &n0, &n1);
  KILN_DRIVE(q4k_tile);
  return 0;
}


/* y[M, N] = x[M, K] @ (d_sb sc * q + m_sb mz)^T: q4k (passes/quant/formats/q4k.py); K % 64 == 0, the
   super-block sb a multiple of 64 dividing K, groups of 32 */
int32_t kiln_cpu_qmatmul_q4k(const float* x, const uint32_t* q, const uint8_t* sc, const int8_t* mz, const uint16_t* sd,
                             const uint16_t* sm, float* y, int64_t M, int64_t N, int64_t K, int64_t sb) {
  job jb = {x, q, 0, 0, y, M, N, K, 32, 0, 0, 0, 0, 0, 0, sc, mz, sd, sm, sb};
  return qdot_run(&jb, 1, q4k_task);
}
