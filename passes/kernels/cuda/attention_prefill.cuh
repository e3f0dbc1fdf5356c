// kiln: ragged prefill attention on tensor cores (mma.sync, bf16/fp16), device function.
//
// Same contract as TVM's batch_prefill_ragged_kv: q [total_q, H_qo, D],
// k/v [total_kv, H_kv, D], q_indptr / kv_indptr [B + 1]; causal: query i of a
// sequence sees keys j <= i + (kv_len - q_len). Output [total_q, H_qo, D] and
// lse [total_q, H_qo] in base 2 (scores scaled by sm_scale * log2 e).
// (Before session 15: a two-pass WMMA kernel, 45-62 TF/s on the H200; this one
// 169-216 TF/s at 2048-8192 tokens: benchmarks/NOTES.md.)
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <stdint.h>

namespace kiln {

// FlashAttention-2 on mma.sync: the same contract and row-tile mapping as attn_prefill_ragged
// (TVM's batch_prefill_ragged_kv), one pass. A block = 64 query rows of one sequence and one
// query head, 4 warps of 16 rows; Q lives in registers as MMA A fragments; K / V tiles of 64
// keys come through a 2-deep cp.async ring in shared memory (rows of D 16-bit values, 16-byte
// chunks XOR-swizzled by row % 8 so ldmatrix reads are conflict-free); S = Q K^T in m16n8
// accumulators, online softmax on them in registers (each lane holds two rows: the m16n8 C
// layout is documented, unlike WMMA's), P re-packed from the S accumulators straight into A
// fragments for O += P V (V through ldmatrix.trans). Heavy row tiles (late in a causal
// sequence) are scheduled first. NW warps (4 or 8: 64 or 128 query rows share each K / V tile).
// Launch: grid (row-tile bound of 16 NW rows, H_qo), 32 NW threads, attn_fa2_smem_bytes<D, NW>()
// of dynamic shared memory.
template <int D, int NW = 4>
constexpr int attn_fa2_smem_bytes() { return (16 * NW * D + 2 * 2 * 64 * D) * 2; }

template <typename T, int D, int NW = 4>
__device__ __forceinline__ void attn_prefill_fa2(const T* __restrict__ q, const int32_t* __restrict__ q_indptr, const T* __restrict__ k,
                                                 const T* __restrict__ v, const int32_t* __restrict__ kv_indptr, T* __restrict__ out,
                                                 float* __restrict__ lse, int B, int H_qo, int H_kv, int causal, float sm_scale,
                                                 unsigned char* __restrict__ smem_raw) {
  constexpr int BQ = 16 * NW, BK = 64, CH = D / 8, NT = 32 * NW;  // CH: 16-byte chunks per row
  static_assert(D % 16 == 0 && D <= 256, "head_dim");
  T* Qs = reinterpret_cast<T*>(smem_raw);
  T* Ks = Qs + BQ * D;          // [2][BK][D]
  T* Vs = Ks + 2 * BK * D;      // [2][BK][D]

  int tile = gridDim.x - 1 - blockIdx.x, b = 0, q_len = 0;  // reversed: the blocks with the most keys first
  for (; b < B; ++b) {
    q_len = q_indptr[b + 1] - q_indptr[b];
    const int tiles = (q_len + BQ - 1) / BQ;
    if (tile < tiles) break;
    tile -= tiles;
  }
  if (b >= B) return;
  const int row_in_seq0 = tile * BQ, q0 = q_indptr[b] + row_in_seq0;
  const int kv0 = kv_indptr[b], kv_len = kv_indptr[b + 1] - kv0;
  const int h = blockIdx.y, kvh = h / (H_qo / H_kv);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, qd = lane % 4;
  const int rows = min(BQ, q_len - row_in_seq0);
  const int shift = kv_len - q_len;  // causal: query row r (in the sequence) sees keys j <= r + shift
  const int kv_end = causal ? min(kv_len, row_in_seq0 + rows + shift) : kv_len;
  const int n_tiles = kv_end > 0 ? (kv_end + BK - 1) / BK : 0;
  const float scale = sm_scale * 1.4426950408889634f;

  auto sw = [](int row, int c) { return row * D + ((c ^ (row & 7)) << 3); };  // element offset of chunk c of a row
  auto load_rows = [&](T* dst, const T* src, size_t stride, int first, int count, int limit) {
    for (int i = tid; i < count * CH; i += NT) {
      const int r = i / CH, c = i % CH, j = first + r;
      cp_async16(dst + sw(r, c), src + (size_t)min(j, max(limit - 1, 0)) * stride + c * 8, j < limit);
    }
  };
  const size_t qstride = (size_t)H_qo * D, kvstride = (size_t)H_kv * D;
  load_rows(Qs, q + (size_t)q_indptr[b] * qstride + (size_t)h * D, qstride, row_in_seq0, BQ, q_len);
  if (n_tiles > 0) {
    load_rows(Ks, k + (size_t)kv0 * kvstride + (size_t)kvh * D, kvstride, 0, BK, kv_len);
    load_rows(Vs, v + (size_t)kv0 * kvstride + (size_t)kvh * D, kvstride, 0, BK, kv_len);
  }
  cp_async_commit();

  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m_r[2] = {-INFINITY, -INFINITY}, l_r[2] = {0.f, 0.f};  // rows g and g + 8 of this warp
  uint32_t qf[D / 16][4];
  const int r_lo = row_in_seq0 + warp * 16 + g;  // this lane's first row, as a sequence index

  for (int t = 0; t < n_tiles; ++t) {
    const int j0 = t * BK, buf = t & 1;
    if (t + 1 < n_tiles) {  // prefetch the next tile into the other slot (free: last iteration ended with a barrier)
      load_rows(Ks + (buf ^ 1) * BK * D, k + (size_t)kv0 * kvstride + (size_t)kvh * D, kvstride, j0 + BK, BK, kv_len);
      load_rows(Vs + (buf ^ 1) * BK * D, v + (size_t)kv0 * kvstride + (size_t)kvh * D, kvstride, j0 + BK, BK, kv_len);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    if (t == 0) {
#pragma unroll
      for (int kc = 0; kc < D / 16; ++kc) {
        const int row = warp * 16 + (lane % 8) + ((lane / 8) % 2) * 8, c = kc * 2 + lane / 16;
        ldmatrix_x4(qf[kc], Qs + sw(row, c));
      }
    }
    const T* Kt = Ks + buf * BK * D;
    const T* Vt = Vs + buf * BK * D;

    // S = Q K^T: 16 rows x 64 keys per warp, 8 n-tiles of 8 keys
    float s[BK / 8][4];
#pragma unroll
    for (int nt = 0; nt < BK / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
    for (int kc = 0; kc < D / 16; ++kc) {
#pragma unroll
      for (int np = 0; np < BK / 16; ++np) {  // two n-tiles per ldmatrix.x4
        uint32_t kb[4];
        const int row = np * 16 + (lane % 8) + (lane / 16) * 8, c = kc * 2 + (lane / 8) % 2;
        ldmatrix_x4(kb, Kt + sw(row, c));
        mma_16816<T>(s[2 * np], qf[kc][0], qf[kc][1], qf[kc][2], qf[kc][3], kb[0], kb[1]);
        mma_16816<T>(s[2 * np + 1], qf[kc][0], qf[kc][1], qf[kc][2], qf[kc][3], kb[2], kb[3]);
      }
    }
    // scale, mask (past kv_len; causal: key > row + shift), online softmax per row
    const bool edge = j0 + BK > kv_len || (causal && j0 + BK - 1 > row_in_seq0 + warp * 16 + shift);
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < BK / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[nt][e] * scale;
        if (edge) {
          const int j = j0 + nt * 8 + 2 * qd + (e & 1), r = r_lo + (e >= 2 ? 8 : 0);
          if (j >= kv_len || (causal && j > r + shift)) x = -INFINITY;
        }
        s[nt][e] = x;
        mx[e >> 1] = fmaxf(mx[e >> 1], x);
      }
    float alpha[2], m_use[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
      const float m_new = fmaxf(m_r[i], mx[i]);
      m_use[i] = m_new == -INFINITY ? 0.f : m_new;  // a row with no visible key yet: exp2(-inf - 0) = 0
      alpha[i] = exp2f(m_r[i] - m_use[i]);
      m_r[i] = m_new;
    }
    float rs[2] = {0.f, 0.f};
#pragma unroll
    for (int nt = 0; nt < BK / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float p = exp2f(s[nt][e] - m_use[e >> 1]);
        s[nt][e] = p;
        rs[e >> 1] += p;
      }
#pragma unroll
    for (int i = 0; i < 2; ++i) l_r[i] = l_r[i] * alpha[i] + rs[i];  // (lane partial sums; the quad's are added at the end)
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      o[dt][0] *= alpha[0]; o[dt][1] *= alpha[0];
      o[dt][2] *= alpha[1]; o[dt][3] *= alpha[1];
    }
    // O += P V: P's A fragments are the S accumulators of n-tiles 2 kc and 2 kc + 1
#pragma unroll
    for (int kc = 0; kc < BK / 16; ++kc) {
      const uint32_t a0 = pack_pair<T>(s[2 * kc][0], s[2 * kc][1]), a1 = pack_pair<T>(s[2 * kc][2], s[2 * kc][3]);
      const uint32_t a2 = pack_pair<T>(s[2 * kc + 1][0], s[2 * kc + 1][1]), a3 = pack_pair<T>(s[2 * kc + 1][2], s[2 * kc + 1][3]);
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {  // two d-tiles of 8 per ldmatrix.x4.trans
        uint32_t vb[4];
        const int row = kc * 16 + (lane % 8) + ((lane / 8) % 2) * 8, c = dp * 2 + lane / 16;
        ldmatrix_x4_trans(vb, Vt + sw(row, c));
        mma_16816<T>(o[2 * dp], a0, a1, a2, a3, vb[0], vb[1]);
        mma_16816<T>(o[2 * dp + 1], a0, a1, a2, a3, vb[2], vb[3]);
      }
    }
    __syncthreads();  // every warp is done with this slot before it is refilled
  }
  cp_async_wait<0>();

  // the quad's partial row sums, normalise, write O and lse (base 2)
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l_r[i] += __shfl_xor_sync(0xffffffffu, l_r[i], 1);
    l_r[i] += __shfl_xor_sync(0xffffffffu, l_r[i], 2);
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int rr = warp * 16 + g + i * 8;
    if (rr >= rows) continue;
    const float inv = l_r[i] > 0.f ? 1.f / l_r[i] : 0.f;
    T* dst = out + (size_t)(q0 + rr) * qstride + (size_t)h * D;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt)
      *reinterpret_cast<uint32_t*>(dst + dt * 8 + 2 * qd) = pack_pair<T>(o[dt][2 * i] * inv, o[dt][2 * i + 1] * inv);
    if (qd == 0) lse[(size_t)(q0 + rr) * H_qo + h] = l_r[i] > 0.f ? m_r[i] + log2f(l_r[i]) : -1e30f;
  }
}

}  // namespace kiln
