/* kiln's fp32 GEMM for CPUs against weights packed once at compile time (issue 18):

     y[M, N] = x[M, K] @ W^T          x  # [M, K] f32, rows contiguous
                                       wp # [ceil(N / 16), K, 16] f32: W [N, K] in panels of 16 rows,
                                          #   k-major inside a panel, rows past N zero
                                       y  # [M, N] f32

   BLIS's loop nest (Goto & van de Geijn): a KC-deep slice of one weight panel (KC x 16
   floats, 16 KB) stays in L1 while every MR-row strip of the activations' MC x KC block
   (in L2) passes it; the micro-kernel keeps an MR x 16 tile of y in registers. AVX2 + FMA:
   MR = 6, 12 accumulators + 2 weight vectors + 1 broadcast of 16 ymm, 12 FMAs per 2 loads
   and 6 broadcasts. The activations are read in place (six row streams), not packed: a
   packing pass cost 20-25% on ResNet's GEMMs of 64 columns, and gained nothing at 768
   (benchmarks/NOTES.md, Session 20). Elsewhere the same nest around a plain C tile that
   compilers vectorise (MR = 4).

   Why packed at compile time: the weights are constants, so the panel layout is data
   (CONVENTIONS: layout work happens once at conversion time); TVM's GEMM schedule repacked
   its weight tile on every call. Threads: TVM's pool (kiln_pool.h); a call of many row
   blocks splits the rows between tasks, otherwise the panels. */

#include "kiln_half.h"
#include "kiln_pool.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SG_AVX2 1
#define SG_MR 6
#else
#define SG_MR 4
#endif
#define SG_NR 16
#if defined(__GNUC__) && !defined(SG_NO_PREFETCH)
#define SG_PREFETCH(p) __builtin_prefetch((p), 0, 2)
#else
#define SG_PREFETCH(p) ((void)(p))
#endif
#ifndef SG_KC
#define SG_KC 256 /* k per pass: a panel slice of KC x 16 floats is 16 KB (L1) */
#endif
#ifndef SG_MC
#define SG_MC 132 /* activation rows per block (22 strips: a 128-token prompt in one), MC x KC floats = 132 KB (L2) */
#endif

typedef struct {
  const float* x;
  const float* wp;
  float* y;
  int64_t M, N, K;
  const int8_t* q;    /* q8 weights instead of wp: codes [N, K], */
  const uint16_t* s;  /* fp16 scales [N, K / 32]; each panel's slice decoded per use */
  const struct sg_conv* cv; /* a convolution read in place: x is its NHWC input, row m its output pixel m */
  const float* bias;        /* epilogue, after the last K slice of a tile: y = relu?(y + bias [N] + res [M, N]) */
  const float* res;
  int relu;
} sg_job;

/* a 2-D convolution as the GEMM over its patches, the patches never written: x [B, H, W, C] NHWC,
   y [B OH OW, N] (rows: output pixels in NHWC order), W [N, KH KW C] (k in (kh, kw, c) order);
   row m's k = (kh KW + kw) C + c reads x[b, oh sh - ph + kh dh, ow sw - pw + kw dw, c], zero outside */
typedef struct sg_conv {
  int64_t H, W, C, OH, OW, KH, KW, sh, sw, ph, pw, dh, dw;
  int64_t XC; /* floats per pixel of x: C, or fewer when a row of KW pixels is one tap of C = KW XC (the stem, padded) */
} sg_conv;
#define SG_TAPS 16 /* taps per KC slice at most (C >= 16: 256 / C) */
static const float sg_zeros[SG_KC]; /* the row a tap outside the input reads (cs <= SG_KC) */

#if SG_AVX2
/* c[MR x 16] (row stride ldc) = (acc ? c : 0) + a rows (a[i] + k, k < kc) x b-slice [kc][16]; MR a
   constant at each call (1..6). Named accumulators, not arrays: gcc kept arrays of __m256 on the
   stack and stored every accumulator each k (session 20, asm) */
