/* q8 and q4 (q4g32 / q4g128) integer-dot matmuls: the arithmetic, layouts and threads are
   described in qdot_common.h. Entry points return 0, or -1 when scratch memory ran out. */

#include "qdot_common.h"

/* ---- q8 x q8 ----------------------------------------------------------------------------- */

#if KILN_AVX2
/* MR activation rows x NR weight rows, over all of K */
KILN_INLINE void q8_tile(const job* jb, int64_t m0, int64_t n0, const int MR, const int NR) {
  const int64_t K = jb->K, nb = K / 32;
  const int8_t* q = (const int8_t*)jb->q;
  __m256 acc[MR_MAX][NR_MAX];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) acc[i][r] = _mm256_setzero_ps();
  /* blocks in pairs: the two blocks' sums meet in one vector (vphaddd: lanes b, b, b+1, b+1, ...),
     converted and scaled once -- half the float work of one block at a time */
  const __m256i pair_lanes = _mm256_setr_epi32(0, 0, 1, 1, 0, 0, 1, 1);
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    __m256i w[NR_MAX][4];
    __m256 sw[NR_MAX];
    for (int r = 0; r < NR; ++r) {
      const int8_t* wp = q + (n0 + r) * K + 32 * b;
      _mm_prefetch((const char*)(wp + PREFETCH_BYTES), _MM_HINT_T0);
      for (int j = 0; j < 4; ++j) w[r][j] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(wp + 16 * j)));
      uint32_t pair;
      memcpy(&pair, jb->s + (n0 + r) * nb + b, 4);
      sw[r] = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_cvtph_ps(_mm_cvtsi32_si128((int)pair))), pair_lanes);
    }
    for (int i = 0; i < MR; ++i) {
      const int16_t* ap = jb->a16 + (m0 + i) * K + 32 * b;
      const __m256 da = _mm256_loadu_ps(jb->dv + (m0 + i) * nb * 4 + 4 * b);
      for (int r = 0; r < NR; ++r) {
        const __m256i p0 = _mm256_add_epi32(_mm256_madd_epi16(w[r][0], _mm256_loadu_si256((const __m256i*)ap)),
                                            _mm256_madd_epi16(w[r][1], _mm256_loadu_si256((const __m256i*)(ap + 16))));
        const __m256i p1 = _mm256_add_epi32(_mm256_madd_epi16(w[r][2], _mm256_loadu_si256((const __m256i*)(ap + 32))),
                                            _mm256_madd_epi16(w[r][3], _mm256_loadu_si256((const __m256i*)(ap + 48))));
        const __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_hadd_epi32(p0, p1)), da);
        acc[i][r] = _mm256_fmadd_ps(f, sw[r], acc[i][r]);
      }
    }
  }
  for (; b < nb; ++b) { /* an odd last block */
    __m256i w0[NR_MAX], w1[NR_MAX];
    float sw[NR_MAX];
    for (int r = 0; r < NR; ++r) {
      const int8_t* wp = q + (n0 + r) * K + 32 * b;
      _mm_prefetch((const char*)(wp + PREFETCH_BYTES), _MM_HINT_T0);
      w0[r] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)wp));
      w1[r] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(wp + 16)));
      sw[r] = h2f(jb->s[(n0 + r) * nb + b]);
    }
    for (int i = 0; i < MR; ++i) {
      const int16_t* ap = jb->a16 + (m0 + i) * K + 32 * b;
      const __m256i a0 = _mm256_loadu_si256((const __m256i*)ap), a1 = _mm256_loadu_si256((const __m256i*)(ap + 16));
      const float da = jb->d[(m0 + i) * nb + b];
      for (int r = 0; r < NR; ++r) {
        const __m256i p = _mm256_add_epi32(_mm256_madd_epi16(w0[r], a0), _mm256_madd_epi16(w1[r], a1));
        acc[i][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(da * sw[r]), acc[i][r]);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) jb->y[(m0 + i) * jb->N + n0 + r] = hsum8(acc[i][r]);
}
#elif KILN_SDOT
KILN_INLINE void q8_tile(const job* jb, int64_t m0, int64_t n0, const int MR, const int NR) {
  const int64_t K = jb->K, nb = K / 32;
  const int8_t* q = (const int8_t*)jb->q;
  float32x4_t acc[MR_MAX][NR_MAX];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) acc[i][r] = vdupq_n_f32(0.f);
  for (int64_t b = 0; b < nb; ++b) {
    int16x8_t w[NR_MAX][4];
    float sw[NR_MAX];
    for (int r = 0; r < NR; ++r) {
      const int8_t* wp = q + (n0 + r) * K + 32 * b;
      const int8x16_t v0 = vld1q_s8(wp), v1 = vld1q_s8(wp + 16);
      w[r][0] = vmovl_s8(vget_low_s8(v0));
      w[r][1] = vmovl_s8(vget_high_s8(v0));
      w[r][2] = vmovl_s8(vget_low_s8(v1));
      w[r][3] = vmovl_s8(vget_high_s8(v1));
      sw[r] = h2f(jb->s[(n0 + r) * nb + b]);
    }
    for (int i = 0; i < MR; ++i) {
      const int16_t* ap = jb->a16 + (m0 + i) * K + 32 * b;
      int16x8_t a[4];
      for (int j = 0; j < 4; ++j) a[j] = vld1q_s16(ap + 8 * j);
      const float da = jb->d[(m0 + i) * nb + b];
      for (int r = 0; r < NR; ++r) {
        int32x4_t p = vmull_s16(vget_low_s16(w[r][0]), vget_low_s16(a[0]));
        p = vmlal_high_s16(p, w[r][0], a[0]);
        for (int j = 1; j < 4; ++j) {
          p = vmlal_s16(p, vget_low_s16(w[r][j]), vget_low_s16(a[j]));
          p = vmlal_high_s16(p, w[r][j], a[j]);
        }
        acc[i][r] = vfmaq_n_f32(acc[i][r], vcvtq_f32_s32(p), da * sw[r]);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) jb->y[(m0 + i) * jb->N + n0 + r] = vaddvq_f32(acc[i][r]);
}
#else
KILN_INLINE void q8_tile(const job* jb, int64_t m0, int64_t n0, const int MR, const int NR) {
  const int64_t K = jb->K, nb = K / 32;
  const int8_t* q = (const int8_t*)jb->q;
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) {
      const int8_t* w = q + (n0 + r) * K;
      const int16_t* a = jb->a16 + (m0 + i) * K;
      float acc = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        int32_t sum = 0;
        for (int k = 32 * b; k < 32 * b + 32; ++k) sum += (int32_t)w[k] * (int32_t)a[k];
        acc += (float)sum * (jb->d[(m0 + i) * nb + b] * h2f(jb->s[(n0 + r) * nb + b]));
      }
      jb->y[(m0 + i) * jb->N + n0 + r] = acc;
    }
}
#endif


