/* kiln's integer-dot quantized matmuls for CPUs: y[M, N] = x[M, K] @ dequant(W)^T.

   Activations are quantized on the fly, per block of 32 values with one fp32 scale each,
   then dotted with the weight codes in integer arithmetic; each block's integer sum is
   scaled once in fp32.
     q4 weights meet int8 activations (d = amax / 127, llama.cpp's Q8 activations): AVX2
       `vpmaddubsw` (u8 codes x s8 -> s16 pairs) + `vpmaddwd`, ARM `sdot`.
     q8 weights meet int16 activations (d = amax / 32767): AVX2 `vpmaddwd` (s16 x s16 ->
       s32 pairs), ARM `smlal`. As many instructions per 32 weights as int8's sign trick
       (signed x signed has no byte instruction on AVX2), and the activations' rounding
       disappears: int8 activations took SmolLM2's q8 KLD from 0.00105 to 0.00382 (llama.cpp
       Q8_0: 0.00385); int16 keeps q8 the near-lossless format (benchmarks/NOTES.md).
   Plain C elsewhere (same integer sums).

     q8 (w = s * q, q in [-127, 127], one fp16 scale per 32):
       y = sum_b  d_b * s_b * isum_b
     q4 (w = s * q + m, q in [0, 15], fp16 scale and minimum per group of 32..128):
       y = sum_g ( s_g * sum_{b in g} d_b * isum_b  +  m_g * sum_{b in g} d_b * asum_b )
     q4k (w = (D sc) * q + (Dm mz): the q4 sum with s_g = D sc_g, m_g = Dm mz_g per 32, sc uint8,
       mz int8, D and Dm fp16 per super-block of 64..256; the minimum's share is added into the
       same accumulators once per super-block, eight groups per instruction)

   with isum_b the integer dot of block b and asum_b the sum of its activation codes.

   Layouts (passes/quant/formats): q8 codes int8 [N, K], scales fp16 [N, K/32]; q4 codes
   packed 8 per uint32 little-endian, so byte j of a row holds code 2j (low nibble) and
   2j+1 (high), scales and minima fp16 [N, K/group]. For q4 the activation codes of each
   64-value chunk are stored de-interleaved (the 32 even values, then the 32 odd ones):
   then the low nibbles of 32 code bytes meet the first half and the high nibbles the
   second, and bytes 0-15 / 16-31 (one 128-bit lane each) are blocks 2c / 2c+1.

   Threads: TVM's own pool, through the pointer the runtime fills in every library it
   loads (__TVMBackendParallelLaunch, as in the code TVM generates); rows of W are
   split between tasks. Entry points return 0, or -1 when scratch memory ran out. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define KILN_AVX2 1
#elif defined(__aarch64__) && defined(__ARM_FEATURE_DOTPROD)
#include <arm_neon.h>
#define KILN_SDOT 1
#endif

#define KILN_INLINE static inline __attribute__((always_inline))
#ifndef NR_ROWS
#define NR_ROWS 4 /* weight rows per tile (decode: one activation row) */
#endif
#ifndef MR_GEMM
#define MR_GEMM 6 /* activation rows per tile in a prompt (6 x 1: measured best of 2x2..8x1, benchmarks/NOTES.md) */
#endif
#ifndef NR_GEMM
#define NR_GEMM 1
#endif
#ifndef NB_GEMM
#define NB_GEMM 64 /* weight rows per block of a prompt's GEMM */
#endif
#define MR_MAX (MR_GEMM > 1 ? MR_GEMM : 1)
#define NR_MAX (NR_GEMM > NR_ROWS ? NR_GEMM : NR_ROWS)
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 8192 /* software prefetch of the weight stream this far ahead */
#endif

typedef struct { void* sync_handle; int32_t num_task; } kiln_penv;
typedef int (*kiln_lambda)(int task_id, kiln_penv* penv, void* cdata);
typedef int (*kiln_launch)(kiln_lambda flambda, void* cdata, int num_task);
/* filled in by TVM's library loader (weak: one symbol with the one TVM's codegen emits) */
void* __TVMBackendParallelLaunch __attribute__((weak)) = 0;