#define SG_ROW_FMA(i)                                        \
  if (MR > i) {                                              \
    const __m256 t = _mm256_broadcast_ss(a##i + k);          \
    c##i##0 = _mm256_fmadd_ps(t, b0, c##i##0);               \
    c##i##1 = _mm256_fmadd_ps(t, b1, c##i##1);               \
  }
#define SG_ROW_STORE(i)                                                \
  if (MR > i) {                                                        \
    float* ci = c + i * ldc;                                           \
    if (acc) {                                                         \
      c##i##0 = _mm256_add_ps(c##i##0, _mm256_loadu_ps(ci));           \
      c##i##1 = _mm256_add_ps(c##i##1, _mm256_loadu_ps(ci + 8));       \
    }                                                                  \
    _mm256_storeu_ps(ci, c##i##0);                                     \
    _mm256_storeu_ps(ci + 8, c##i##1);                                 \
  }
static inline __attribute__((always_inline)) void sg_tile_mr(int64_t kc, const float* const* a, const float* b, float* c, int64_t ldc,
                                                             int acc, const int MR) {
  __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps(), c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
  __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps(), c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
  __m256 c40 = _mm256_setzero_ps(), c41 = _mm256_setzero_ps(), c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
  const float *a0 = a[0], *a1 = a[MR > 1 ? 1 : 0], *a2 = a[MR > 2 ? 2 : 0], *a3 = a[MR > 3 ? 3 : 0], *a4 = a[MR > 4 ? 4 : 0],
              *a5 = a[MR > 5 ? 5 : 0];
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_loadu_ps(b + 16 * k), b1 = _mm256_loadu_ps(b + 16 * k + 8);
    SG_ROW_FMA(0) SG_ROW_FMA(1) SG_ROW_FMA(2) SG_ROW_FMA(3) SG_ROW_FMA(4) SG_ROW_FMA(5)
  }
  SG_ROW_STORE(0) SG_ROW_STORE(1) SG_ROW_STORE(2) SG_ROW_STORE(3) SG_ROW_STORE(4) SG_ROW_STORE(5)
}

/* rows 1..6: one unrolled tile each (a strip of fewer rows at the end of M computes only its rows) */
static void sg_tile_rows(int64_t kc, const float* const* a, const float* b, float* c, int64_t ldc, int acc, int64_t rows) {
  switch (rows) {
    case 6: sg_tile_mr(kc, a, b, c, ldc, acc, 6); break;
    case 5: sg_tile_mr(kc, a, b, c, ldc, acc, 5); break;
    case 4: sg_tile_mr(kc, a, b, c, ldc, acc, 4); break;
    case 3: sg_tile_mr(kc, a, b, c, ldc, acc, 3); break;
    case 2: sg_tile_mr(kc, a, b, c, ldc, acc, 2); break;
    default: sg_tile_mr(kc, a, b, c, ldc, acc, 1); break;
  }
}

/* the convolution's tile: ntaps segments of cs k each, row i of segment t read from a[6 t + i]
   (a tap's C channels, or a c-range of them, contiguous in x); the panel slice b runs on through
   the segments (ntaps > 1 only when cs == C: consecutive taps are consecutive in the panel) */
static inline __attribute__((always_inline)) void sg_ctile_mr(int64_t ntaps, int64_t cs, const float* const* a, const float* b, float* c,
                                                              int64_t ldc, int acc, const int MR) {
  __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps(), c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
  __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps(), c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
  __m256 c40 = _mm256_setzero_ps(), c41 = _mm256_setzero_ps(), c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
  for (int64_t t = 0; t < ntaps; ++t, a += SG_MR, b += SG_NR * cs) {
    const float *a0 = a[0], *a1 = a[MR > 1 ? 1 : 0], *a2 = a[MR > 2 ? 2 : 0], *a3 = a[MR > 3 ? 3 : 0], *a4 = a[MR > 4 ? 4 : 0],
                *a5 = a[MR > 5 ? 5 : 0];
    for (int64_t k = 0; k < cs; ++k) {
      const __m256 b0 = _mm256_loadu_ps(b + 16 * k), b1 = _mm256_loadu_ps(b + 16 * k + 8);
      SG_ROW_FMA(0) SG_ROW_FMA(1) SG_ROW_FMA(2) SG_ROW_FMA(3) SG_ROW_FMA(4) SG_ROW_FMA(5)
    }
  }
  SG_ROW_STORE(0) SG_ROW_STORE(1) SG_ROW_STORE(2) SG_ROW_STORE(3) SG_ROW_STORE(4) SG_ROW_STORE(5)
}

static void sg_ctile_rows(int64_t ntaps, int64_t cs, const float* const* a, const float* b, float* c, int64_t ldc, int acc, int64_t rows) {
  switch (rows) {
    case 6: sg_ctile_mr(ntaps, cs, a, b, c, ldc, acc, 6); break;
    case 5: sg_ctile_mr(ntaps, cs, a, b, c, ldc, acc, 5); break;
    case 4: sg_ctile_mr(ntaps, cs, a, b, c, ldc, acc, 4); break;
    case 3: sg_ctile_mr(ntaps, cs, a, b, c, ldc, acc, 3); break;
    case 2: sg_ctile_mr(ntaps, cs, a, b, c, ldc, acc, 2); break;
    default: sg_ctile_mr(ntaps, cs, a, b, c, ldc, acc, 1); break;
  }
}
#else
static inline void sg_tile(int64_t kc, const float* const* a, const float* b, float* c, int64_t ldc, int acc) {
  float t[SG_MR][SG_NR];
  for (int i = 0; i < SG_MR; ++i)
    for (int j = 0; j < SG_NR; ++j) t[i][j] = 0.f;
  for (int64_t k = 0; k < kc; ++k)
    for (int i = 0; i < SG_MR; ++i) {
      const float ai = a[i][k];
      for (int j = 0; j < SG_NR; ++j) t[i][j] += ai * b[SG_NR * k + j];
    }
  for (int i = 0; i < SG_MR; ++i)
    for (int j = 0; j < SG_NR; ++j) c[i * ldc + j] = (acc ? c[i * ldc + j] : 0.f) + t[i][j];
}

static void sg_tile_rows(int64_t kc, const float* const* a, const float* b, float* c, int64_t ldc, int acc, int64_t rows) {
  (void)rows; /* the caller passes a buffer of SG_MR rows when rows < SG_MR */
  sg_tile(kc, a, b, c, ldc, acc);
}

/* portable: the segments gathered into one row-major [SG_MR][ntaps cs] block, then the plain tile */
static void sg_ctile_rows(int64_t ntaps, int64_t cs, const float* const* a, const float* b, float* c, int64_t ldc, int acc, int64_t rows) {
  float rowbuf[SG_MR][SG_KC];
  const float* r[SG_MR];
  for (int i = 0; i < SG_MR; ++i) {
    for (int64_t t = 0; t < ntaps; ++t) memcpy(rowbuf[i] + t * cs, a[SG_MR * t + i], (size_t)cs * sizeof(float));
    r[i] = rowbuf[i];
  }
  sg_tile_rows(ntaps * cs, r, b, c, ldc, acc, rows);
}
#endif

/* the epilogue on a finished tile, rows [m, m + rows) x columns [n, n + cols) of y, while it is in L1:
   bias, residual and ReLU in the GEMM's store instead of passes over the whole output (session 21) */
static inline void sg_epilogue(const sg_job* jb, int64_t m, int64_t rows, int64_t n, int64_t cols) {
  if (!jb->bias && !jb->res && !jb->relu) return;
  for (int64_t i = 0; i < rows; ++i) {
    float* c = jb->y + (m + i) * jb->N + n;
    const float* r = jb->res ? jb->res + (m + i) * jb->N + n : 0;
#if SG_AVX2
    if (cols == SG_NR) {
      __m256 v0 = _mm256_loadu_ps(c), v1 = _mm256_loadu_ps(c + 8);
      if (jb->bias) v0 = _mm256_add_ps(v0, _mm256_loadu_ps(jb->bias + n)), v1 = _mm256_add_ps(v1, _mm256_loadu_ps(jb->bias + n + 8));
      if (r) v0 = _mm256_add_ps(v0, _mm256_loadu_ps(r)), v1 = _mm256_add_ps(v1, _mm256_loadu_ps(r + 8));
      if (jb->relu) v0 = _mm256_max_ps(v0, _mm256_setzero_ps()), v1 = _mm256_max_ps(v1, _mm256_setzero_ps());
      _mm256_storeu_ps(c, v0);
      _mm256_storeu_ps(c + 8, v1);
    } else
#endif
    {
      for (int64_t j = 0; j < cols; ++j) {
        float v = c[j];
        if (jb->bias) v += jb->bias[n + j];
        if (r) v += r[j];
        c[j] = jb->relu && !(v > 0.f) ? 0.f : v;
      }
    }
  }
}

/* the residual rows a tile's epilogue adds, requested before its K loop: read from DRAM inside the
   epilogue they stalled the tile (the 1x1 convolutions with a residual ran ~30% slower, session 21) */
static inline void sg_prefetch_res(const sg_job* jb, int64_t m, int64_t rows, int64_t n) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* r = jb->res + (m + i) * jb->N + n;
    SG_PREFETCH(r);
    SG_PREFETCH(r + SG_NR - 1);
  }
}

