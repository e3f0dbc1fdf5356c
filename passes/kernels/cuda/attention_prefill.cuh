// kiln: ragged prefill attention on tensor cores (WMMA, bf16/fp16), device function.
//
// Same contract as TVM's batch_prefill_ragged_kv: q [total_q, H_qo, D],
// k/v [total_kv, H_kv, D], q_indptr / kv_indptr [B + 1]; causal: query i of a
// sequence sees keys j <= i + (kv_len - q_len). Output [total_q, H_qo, D] and
// lse [total_q, H_qo] in base 2 (scores scaled by sm_scale * log2 e).
//
// One block = 64 query rows of one sequence and one query head; 4 warps, each
// owning 16 rows. Two passes over the key tiles (32 keys each): pass 1 finds
// every row's max and softmax denominator (S = Q K^T on tensor cores, row
// statistics by the lanes from shared memory); pass 2 recomputes S, forms
// P = exp2(S - m) / l in bf16 and accumulates O += P V in WMMA fragments.
// Recomputing S costs one extra Q K^T but no accumulator ever needs a
// per-row rescale (whose register layout WMMA does not expose).
// Launch: grid (num_tiles_bound, H_qo), 128 threads, static shared memory ~44 KB.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <stdint.h>

namespace kiln {

template <typename T, int D>
__device__ __forceinline__ void attn_prefill_ragged(const T* __restrict__ q, const int32_t* __restrict__ q_indptr, const T* __restrict__ k,
                                                    const T* __restrict__ v, const int32_t* __restrict__ kv_indptr, T* __restrict__ out,
                                                    float* __restrict__ lse, int B, int H_qo, int H_kv, int causal, float sm_scale) {
  using namespace nvcuda;
  constexpr int BQ = 64, BK = 32, LDQ = D + 8, LDS = BK + 4, NW = 4;
  static_assert(D % 16 == 0, "head_dim must be a multiple of 16");
  __shared__ __align__(32) T Qs[BQ * LDQ];
  __shared__ __align__(32) T Ks[BK * LDQ];  // K tile; in pass 2 also P (after S is formed)
  __shared__ __align__(32) T Vs[BK * LDQ];
  __shared__ __align__(32) float Ss[BQ * LDS];
  __shared__ float row_m[BQ], row_l[BQ];
  // P [BQ][BK + 8] reuses the K tile when it fits (D >= 128: keeps the block under 48 KB)
  constexpr bool kAlias = BK * LDQ >= BQ * (BK + 8);
  __shared__ __align__(32) T Pown[kAlias ? 16 : BQ * (BK + 8)];
  T* Ps = kAlias ? Ks : Pown;

  // ---- which sequence and row tile is this block?
  int tile = blockIdx.x, b = 0, q0 = 0, q_len = 0;
  for (; b < B; ++b) {
    q_len = q_indptr[b + 1] - q_indptr[b];
    const int tiles = (q_len + BQ - 1) / BQ;
    if (tile < tiles) break;
    tile -= tiles;
  }
  if (b >= B) return;
  q0 = q_indptr[b] + tile * BQ;  // first global query row of the block
  const int row_in_seq0 = tile * BQ;
  const int kv0 = kv_indptr[b], kv_len = kv_indptr[b + 1] - kv0;
  const int h = blockIdx.y, kvh = h / (H_qo / H_kv);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int rows = min(BQ, q_len - row_in_seq0);
  const int shift = kv_len - q_len;  // causal offset
  const int kv_end = causal ? min(kv_len, row_in_seq0 + rows + shift) : kv_len;
  const float scale = sm_scale * 1.4426950408889634f;

  // ---- Q tile (rows past the end are zero)
  for (int i = tid; i < BQ * (D / 8); i += NW * 32) {
    const int r = i / (D / 8), c = (i % (D / 8)) * 8;
    uint4 val = make_uint4(0, 0, 0, 0);
    if (r < rows) val = *reinterpret_cast<const uint4*>(q + ((size_t)(q0 + r) * H_qo + h) * D + c);
    *reinterpret_cast<uint4*>(Qs + r * LDQ + c) = val;
  }
  if (tid < BQ) { row_m[tid] = -1e30f; row_l[tid] = 0.f; }

  auto load_tile = [&](T* dst, const T* src, int j0) {
    for (int i = tid; i < BK * (D / 8); i += NW * 32) {
      const int r = i / (D / 8), c = (i % (D / 8)) * 8;
      uint4 val = make_uint4(0, 0, 0, 0);
      if (j0 + r < kv_len) val = *reinterpret_cast<const uint4*>(src + ((size_t)(kv0 + j0 + r) * H_kv + kvh) * D + c);
      *reinterpret_cast<uint4*>(dst + r * LDQ + c) = val;
    }
  };
  // S (this warp's 16 rows x BK keys) = Q K^T, into Ss
  auto scores = [&]() {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> s[BK / 16];
#pragma unroll
    for (int n = 0; n < BK / 16; ++n) wmma::fill_fragment(s[n], 0.f);
#pragma unroll
    for (int kk = 0; kk < D; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
      wmma::load_matrix_sync(fa, Qs + warp * 16 * LDQ + kk, LDQ);
#pragma unroll
      for (int n = 0; n < BK / 16; ++n) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
        wmma::load_matrix_sync(fb, Ks + n * 16 * LDQ + kk, LDQ);
        wmma::mma_sync(s[n], fa, fb, s[n]);
      }
    }
#pragma unroll
    for (int n = 0; n < BK / 16; ++n) wmma::store_matrix_sync(Ss + warp * 16 * LDS + n * 16, s[n], LDS, wmma::mem_row_major);
    __syncwarp();
  };
  // lane -> (row of this warp, half of the 32 keys)
  const int lr = warp * 16 + lane / 2, half = (lane % 2) * (BK / 2);
  auto visible = [&](int row, int j) {  // key j (sequence index) visible to tile row `row`
    return j < kv_len && (!causal || j <= row_in_seq0 + row + shift);
  };

