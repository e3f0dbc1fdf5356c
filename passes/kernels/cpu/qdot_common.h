/* kiln's integer-dot quantized matmuls for CPUs: y[M, N] = x[M, K] @ dequant(W)^T -- what the
   kernel files share (qdot.c: q8 and q4; qdot_q4k.c: q4k): activation quantization, the job,
   the tile drivers, the thread pool.

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
#ifndef KILN_QDOT_COMMON_H
#define KILN_QDOT_COMMON_H

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

#include "kiln_pool.h"

#include "kiln_half.h"

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

#if KILN_AVX2
KILN_INLINE float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
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


/* ---- shared by the 4-bit tiles (qdot.c's q4, qdot_q4k.c) ------------------------------------ */

#if KILN_AVX2
/* chunk c (64 values) of weight rows n0 .. n0 + NR - 1: the low / high nibbles of its 32 code bytes
   (bytes 0-15 / 16-31: blocks 2c / 2c + 1), the stream prefetched PREFETCH_BYTES ahead */
KILN_INLINE void q4_chunk_codes(const job* jb, int64_t n0, int64_t c, const int NR, __m256i* lo, __m256i* hi) {
  const uint8_t* q = (const uint8_t*)jb->q;
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  for (int r = 0; r < NR; ++r) {
    const uint8_t* wp = q + (n0 + r) * (jb->K / 2) + 32 * c;
    _mm_prefetch((const char*)(wp + PREFETCH_BYTES), _MM_HINT_T0);
    const __m256i w = _mm256_loadu_si256((const __m256i*)wp);
    lo[r] = _mm256_and_si256(w, m4);
    hi[r] = _mm256_and_si256(_mm256_srli_epi16(w, 4), m4);
  }
}

/* acc[i][r] += isum * d * sw[r] for chunk c: the integer dots of activation rows m0 .. m0 + MR - 1
   with the NR rows' codes, per lane (vpmaddubsw: u8 codes x s8 activations), scaled by the
   activation blocks' d (lane vectors dv) and the weights' scale vectors sw */
KILN_INLINE void q4_chunk_acc(const job* jb, int64_t m0, int64_t c, const int MR, const int NR, const __m256i* lo,
                              const __m256i* hi, const __m256* sw, __m256 acc[MR_MAX][NR_MAX]) {
  const int64_t K = jb->K, nc = K / 64;
  const __m256i ones = _mm256_set1_epi16(1);
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
#else
/* the integer dot of block b (32 codes) of one weight row w with one activation row a (its codes
   de-interleaved per 64: block b is half h of chunk c, low nibbles meet a[64c + 16h ..], high
   nibbles a[64c + 32 + 16h ..]) */
KILN_INLINE int32_t q4_block_isum(const uint8_t* w, const int8_t* a, int64_t b) {
  const int64_t c = b / 2, h = b % 2;
#if KILN_SDOT
  const uint8x16_t wv = vld1q_u8(w + 16 * b);
  const int8x16_t lo = vreinterpretq_s8_u8(vandq_u8(wv, vdupq_n_u8(0x0F))), hi = vreinterpretq_s8_u8(vshrq_n_u8(wv, 4));
  return vaddvq_s32(vdotq_s32(vdotq_s32(vdupq_n_s32(0), lo, vld1q_s8(a + 64 * c + 16 * h)), hi, vld1q_s8(a + 64 * c + 32 + 16 * h)));
#else
  int32_t sum = 0;
  for (int j = 0; j < 16; ++j) {
    const uint8_t byte = w[16 * b + j];
    sum += (int32_t)(byte & 15) * a[64 * c + 16 * h + j] + (int32_t)(byte >> 4) * a[64 * c + 32 + 16 * h + j];
  }
  return sum;
#endif
}
#endif

/* one call of an entry point: the activations quantized, `task` over the pool's threads, the
   scratch freed; 0, or -1 when scratch memory ran out */
static int32_t qdot_run(job* jb, int q4, kiln_lambda task) {
  if (jb->M <= 0 || jb->N <= 0) return 0;
  if (prepare(jb, q4)) return -1;
  kiln_parallel(task, jb);
  free(jb->qa);
  return 0;
}

#endif /* KILN_QDOT_COMMON_H */