/* one micro-tile: rows [m, m + rows) x panel p over k [k0, k0 + kc); full tiles straight into y,
   edge tiles through a buffer (rows past M read the last row again, their results dropped) */
static inline void sg_micro(const sg_job* jb, int64_t k0, int64_t kc, const float* b, int64_t m, int64_t rows, int64_t p, int acc,
                            int last) {
  const int64_t n = p * SG_NR, cols = jb->N - n < SG_NR ? jb->N - n : SG_NR;
  const float* a[SG_MR];
  for (int i = 0; i < SG_MR; ++i) a[i] = jb->x + (m + (i < rows ? i : rows - 1)) * jb->K + k0;
  float* c = jb->y + m * jb->N + n;
  if (last && jb->res) sg_prefetch_res(jb, m, rows, n);
#if SG_AVX2
  const int full = cols == SG_NR; /* a strip of fewer rows writes its rows straight into y */
#else
  const int full = cols == SG_NR && rows == SG_MR;
#endif
  if (full) {
    sg_tile_rows(kc, a, b, c, jb->N, acc, rows);
  } else {
    float buf[SG_MR * SG_NR] __attribute__((aligned(32)));
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) buf[i * SG_NR + j] = acc ? c[i * jb->N + j] : 0.f;
    sg_tile_rows(kc, a, b, buf, SG_NR, 1, rows);
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) c[i * jb->N + j] = buf[i * SG_NR + j];
  }
  if (last) sg_epilogue(jb, m, rows, n, cols);
}

