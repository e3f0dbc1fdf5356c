// kiln: mixture-of-experts decode kernels (frontends/models/moe.py), device functions.
//
//   topk_softmax          logits [T, E] fp32 -> ids [T, k] int32, weights [T, k] fp32
//   expert_gate_up_silu   x [T, D], W [E, 2F, D], ids -> a [T, k, F] = silu(W_e[n] x) * W_e[F + n] x
//   expert_down           a [T, k, F], W [E, D, F], ids, weights -> y [T, D] = sum_j w_j W_{e_j} a_j
//                         (+ residual [T, D])
//
// Expert ids stay device data (read by each block), so a decode step never goes
// back to the host and the whole step stays one CUDA graph. The GEMVs follow
// qgemv.cuh's v3 layout: a block's NW warps split the reduction of the same
// ROWS rows in 16-byte units, partial sums meet in shared memory. Gate and up
// rows of one output come from the same block, so SiLU * up is the epilogue (no
// [T, k, 2F] intermediate, no separate elementwise kernel); the routing weights
// and the sum over the k experts live in the down GEMV's reduction.
// Measured (H200, Qwen3-30B-A3B shape, bf16, batch 1, ncu): before, dlight's
// generic schedules: gate_up 21.0 us (2.4 TB/s), down 12.9 us, top-k 18.8 us in
// two kernels + routing weights 2.7 us per layer. After: benchmarks/NOTES.md.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace kiln {

// --- routing -----------------------------------------------------------------
// One warp per token; lane l holds the logits of experts l, l + 32, ... The k
// picks are k warp arg-max reductions over (logit, -index): ties go to the lower
// expert index, the rule of moe.py's te_topk_experts (and so of the CPU target).
// weights = exp(logit - max) / den; den = the chosen experts' sum (RENORM) or
// all E experts' (softmax over E, then the chosen probabilities).
// Launch: grid ceil(T / WARPS), block WARPS * 32.
template <int E, int KTOP, bool RENORM>
__device__ __forceinline__ void topk_softmax(const float* __restrict__ logits, int* __restrict__ ids, float* __restrict__ wts,
                                             int ntok) {
  constexpr int PER = (E + 31) / 32;
  static_assert(PER <= 32, "up to 1024 experts (one bit per held logit)");
  const int lane = threadIdx.x % 32;
  const int t = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (t >= ntok) return;  // the whole warp leaves together
  const float* row = logits + (size_t)t * E;
  float v[PER];
#pragma unroll
  for (int i = 0; i < PER; ++i) v[i] = i * 32 + lane < E ? row[i * 32 + lane] : -INFINITY;
  uint32_t taken = 0;  // bit i: expert 32 i + lane is chosen
  float pv[KTOP];
  int pi[KTOP];
#pragma unroll
  for (int j = 0; j < KTOP; ++j) {
    float bv = -INFINITY;
    int bi = 0x7fffffff;
#pragma unroll
    for (int i = 0; i < PER; ++i) {
      const int e = i * 32 + lane;
      if (e < E && !((taken >> i) & 1u) && (bi == 0x7fffffff || v[i] > bv)) {  // increasing e: strict > keeps the lowest
        bv = v[i];
        bi = e;
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, off);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, off);
      if (ov > bv || (ov == bv && oi < bi)) {
        bv = ov;
        bi = oi;
      }
    }
    if (bi % 32 == lane) taken |= 1u << (bi / 32);
    pv[j] = bv;
    pi[j] = bi;
  }
  const float mx = pv[0];  // the first pick is the largest logit
  float den = 0.f;
  if constexpr (RENORM) {
#pragma unroll
    for (int j = 0; j < KTOP; ++j) den += __expf(pv[j] - mx);
  } else {
#pragma unroll
    for (int i = 0; i < PER; ++i)
      if (i * 32 + lane < E) den += __expf(v[i] - mx);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) den += __shfl_xor_sync(0xffffffffu, den, off);
  }
  if (lane == 0) {
#pragma unroll
    for (int j = 0; j < KTOP; ++j) {
      ids[(size_t)t * KTOP + j] = pi[j];
      wts[(size_t)t * KTOP + j] = __expf(pv[j] - mx) / den;
    }
  }
}

// --- expert GEMVs ----------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void unit_to_float(const uint4& raw, float* out) {
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int j = 0; j < 16 / (int)sizeof(T); ++j) out[j] = to_float(e[j]);
}

