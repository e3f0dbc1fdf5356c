// kiln: quantized paged KV cache (int8 / fp8 e4m3, one fp32 scale per token and
// kv head), device functions called from TIR (compiler/kernels/kv_quant_cuda.py).
// Formats and the bit-level fp8 codec: passes/kv_quant.py (the same arithmetic
// as the CPU kernels, so both caches hold the same bytes).
//   k, v    [s, H_kv, D]            this call's rows after RoPE
//   meta    [1 + pages] int32       meta[0]: position of row 0; then the page table
//   pages   [layers, num_pages, 2, H_kv, P, D]  codes (int8 / uint8)
//   scales  [layers, num_pages, 2, H_kv, P]     fp32
//   q, out  [s, H_qo, D]            row r sits at position meta[0] + r (causal)
#pragma once
#include <cuda_fp8.h>
#include <stdint.h>

namespace kiln {

template <int FMT>
__device__ __forceinline__ uint8_t kv_encode(float y) {
  if constexpr (FMT == kKvInt8) {
    return static_cast<uint8_t>(static_cast<int8_t>(fminf(fmaxf(rintf(y), -127.f), 127.f)));
  } else {
    const float a = fabsf(y);
    const int mag = __float_as_int(a);
    const int r = mag + 0x7FFFF + ((mag >> 20) & 1);
    int c = min(max((r >> 20) - (120 << 3), 0), 0x7E);
    if (a < 0.015625f) c = 0;  // under 2^-6: flushed (no subnormal codes)
    return static_cast<uint8_t>(c | (((__float_as_int(y) >> 31) & 1) << 7));
  }
}

// One warp per (row, kv head, k|v): the row's maximum, its scale, its codes.
template <typename T, int D, int FMT>
__device__ __forceinline__ void kv_quant_append(const T* __restrict__ k, const T* __restrict__ v, const int32_t* __restrict__ meta,
                                                void* pages_, float* __restrict__ scales, int s, int H_kv,
                                                int page_size, int64_t num_pages, int64_t layer) {
  constexpr int PER = (D + 31) / 32;
  uint8_t* __restrict__ pages = static_cast<uint8_t*>(pages_);  // int8 or uint8 codes: bytes here
  const int job = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (job >= s * H_kv * 2) return;
  const int t = job / (H_kv * 2), h = job / 2 % H_kv, kv = job % 2;
  const T* src = (kv ? v : k) + ((size_t)t * H_kv + h) * D;
  float x[PER], amax = 0.f;
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int d = lane + 32 * i;
    x[i] = d < D ? to_float(src[d]) : 0.f;
    amax = fmaxf(amax, fabsf(x[i]));
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  const int pos = meta[0] + t;
  const int64_t page = meta[1 + pos / page_size];
  const size_t row = ((((size_t)layer * num_pages + page) * 2 + kv) * H_kv + h) * page_size + pos % page_size;
  const float inv = amax > 0.f ? __fdiv_rn(kv_qmax<FMT>(), amax) : 0.f;
  if (lane == 0) scales[row] = __fdiv_rn(amax, kv_qmax<FMT>());
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int d = lane + 32 * i;
    if (d < D) pages[row * D + d] = kv_encode<FMT>(__fmul_rn(x[i], inv));
  }
}

// Attention over the quantized pages, split-KV. One block per (row, kv head,
// query-head chunk, split), NW warps; lane groups of L = D / VEC lanes take one
// key each per iteration (VEC codes = one 8- or 16-byte load per lane), each
// group keeps an online softmax for the G query heads of its chunk; the block
// merges its groups and writes the split's unnormalised O, max and sum to
//   ws [s * H_qo, num_splits, D + 2]
// which kiln::split_merge (attention_decode.cuh) reduces; with one split
// the output is written here directly.
template <typename T, int D, int G, int NW, int FMT>
__device__ __forceinline__ void kv_quant_attention_partial(
    const T* __restrict__ Q, const int32_t* __restrict__ meta, const void* pages_, const float* __restrict__ scales,
    float* __restrict__ ws, T* __restrict__ out, float* __restrict__ lse, int H_kv, int q_chunks, int page_size, int64_t num_pages,
    int64_t layer, int num_splits, float sm_scale) {
  const uint8_t* __restrict__ pages = static_cast<const uint8_t*>(pages_);
  constexpr int VEC = D >= 256 ? 16 : 8;  // codes per lane per row: one 8- or 16-byte load
  constexpr int L = D / VEC;
  static_assert(L >= 1 && L <= 32 && (32 % L) == 0, "head_dim must be 32/64/128/256");
  constexpr int TPW = 32 / L;
  constexpr int GROUPS = NW * TPW;
  const int split = blockIdx.x % num_splits;
  const int qc = (blockIdx.x / num_splits) % q_chunks;
  const int rh = blockIdx.x / num_splits / q_chunks;
  const int kvh = rh % H_kv, r = rh / H_kv;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int grp = warp * TPW + lane / L, li = lane % L;
  const int len = meta[0] + r + 1;
  const int per = (len + num_splits - 1) / num_splits;
  const int t_begin = split * per, t_end = min(len, t_begin + per);
  const int H_qo = H_kv * G * q_chunks;
  const int h0 = (kvh * q_chunks + qc) * G;

  float q[G][VEC];
  const float qscale = sm_scale * 1.4426950408889634f;
#pragma unroll
  for (int g = 0; g < G; ++g) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) q[g][j] = to_float(Q[((size_t)r * H_qo + h0 + g) * D + li * VEC + j]) * qscale;
  }
  float m[G], l[G], o[G][VEC];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = kNegBig; l[g] = 0.f;
