// kiln: multi-head latent attention (DeepSeek's MLA) over the latent page cache, on CUDA
// cores (v2: contiguous lane columns, a one-deep row pipeline; the tensor-core kernel is the next step,
// benchmarks/NOTES.md). Called from TIR (passes/kernels/mla_cuda.py); same layout as the
// CPU kernels (passes/kernels/mla_cpu.py):
//   latent [s, W]                     this call's rows (RMSNorm(c_kv), rope(k_pe))
//   meta   [1 + pages] int32          meta[0]: position of row 0; then the page table
//   pages  [layers, num_pages, P, W]  rows in the activations' dtype
//   scales [layers, num_pages, P]     fp32 (1 for float rows)
//   q      [s, H, W]                  absorbed query; row r sits at position meta[0] + r (causal)
//   out    [s, H, DV]                 softmax(q . rows) @ rows[:, :DV]
#pragma once
#include <stdint.h>

namespace kiln {

// One warp per row of this call: copied into its page slot.
template <typename T, int W>
__device__ __forceinline__ void mla_append(const T* __restrict__ kv, const int32_t* __restrict__ meta, T* __restrict__ pages,
                                           float* __restrict__ scales, int s, int page_size, int64_t num_pages, int64_t layer) {
  const int t = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (t >= s) return;
  const int pos = meta[0] + t;
  const size_t row = ((size_t)layer * num_pages + meta[1 + pos / page_size]) * page_size + pos % page_size;
  for (int d = lane; d < W; d += 32) pages[row * W + d] = kv[(size_t)t * W + d];
  if (lane == 0) scales[row] = 1.f;
}

// Split-KV stage 1. One block per (query row r, chunk of G heads, split), NW warps: warp w
// takes the split's keys w, w + NW, ...; lane i holds the contiguous columns
// [i CV, (i + 1) CV) of a row's first DV (the value part: CV = DV / 32, one or two 16-byte
// loads) and [DV + i CR, DV + (i + 1) CR) of the rope part (CR = ceil(R / 32), lanes past R
// hold nothing), for q (G heads) and for each key row; the next key's row is loaded while the
// current one is scored (one-deep register pipeline). Every warp keeps an online softmax per
// head; the block merges its warps (merge_lane_groups) and writes the final output (one split)
// or the split's unnormalised O, max and sum to
//   ws [s * H, num_splits, DV + 2]
// for split_merge (attention_decode.cuh).
template <typename T, int CV, int CR>
struct MlaRow {
  T v[CV];
  T r[CR > 0 ? CR : 1];
};

template <typename T, int DV, int R, int CV, int CR>
__device__ __forceinline__ void mla_load_row(MlaRow<T, CV, CR>& row, const T* __restrict__ p, int lane) {
  constexpr int BYTES = CV * (int)sizeof(T);
  if constexpr (BYTES % 16 == 0) {
#pragma unroll
    for (int i = 0; i < BYTES / 16; ++i)
      reinterpret_cast<uint4*>(row.v)[i] = __ldg(reinterpret_cast<const uint4*>(p + lane * CV) + i);
  } else {
#pragma unroll
    for (int i = 0; i < CV; ++i) row.v[i] = p[lane * CV + i];
  }
#pragma unroll
  for (int i = 0; i < CR; ++i) {
    const int d = lane * CR + i;
    row.r[i] = d < R ? p[DV + d] : from_float<T>(0.f);
  }
}

template <typename T, int W, int DV, int G, int NW>
__device__ __forceinline__ void mla_attention_partial(const T* __restrict__ Q, const int32_t* __restrict__ meta, const T* __restrict__ pages,
                                                      float* __restrict__ ws, T* __restrict__ out, float* __restrict__ lse, int H,
                                                      int page_size, int64_t num_pages, int64_t layer, int num_splits, float sm_scale) {
  constexpr int R = W - DV, CV = DV / 32, CR = (R + 31) / 32;
  static_assert(DV % 32 == 0 && R >= 0, "the value part (kv_lora_rank) must be a multiple of 32");
  const int chunks = H / G;
  const int split = blockIdx.x % num_splits;
  const int hc = (blockIdx.x / num_splits) % chunks;
  const int r = blockIdx.x / num_splits / chunks;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int len = meta[0] + r + 1;
  const int per = (len + num_splits - 1) / num_splits;
  const int t_begin = split * per, t_end = min(len, t_begin + per);
  const int h0 = hc * G;
  const float qscale = sm_scale * 1.4426950408889634f;  // scores in base 2, as the other attention kernels
  float qv[G][CV], qr[G][CR > 0 ? CR : 1], o[G][CV], m[G], l[G];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = kNegBig;
    l[g] = 0.f;
    const T* qh = Q + ((size_t)r * H + h0 + g) * W;
#pragma unroll
    for (int i = 0; i < CV; ++i) { qv[g][i] = to_float(qh[lane * CV + i]) * qscale; o[g][i] = 0.f; }
#pragma unroll
    for (int i = 0; i < CR; ++i) { const int d = lane * CR + i; qr[g][i] = d < R ? to_float(qh[DV + d]) * qscale : 0.f; }
  }
  const size_t base = (size_t)layer * num_pages * page_size;
  auto row_ptr = [&](int t) { return pages + (base + (size_t)meta[1 + t / page_size] * page_size + t % page_size) * W; };
  MlaRow<T, CV, CR> cur, nxt;
  int t = t_begin + warp;
  if (t < t_end) mla_load_row<T, DV, R, CV, CR>(cur, row_ptr(t), lane);
  for (; t < t_end; t += NW) {
    if (t + NW < t_end) mla_load_row<T, DV, R, CV, CR>(nxt, row_ptr(t + NW), lane);  // the next key, while this one is scored
    float kv[CV], kr[CR > 0 ? CR : 1];
#pragma unroll
    for (int i = 0; i < CV; ++i) kv[i] = to_float(cur.v[i]);
#pragma unroll
    for (int i = 0; i < CR; ++i) kr[i] = to_float(cur.r[i]);
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float x = 0.f;
#pragma unroll
      for (int i = 0; i < CV; ++i) x += qv[g][i] * kv[i];
#pragma unroll
      for (int i = 0; i < CR; ++i) x += qr[g][i] * kr[i];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
      const float m_new = fmaxf(m[g], x);
      const float scale = exp2f(m[g] - m_new), pe = exp2f(x - m_new);
      l[g] = l[g] * scale + pe;
#pragma unroll
      for (int i = 0; i < CV; ++i) o[g][i] = o[g][i] * scale + pe * kv[i];
      m[g] = m_new;
    }
    cur = nxt;
  }
  // the warps are attention_decode.cuh's lane groups of 32 lanes (lane i: columns i CV ..)
  __shared__ float smem[(2 + DV) * NW * G];
  merge_lane_groups<T, DV, G, CV, NW>(m, l, o, smem, warp, lane, (size_t)r * H + h0, split, num_splits, ws, out, lse);
}