template <typename T>
__device__ __forceinline__ float unit_dot(const uint4& w, const float* xf) {
  const T* e = reinterpret_cast<const T*>(&w);
  float d = 0.f;
#pragma unroll
  for (int j = 0; j < 16 / (int)sizeof(T); ++j) d = fmaf(xf[j], to_float(e[j]), d);
  return d;
}

// The expert GEMVs' shared steps (float and quantized, qmoe.cuh):
// a token's experts (clamped like moe.py's _expert: in bounds whatever ids hold) and
// routing weights in shared memory, for every warp of the block.
template <int KTOP>
__device__ __forceinline__ void routing_to_shared(const int* __restrict__ ids, const float* __restrict__ wts, int t, int n_exp, int* se,
                                                  float* sw) {
  if (threadIdx.x < KTOP) {
    se[threadIdx.x] = min(max(ids[t * KTOP + threadIdx.x], 0), n_exp - 1);
    sw[threadIdx.x] = wts[t * KTOP + threadIdx.x];
  }
  __syncthreads();
}

// acc: ROWS gate then ROWS up partial sums -> y[tj, n0 + r] = silu(gate_r) * up_r. Threads
// 0..ROWS-1 get the gate sums, ROWS..2 ROWS-1 the up sums: paired by shuffle.
template <typename T, int NW, int ROWS>
__device__ __forceinline__ void store_silu_mul(const float* acc, T* __restrict__ y, int tj, int n0, int F) {
  const float v = block_sum_rows<NW, 2 * ROWS>(acc);
  const float u = __shfl_down_sync(0xffffffffu, v, ROWS);
  const int n = n0 + threadIdx.x;
  if (threadIdx.x < ROWS && n < F) y[(size_t)tj * F + n] = from_float<T>(v / (1.f + __expf(-v)) * u);
}

// acc: ROWS partial sums -> y[t, d0 + r] (+ residual[t, d0 + r]).
template <typename T, int NW, int ROWS, bool RESIDUAL>
__device__ __forceinline__ void store_rows(const float* acc, const T* __restrict__ residual, T* __restrict__ y, int t, int d0, int D) {
  const float v = block_sum_rows<NW, ROWS>(acc);
  const int d = d0 + threadIdx.x;
  if (threadIdx.x < ROWS && d < D) {
    float out = v;
    if constexpr (RESIDUAL) out += to_float(residual[(size_t)t * D + d]);
    y[(size_t)t * D + d] = from_float<T>(out);
  }
}

// x [T, K], W [E, 2F, K] (gate rows 0..F-1, up rows F..2F-1 of each expert),
// ids [T, KTOP] -> y [T, KTOP, F]. Grid (ceil(F / ROWS), T * KTOP), block NW * 32.
template <typename T, int K, int KTOP, int NW, int ROWS>
__device__ __forceinline__ void expert_gate_up_silu(const T* __restrict__ x, const T* __restrict__ W, const int* __restrict__ ids,
                                                    T* __restrict__ y, int F, int n_exp) {
  constexpr int VEC = 16 / sizeof(T);
  static_assert(K % VEC == 0, "rows must be whole 16-byte units");
  constexpr int UNITS = K / VEC, NT = NW * 32;
  const int tj = blockIdx.y, t = tj / KTOP;
  const int e = min(max(ids[tj], 0), n_exp - 1);  // clamped like moe.py's _expert: in bounds whatever ids hold
  const int n0 = blockIdx.x * ROWS;
  const uint4* xu = reinterpret_cast<const uint4*>(x + (size_t)t * K);
  const uint4* wg[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) wg[r] = reinterpret_cast<const uint4*>(W + ((size_t)e * 2 * F + min(n0 + r, F - 1)) * K);
  const size_t up = (size_t)F * UNITS;  // gate row n -> up row F + n, in units
  float acc[2 * ROWS];
#pragma unroll
  for (int r = 0; r < 2 * ROWS; ++r) acc[r] = 0.f;
#pragma unroll 2
  for (int u = threadIdx.x; u < UNITS; u += NT) {
    uint4 w[2 * ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      w[r] = __ldg(wg[r] + u);
      w[ROWS + r] = __ldg(wg[r] + up + u);
    }
    float xf[VEC];
    unit_to_float<T>(__ldg(xu + u), xf);
#pragma unroll
    for (int r = 0; r < 2 * ROWS; ++r) acc[r] += unit_dot<T>(w[r], xf);
  }
  store_silu_mul<T, NW, ROWS>(acc, y, tj, n0, F);
}

