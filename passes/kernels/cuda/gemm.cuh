// kiln: prefill GEMM on tensor cores (bf16/fp16 in, fp32 accumulate), device function.
//
//   C[M, N] = A[M, K] . B[N, K]^T  (+ R[M, N])       A, B, C, R row-major
//
// A is the activations (M = tokens), B the weights as stored ([out, in]).
// Block tile 128 x 256, K step 32, 8 warps as 2 (M) x 4 (N), each warp 64 x 64
// = 4 x 4 WMMA 16x16x16 fragments; A/B tiles in a GEMM_STAGES-deep cp.async
// ring in shared memory (rows padded by 8 elements against bank conflicts);
// rows past M or N are zero-filled. K must be a multiple of 32 (the TIR side
// checks). Launch: grid (ceil(N / 256), ceil(M / 128)), 256 threads,
// GEMM_SMEM_BYTES of dynamic shared memory (over 48 KB: TVM sets the opt-in).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <stdint.h>

namespace kiln {

constexpr int GEMM_BM = 128, GEMM_BN = 256, GEMM_BK = 32, GEMM_PAD = 8, GEMM_LDS = GEMM_BK + GEMM_PAD;
constexpr int GEMM_STAGE_ELEMS = (GEMM_BM + GEMM_BN) * GEMM_LDS;
constexpr int GEMM_STAGES = 3;
constexpr int GEMM_SMEM_BYTES = GEMM_STAGES * GEMM_STAGE_ELEMS * 2;  // 16-bit A and B tiles: 90 KB

// One K step of a warp's 64 x 64 sub-tile (warp wm, wn of 2 x 4): A tile
// [BM][LDS] and B tile [BN][LDS] in shared memory, 16-bit.
template <typename T>
__device__ __forceinline__ void gemm_mma_step(nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> (&acc)[4][4],
                                              const T* __restrict__ As, const T* __restrict__ Bs, int wm, int wn) {
  using namespace nvcuda;
#pragma unroll
  for (int kk = 0; kk < GEMM_BK; kk += 16) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[4];
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) wmma::load_matrix_sync(fa[i], As + (wm * 64 + i * 16) * GEMM_LDS + kk, GEMM_LDS);
#pragma unroll
    for (int j = 0; j < 4; ++j) wmma::load_matrix_sync(fb[j], Bs + (wn * 64 + j * 16) * GEMM_LDS + kk, GEMM_LDS);
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
  }
}

// Store a warp's 4 x 4 fragments (rows m_w.., columns n_w..) through a 16 x 16
// fp32 scratch per warp in `smem_raw` (free when called): 8 values per lane per
// fragment, rows past M / columns past N dropped, + R when RESIDUAL.
template <typename T, bool RESIDUAL>
__device__ __forceinline__ void gemm_epilogue(nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> (&acc)[4][4],
                                              const T* __restrict__ R, T* __restrict__ C, int M, int N, int m_w, int n_w,
                                              unsigned char* __restrict__ smem_raw) {
  using namespace nvcuda;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* scratch = reinterpret_cast<float*>(smem_raw) + warp * 256;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      wmma::store_matrix_sync(scratch, acc[i][j], 16, wmma::mem_row_major);
      __syncwarp();
      const int r = lane / 2, c0 = (lane % 2) * 8;
      const int gm = m_w + i * 16 + r, gn = n_w + j * 16 + c0;
      if (gm < M) {
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          if (gn + e < N) {
            float v = scratch[r * 16 + c0 + e];
            if constexpr (RESIDUAL) v += to_float(R[(size_t)gm * N + gn + e]);
            C[(size_t)gm * N + gn + e] = from_float<T>(v);
          }
        }
      }
      __syncwarp();
    }
  }
}