static void kiln_parallel(kiln_lambda f, void* cdata) {
  kiln_launch launch = (kiln_launch)__TVMBackendParallelLaunch;
  if (launch) {
    launch(f, cdata, 0);
  } else {
    kiln_penv env = {0, 1};
    f(0, &env, cdata);
  }
}

KILN_INLINE float h2f(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else { /* subnormal: renormalise */
      exp = 127 - 15 + 1;
      while (!(man & 0x400)) { man <<= 1; exp--; }
      bits = sign | (exp << 23) | ((man & 0x3FF) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
#endif
}

/* ---- activations ------------------------------------------------------------------------- */

/* One row of K values -> codes, one scale per 32 (d). q4 (int8): codes de-interleaved per 64,
   and the per-block d * sum(codes) (ds); q8 (int16): codes in order. The AVX2 version gives
   the same codes (round to nearest even, as lrintf), eight values per instruction. */
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
static void quantize_row(const float* x, int64_t K, int q4, void* codes, float* d, float* ds) {
  const float top = q4 ? 127.f : 32767.f;
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256i evens_odds = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  for (int64_t b = 0; b < K / 32; ++b) {
    const float* xb = x + 32 * b;
    __m256 v[4];
    for (int j = 0; j < 4; ++j) v[j] = _mm256_loadu_ps(xb + 8 * j);
    const __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                   _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    const float amax = _mm_cvtss_f32(h);
    const float db = amax / top, id = db > 0.f ? 1.f / db : 0.f;
    const __m256 idv = _mm256_set1_ps(id);
    __m256i c[4];
    for (int j = 0; j < 4; ++j) c[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], idv));
    d[b] = db;
    if (!q4) {
      int16_t* out = (int16_t*)codes + 32 * b;
      _mm256_storeu_si256((__m256i*)out, _mm256_permute4x64_epi64(_mm256_packs_epi32(c[0], c[1]), 0xD8));
      _mm256_storeu_si256((__m256i*)(out + 16), _mm256_permute4x64_epi64(_mm256_packs_epi32(c[2], c[3]), 0xD8));
      continue;
    }
    /* evens of the block to 64c + 16h + j, odds to 64c + 32 + 16h + j (j < 16) */
    for (int j = 0; j < 4; ++j) c[j] = _mm256_permutevar8x32_epi32(c[j], evens_odds); /* [4 evens | 4 odds] */
    const __m256i e01 = _mm256_permute2x128_si256(c[0], c[1], 0x20), o01 = _mm256_permute2x128_si256(c[0], c[1], 0x31);
    const __m256i e23 = _mm256_permute2x128_si256(c[2], c[3], 0x20), o23 = _mm256_permute2x128_si256(c[2], c[3], 0x31);
    const __m256i e = _mm256_permute4x64_epi64(_mm256_packs_epi32(e01, e23), 0xD8); /* 16 evens, int16 */
    const __m256i o = _mm256_permute4x64_epi64(_mm256_packs_epi32(o01, o23), 0xD8);
    const __m256i eo = _mm256_permute4x64_epi64(_mm256_packs_epi16(e, o), 0xD8); /* [16 evens | 16 odds], int8 */
    int8_t* out = (int8_t*)codes + 64 * (b / 2) + 16 * (b % 2);
    _mm_storeu_si128((__m128i*)out, _mm256_castsi256_si128(eo));
    _mm_storeu_si128((__m128i*)(out + 32), _mm256_extracti128_si256(eo, 1));
    const __m256i s4 = _mm256_add_epi32(_mm256_add_epi32(c[0], c[1]), _mm256_add_epi32(c[2], c[3]));
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s4), _mm256_extracti128_si256(s4, 1));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
    ds[b] = db * (float)_mm_cvtsi128_si32(t);
  }
}
#else
static void quantize_row(const float* x, int64_t K, int q4, void* codes, float* d, float* ds) {
  const float top = q4 ? 127.f : 32767.f;
  for (int64_t b = 0; b < K / 32; ++b) {
    const float* xb = x + 32 * b;
    float amax = 0.f;
    for (int i = 0; i < 32; ++i) amax = fmaxf(amax, fabsf(xb[i]));
    const float db = amax / top, id = db > 0.f ? 1.f / db : 0.f;
    int32_t sum = 0;
    for (int i = 0; i < 32; ++i) {
      const int32_t v = (int32_t)lrintf(xb[i] * id);
      const int64_t at = 32 * b + i;
      if (q4) { /* value 64c + j (j < 64) -> 64c + j/2 (even j) or 64c + 32 + j/2 (odd j) */
        const int64_t c = at / 64, j = at % 64;
        ((int8_t*)codes)[64 * c + (j & 1) * 32 + j / 2] = (int8_t)v;
        sum += v;
      } else {
        ((int16_t*)codes)[at] = (int16_t)v;
      }
    }
    d[b] = db;
    if (q4) ds[b] = db * (float)sum;
  }
}
#endif