// a [T, KTOP, F], W [E, D, F], ids [T, KTOP], wts [T, KTOP] fp32 (, residual [T, D])
// -> y [T, D] = sum_j wts_j * (W_{ids_j} @ a_j) (+ residual). The reduction runs over
// (j, f) as one axis of KTOP * F / VEC units. Grid (ceil(D / ROWS), T), block NW * 32.
template <typename T, int F, int KTOP, int NW, int ROWS, bool RESIDUAL>
__device__ __forceinline__ void expert_down(const T* __restrict__ a, const T* __restrict__ W, const int* __restrict__ ids,
                                            const float* __restrict__ wts, const T* __restrict__ residual, T* __restrict__ y, int D,
                                            int n_exp) {
  constexpr int VEC = 16 / sizeof(T);
  static_assert(F % VEC == 0, "rows must be whole 16-byte units");
  constexpr int UF = F / VEC, UNITS = KTOP * UF, NT = NW * 32;
  __shared__ int se[KTOP];
  __shared__ float sw[KTOP];
  const int t = blockIdx.y, d0 = blockIdx.x * ROWS;
  routing_to_shared<KTOP>(ids, wts, t, n_exp, se, sw);
  const uint4* au = reinterpret_cast<const uint4*>(a + (size_t)t * KTOP * F);
  float acc[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) acc[r] = 0.f;
#pragma unroll 2
  for (int u = threadIdx.x; u < UNITS; u += NT) {
    const int j = u / UF, c = u - j * UF;
    const uint4* wr = reinterpret_cast<const uint4*>(W + (size_t)se[j] * D * F) + c;
    uint4 w[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) w[r] = __ldg(wr + (size_t)min(d0 + r, D - 1) * UF);
    float xf[VEC];
    unit_to_float<T>(__ldg(au + u), xf);
    const float s = sw[j];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) acc[r] = fmaf(s, unit_dot<T>(w[r], xf), acc[r]);
  }
  store_rows<T, NW, ROWS, RESIDUAL>(acc, residual, y, t, d0, D);
}

// --- prompts: tokens grouped by expert, tensor-core GEMMs per group ---------------------
// A prompt's T x KTOP (token, expert) pairs are grouped by expert: expert e owns rows
// offsets[e] .. offsets[e + 1] of the grouped matrices, row r holds token rows[r], and
// pair (t, j) sits at row pos[t KTOP + j]. One block counts in shared memory; a row's
// place inside its group comes from an atomic, so the order within a group varies
// from run to run -- each row's result is computed alone, so the results do not.
// Launch: grid 1, block 1024.
template <int E, int KTOP>
__device__ __forceinline__ void expert_route(const int* __restrict__ ids, int* __restrict__ offsets, int* __restrict__ rows,
                                             int* __restrict__ pos, int ntok) {
  __shared__ int cnt[E];
  __shared__ int off[E + 1];
  for (int e = threadIdx.x; e < E; e += blockDim.x) cnt[e] = 0;
  __syncthreads();
  const int n = ntok * KTOP;
  for (int i = threadIdx.x; i < n; i += blockDim.x) pos[i] = atomicAdd(&cnt[min(max(ids[i], 0), E - 1)], 1);
  __syncthreads();
  if (threadIdx.x == 0) {
    int acc = 0;
    for (int e = 0; e < E; ++e) {
      off[e] = acc;
      acc += cnt[e];
    }
    off[E] = acc;
  }
  __syncthreads();
  for (int e = threadIdx.x; e <= E; e += blockDim.x) offsets[e] = off[e];
  for (int i = threadIdx.x; i < n; i += blockDim.x) {  // the same i as above: pos[i] is this thread's
    const int p = off[min(max(ids[i], 0), E - 1)] + pos[i];
    pos[i] = p;
    rows[p] = i / KTOP;
  }
}