/* the row pointers of rows [m, m + mc) of the convolution's patch matrix for taps [t0, t0 + nt),
   channels from c0: a[strip][t][i] ([strips][SG_TAPS][SG_MR]: strip = row / MR, i = row % MR; rows past the last strip's end
   repeat its last row), into x or into zeros outside it. Once per slice and row block, not per tile:
   the divisions cost as much as a tile's FMAs otherwise (session 21) */
static void sg_cptrs(const sg_job* jb, int64_t t0, int64_t nt, int64_t c0, int64_t m, int64_t mc, const float** a) {
  const sg_conv* cv = jb->cv;
  const int64_t plane = cv->OH * cv->OW, strips = (mc + SG_MR - 1) / SG_MR;
  int64_t img = m / plane, oh = m % plane / cv->OW, ow = m % cv->OW;
  int64_t dy[SG_TAPS], dx[SG_TAPS];
  for (int64_t t = 0; t < nt; ++t) dy[t] = (t0 + t) / cv->KW * cv->dh, dx[t] = (t0 + t) % cv->KW * cv->dw;
  for (int64_t r = 0; r < strips * SG_MR; ++r) {
    const float** at = a + (r / SG_MR) * SG_TAPS * SG_MR + r % SG_MR;
    if (r >= mc) { /* past the block's last row: its last row again (computed, dropped) */
      for (int64_t t = 0; t < nt; ++t) at[SG_MR * t] = at[SG_MR * t - 1];
      continue;
    }
    const int64_t ih0 = oh * cv->sh - cv->ph, iw0 = ow * cv->sw - cv->pw;
    const float* base = jb->x + img * cv->H * cv->W * cv->XC + c0;
    for (int64_t t = 0; t < nt; ++t) {
      const int64_t ih = ih0 + dy[t], iw = iw0 + dx[t];
      at[SG_MR * t] = ih >= 0 && ih < cv->H && iw >= 0 && iw < cv->W ? base + (ih * cv->W + iw) * cv->XC : sg_zeros;
    }
    if (++ow == cv->OW && (ow = 0, ++oh == cv->OH)) oh = 0, ++img;
  }
}

