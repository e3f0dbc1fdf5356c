/* kiln's 2-D max pool over NHWC activations for CPUs (issue 18), output rows (b, oh) split
   between TVM's pool threads (kiln_pool.h).

     x  # [B, H, W, C] f32, y  # [B, OH, OW, C] f32

   y[b, oh, ow, c] = max over the taps (kh, kw) inside x of x[b, oh SH - PT + kh DH, ow SW - PL + kw DW, c];
   taps in the padding are skipped (a window with none gives -inf). OH / OW come from the caller,
   so ceil_mode is the caller's output size. Channels are contiguous in NHWC: 64 at a time in
   eight AVX2 accumulators, then 8, then one. Why C: TVM's loops for Relax's max_pool2d in
   NHWC took 0.5 ms of ResNet-50's stem pool (112 x 112 x 64 -> 56 x 56, 3 x 3 stride 2:
   benchmarks/NOTES.md). NaN: as maxps (a NaN tap may be dropped), unspecified by ONNX. */

#include "kiln_pool.h"

#include <math.h>
#include <stdint.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

typedef struct {
  const float* x;
  float* y;
  int64_t B, H, W, C, OH, OW, KH, KW, SH, SW, PT, PL, DH, DW;
} mp_job;

/* the taps of one window inside x, as offsets of its pixels from x's row start; returns their count */
static int64_t mp_taps(const mp_job* j, int64_t ih0, int64_t iw0, int64_t* off) {
  int64_t n = 0;
  for (int64_t kh = 0; kh < j->KH; ++kh) {
    const int64_t ih = ih0 + kh * j->DH;
    if (ih < 0 || ih >= j->H) continue;
    for (int64_t kw = 0; kw < j->KW; ++kw) {
      const int64_t iw = iw0 + kw * j->DW;
      if (iw >= 0 && iw < j->W) off[n++] = (ih * j->W + iw) * j->C;
    }
  }
  return n;
}

static void mp_pixel(const float* x, float* y, const int64_t* off, int64_t n, int64_t C) {
  int64_t c = 0;
#if defined(__AVX2__)
  for (; c + 64 <= C; c += 64) {
    __m256 a[8];
    for (int v = 0; v < 8; ++v) a[v] = _mm256_set1_ps(-INFINITY);
    for (int64_t t = 0; t < n; ++t) {
      const float* p = x + off[t] + c;
      for (int v = 0; v < 8; ++v) a[v] = _mm256_max_ps(a[v], _mm256_loadu_ps(p + 8 * v));
    }
    for (int v = 0; v < 8; ++v) _mm256_storeu_ps(y + c + 8 * v, a[v]);
  }
  for (; c + 8 <= C; c += 8) {
    __m256 a = _mm256_set1_ps(-INFINITY);
    for (int64_t t = 0; t < n; ++t) a = _mm256_max_ps(a, _mm256_loadu_ps(x + off[t] + c));
    _mm256_storeu_ps(y + c, a);
  }
#endif
  for (; c < C; ++c) {
    float m = -INFINITY;
    for (int64_t t = 0; t < n; ++t) {
      const float v = x[off[t] + c];
      m = v > m ? v : m;
    }
    y[c] = m;
  }
}

static int mp_task(int task, kiln_penv* env, void* cdata) {
  const mp_job* j = (const mp_job*)cdata;
  const int64_t rows = j->B * j->OH;
  const int64_t r0 = rows * task / env->num_task, r1 = rows * (task + 1) / env->num_task;
  int64_t off[64]; /* KH KW <= 64: kiln_cpu_max_pool2d_nhwc */
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / j->OH, oh = r % j->OH;
    const float* xb = j->x + b * j->H * j->W * j->C;
    float* yr = j->y + r * j->OW * j->C;
    for (int64_t ow = 0; ow < j->OW; ++ow) {
      const int64_t n = mp_taps(j, oh * j->SH - j->PT, ow * j->SW - j->PL, off);
      mp_pixel(xb, yr + ow * j->C, off, n, j->C);
    }
  }
  return 0;
}

/* max pool of x into y (shapes above); returns 0, nonzero for a window of more than 64 taps */
int32_t kiln_cpu_max_pool2d_nhwc(const float* x, float* y, int64_t B, int64_t H, int64_t W, int64_t C, int64_t OH, int64_t OW,
                                 int64_t KH, int64_t KW, int64_t SH, int64_t SW, int64_t PT, int64_t PL, int64_t DH, int64_t DW) {
  if (B <= 0 || OH <= 0 || OW <= 0 || C <= 0) return 0;
  if (KH * KW > 64) return -1;
  mp_job j = {x, y, B, H, W, C, OH, OW, KH, KW, SH, SW, PT, PL, DH, DW};
  if (B * OH * OW * C * KH * KW < 32768) { /* one task: the pool's wake-up costs more than the work */
    kiln_penv env = {0, 1};
    return mp_task(0, &env, &j);
  }
  return kiln_parallel(mp_task, &j);
}