// C[rows of expert e] = A[rows of expert e] . W[e]^T for every expert: gemm.cuh's
// 128 x 256 tiles, blockIdx.z the expert, blockIdx.y the M tile within its group
// (blocks past the group's rows leave at once). A [R, K], W [E, N, K], C [R, N].
// Launch: grid (ceil(N / 256), ceil(T / 128), E), 256 threads, GEMM_SMEM_BYTES.
// WG: the tile on Hopper's wgmma (gemm_wg.cuh; the same 128 x 256 tile, GEMM_WG_SMEM_BYTES), where built as sm_90a.
template <typename T, bool WG = false>
__device__ __forceinline__ void expert_gemm(const T* __restrict__ A, const T* __restrict__ W, const int* __restrict__ offsets,
                                            T* __restrict__ C, int N, int K, unsigned char* __restrict__ smem) {
  const int e = blockIdx.z, start = offsets[e], cnt = offsets[e + 1] - start, m0 = blockIdx.y * GEMM_BM;
  if (m0 >= cnt) return;  // the whole block
#ifdef KILN_HAVE_WGMMA
  if constexpr (WG) {
    gemm_wg_tile_wgmma<T, T, false>(A + (size_t)start * K, W + (size_t)e * N * K, nullptr, C + (size_t)start * N, nullptr, cnt, N, K, 0,
                                    K / WG_BK, 0, false, smem, m0, blockIdx.x * GEMM_BN);
    return;
  }
#endif
  gemm_tn_tile<T, false>(A + (size_t)start * K, W + (size_t)e * N * K, nullptr, C + (size_t)start * N, cnt, N, K, smem, m0,
                         blockIdx.x * GEMM_BN);
}

// The same over a quantized stack (gemm.cuh's gemm_tn_q tile: codes through the cp.async ring,
// decoded once per K step into a 16-bit tile). Expert e's rows of the format's arrays start at
// e N: codes (K / 2 or K bytes per row), scales and minima (K / G per row; fp8: one fp32 per row).
template <typename T, int CODE, int G, bool WG = false>
__device__ __forceinline__ void expert_qgemm(const T* __restrict__ A, const void* __restrict__ Qv, const void* __restrict__ Sv,
                                             const void* __restrict__ Zv, const int* __restrict__ offsets, T* __restrict__ C, int N, int K,
                                             unsigned char* __restrict__ smem) {
  const int e = blockIdx.z, start = offsets[e], cnt = offsets[e + 1] - start, m0 = blockIdx.y * GEMM_BM;
  if (m0 >= cnt) return;  // the whole block
  const size_t rows = (size_t)e * N, ng = CODE == 9 ? 1 : K / G;
  const uint8_t* q = static_cast<const uint8_t*>(Qv) + rows * (CODE == 4 ? K / 2 : K);
  const void* s = CODE == 9 ? static_cast<const void*>(static_cast<const float*>(Sv) + rows)
                            : static_cast<const void*>(static_cast<const __half*>(Sv) + rows * ng);
  const void* z = CODE == 4 ? static_cast<const void*>(static_cast<const __half*>(Zv) + rows * ng) : Zv;
#ifdef KILN_HAVE_WGMMA
  if constexpr (WG) {
    gemm_wg_tile_wgmma<T, T, false, CODE, G>(A + (size_t)start * K, q, nullptr, C + (size_t)start * N, nullptr,
                                                                            cnt, N, K, 0, K / WG_BK, 0, false, smem, m0, blockIdx.x * GEMM_BN, s, z);
    return;
  }
#endif
  gemm_tn_q_tile<T, CODE, G>(A + (size_t)start * K, q, s, z, C + (size_t)start * N, cnt, N, K, smem, m0, blockIdx.x * GEMM_BN);
}

// y[t] = sum_j w[t, j] z[pos[t KTOP + j]]: a prompt's expert outputs back in token order,
// weighted and summed in fp32. z [R, D] grouped rows, y [T, D]. Grid T, block 128.
template <typename T, int D, int KTOP>
__device__ __forceinline__ void expert_combine(const T* __restrict__ z, const int* __restrict__ pos, const float* __restrict__ wts,
                                               T* __restrict__ y) {
  constexpr int VEC = 16 / sizeof(T);
  static_assert(D % VEC == 0, "rows must be whole 16-byte units");
  const int t = blockIdx.x;
  int p[KTOP];
  float w[KTOP];
#pragma unroll
  for (int j = 0; j < KTOP; ++j) {
    p[j] = pos[t * KTOP + j];
    w[j] = wts[t * KTOP + j];
  }
  for (int u = threadIdx.x; u < D / VEC; u += blockDim.x) {
    float acc[VEC] = {};
#pragma unroll
    for (int j = 0; j < KTOP; ++j) {
      float f[VEC];
      unit_to_float<T>(__ldg(reinterpret_cast<const uint4*>(z + (size_t)p[j] * D) + u), f);
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] = fmaf(w[j], f[i], acc[i]);
    }
    uint4 out;
    T* o = reinterpret_cast<T*>(&out);
#pragma unroll
    for (int i = 0; i < VEC; ++i) o[i] = from_float<T>(acc[i]);
    reinterpret_cast<uint4*>(y + (size_t)t * D)[u] = out;
  }
}

}  // namespace kiln