/* ---- q4 (with minimum) x q8 -------------------------------------------------------------- */

/* sum over groups of m_g * sum_{b in g} d_b * asum_b: the minimum's share of output (m, n), a dot
   over K / group values (K / 32 times less work than the codes': kept out of the chunk loop) */
KILN_INLINE float q4_min_term(const job* jb, int64_t m, int64_t n) {
  const int64_t ng = jb->K / jb->group;
  const uint16_t* z = jb->z + n * ng;
  const float* xg = jb->xg + m * ng;
  int64_t g = 0;
  float t = 0.f;
#if KILN_AVX2
  __m256 a = _mm256_setzero_ps();
  for (; g + 8 <= ng; g += 8) a = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(z + g))), _mm256_loadu_ps(xg + g), a);
  t = hsum8(a);
#endif
  for (; g < ng; ++g) t += h2f(z[g]) * xg[g];
  return t;
}

#if KILN_AVX2
/* the scale vector of chunk c (64 values) of one weight row: [s(2c) x4, s(2c+1) x4] for groups
   of 32 (GC == 0), one broadcast scale for groups of GC chunks (64 * GC values) */
KILN_INLINE __m256 q4_scales(const uint16_t* srow, int64_t c, const int GC) {
  if (GC == 0) {
    uint32_t pair;
    memcpy(&pair, srow + 2 * c, 4);
    const __m128 v = _mm_cvtph_ps(_mm_cvtsi32_si128((int)pair));
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(v), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
  }
  return _mm256_set1_ps(h2f(srow[c / GC]));
}

