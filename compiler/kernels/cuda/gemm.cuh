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

template <typename T, bool RESIDUAL>
__device__ __forceinline__ void gemm_tn(const T* __restrict__ A, const T* __restrict__ B, const T* __restrict__ R, T* __restrict__ C,
                                        int M, int N, int K, unsigned char* __restrict__ smem_raw) {
  using namespace nvcuda;
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int wm = warp / 4, wn = warp % 4;  // warp's 64 x 64 sub-tile
  const int m0 = blockIdx.y * GEMM_BM, n0 = blockIdx.x * GEMM_BN;

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
    const T* Bs = As + GEMM_BM * GEMM_LDS;
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
  cp_async_wait<0>();
  __syncthreads();  // tiles no longer needed: reuse shared memory for the epilogue

  // epilogue: one 16 x 16 fp32 scratch per warp; 8 values per lane per fragment
  float* scratch = reinterpret_cast<float*>(smem_raw) + warp * 256;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      wmma::store_matrix_sync(scratch, acc[i][j], 16, wmma::mem_row_major);
      __syncwarp();
      const int r = lane / 2, c0 = (lane % 2) * 8;
      const int gm = m0 + wm * 64 + i * 16 + r, gn = n0 + wn * 64 + j * 16 + c0;
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

}  // namespace kiln