typedef struct {
  const float* x;
  const void* q;
  const uint16_t* s;
  const uint16_t* z;
  float* y;
  int64_t M, N, K, group;
  int8_t* qa;  /* [M, K] q4: int8 codes; q8: int16 codes (a16) */
  int16_t* a16;
  float* d;    /* [M, K/32] */
  float* ds;   /* [M, K/32] (q4) */
  float* dv;   /* [M, K/64, 8] (AVX2) q4: chunk c's two block scales, 4 lanes each; q8: blocks 2c, 2c+1 as vphaddd lays them out */
  float* xg;   /* q4: [M, K/group] sum over each weight group's blocks of d * sum(codes) */
  const uint8_t* sc;  /* q4k: [N, K/32] scale codes */
  const int8_t* mz;   /* q4k: [N, K/32] minimum codes */
  const uint16_t* sd; /* q4k: [N, K/sb] fp16 super-block scales of sc */
  const uint16_t* sm; /* q4k: [N, K/sb] fp16 super-block scales of mz */
  int64_t sb;         /* q4k: super-block (a multiple of 64 dividing K) */
} job;

/* ---- q8 x q8 ----------------------------------------------------------------------------- */

#if KILN_AVX2
KILN_INLINE float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

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
  const int64_t K = jb->K, nc = K / 64, ng = K / jb->group;
  const uint8_t* q = (const uint8_t*)jb->q;
  const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 acc[MR_MAX][NR_MAX];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) acc[i][r] = _mm256_setzero_ps();
  for (int64_t c = 0; c < nc; ++c) {
    __m256i lo[NR_MAX], hi[NR_MAX];
    __m256 sw[NR_MAX];
    for (int r = 0; r < NR; ++r) {
      const uint8_t* wp = q + (n0 + r) * (K / 2) + 32 * c;
      _mm_prefetch((const char*)(wp + PREFETCH_BYTES), _MM_HINT_T0);
      const __m256i w = _mm256_loadu_si256((const __m256i*)wp);
      lo[r] = _mm256_and_si256(w, m4);
      hi[r] = _mm256_and_si256(_mm256_srli_epi16(w, 4), m4);
      sw[r] = q4_scales(jb->s + (n0 + r) * ng, c, GC);
    }
    for (int i = 0; i < MR; ++i) {
      const int8_t* ap = jb->qa + (m0 + i) * K + 64 * c;
      const __m256i xe = _mm256_loadu_si256((const __m256i*)ap), xo = _mm256_loadu_si256((const __m256i*)(ap + 32));
      const __m256 da = _mm256_loadu_ps(jb->dv + ((m0 + i) * nc + c) * 8);
      for (int r = 0; r < NR; ++r) {
        const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo[r], xe), _mm256_maddubs_epi16(hi[r], xo));
        const __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones)), da);
        acc[i][r] = _mm256_fmadd_ps(f, sw[r], acc[i][r]);
      }
    }
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
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t c = b / 2, h = b % 2;
        int32_t sum = 0;
        for (int j = 0; j < 16; ++j) {
          const uint8_t byte = w[16 * b + j];
          sum += (int32_t)(byte & 15) * a[64 * c + 16 * h + j] + (int32_t)(byte >> 4) * a[64 * c + 32 + 16 * h + j];
        }
        acc += (float)sum * (jb->d[(m0 + i) * nb + b] * h2f(jb->s[(n0 + r) * ng + (32 * b) / jb->group]));
      }
      jb->y[(m0 + i) * jb->N + n0 + r] = acc + q4_min_term(jb, m0 + i, n0 + r);
    }
}
#endif

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
  const int64_t K = jb->K, nc = K / 64, nb = K / 32, per = jb->sb / 32, cps = jb->sb / 64, nsb = K / jb->sb;
  const uint8_t* q = (const uint8_t*)jb->q;
  const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
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
      for (int r = 0; r < NR; ++r) {
        const uint8_t* wp = q + (n0 + r) * (K / 2) + 32 * c;
        _mm_prefetch((const char*)(wp + PREFETCH_BYTES), _MM_HINT_T0);
        const __m256i w = _mm256_loadu_si256((const __m256i*)wp);
        lo[r] = _mm256_and_si256(w, m4);
        hi[r] = _mm256_and_si256(_mm256_srli_epi16(w, 4), m4);
        sw[r] = _mm256_permutevar8x32_ps(s8[r], pick);
      }
      for (int i = 0; i < MR; ++i) {
        const int8_t* ap = jb->qa + (m0 + i) * K + 64 * c;
        const __m256i xe = _mm256_loadu_si256((const __m256i*)ap), xo = _mm256_loadu_si256((const __m256i*)(ap + 32));
        const __m256 da = _mm256_loadu_ps(jb->dv + ((m0 + i) * nc + c) * 8);
        for (int r = 0; r < NR; ++r) {
          const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo[r], xe), _mm256_maddubs_epi16(hi[r], xo));
          const __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones)), da);
          acc[i][r] = _mm256_fmadd_ps(f, sw[r], acc[i][r]);
        }
      }
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
          const int64_t c = b / 2, h = b % 2;