#pragma unroll
    for (int j = 0; j < VEC; ++j) o[g][j] = 0.f;
  }
  const size_t layer_rows = (size_t)layer * num_pages * 2 * H_kv * page_size;
  const size_t v_rows = (size_t)H_kv * page_size;  // K row -> V row within a page
  // Every lane runs the same iterations (the shuffles need the whole warp); a
  // lane group past the end loads key 0 and discards it. Loads are pipelined in
  // registers ST iterations ahead, page-table entries 2 ST ahead (the index a
  // load needs has arrived when it is issued). The online softmax advances ST
  // keys at a time: one max, one rescale of the accumulators per ST keys.
  // Measured on H100 (8B, 32k, bf16 weights; bf16 KV with the cp.async ring:
  // 127 tok/s): one key at a time, 8-byte loads, no pipeline: int8 114, fp8 104
  // (I2F / bit decoding); a 4-deep register pipeline with a rescale per key:
  // 88-99 (compute-bound, ~200 instructions per key); this (2 deep, rescale per
  // 2 keys, PRMT / cvt decoding, 128 registers, 528 blocks): int8 126-129,
  // fp8 127-130; 4 deep (167 registers, 396 blocks): 121-122.
  constexpr int ST = 2;
  constexpr int W = VEC / 4;  // 32-bit words of codes per lane per row
  const int gl = lane / L;
  const int first = t_begin + warp * TPW;
  const int iters = first < t_end ? (t_end - first + GROUPS - 1) / GROUPS : 0;
  auto key_of = [&](int it) { const int t = first + it * GROUPS + gl; return t < t_end ? t : 0; };  // key 0 always exists
  auto page_of = [&](int it) { return meta[1 + key_of(it) / page_size]; };
  int pg[ST];
  uint32_t kw[ST][W], vw[ST][W];
  float ks[ST], vs[ST];
  auto load = [&](int slot, int it, int page) {
    const size_t krow = layer_rows + ((size_t)page * 2 * H_kv + kvh) * page_size + key_of(it) % page_size;
    const uint8_t* kp = pages + krow * D + li * VEC;
    const uint8_t* vp = pages + (krow + v_rows) * D + li * VEC;
    if constexpr (VEC == 16) {
      const uint4 x = __ldg(reinterpret_cast<const uint4*>(kp)), y = __ldg(reinterpret_cast<const uint4*>(vp));
      kw[slot][0] = x.x; kw[slot][1] = x.y; kw[slot][2] = x.z; kw[slot][3] = x.w;
      vw[slot][0] = y.x; vw[slot][1] = y.y; vw[slot][2] = y.z; vw[slot][3] = y.w;
    } else {
      const uint2 x = __ldg(reinterpret_cast<const uint2*>(kp)), y = __ldg(reinterpret_cast<const uint2*>(vp));
      kw[slot][0] = x.x; kw[slot][1] = x.y; vw[slot][0] = y.x; vw[slot][1] = y.y;
    }
    ks[slot] = __ldg(scales + krow);
    vs[slot] = __ldg(scales + krow + v_rows);
  };
#pragma unroll
  for (int st = 0; st < ST; ++st) pg[st] = page_of(st);
#pragma unroll
  for (int st = 0; st < ST; ++st) {
    load(st, st, pg[st]);
    pg[st] = page_of(st + ST);
  }
  for (int it0 = 0; it0 < iters; it0 += ST) {
    float sc[ST][G], vsc[ST];
    uint32_t vcode[ST][W];
    bool valid[ST];
#pragma unroll
    for (int st = 0; st < ST; ++st) {
      const int it = it0 + st;
      valid[st] = it < iters && first + it * GROUPS + gl < t_end;
      float kf[VEC];
#pragma unroll
      for (int w = 0; w < W; ++w) { kv_decode4<FMT>(kw[st][w], kf + 4 * w); vcode[st][w] = vw[st][w]; }
      const float kscale = ks[st];
      vsc[st] = vs[st];
      load(st, it + ST, pg[st]);  // the slot's next key, ST iterations ahead
      pg[st] = page_of(it + 2 * ST);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float x = 0.f;
#pragma unroll
        for (int j = 0; j < VEC; ++j) x += q[g][j] * kf[j];
#pragma unroll
        for (int off = L / 2; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
        sc[st][g] = valid[st] ? x * kscale : kNegBig;
      }
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float m_new = m[g];
#pragma unroll
      for (int st = 0; st < ST; ++st) m_new = fmaxf(m_new, sc[st][g]);
      const float scale = exp2f(m[g] - m_new);
      l[g] *= scale;
#pragma unroll
      for (int j = 0; j < VEC; ++j) o[g][j] *= scale;
      m[g] = m_new;
    }
#pragma unroll
    for (int st = 0; st < ST; ++st) {
      float vf[VEC];
#pragma unroll
      for (int w = 0; w < W; ++w) kv_decode4<FMT>(vcode[st][w], vf + 4 * w);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        const float p = valid[st] ? exp2f(sc[st][g] - m[g]) : 0.f;
        l[g] += p;
        const float pv = p * vsc[st];
#pragma unroll
        for (int j = 0; j < VEC; ++j) o[g][j] += pv * vf[j];
      }
    }
  }
  __shared__ float smem[(2 + D) * GROUPS * G];
  merge_lane_groups<T, D, G, VEC, GROUPS>(m, l, o, smem, grp, li, (size_t)r * H_qo + h0, split, num_splits, ws, out, lse);
}

}  // namespace kiln