/* the convolution's micro-tile: rows [m, m + rows) (output pixels) x panel p, ntaps segments of cs k
   from the strip's pointers a [ntaps][6] */
static inline void sg_cmicro(const sg_job* jb, int64_t ntaps, int64_t cs, const float* const* a, const float* b, int64_t m,
                             int64_t rows, int64_t p, int acc, int last) {
  const int64_t n = p * SG_NR, cols = jb->N - n < SG_NR ? jb->N - n : SG_NR;
  float* c = jb->y + m * jb->N + n;
  if (last && jb->res) sg_prefetch_res(jb, m, rows, n);
#if SG_AVX2
  const int full = cols == SG_NR;
#else
  const int full = cols == SG_NR && rows == SG_MR;
#endif
  if (full) {
    sg_ctile_rows(ntaps, cs, a, b, c, jb->N, acc, rows);
  } else {
    float buf[SG_MR * SG_NR] __attribute__((aligned(32)));
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) buf[i * SG_NR + j] = acc ? c[i * jb->N + j] : 0.f;
    sg_ctile_rows(ntaps, cs, a, b, buf, SG_NR, 1, rows);
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) c[i * jb->N + j] = buf[i * SG_NR + j];
  }
  if (last) sg_epilogue(jb, m, rows, n, cols);
}

/* q8: rows [16 p, 16 p + 16) of W (codes x their block's scale), k [k0, k0 + kc), into a panel
   slice [kc][16] (rows past N zero). kc and k0 are multiples of 32 (K % 32 == 0): one scale per
   8-wide chunk. AVX2: 16 rows x 8 codes widened and scaled, then two 8 x 8 transposes. */
#if SG_AVX2
static inline void sg_tr8(__m256* r) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]), t2 = _mm256_unpacklo_ps(r[2], r[3]),
               t3 = _mm256_unpackhi_ps(r[2], r[3]), t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]),
               t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE), u2 = _mm256_shuffle_ps(t1, t3, 0x44),
               u3 = _mm256_shuffle_ps(t1, t3, 0xEE), u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE),
               u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}
#endif

static void sg_decode_q8(const sg_job* jb, int64_t p, int64_t k0, int64_t kc, float* out) {
  const int64_t K = jb->K, nb = K / 32;
#if SG_AVX2
  for (int64_t kb = 0; kb < kc; kb += 8) {
    for (int h = 0; h < 2; ++h) { /* rows 8h .. 8h + 7 of the panel */
      __m256 r[8];
      for (int i = 0; i < 8; ++i) {
        const int64_t n = p * SG_NR + 8 * h + i;
        if (n < jb->N) {
          const __m128i c = _mm_loadl_epi64((const __m128i*)(jb->q + n * K + k0 + kb));
          r[i] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c)), _mm256_set1_ps(h2f(jb->s[n * nb + (k0 + kb) / 32])));
        } else {
          r[i] = _mm256_setzero_ps();
        }
      }
      sg_tr8(r);
      for (int j = 0; j < 8; ++j) _mm256_storeu_ps(out + (kb + j) * SG_NR + 8 * h, r[j]);
    }
  }
#else
  for (int r = 0; r < SG_NR; ++r) {
    const int64_t n = p * SG_NR + r;
    for (int64_t k = 0; k < kc; ++k)
      out[k * SG_NR + r] = n < jb->N ? (float)jb->q[n * K + k0 + k] * h2f(jb->s[n * nb + (k0 + k) / 32]) : 0.f;
  }