#if KILN_SDOT
          const uint8x16_t wv = vld1q_u8(w + 16 * b);
          const int8x16_t lo = vreinterpretq_s8_u8(vandq_u8(wv, vdupq_n_u8(0x0F))), hi = vreinterpretq_s8_u8(vshrq_n_u8(wv, 4));
          const int32_t sum = vaddvq_s32(vdotq_s32(vdotq_s32(vdupq_n_s32(0), lo, vld1q_s8(a + 64 * c + 16 * h)), hi,
                                                   vld1q_s8(a + 64 * c + 32 + 16 * h)));
#else
          int32_t sum = 0;
          for (int j = 0; j < 16; ++j) {
            const uint8_t byte = w[16 * b + j];
            sum += (int32_t)(byte & 15) * a[64 * c + 16 * h + j] + (int32_t)(byte >> 4) * a[64 * c + 32 + 16 * h + j];
          }
#endif
          part += (float)sum * jb->d[(m0 + i) * nb + b] * (float)jb->sc[(n0 + r) * nb + b];
        }
        acc += dsb * part;
      }
      jb->y[(m0 + i) * jb->N + n0 + r] = acc + q4k_min_term(jb, m0 + i, n0 + r);
    }
}
#endif

/* ---- drivers ----------------------------------------------------------------------------- */


