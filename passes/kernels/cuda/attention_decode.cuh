// kiln: split-KV paged decode attention (FlashDecoding-style), device functions.
//
// Called from TIR kernels (compiler/kernels/attention_cuda.py) through
// T.call_extern; the TIR side owns the launch (grid, block) and the workspace.
// Layouts are those of TVM's paged KV cache:
//   Q      [B, H_qo, D]                      (q head h reads kv head h / G)
//   pages  [num_pages, 2, H_kv, page_size, D] (K at [.,0], V at [.,1])
//   page_indptr [B + 1], page_values [nnz_pages], last_page_len [B]
// Scores are kept in base 2 (q pre-scaled by sm_scale * log2 e), as TVM's
// kernels do, so the lse written here merges with TVM's other attention parts.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace kiln {

constexpr float kNegBig = -1e30f;  // finite "minus infinity": exp2(kNegBig - m) is 0, never NaN
constexpr int kStages = 6;  // cp.async ring slots of the decode kernel: two iterations read, four in flight

// The end of a split-KV stage 1 (here and in kv_quant.cuh): merge the online
// softmax states (m, l, o) of a block's GROUPS lane groups through shared
// memory `smem` (2 GROUPS G + GROUPS G D floats, free when called) and write
// the block's result for query-head rows hrow0 .. hrow0 + G - 1: the final
// output and lse when num_splits == 1, else the split's unnormalised O, max
// and sum to ws [rows, num_splits, D + 2] for split_merge.
template <typename T, int D, int G, int VEC, int GROUPS>
__device__ __forceinline__ void merge_lane_groups(const float (&m)[G], const float (&l)[G], const float (&o)[G][VEC], float* smem,
                                                  int grp, int li, size_t hrow0, int split, int num_splits, float* __restrict__ ws,
                                                  T* __restrict__ out, float* __restrict__ lse) {
  float (*s_m)[G] = reinterpret_cast<float (*)[G]>(smem);
  float (*s_l)[G] = s_m + GROUPS;
  float (*s_o)[G][D] = reinterpret_cast<float (*)[G][D]>(smem + 2 * GROUPS * G);
#pragma unroll
  for (int g = 0; g < G; ++g) {
    if (li == 0) { s_m[grp][g] = m[g]; s_l[grp][g] = l[g]; }
#pragma unroll
    for (int j = 0; j < VEC; ++j) s_o[grp][g][li * VEC + j] = o[g][j];
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < G * D; idx += blockDim.x) {
    const int g = idx / D, d = idx % D;
    float M = kNegBig;
#pragma unroll
    for (int r = 0; r < GROUPS; ++r) M = fmaxf(M, s_m[r][g]);
    float Lsum = 0.f, O = 0.f;
#pragma unroll
    for (int r = 0; r < GROUPS; ++r) {
      const float w = exp2f(s_m[r][g] - M);
      Lsum += s_l[r][g] * w;
      O += s_o[r][g][d] * w;
    }
    const size_t h = hrow0 + g;
    if (num_splits == 1) {  // the whole context in this block: final output, no merge pass
      out[h * D + d] = from_float<T>(Lsum > 0.f ? O / Lsum : 0.f);
      if (d == 0) lse[h] = Lsum > 0.f ? M + log2f(Lsum) : kNegBig;
    } else {
      float* dst = ws + (h * num_splits + split) * (D + 2);
      dst[d] = O;
      if (d == 0) { dst[D] = M; dst[D + 1] = Lsum; }
    }
  }
}