#endif
}

/* rows [m0, m1) x panels [p0, p1) of y: for each KC slice of K, blocks of MC rows (in L2)
   pass each panel's slice (in L1) tile by tile */
static int sg_block(const sg_job* jb, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  const int64_t K = jb->K;
  float* slice = 0; /* q8: this task's decoded panel slice [kc][16] */
  if (jb->q && !(slice = (float*)aligned_alloc(64, SG_KC * SG_NR * sizeof(float)))) return -1;
  for (int64_t k0 = 0; k0 < K; k0 += SG_KC) {
    const int64_t kc = K - k0 < SG_KC ? K - k0 : SG_KC;
    for (int64_t mb = m0; mb < m1; mb += SG_MC) {
      const int64_t mc = m1 - mb < SG_MC ? m1 - mb : SG_MC;
      for (int64_t p = p0; p < p1; ++p) {
        const float* b = jb->q ? slice : jb->wp + (p * K + k0) * SG_NR;
        if (jb->q) sg_decode_q8(jb, p, k0, kc, slice);
        /* the next panel's slice (kc cache lines) towards L2 while this one is used, a share per
           strip: the weights come from DRAM in a graph (every matrix read once per run) */
        const char* next = jb->q ? 0 : (const char*)(p + 1 < p1 ? b + K * SG_NR : b);
        const int64_t strips = (mc + SG_MR - 1) / SG_MR, per = (kc + strips - 1) / strips;
        for (int64_t i = 0, s = 0; i < mc; i += SG_MR, ++s) {
          if (next)
            for (int64_t l = s * per; l < (s + 1) * per && l < kc; ++l) SG_PREFETCH(next + 64 * l);
          sg_micro(jb, k0, kc, b, mb + i, mc - i < SG_MR ? mc - i : SG_MR, p, k0 > 0, k0 + kc >= K);
        }
      }
    }
  }
  free(slice);
  return 0;
}

/* the convolution's sg_block: K sliced along taps (whole taps of C <= KC channels, up to KC k per
   slice; a tap of more channels in KC-wide pieces), so every row's k-run in a slice is contiguous in x */
static int sg_cblock(const sg_job* jb, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  const sg_conv* cv = jb->cv;
  const int64_t K = jb->K, C = cv->C, taps = cv->KH * cv->KW, cw = C < SG_KC ? C : SG_KC;
  const int64_t per_slice = C < SG_KC ? (SG_KC / C < SG_TAPS ? SG_KC / C : SG_TAPS) : 1;
  const float** ptrs = (const float**)malloc(sizeof(float*) * ((SG_MC + SG_MR - 1) / SG_MR) * SG_TAPS * SG_MR); /* [strip][tap][6] */
  if (!ptrs) return -1;
  for (int64_t t0 = 0; t0 < taps; t0 += per_slice) {
    const int64_t nt = taps - t0 < per_slice ? taps - t0 : per_slice;
    for (int64_t c0 = 0; c0 < C; c0 += cw) {
      const int64_t cs = C - c0 < cw ? C - c0 : cw, k0 = t0 * C + c0, kc = nt * cs;
      for (int64_t mb = m0; mb < m1; mb += SG_MC) {
        const int64_t mc = m1 - mb < SG_MC ? m1 - mb : SG_MC;
        sg_cptrs(jb, t0, nt, c0, mb, mc, ptrs);
        for (int64_t p = p0; p < p1; ++p) {
          const float* b = jb->wp + (p * K + k0) * SG_NR;
          const char* next = (const char*)(p + 1 < p1 ? b + K * SG_NR : b);
          const int64_t strips = (mc + SG_MR - 1) / SG_MR, per = (kc + strips - 1) / strips;
          for (int64_t i = 0, s = 0; i < mc; i += SG_MR, ++s) {
            for (int64_t l = s * per; l < (s + 1) * per && l < kc; ++l) SG_PREFETCH(next + 64 * l);
            sg_cmicro(jb, nt, cs, ptrs + s * SG_TAPS * SG_MR, b, mb + i, mc - i < SG_MR ? mc - i : SG_MR, p, k0 > 0,
                      t0 + nt >= taps && c0 + cs >= C);
          }
        }
      }
    }
  }
  free(ptrs);
  return 0;
}

