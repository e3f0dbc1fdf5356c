/* kiln's row softmax for CPUs (issue 18): y[r, :] = exp(x[r, :] - max) / sum, rows split between
   TVM's pool threads (kiln_pool.h).

     x  # [R, L] f32, y  # [R, L] f32 (may be x)

   Three passes over a row (max; exp stored into y and summed; scale), eight values per AVX2
   instruction, exp by TOPI's fast_exp polynomial (the one Relax's FastMathTransform gave these
   graphs before: 2^n by the exponent bits, a degree-7 polynomial of the remainder; ~1e-7
   relative). Why C: TVM's loops for the fused fast_softmax computed exp twice per value and
   kept scalar sums (BERT-base's 12 softmaxes 0.7-1.2 ms each for 12 x 128 x 128 values,
   benchmarks/NOTES.md Session 20). Elsewhere plain C with expf. */

#include "kiln_pool.h"

#include <math.h>
#include <stdint.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

static inline __m256 sm_exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-88.3762626647949f));
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693147181f), x);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static inline float sm_hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

static inline float sm_hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

static void sm_row(const float* x, float* y, int64_t L) {
  int64_t j = 0;
  float m = -INFINITY, s = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 mv = _mm256_set1_ps(-INFINITY);
  for (; j + 8 <= L; j += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(x + j));
  m = sm_hmax(mv);
#endif
  for (; j < L; ++j) m = x[j] > m ? x[j] : m;
  if (m == -INFINITY) { /* every value -inf (a row masked out): NaN, as onnxruntime's and TVM's softmax give */
    for (j = 0; j < L; ++j) y[j] = NAN;
    return;
  }
  j = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 m8 = _mm256_set1_ps(m);
  __m256 sv = _mm256_setzero_ps();
  for (; j + 8 <= L; j += 8) {
    const __m256 e = sm_exp8(_mm256_sub_ps(_mm256_loadu_ps(x + j), m8));
    _mm256_storeu_ps(y + j, e);
    sv = _mm256_add_ps(sv, e);
  }
  s = sm_hsum(sv);
#endif
  for (; j < L; ++j) {
    y[j] = expf(x[j] - m);
    s += y[j];
  }
  const float inv = 1.f / s;
  j = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 i8 = _mm256_set1_ps(inv);
  for (; j + 8 <= L; j += 8) _mm256_storeu_ps(y + j, _mm256_mul_ps(_mm256_loadu_ps(y + j), i8));
#endif
  for (; j < L; ++j) y[j] *= inv;
}

typedef struct {
  const float* x;
  float* y;
  int64_t R, L;
} sm_job;

static int sm_task(int t, kiln_penv* env, void* cdata) {
  const sm_job* jb = (const sm_job*)cdata;
  const int64_t r0 = jb->R * t / env->num_task, r1 = jb->R * (t + 1) / env->num_task;
  for (int64_t r = r0; r < r1; ++r) sm_row(jb->x + r * jb->L, jb->y + r * jb->L, jb->L);
  return 0;
}

/* softmax of each of R rows of L values; returns 0 */
int32_t kiln_cpu_softmax_rows(const float* x, float* y, int64_t R, int64_t L) {
  if (R <= 0 || L <= 0) return 0;
  sm_job jb = {x, y, R, L};
  if (R * L < 4096) { /* one task: the pool's wake-up costs more than the work */
    kiln_penv env = {0, 1};
    return sm_task(0, &env, &jb);
  }
  return kiln_parallel(sm_task, &jb);
}