  // ---- pass 1: row max and denominator
  __syncthreads();
  for (int j0 = 0; j0 < kv_end; j0 += BK) {
    load_tile(Ks, k, j0);
    __syncthreads();
    scores();
    float mx = -1e30f;
#pragma unroll
    for (int c = 0; c < BK / 2; ++c)
      if (visible(lr, j0 + half + c)) mx = fmaxf(mx, Ss[lr * LDS + half + c] * scale);
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    const float m_old = row_m[lr], m_new = fmaxf(m_old, mx);
    float sum = 0.f;
#pragma unroll
    for (int c = 0; c < BK / 2; ++c)
      if (visible(lr, j0 + half + c)) sum += exp2f(Ss[lr * LDS + half + c] * scale - m_new);
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    __syncwarp();
    if (lane % 2 == 0) { row_l[lr] = row_l[lr] * exp2f(m_old - m_new) + sum; row_m[lr] = m_new; }
    __syncthreads();  // K tile consumed by every warp
  }

  // ---- pass 2: O = sum_j softmax(S)_j V_j
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> o[D / 16];
#pragma unroll
  for (int n = 0; n < D / 16; ++n) wmma::fill_fragment(o[n], 0.f);
  const float m_row = row_m[lr], inv_l = row_l[lr] > 0.f ? 1.f / row_l[lr] : 0.f;
  for (int j0 = 0; j0 < kv_end; j0 += BK) {
    load_tile(Ks, k, j0);
    load_tile(Vs, v, j0);
    __syncthreads();
    scores();
    __syncthreads();  // every warp has read the K tile: P may overwrite it
#pragma unroll
    for (int c = 0; c < BK / 2; ++c) {
      const int j = half + c;
      const float p = visible(lr, j0 + j) ? exp2f(Ss[lr * LDS + j] * scale - m_row) * inv_l : 0.f;
      Ps[lr * (BK + 8) + j] = from_float<T>(p);
    }
    __syncwarp();
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fp;
      wmma::load_matrix_sync(fp, Ps + warp * 16 * (BK + 8) + kk, BK + 8);
#pragma unroll
      for (int n = 0; n < D / 16; ++n) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fv;
        wmma::load_matrix_sync(fv, Vs + kk * LDQ + n * 16, LDQ);
        wmma::mma_sync(o[n], fp, fv, o[n]);
      }
    }
    __syncthreads();  // P and V consumed before the next tiles land
  }

  // ---- epilogue: O (already normalised) and lse
  float* scratch = Ss + warp * 16 * LDS;  // 16 x 16 floats per warp, stride 16
#pragma unroll
  for (int n = 0; n < D / 16; ++n) {
    wmma::store_matrix_sync(scratch, o[n], 16, wmma::mem_row_major);
    __syncwarp();
    for (int e = lane; e < 256; e += 32) {
      const int r = e / 16, c = e % 16, row = warp * 16 + r;
      if (row < rows) out[((size_t)(q0 + row) * H_qo + h) * D + n * 16 + c] = from_float<T>(scratch[e]);
    }
    __syncwarp();
  }
  if (lane % 2 == 0 && lr < rows) lse[(size_t)(q0 + lr) * H_qo + h] = row_l[lr] > 0.f ? row_m[lr] + log2f(row_l[lr]) : -1e30f;
}

}  // namespace kiln