static int sg_task(int t, kiln_penv* env, void* cdata) {
  const sg_job* jb = (const sg_job*)cdata;
  const int nt = env->num_task;
  const int64_t panels = (jb->N + SG_NR - 1) / SG_NR, mblocks = (jb->M + SG_MC - 1) / SG_MC;
  if (mblocks >= 2 * nt || panels < nt) { /* many rows: each task its share of the rows (whole strips), every panel */
    const int64_t strips = (jb->M + SG_MR - 1) / SG_MR, a = strips * t / nt * SG_MR, b = strips * (t + 1) / nt * SG_MR;
    return (jb->cv ? sg_cblock : sg_block)(jb, a, b < jb->M ? b : jb->M, 0, panels);
  }
  return (jb->cv ? sg_cblock : sg_block)(jb, 0, jb->M, panels * t / nt, panels * (t + 1) / nt); /* few rows: a share of the panels */
}

/* y[M, N] = relu?(x[M, K] @ W^T + bias [N] + res [M, N]), the epilogue's operands flagged in ep: bit 0
   bias, bit 1 res, bit 2 ReLU (a pointer not flagged is never read); K > 0 */
int32_t kiln_cpu_sgemm_packed_ep(const float* x, const float* wp, float* y, int64_t M, int64_t N, int64_t K, const float* bias,
                                 const float* res, int64_t ep) {
  if (M <= 0 || N <= 0) return 0;
  if (K <= 0) return -1;
  sg_job jb = {x, wp, y, M, N, K, 0, 0, 0, (ep & 1) ? bias : 0, (ep & 2) ? res : 0, (int)((ep >> 2) & 1)};
  return kiln_parallel(sg_task, &jb);
}

/* y[M, N] = x[M, K] @ W^T with W packed as above; returns 0 (an int, as kiln's other entry points) */
int32_t kiln_cpu_sgemm_packed(const float* x, const float* wp, float* y, int64_t M, int64_t N, int64_t K) {
  if (M <= 0 || N <= 0) return 0;
  if (K <= 0) {
    memset(y, 0, (size_t)(M * N) * sizeof(float));
    return 0;
  }
  sg_job jb = {x, wp, y, M, N, K, 0, 0, 0, 0, 0, 0};
  return kiln_parallel(sg_task, &jb);
}

/* y [B OH OW, N] = the convolution of x [B, H, W, C] (NHWC) with W [N, KH KW C] packed as above (k in
   (kh, kw, c) order), strides (sh, sw), leading pads (ph, pw), dilations (dh, dw), x's pixels XC floats
   apart (XC = C; a tap of C > XC floats reads the next pixels on: x padded, KW folded into C); the patches are read
   in place, never written (XNNPACK's indirection, the pointers made per row block); then the epilogue
   (bias, res, ep as below). 0, or -1 when memory for the pointers ran out. */
int32_t kiln_cpu_sconv_packed(const float* x, const float* wp, float* y, int64_t B, int64_t H, int64_t W, int64_t C, int64_t OH,
                              int64_t OW, int64_t KH, int64_t KW, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh,
                              int64_t dw, int64_t N, const float* bias, const float* res, int64_t ep, int64_t XC) {
  const int64_t M = B * OH * OW, K = KH * KW * C;
  if (M <= 0 || N <= 0 || K <= 0) return -1; /* the pass builds it only for real convolutions */
  const sg_conv cv = {H, W, C, OH, OW, KH, KW, sh, sw, ph, pw, dh, dw, XC};
  sg_job jb = {x, wp, y, M, N, K, 0, 0, &cv, (ep & 1) ? bias : 0, (ep & 2) ? res : 0, (int)((ep >> 2) & 1)};
  return kiln_parallel(sg_task, &jb);
}