// The block's 128 x 256 tile at rows m0, columns n0 (gemm_tn: from the block index;
// moe.cuh's expert GEMM: within one expert's rows).
template <typename T, bool RESIDUAL>
__device__ __forceinline__ void gemm_tn_tile(const T* __restrict__ A, const T* __restrict__ B, const T* __restrict__ R, T* __restrict__ C,
                                             int M, int N, int K, unsigned char* __restrict__ smem_raw, int m0, int n0) {
  using namespace nvcuda;
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int wm = warp / 4, wn = warp % 4;  // warp's 64 x 64 sub-tile

  auto load_stage = [&](int stage, int k0) {
    T* As = smem + stage * GEMM_STAGE_ELEMS;
    T* Bs = As + GEMM_BM * GEMM_LDS;
    // rows of 4 chunks of 16 bytes: A 128 rows = 2 chunks per thread, B 256 rows = 4
#pragma unroll
    for (int i = 0; i < GEMM_BM * 4 / 256; ++i) {
      const int c = tid + i * 256, row = c / 4, col = (c % 4) * 8;
      const int am = m0 + row;
      cp_async16(As + row * GEMM_LDS + col, A + (size_t)min(am, M - 1) * K + k0 + col, am < M);
    }
#pragma unroll
    for (int i = 0; i < GEMM_BN * 4 / 256; ++i) {
      const int c = tid + i * 256, row = c / 4, col = (c % 4) * 8;
      const int bn = n0 + row;
      cp_async16(Bs + row * GEMM_LDS + col, B + (size_t)min(bn, N - 1) * K + k0 + col, bn < N);
    }
  };

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  const int steps = K / GEMM_BK;
  // one commit group per K step (empty past the end) so wait_group counts stay exact
#pragma unroll
  for (int s = 0; s < GEMM_STAGES - 1; ++s) {
    if (s < steps) load_stage(s, s * GEMM_BK);
    cp_async_commit();
  }
  for (int s = 0; s < steps; ++s) {
    cp_async_wait<GEMM_STAGES - 2>();  // step s's group landed (for this thread)
    __syncthreads();  // ... for every thread; and step s-1's slot is free
    const int nxt = s + GEMM_STAGES - 1;
    if (nxt < steps) load_stage(nxt % GEMM_STAGES, nxt * GEMM_BK);
    cp_async_commit();
    const T* As = smem + (s % GEMM_STAGES) * GEMM_STAGE_ELEMS;
    gemm_mma_step<T>(acc, As, As + GEMM_BM * GEMM_LDS, wm, wn);
  }
  cp_async_wait<0>();
  __syncthreads();  // tiles no longer needed: reuse shared memory for the epilogue

  gemm_epilogue<T, RESIDUAL>(acc, R, C, M, N, m0 + wm * 64, n0 + wn * 64, smem_raw);
}

template <typename T, bool RESIDUAL>
__device__ __forceinline__ void gemm_tn(const T* __restrict__ A, const T* __restrict__ B, const T* __restrict__ R, T* __restrict__ C,
                                        int M, int N, int K, unsigned char* __restrict__ smem_raw) {
  gemm_tn_tile<T, RESIDUAL>(A, B, R, C, M, N, K, smem_raw, blockIdx.y * GEMM_BM, blockIdx.x * GEMM_BN);
}


// Prefill GEMM over quantized weights (passes/quantize.py formats; CODE as
// qgemv.cuh's BITS: 4, 8, or kF8 = 9 for e4m3): C = A . dequant(Q, S, Z)^T.
// The same tiles and WMMA loop as gemm_tn; the B tile's codes come through
// the cp.async ring (16 or 32 bytes per row per K step) and are decoded once
// per step into one bf16/fp16 tile in shared memory -- a dequantized matrix
// never exists, each weight is decoded once per 128 rows of A. G: the group
// (a multiple of the K step; fp8: G = K, one fp32 scale per row).
constexpr int QGEMM_CODE_BYTES = 32;  // the ring's slot per B row (8-bit codes; 4-bit use half)
constexpr int QGEMM_SMEM_BYTES = GEMM_STAGES * (GEMM_BM * GEMM_LDS * 2 + GEMM_BN * QGEMM_CODE_BYTES) + GEMM_BN * GEMM_LDS * 2;  // 74 KB