// Stage 1. One block per (sequence b, kv head, query-head chunk, split); NW warps. The split's
// tokens are dealt round-robin to lane groups of L = D / VEC lanes (VEC
// elements each), TPW groups per warp; every group keeps an online softmax
// for G query heads of this kv head (the block's chunk of the group), then the block merges its groups and
// writes the split's unnormalised O, running max m and sum l to the workspace
//   ws [B * H_qo, num_splits, D + 2]   (O[0:D], m, l)
template <typename T, int D, int G, int NW>
__device__ __forceinline__ void attn_decode_partial(
    const T* __restrict__ Q, const T* __restrict__ pages, const int32_t* __restrict__ page_indptr,
    const int32_t* __restrict__ page_values, const int32_t* __restrict__ last_page_len, float* __restrict__ ws,
    T* __restrict__ out, float* __restrict__ lse,
    int H_kv, int q_chunks, int page_size, int num_splits, float sm_scale) {
  constexpr int VEC = (sizeof(T) == 2 ? 8 : 4) * (D >= 256 ? 2 : 1);
  constexpr int L = D / VEC;
  static_assert(L >= 1 && L <= 32 && (32 % L) == 0, "head_dim must be 32/64/128/256");
  constexpr int TPW = 32 / L;
  constexpr int GROUPS = NW * TPW;
  const int split = blockIdx.x % num_splits;
  const int qc = (blockIdx.x / num_splits) % q_chunks;
  const int bh = blockIdx.x / num_splits / q_chunks;
  const int kvh = bh % H_kv;
  const int b = bh / H_kv;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int grp = warp * TPW + lane / L, li = lane % L;

  const int p0 = page_indptr[b], p1 = page_indptr[b + 1];
  const int len = p1 > p0 ? (p1 - p0 - 1) * page_size + last_page_len[b] : 0;
  const int per = (len + num_splits - 1) / num_splits;
  const int t_begin = split * per, t_end = min(len, t_begin + per);
  const int H_qo = H_kv * G * q_chunks;
  const int h0 = (kvh * q_chunks + qc) * G;  // first query head of this block

  float q[G][VEC];
  const float qscale = sm_scale * 1.4426950408889634f;  // log2(e)
#pragma unroll
  for (int g = 0; g < G; ++g) {
    load_vec<T, VEC>(Q + ((size_t)b * H_qo + h0 + g) * D + li * VEC, q[g]);
#pragma unroll
    for (int j = 0; j < VEC; ++j) q[g][j] *= qscale;
  }
  float m[G], l[G], o[G][VEC];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = kNegBig; l[g] = 0.f;
#pragma unroll
    for (int j = 0; j < VEC; ++j) o[g][j] = 0.f;
  }
  const size_t kv_stride = (size_t)H_kv * page_size * D;  // K -> V within a page
  // Every lane of a warp runs the same number of iterations (the shuffles
  // need the whole warp); a lane group past the end contributes nothing.
  // One key per lane group per iteration, two iterations per turn: both keys'
  // scores (two independent shuffle chains), then one online-softmax update --
  // one exp2 of the old maximum and one rescale of o per two keys. K/V rows
  // stream through a per-warp ring of kStages shared-memory slots filled by
  // cp.async: each turn issues the two iterations four ahead into the slots
  // the previous turn read, and the page index is read one iteration ahead.
  // Measured on H100 (Llama-3-8B, 32k context, share of the bound counting
  // KV bytes), one key per update: register loads 70-71%; a 4-slot ring 75-76%
  // with 1056 blocks, 80-81.6% with 528. Two keys per update (H200, kernel
  // alone, benchmarks/kernels/attn_decode_check.cu): 128 sequences x 192 keys
  // 51.6 -> 42.0 us, 16 x 2048 85.9 -> 57.0, 1 x 32k 63.8 -> 55.4.
  constexpr int CH = VEC * (int)sizeof(T) / 16;  // 16-byte chunks per lane per row
  constexpr int RING = NW * kStages * TPW * 2 * D;  // elements of T
  constexpr int MERGE = (GROUPS * G * (D + 2)) * 4 / (int)sizeof(T);
  __shared__ __align__(16) T smem[RING > MERGE ? RING : MERGE];
  T* ring = smem + (size_t)warp * kStages * TPW * 2 * D;
  const int first = t_begin + warp * TPW;
  const int iters = first < t_end ? (t_end - first + GROUPS - 1) / GROUPS : 0;
  const int gl = lane / L;
  auto page_of = [&](int it) {
    const int t = first + it * GROUPS + gl;
    return t < t_end ? page_values[p0 + t / page_size] : 0;
  };
  int next_page = page_of(0);
  auto issue = [&](int it) {  // K and V of this lane group's key at iteration it into slot it % kStages
    const int t = first + it * GROUPS + gl;
    const bool ok = it < iters && t < t_end;
    const int page = next_page;
    next_page = page_of(it + 1);
    const T* kp = pages + ((size_t)page * 2 * H_kv + kvh) * page_size * D + (size_t)(ok ? t % page_size : 0) * D + li * VEC;
    T* dst = ring + ((it % kStages) * TPW + gl) * 2 * D + li * VEC;
#pragma unroll
    for (int c = 0; c < CH; ++c) {
      cp_async16(dst + c * (16 / sizeof(T)), kp + c * (16 / sizeof(T)), ok);
      cp_async16(dst + D + c * (16 / sizeof(T)), kp + kv_stride + c * (16 / sizeof(T)), ok);
    }
    cp_async_commit();
  };
#pragma unroll
  for (int s = 0; s < kStages - 2; ++s) issue(s);
  for (int it = 0; it < iters; it += 2) {
    issue(it + kStages - 2);  // into the slots of it - 2 and it - 1, read last turn (their values are in registers)
    issue(it + kStages - 1);
    cp_async_wait<kStages - 2>();  // iterations it and it + 1 landed (this lane's own copies)
    const int t0 = first + it * GROUPS + gl, t1 = t0 + GROUPS;
    const bool v0 = t0 < t_end, v1 = it + 1 < iters && t1 < t_end;
    const T* s0 = ring + ((it % kStages) * TPW + gl) * 2 * D + li * VEC;
    const T* s1 = ring + (((it + 1) % kStages) * TPW + gl) * 2 * D + li * VEC;
    float k0[VEC], k1[VEC], w0[VEC], w1[VEC];
    load_vec<T, VEC, false>(s0, k0);
    load_vec<T, VEC, false>(s1, k1);
    load_vec<T, VEC, false>(s0 + D, w0);
    load_vec<T, VEC, false>(s1 + D, w1);
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float a = 0.f, c = 0.f;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        a += q[g][j] * k0[j];
        c += q[g][j] * k1[j];
      }