/* ---- both operands activations (attention's q k^T and p v) ---------------------------------- */

typedef struct {
  const float* a; /* [batch, M, K] */
  const float* b; /* [batch or 1, K, N] */
  float* y;       /* [batch, M, N] */
  int64_t batch, b_batch, M, N, K;
} bmm_job;

/* panels [p0, p1) of b [K, N] (row-major) into wp [ceil(N / 16), K, 16], columns past N zero */
static void bmm_pack(const float* b, int64_t N, int64_t K, int64_t p0, int64_t p1, float* wp) {
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t n0 = p * SG_NR, cols = N - n0 < SG_NR ? N - n0 : SG_NR;
    float* out = wp + p * K * SG_NR;
    for (int64_t k = 0; k < K; ++k) {
      memcpy(out + k * SG_NR, b + k * N + n0, (size_t)cols * sizeof(float));
      for (int64_t j = cols; j < SG_NR; ++j) out[k * SG_NR + j] = 0.f;
    }
  }
}

/* task t: whole products when there are enough of them for every task, else a share of each
   product's panels; each task packs the panels it computes into its own buffer */
static int bmm_task(int t, kiln_penv* env, void* cdata) {
  const bmm_job* jb = (const bmm_job*)cdata;
  const int nt = env->num_task;
  const int64_t P = (jb->N + SG_NR - 1) / SG_NR, split = jb->batch >= nt ? 1 : nt, units = jb->batch * split;
  const int64_t u0 = units * t / nt, u1 = units * (t + 1) / nt;
  if (u0 >= u1) return 0;
  float* wp = (float*)aligned_alloc(64, (size_t)((P * jb->K * SG_NR * 4 + 63) / 64 * 64));
  if (!wp) return -1;
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t bi = u / split, c = u % split, p0 = P * c / split, p1 = P * (c + 1) / split;
    bmm_pack(jb->b + (jb->b_batch == 1 ? 0 : bi) * jb->K * jb->N, jb->N, jb->K, p0, p1, wp);
    const sg_job one = {jb->a + bi * jb->M * jb->K, wp, jb->y + bi * jb->M * jb->N, jb->M, jb->N, jb->K, 0, 0, 0, 0, 0, 0};
    sg_block(&one, 0, jb->M, p0, p1);
  }
  free(wp);
  return 0;
}

/* y[i] = a[i] @ b[i or 0] for i < batch (b_batch is batch or 1); 0, or -1 when scratch memory ran out */
int32_t kiln_cpu_sgemm_batched(const float* a, const float* b, float* y, int64_t batch, int64_t b_batch, int64_t M, int64_t N,
                               int64_t K) {
  if (batch <= 0 || M <= 0 || N <= 0) return 0;
  if (K <= 0) {
    memset(y, 0, (size_t)(batch * M * N) * sizeof(float));
    return 0;
  }
  bmm_job jb = {a, b, y, batch, b_batch, M, N, K};
  return kiln_parallel(bmm_task, &jb);
}


/* ---- q8 weights on the float GEMM --------------------------------------------------------------- */

/* y[M, N] = x[M, K] @ (s * q)^T, q8 weights (codes int8 [N, K], fp16 scales per 32 along K; K % 32
   == 0): each task decodes the panel slices it uses into fp32 and runs the float micro-kernel on
   them. For prompt-sized M on CPUs without VNNI, where the integer dot's multiply chain peaks at
   the FMA's rate (benchmarks/NOTES.md, Session 20): the weights' bytes stay a quarter, the
   arithmetic is the float GEMM's (activations unrounded). 0, or -1 when scratch memory ran out. */
int32_t kiln_cpu_sgemm_q8(const float* x, const int8_t* q, const uint16_t* s, float* y, int64_t M, int64_t N, int64_t K) {
  if (M <= 0 || N <= 0) return 0;
  if (K <= 0) {
    memset(y, 0, (size_t)(M * N) * sizeof(float));
    return 0;
  }
  sg_job jb = {x, 0, y, M, N, K, q, s, 0, 0, 0, 0};
  return kiln_parallel(sg_task, &jb);
}