/* rows [n0, n1) of W for every activation row, in MR x NR tiles (edges in smaller ones) */
#define KILN_DRIVE(TILE, ...)                                                              \
  do {                                                                                     \
    if (jb->M == 1) {                                                                      \
      int64_t n = n0;                                                                      \
      for (; n + NR_ROWS <= n1; n += NR_ROWS) TILE(jb, 0, n, 1, NR_ROWS, ##__VA_ARGS__);   \
      for (; n < n1; ++n) TILE(jb, 0, n, 1, 1, ##__VA_ARGS__);                             \
    } else { /* blocks of NB_GEMM weight rows; in each, every activation tile (in L1) */   \
      for (int64_t nb0 = n0; nb0 < n1; nb0 += NB_GEMM) {                                   \
        const int64_t nb1 = nb0 + NB_GEMM < n1 ? nb0 + NB_GEMM : n1;                       \
        int64_t m = 0;                                                                     \
        for (; m + MR_GEMM <= jb->M; m += MR_GEMM) {                                       \
          int64_t n = nb0;                                                                 \
          for (; n + NR_GEMM <= nb1; n += NR_GEMM) TILE(jb, m, n, MR_GEMM, NR_GEMM, ##__VA_ARGS__); \
          for (; n < nb1; ++n) TILE(jb, m, n, MR_GEMM, 1, ##__VA_ARGS__);                  \
        }                                                                                  \
        for (; m < jb->M; ++m) {                                                           \
          int64_t n = nb0;                                                                 \
          for (; n + NR_GEMM <= nb1; n += NR_GEMM) TILE(jb, m, n, 1, NR_GEMM, ##__VA_ARGS__); \
          for (; n < nb1; ++n) TILE(jb, m, n, 1, 1, ##__VA_ARGS__);                        \
        }                                                                                  \
      }                                                                                    \
    }                                                                                      \
  } while (0)

/* task t of nt gets a contiguous range of rows of W, in whole tiles */
static void task_rows(const job* jb, int t, int nt, int64_t* n0, int64_t* n1) {
  const int64_t unit = jb->M == 1 ? NR_ROWS : NR_GEMM, units = (jb->N + unit - 1) / unit;
  const int64_t a = units * t / nt, b = units * (t + 1) / nt;
  *n0 = a * unit;
  *n1 = b * unit < jb->N ? b * unit : jb->N;
}

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

static int q4k_task(int t, kiln_penv* env, void* cdata) {
  const job* jb = (const job*)cdata;
  int64_t n0, n1;
  task_rows(jb, t, env->num_task, &n0, &n1);
  KILN_DRIVE(q4k_tile);
  return 0;
}

/* activation rows [m0, m1) -> codes, scales, block sums, group sums (q4), lane vectors (q4) */
static void quantize_rows(job* jb, int q4, int64_t m0, int64_t m1) {
  const int64_t nb = jb->K / 32, ng = jb->K / jb->group, per = jb->group / 32;
  for (int64_t m = m0; m < m1; ++m) {
    quantize_row(jb->x + m * jb->K, jb->K, q4, q4 ? (void*)(jb->qa + m * jb->K) : (void*)(jb->a16 + m * jb->K), jb->d + m * nb,
                 jb->ds + m * nb);
    if (!q4) { /* q8 (AVX2): scales of blocks 2p, 2p+1 in the lanes vphaddd leaves them in */
      for (int64_t b = 0; b + 1 < nb; b += 2)
        for (int l = 0; l < 8; ++l) jb->dv[m * nb * 4 + b * 4 + l] = jb->d[m * nb + b + ((l >> 1) & 1)];
      continue;
    }
    for (int64_t g = 0; g < ng; ++g) {
      float t = 0.f;
      for (int64_t b = g * per; b < (g + 1) * per; ++b) t += jb->ds[m * nb + b];
      jb->xg[m * ng + g] = t;
    }
    for (int64_t b = 0; b < nb; ++b)
      for (int l = 0; l < 4; ++l) jb->dv[m * nb * 4 + b * 4 + l] = jb->d[m * nb + b];
  }
}

static int quantize_task(int t, kiln_penv* env, void* cdata, int q4) {
  job* jb = (job*)cdata;
  quantize_rows(jb, q4, jb->M * t / env->num_task, jb->M * (t + 1) / env->num_task);
  return 0;
}
static int quantize_task_q4(int t, kiln_penv* env, void* cdata) { return quantize_task(t, env, cdata, 1); }
static int quantize_task_q8(int t, kiln_penv* env, void* cdata) { return quantize_task(t, env, cdata, 0); }

/* scratch for one call (64-byte aligned), filled: activation codes, scales, block sums, group
   sums, lane vectors; a prompt's rows are quantized by the pool's threads */
static int prepare(job* jb, int q4) {
  const int64_t nb = jb->K / 32;
  const size_t codes = (size_t)((jb->M * jb->K * (q4 ? 1 : 2) + 63) / 64 * 64);
  const size_t scales = (size_t)((jb->M * nb * sizeof(float) + 63) / 64 * 64);
  const size_t lanes = (size_t)(jb->M * nb * 4 * sizeof(float)); /* [M, K/64, 8]; rows of odd nb (q8) are not 32-byte aligned: loadu */
  char* mem = (char*)aligned_alloc(64, (codes + 3 * scales + lanes + 63) / 64 * 64); /* a multiple of the alignment (C11) */
  if (!mem) return -1;
  jb->qa = (int8_t*)mem;
  jb->a16 = (int16_t*)mem;
  jb->d = (float*)(mem + codes);
  jb->ds = (float*)(mem + codes + scales);
  jb->xg = (float*)(mem + codes + 2 * scales);
  jb->dv = (float*)(mem + codes + 3 * scales);
  if (jb->M >= 8)
    kiln_parallel(q4 ? quantize_task_q4 : quantize_task_q8, jb);
  else
    quantize_rows(jb, q4, 0, jb->M);
  return 0;
}

/* y[M, N] = x[M, K] @ (s * q)^T; K % 32 == 0, one scale per 32 weights */
int32_t kiln_cpu_qmatmul_q8(const float* x, const int8_t* q, const uint16_t* s, float* y, int64_t M, int64_t N, int64_t K) {
  job jb = {x, q, s, 0, y, M, N, K, 32, 0, 0, 0, 0, 0, 0};
  if (M <= 0 || N <= 0) return 0;
  if (prepare(&jb, 0)) return -1;
  kiln_parallel(q8_task, &jb);
  free(jb.qa);
  return 0;
}

/* y[M, N] = x[M, K] @ (s * q + m)^T; K % 64 == 0, group in {32, 64, 128, ...} dividing K */
int32_t kiln_cpu_qmatmul_q4(const float* x, const uint32_t* q, const uint16_t* s, const uint16_t* z, float* y, int64_t M,
                            int64_t N, int64_t K, int64_t group) {
  job jb = {x, q, s, z, y, M, N, K, group, 0, 0, 0, 0, 0, 0};
  if (M <= 0 || N <= 0) return 0;
  if (prepare(&jb, 1)) return -1;
  kiln_parallel(q4_task, &jb);
  free(jb.qa);
  return 0;
}

/* y[M, N] = x[M, K] @ (d_sb sc * q + m_sb mz)^T: q4k (passes/quant/formats/q4k.py); K % 64 == 0, the
   super-block sb a multiple of 64 dividing K, groups of 32 */
int32_t kiln_cpu_qmatmul_q4k(const float* x, const uint32_t* q, const uint8_t* sc, const int8_t* mz, const uint16_t* sd,
                             const uint16_t* sm, float* y, int64_t M, int64_t N, int64_t K, int64_t sb) {
  job jb = {x, q, 0, 0, y, M, N, K, 32, 0, 0, 0, 0, 0, 0, sc, mz, sd, sm, sb};
  if (M <= 0 || N <= 0) return 0;
  if (prepare(&jb, 1)) return -1;
  kiln_parallel(q4k_task, &jb);
  free(jb.qa);
  return 0;
}