// Each head's matrix applied to its slice of x (MLA's W_UK absorbed into the query, W_UV after
// attention): x [rows, H, K], y [rows, H, N].
//   TRANSPOSED = false: w [H, K, N] (W_UK: N = kv_lora contiguous). A block of 256 threads
//     takes 32 neighbouring outputs of one (row, head): lane = output, warp = one of 8 slices
//     of K (neighbouring lanes read neighbouring weights); the slices are summed in shared memory.
//   TRANSPOSED = true:  w [H, N, K] (W_UV: K = kv_lora contiguous), one warp per output,
//     lanes stride K, then a warp sum.
template <typename T, typename TW, int H, int K, int N, bool TRANSPOSED>
__device__ __forceinline__ void head_matmul(const T* __restrict__ x, const TW* __restrict__ w, T* __restrict__ y, int rows) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if constexpr (!TRANSPOSED) {
    constexpr int NT = (N + 31) / 32, KS = 8;
    const int jt = blockIdx.x % NT, h = blockIdx.x / NT % H;
    const int64_t r = blockIdx.x / NT / H;
    const int j = jt * 32 + lane;
    const T* xr = x + (r * H + h) * K;
    const TW* wh = w + (size_t)h * K * N + j;
    float acc = 0.f;
    if (j < N) {
#pragma unroll 4
      for (int k = warp; k < K; k += KS) acc += to_float(xr[k]) * to_float(wh[(size_t)k * N]);
    }
    __shared__ float part[KS][32];
    part[warp][lane] = acc;
    __syncthreads();
    if (warp == 0 && j < N) {
      float v = 0.f;
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) v += part[ks][lane];
      y[(r * H + h) * N + j] = from_float<T>(v);
    }
  } else {
    const int64_t out = (int64_t)blockIdx.x * (blockDim.x / 32) + warp;
    if (out >= (int64_t)rows * H * N) return;
    const int j = out % N, h = out / N % H;
    const int64_t r = out / N / H;
    const T* xr = x + (r * H + h) * K;
    const TW* wr = w + ((size_t)h * N + j) * K;
    float acc = 0.f;
    for (int k = lane; k < K; k += 32) acc += to_float(xr[k]) * to_float(wr[k]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) y[out] = from_float<T>(acc);
  }
}

}  // namespace kiln