#pragma unroll
      for (int off = L / 2; off > 0; off >>= 1) {
        a += __shfl_xor_sync(0xffffffffu, a, off);
        c += __shfl_xor_sync(0xffffffffu, c, off);
      }
      a = v0 ? a : kNegBig;
      c = v1 ? c : kNegBig;
      const float m_new = fmaxf(m[g], fmaxf(a, c));
      const float scale = exp2f(m[g] - m_new), pa = v0 ? exp2f(a - m_new) : 0.f, pc = v1 ? exp2f(c - m_new) : 0.f;
      l[g] = l[g] * scale + pa + pc;
#pragma unroll
      for (int j = 0; j < VEC; ++j) o[g][j] = o[g][j] * scale + pa * w0[j] + pc * w1[j];
      m[g] = m_new;
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the ring is reused for the merge below
  merge_lane_groups<T, D, G, VEC, GROUPS>(m, l, o, reinterpret_cast<float*>(smem), grp, li, (size_t)b * H_qo + h0, split, num_splits,
                                         ws, out, lse);
}

// Stage 2. One block per (b, q head), D threads: merge the splits, normalise,
// write O in the cache dtype and lse (base 2) as TVM's decode kernel does.
// The split weights exp2(m_s - M) are computed once, in parallel, into shared
// memory; then every thread sums its column over the splits.
constexpr int kMaxSplits = 512;

__device__ __forceinline__ float block_reduce(float v, bool is_max, float* red) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float o = __shfl_xor_sync(0xffffffffu, v, off);
    v = is_max ? fmaxf(v, o) : v + o;
  }
  const int warp = threadIdx.x / 32, nw = blockDim.x / 32;
  __syncthreads();  // red may still be read by a previous reduction
  if (threadIdx.x % 32 == 0) red[warp] = v;
  __syncthreads();
  float r = red[0];
  for (int w = 1; w < nw; ++w) r = is_max ? fmaxf(r, red[w]) : r + red[w];
  return r;
}

// Split-KV stage 2, for every split-KV kernel (decode, quantized KV, MLA): one block of
// COLS x SG threads per (query row x head, COLS of the D columns) reduces the splits' partial
// states -- block max, the splits' weights in shared memory, block sum, then each column's
// weighted sum, shared by SG thread groups (a quarter of the splits each for SG = 4: the serial
// sum over ~130 splits bounded the merge, 19.1 -> 6.7 us per MLA layer at 8k keys on the H200).
template <typename T, int D, int COLS, int SG>
__device__ __forceinline__ void split_merge(const float* __restrict__ ws, T* __restrict__ out, float* __restrict__ lse, int num_splits) {
  if (num_splits == 1) return;  // stage 1 wrote the output
  constexpr int TILES = D / COLS;
  __shared__ float w[kMaxSplits];
  __shared__ float red[32];
  __shared__ float part[SG][COLS];
  const int bh = blockIdx.x / TILES, c = threadIdx.x % COLS, sg = threadIdx.x / COLS;
  const int d = (blockIdx.x % TILES) * COLS + c;
  const float* src = ws + (size_t)bh * num_splits * (D + 2);
  float M = kNegBig;
  for (int s = threadIdx.x; s < num_splits; s += COLS * SG) M = fmaxf(M, src[s * (D + 2) + D]);
  M = block_reduce(M, true, red);
  float Lsum = 0.f;
  for (int s = threadIdx.x; s < num_splits; s += COLS * SG) {
    const float f = exp2f(src[s * (D + 2) + D] - M);
    w[s] = f;
    Lsum += src[s * (D + 2) + D + 1] * f;
  }
  Lsum = block_reduce(Lsum, false, red);  // its syncs also publish w[]
  float O = 0.f;
#pragma unroll 8
  for (int s = sg; s < num_splits; s += SG) O += src[s * (D + 2) + d] * w[s];
  part[sg][c] = O;
  __syncthreads();
  if (sg == 0) {
#pragma unroll
    for (int g = 1; g < SG; ++g) O += part[g][c];
    out[(size_t)bh * D + d] = from_float<T>(Lsum > 0.f ? O / Lsum : 0.f);
    if (d == 0) lse[bh] = Lsum > 0.f ? M + log2f(Lsum) : kNegBig;
  }
}

}  // namespace kiln