KILN_INLINE void q4_tile(const job* jb, int64_t m0, int64_t n0, const int MR, const int NR, const int GC) {
  const int64_t nc = jb->K / 64, ng = jb->K / jb->group;
  __m256 acc[MR_MAX][NR_MAX];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) acc[i][r] = _mm256_setzero_ps();
  for (int64_t c = 0; c < nc; ++c) {
    __m256i lo[NR_MAX], hi[NR_MAX];
    __m256 sw[NR_MAX];
    q4_chunk_codes(jb, n0, c, NR, lo, hi);
    for (int r = 0; r < NR; ++r) sw[r] = q4_scales(jb->s + (n0 + r) * ng, c, GC);
    q4_chunk_acc(jb, m0, c, MR, NR, lo, hi, sw, acc);
  }
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) jb->y[(m0 + i) * jb->N + n0 + r] = hsum8(acc[i][r]) + q4_min_term(jb, m0 + i, n0 + r);
}
#elif KILN_SDOT
KILN_INLINE void q4_tile(const job* jb, int64_t m0, int64_t n0, const int MR, const int NR, const int GC) {
  (void)GC;
  const int64_t K = jb->K, nb = K / 32, ng = K / jb->group;
  const uint8_t* q = (const uint8_t*)jb->q;
  const uint8x16_t m4 = vdupq_n_u8(0x0F);
  float32x4_t acc[MR_MAX][NR_MAX];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) acc[i][r] = vdupq_n_f32(0.f);
  for (int64_t b = 0; b < nb; ++b) { /* block b: code bytes 16b..16b+15 of the row */
    const int64_t c = b / 2, h = b % 2;
    int8x16_t lo[NR_MAX], hi[NR_MAX];
    float sw[NR_MAX];
    for (int r = 0; r < NR; ++r) {
      const uint8x16_t w = vld1q_u8(q + (n0 + r) * (K / 2) + 16 * b);
      lo[r] = vreinterpretq_s8_u8(vandq_u8(w, m4));
      hi[r] = vreinterpretq_s8_u8(vshrq_n_u8(w, 4));
      sw[r] = h2f(jb->s[(n0 + r) * ng + (32 * b) / jb->group]);
    }
    for (int i = 0; i < MR; ++i) {
      const int8_t* ap = jb->qa + (m0 + i) * K + 64 * c + 16 * h;
      const int8x16_t xe = vld1q_s8(ap), xo = vld1q_s8(ap + 32);
      const float da = jb->d[(m0 + i) * nb + b];
      for (int r = 0; r < NR; ++r) {
        const int32x4_t p = vdotq_s32(vdotq_s32(vdupq_n_s32(0), lo[r], xe), hi[r], xo);
        acc[i][r] = vfmaq_n_f32(acc[i][r], vcvtq_f32_s32(p), da * sw[r]);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) jb->y[(m0 + i) * jb->N + n0 + r] = vaddvq_f32(acc[i][r]) + q4_min_term(jb, m0 + i, n0 + r);
}
#else
KILN_INLINE void q4_tile(const job* jb, int64_t m0, int64_t n0, const int MR, const int NR, const int GC) {
  (void)GC;
  const int64_t K = jb->K, nb = K / 32, ng = K / jb->group;
  const uint8_t* q = (const uint8_t*)jb->q;
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) {
      const uint8_t* w = q + (n0 + r) * (K / 2);
      const int8_t* a = jb->qa + (m0 + i) * K;
      float acc = 0.f;
      for (int64_t b = 0; b < nb; ++b)
        acc += (float)q4_block_isum(w, a, b) * (jb->d[(m0 + i) * nb + b] * h2f(jb->s[(n0 + r) * ng + (32 * b) / jb->group]));
      jb->y[(m0 + i) * jb->N + n0 + r] = acc + q4_min_term(jb, m0 + i, n0 + r);
    }
}
#endif


static int q8_task(int t, kiln_penv* env, void* cdata) {
  const job* jb = (const job*)cdata;
  int64_t n0, n1;
  task_rows(jb, t, env->num_task, &n0, &n1);
  KILN_DRIVE(q8_tile);
  return 0;
}


static int q4_task(int t, kiln_penv* env, void* cdata) {
  const job* jb = (const job*)cdata;
  int64_t n0, n1;
  task_rows(jb, t, env->num_task, &n0, &n1);
  switch (jb->group) { /* chunks of 64 per group, a constant in each tile (group index by shift) */
    case 32: KILN_DRIVE(q4_tile, 0); break;
    case 64: KILN_DRIVE(q4_tile, 1); break;
    case 128: KILN_DRIVE(q4_tile, 2); break;
    default: KILN_DRIVE(q4_tile, 4); break; /* 256 (qdot_supported) */
  }
  return 0;
}


/* y[M, N] = x[M, K] @ (s * q)^T; K % 32 == 0, one scale per 32 weights */
int32_t kiln_cpu_qmatmul_q8(const float* x, const int8_t* q, const uint16_t* s, float* y, int64_t M, int64_t N, int64_t K) {
  job jb = {x, q, s, 0, y, M, N, K, 32, 0, 0, 0, 0, 0, 0};
  return qdot_run(&jb, 0, q8_task);
}


/* y[M, N] = x[M, K] @ (s * q + m)^T; K % 64 == 0, group in {32, 64, 128, ...} dividing K */
int32_t kiln_cpu_qmatmul_q4(const float* x, const uint32_t* q, const uint16_t* s, const uint16_t* z, float* y, int64_t M,
                            int64_t N, int64_t K, int64_t group) {
  job jb = {x, q, s, z, y, M, N, K, group, 0, 0, 0, 0, 0, 0};
  return qdot_run(&jb, 1, q4_task);
}