template <typename T, int CODE, int G>
__device__ __forceinline__ void gemm_tn_q_tile(const T* __restrict__ A, const void* __restrict__ Qv, const void* __restrict__ Sv,
                                               const void* __restrict__ Zv, T* __restrict__ C, int M, int N, int K,
                                               unsigned char* __restrict__ smem_raw, int m0, int n0) {
  using namespace nvcuda;
  static_assert(G % GEMM_BK == 0, "groups hold whole K steps");
  constexpr int CB = CODE == 4 ? 16 : 32;  // code bytes per B row per K step
  T* As0 = reinterpret_cast<T*>(smem_raw);
  uint8_t* Qs0 = smem_raw + GEMM_STAGES * GEMM_BM * GEMM_LDS * 2;
  T* Bs = reinterpret_cast<T*>(Qs0 + GEMM_STAGES * GEMM_BN * QGEMM_CODE_BYTES);
  const uint8_t* Q = static_cast<const uint8_t*>(Qv);
  const size_t qrow = CODE == 4 ? (size_t)K / 2 : (size_t)K;  // code bytes per weight row
  const int NG = K / G;
  const int tid = threadIdx.x, warp = tid / 32;
  const int wm = warp / 4, wn = warp % 4;

  auto load_stage = [&](int stage, int k0) {
    T* As = As0 + stage * GEMM_BM * GEMM_LDS;
#pragma unroll
    for (int i = 0; i < GEMM_BM * 4 / 256; ++i) {
      const int c = tid + i * 256, row = c / 4, col = (c % 4) * 8;
      const int am = m0 + row;
      cp_async16(As + row * GEMM_LDS + col, A + (size_t)min(am, M - 1) * K + k0 + col, am < M);
    }
    const size_t kb = CODE == 4 ? k0 / 2 : k0;
#pragma unroll
    for (int i = 0; i < GEMM_BN * (CB / 16) / 256; ++i) {
      const int c = tid + i * 256, row = c / (CB / 16), part = c % (CB / 16);
      const int bn = n0 + row;
      cp_async16(Qs0 + ((size_t)stage * GEMM_BN + row) * QGEMM_CODE_BYTES + part * 16, Q + (size_t)min(bn, N - 1) * qrow + kb + part * 16,
                 bn < N);
    }
  };
  auto dequant = [&](int stage, int k0) {  // thread t decodes B row t of this K step
    const int row = tid, n = min(n0 + row, N - 1), g = k0 / G;
    const uint32_t* w = reinterpret_cast<const uint32_t*>(Qs0 + ((size_t)stage * GEMM_BN + row) * QGEMM_CODE_BYTES);
    float v[GEMM_BK];
    if constexpr (CODE == 4) {
      const float sc = __half2float(static_cast<const __half*>(Sv)[(size_t)n * NG + g]);
      const float zz = __half2float(static_cast<const __half*>(Zv)[(size_t)n * NG + g]);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) v[8 * i + j] = fmaf(static_cast<float>((w[i] >> (4 * j)) & 0xFu), sc, zz);
    } else if constexpr (CODE == 8) {
      const float sc = __half2float(static_cast<const __half*>(Sv)[(size_t)n * NG + g]);
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) v[4 * i + j] = static_cast<float>(static_cast<int8_t>((w[i] >> (8 * j)) & 0xFFu)) * sc;
    } else {
      const float sc = static_cast<const float*>(Sv)[n];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        kv_decode4<kKvFp8>(w[i], v + 4 * i);
#pragma unroll
        for (int j = 0; j < 4; ++j) v[4 * i + j] *= sc;
      }
    }
    T* dst = Bs + row * GEMM_LDS;
#pragma unroll
    for (int j = 0; j < GEMM_BK; ++j) dst[j] = from_float<T>(v[j]);
  };

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) wmma::fill_fragment(acc[i][j], 0.f);
  const int steps = K / GEMM_BK;
#pragma unroll
  for (int s = 0; s < GEMM_STAGES - 1; ++s) {
    if (s < steps) load_stage(s, s * GEMM_BK);
    cp_async_commit();
  }
  for (int s = 0; s < steps; ++s) {
    cp_async_wait<GEMM_STAGES - 2>();
    __syncthreads();  // step s landed for every thread; every warp is done with the previous B tile
    dequant(s % GEMM_STAGES, s * GEMM_BK);
    __syncthreads();  // the B tile is decoded
    const int nxt = s + GEMM_STAGES - 1;
    if (nxt < steps) load_stage(nxt % GEMM_STAGES, nxt * GEMM_BK);
    cp_async_commit();
    gemm_mma_step<T>(acc, As0 + (s % GEMM_STAGES) * GEMM_BM * GEMM_LDS, Bs, wm, wn);
  }
  cp_async_wait<0>();
  __syncthreads();
  gemm_epilogue<T, false>(acc, nullptr, C, M, N, m0 + wm * 64, n0 + wn * 64, smem_raw);
}

template <typename T, int CODE, int G>
__device__ __forceinline__ void gemm_tn_q(const T* __restrict__ A, const void* __restrict__ Qv, const void* __restrict__ Sv,
                                          const void* __restrict__ Zv, T* __restrict__ C, int M, int N, int K,
                                          unsigned char* __restrict__ smem_raw) {
  gemm_tn_q_tile<T, CODE, G>(A, Qv, Sv, Zv, C, M, N, K, smem_raw, blockIdx.y * GEMM_BM, blockIdx.x * GEMM_BN);
}

}  // namespace kiln
