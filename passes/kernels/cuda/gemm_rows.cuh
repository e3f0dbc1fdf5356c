// kiln: the decode_batch GEMM -- a few activation rows (one token of each of M
// sequences) times a large weight, on tensor cores, reading the weight once.
//
//   C[M, N] = A[M, K] . W[N, K]^T  (+ R[M, N])       A, W, R in T (bf16/fp16); C in OutT (T or fp32)
//
// Why not gemm_tn: its 128 x 256 tiles put M = 8..128 sequences on a 128-row
// side and N / 256 blocks on the grid (16 for N = 4096: 239 GB/s on an H200).
// Here the weight sits on the MMA's 16-row A side and the activations on its
// 8-wide B side ("A/B swap": the weight's large N fills the tensor core even
// when M = 1), mma.sync m16n8k16, fp32 accumulation.
//
// K is permuted inside each 32-wide chunk so that every operand a lane needs is
// one 16-byte load straight from global memory (no shared-memory staging):
// lane (g = lane / 4, q = lane % 4) loads W[row g (+8)][8q .. 8q + 7] and
// A[token g][8q .. 8q + 7]; registers .x/.y feed one mma, .z/.w a second. A and
// W use the same permutation, so the sum over k is unchanged (only its order).
//
// A block is 8 warps over 32 weight rows and up to 64 tokens; warp w takes the
// K chunks w, w + 8, ... (its weight loads one chunk ahead of its MMAs), and
// the 8 partial sums are added in warp order at the end (through `red`, 8 KB of
// shared memory, GROWS_RED_FLOATS). A token's result therefore depends on K alone -- not on M or
// on the other tokens in the step (batch-invariant), whichever token-tile count
// the block picks. Launch: grid (ceil(M / 64), ceil(N / 32)), 256 threads (or, for
// M <= 8, the TTMAX = 1 kernel: grid (1, ceil(N / 32))).
// K must be a multiple of 32 (the TIR side checks).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace kiln {

constexpr int GROWS_WARPS = 8, GROWS_N = 32, GROWS_M = 64;
constexpr int GROWS_RED_FLOATS = GROWS_WARPS * 4 * 4 * 32;  // [warp][row tile (at most 4)][acc reg][lane]

// How a lane reads its 8 weights of a 32-wide chunk. `Raw` is what is loaded and
// kept in the prefetch ring; widen() makes the 4 registers of 16-bit pairs the
// MMA takes. 16-bit weights: 16 bytes that already are the operand. e4m3 codes
// (fp8 weights, one fp32 scale per row applied after the sum): 8 bytes, widened
// exactly (an e4m3 value has 4 significant bits and fits bf16 / fp16).
template <typename T, typename WS> struct RowsWeights {
  using Raw = uint4;
  static __device__ __forceinline__ const Raw* row(const void* W, size_t r, int K, int q) {
    return reinterpret_cast<const uint4*>(static_cast<const T*>(W) + r * K + 8 * q);
  }
  static __device__ __forceinline__ uint4 widen(Raw v) { return v; }
};

template <typename T>
__device__ __forceinline__ uint32_t e4m3x2_to_16x2(uint32_t codes) {  // two codes in the low 16 bits
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(codes & 0xFFFF), __NV_E4M3);
  const float2 f = __half22float2(__half2(h));
#else
  const float2 f = make_float2(kv_decode<kKvFp8>(codes & 0xFF), kv_decode<kKvFp8>((codes >> 8) & 0xFF));
#endif
  if constexpr (RowsSame<T, __nv_bfloat16>::value) {
    const __nv_bfloat162 b = __float22bfloat162_rn(f);
    return *reinterpret_cast<const uint32_t*>(&b);
  } else {
    const __half2 b = __float22half2_rn(f);
    return *reinterpret_cast<const uint32_t*>(&b);
  }
}

template <typename T> struct RowsWeights<T, uint8_t> {
  using Raw = uint2;
  static __device__ __forceinline__ const Raw* row(const void* W, size_t r, int K, int q) {
    return reinterpret_cast<const uint2*>(static_cast<const uint8_t*>(W) + r * K + 8 * q);
  }
  static __device__ __forceinline__ uint4 widen(Raw v) {
    return make_uint4(e4m3x2_to_16x2<T>(v.x), e4m3x2_to_16x2<T>(v.x >> 16), e4m3x2_to_16x2<T>(v.y), e4m3x2_to_16x2<T>(v.y >> 16));
  }
};

// One block's RT * 16 weight rows x TT * 8 tokens (tokens m0.., rows n0..); each
// warp keeps its weight loads PF chunks ahead of its MMAs.
template <typename T, typename OutT, bool RESIDUAL, int TT, int RT = 2, int PF = 1, typename WS = T>
__device__ __forceinline__ void gemm_rows_tile(const T* __restrict__ A, const void* __restrict__ W, const void* __restrict__ S,
                                               const T* __restrict__ R, OutT* __restrict__ C, int M, int N, int K, int m0, int n0,
                                               float* __restrict__ red) {
  using WL = RowsWeights<T, WS>;
  using Raw = typename WL::Raw;
  constexpr bool SCALED = !RowsSame<WS, T>::value;  // e4m3 codes: a row scale after the sum
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, q = lane % 4;
  const Raw* wp[RT][2];  // [row tile][+0 / +8 rows]: this lane's part of each 32-wide chunk (4 Raw per row per chunk)
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int h = 0; h < 2; ++h) wp[rt][h] = WL::row(W, (size_t)min(n0 + rt * 16 + h * 8 + g, N - 1), K, q);  // tail rows: recompute the last
  const uint4* xp[TT];
#pragma unroll
  for (int tt = 0; tt < TT; ++tt) xp[tt] = reinterpret_cast<const uint4*>(A + (size_t)min(m0 + tt * 8 + g, M - 1) * K + 8 * q);

  float acc[RT][TT][4];
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int tt = 0; tt < TT; ++tt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[rt][tt][e] = 0.f;

  const int chunks = K / 32;  // a chunk is 4 uint4 per row: chunk c starts at uint4 index 4c
  Raw wbuf[PF + 1][RT][2];  // ring of weight registers: slot i holds chunk warp + 8 * (step + i)
#pragma unroll
  for (int p = 0; p < PF; ++p) {
    const int cp = warp + GROWS_WARPS * p;
    if (cp < chunks) {
#pragma unroll
      for (int rt = 0; rt < RT; ++rt)
#pragma unroll
        for (int h = 0; h < 2; ++h) wbuf[p][rt][h] = __ldg(wp[rt][h] + 4 * cp);
    }
  }
  for (int c = warp; c < chunks; c += GROWS_WARPS) {
    const int cn = c + GROWS_WARPS * PF;
    if (cn < chunks) {
#pragma unroll
      for (int rt = 0; rt < RT; ++rt)
#pragma unroll
        for (int h = 0; h < 2; ++h) wbuf[PF][rt][h] = __ldg(wp[rt][h] + 4 * cn);
    }
    uint4 wv[RT][2];
#pragma unroll
    for (int rt = 0; rt < RT; ++rt)
#pragma unroll
      for (int h = 0; h < 2; ++h) wv[rt][h] = WL::widen(wbuf[0][rt][h]);
#pragma unroll
    for (int tt = 0; tt < TT; ++tt) {
      const uint4 xb = __ldg(xp[tt] + 4 * c);
#pragma unroll
      for (int rt = 0; rt < RT; ++rt) {
        const uint4(&w)[2] = wv[rt];
        mma_16816<T>(acc[rt][tt], w[0].x, w[1].x, w[0].y, w[1].y, xb.x, xb.y);
        mma_16816<T>(acc[rt][tt], w[0].z, w[1].z, w[0].w, w[1].w, xb.z, xb.w);
      }
    }
#pragma unroll
    for (int p = 0; p < PF; ++p)
#pragma unroll
      for (int rt = 0; rt < RT; ++rt)
#pragma unroll
        for (int h = 0; h < 2; ++h) wbuf[p][rt][h] = wbuf[p + 1][rt][h];
  }

  // acc[rt][tt][e] holds C^T[row n0 + rt * 16 + g + (e >= 2 ? 8 : 0)][token m0 + tt * 8 + 2q + (e & 1)]
#pragma unroll
  for (int tt = 0; tt < TT; ++tt) {
#pragma unroll
    for (int rt = 0; rt < RT; ++rt)
#pragma unroll
      for (int e = 0; e < 4; ++e) red[((warp * RT + rt) * 4 + e) * 32 + lane] = acc[rt][tt][e];
    __syncthreads();
#pragma unroll
    for (int i = tid; i < RT * 4 * 32; i += GROWS_WARPS * 32) {
      const int rt = i / 128, e = (i / 32) % 4, ln = i % 32;
      float v = 0.f;
#pragma unroll
      for (int w = 0; w < GROWS_WARPS; ++w) v += red[((w * RT + rt) * 4 + e) * 32 + ln];  // fixed order: batch-invariant
      const int row = n0 + rt * 16 + ln / 4 + (e >= 2 ? 8 : 0), tok = m0 + tt * 8 + 2 * (ln % 4) + (e & 1);
      if (row < N && tok < M) {
        if constexpr (SCALED) v *= static_cast<const float*>(S)[row];
        if constexpr (RESIDUAL) v += to_float(R[(size_t)tok * N + row]);
        C[(size_t)tok * N + row] = from_float<OutT>(v);
      }
    }
    __syncthreads();
  }
}

// Large B (gemm_rows_tile is L2-bound there: each 32-row block re-reads all B
// activation rows): the ordinary multistage GEMM, with the same A/B swap and
// K permutation. A block is 128 weight rows x 128 tokens; both tiles come
// through a GBIG_STAGES-deep cp.async ring of 64-wide K steps in shared memory
// (rows of 128 bytes, 16-byte chunks XOR-swizzled by row parity so the 8 lanes
// of each 128-bit phase -- two rows, four chunks -- hit distinct banks); 8
// warps as 4 (32 weight rows) x 2 (64 tokens), each 2 x 8 MMA tiles. K is cut
// into `ksplit` contiguous ranges over grid.z (so N = 4096 still fills the
// chip); with ksplit > 1 each range's fp32 sums go to `ws` [ksplit, M, N] and
// gemm_rows_big_reduce adds them in order z = 0, 1, ... (+ R). The order of
// every sum depends on K and ksplit alone -- fixed per matrix -- so a token's
// result does not depend on B within this kernel's range (it differs in the
// last bits from gemm_rows_tile's, which sums 8 interleaved partials).
// Launch: grid (ceil(M / 128), ceil(N / 128), ksplit), 256 threads,
// GBIG_SMEM_BYTES of dynamic shared memory; K % (64 * ksplit) == 0.
constexpr int GBIG_W = 128, GBIG_T = 128, GBIG_BK = 64, GBIG_STAGES = 3;  // 96 KB: under sm_86/89's 99 KB
constexpr int GBIG_STAGE_ELEMS = (GBIG_W + GBIG_T) * GBIG_BK;
constexpr int GBIG_SMEM_BYTES = GBIG_STAGES * GBIG_STAGE_ELEMS * 2;

__device__ __forceinline__ int gbig_swizzle(int row, int chunk) { return chunk ^ ((row & 1) << 2); }

template <typename T, typename OutT, bool RESIDUAL>
__device__ __forceinline__ void gemm_rows_big(const T* __restrict__ A, const T* __restrict__ W, const T* __restrict__ R,
                                              OutT* __restrict__ C, float* __restrict__ ws, int M, int N, int K, int ksplit,
                                              unsigned char* __restrict__ smem_raw) {
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, q = lane % 4;
  const int wr = warp / 2, wt = warp % 2;
  const int m0 = blockIdx.x * GBIG_T, n0 = blockIdx.y * GBIG_W, z = blockIdx.z;
  const int kper = K / ksplit, kbeg = z * kper, steps = kper / GBIG_BK;

  auto load_stage = [&](int stage, int k0) {
    T* ws_ = smem + stage * GBIG_STAGE_ELEMS;
    T* xs_ = ws_ + GBIG_W * GBIG_BK;
#pragma unroll
    for (int i = 0; i < GBIG_W * 8 / 256; ++i) {  // 128 rows x 8 chunks of 16 bytes, both tiles
      const int c = tid + i * 256, row = c / 8, j = c % 8, n = n0 + row, t = m0 + row;
      cp_async16(ws_ + row * GBIG_BK + gbig_swizzle(row, j) * 8, W + (size_t)min(n, N - 1) * K + k0 + j * 8, n < N);
      cp_async16(xs_ + row * GBIG_BK + gbig_swizzle(row, j) * 8, A + (size_t)min(t, M - 1) * K + k0 + j * 8, t < M);
    }
  };

  float acc[2][8][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;
#pragma unroll
  for (int st = 0; st < GBIG_STAGES - 1; ++st) {
    if (st < steps) load_stage(st, kbeg + st * GBIG_BK);
    cp_async_commit();
  }
  for (int s = 0; s < steps; ++s) {
    cp_async_wait<GBIG_STAGES - 2>();
    __syncthreads();  // step s landed for every thread; step s - 1's slot is free
    const int nxt = s + GBIG_STAGES - 1;
    if (nxt < steps) load_stage(nxt % GBIG_STAGES, kbeg + nxt * GBIG_BK);
    cp_async_commit();
    const T* ws_ = smem + (s % GBIG_STAGES) * GBIG_STAGE_ELEMS;
    const T* xs_ = ws_ + GBIG_W * GBIG_BK;
#pragma unroll
    for (int sub = 0; sub < 2; ++sub) {  // the step's two 32-wide chunks
      uint4 wa[2][2], xb[8];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = wr * 32 + mt * 16 + h * 8 + g;
          wa[mt][h] = *reinterpret_cast<const uint4*>(ws_ + row * GBIG_BK + gbig_swizzle(row, sub * 4 + q) * 8);
        }
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        const int row = wt * 64 + nt * 8 + g;
        xb[nt] = *reinterpret_cast<const uint4*>(xs_ + row * GBIG_BK + gbig_swizzle(row, sub * 4 + q) * 8);
      }
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
          mma_16816<T>(acc[mt][nt], wa[mt][0].x, wa[mt][1].x, wa[mt][0].y, wa[mt][1].y, xb[nt].x, xb[nt].y);
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
          mma_16816<T>(acc[mt][nt], wa[mt][0].z, wa[mt][1].z, wa[mt][0].w, wa[mt][1].w, xb[nt].z, xb[nt].w);
    }
  }
  cp_async_wait<0>();
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = n0 + wr * 32 + mt * 16 + g + (e >= 2 ? 8 : 0), tok = m0 + wt * 64 + nt * 8 + 2 * q + (e & 1);
        if (row < N && tok < M) {
          if (ksplit == 1) {
            float v = acc[mt][nt][e];
            if constexpr (RESIDUAL) v += to_float(R[(size_t)tok * N + row]);
            C[(size_t)tok * N + row] = from_float<OutT>(v);
          } else {
            ws[((size_t)z * M + tok) * N + row] = acc[mt][nt][e];
          }
        }
      }
}

// gemm_rows_big's split-K partials, summed in order (+ R): grid ceil(M * N / 256), 256 threads.
template <typename T, typename OutT, bool RESIDUAL>
__device__ __forceinline__ void gemm_rows_big_reduce(const float* __restrict__ ws, const T* __restrict__ R, OutT* __restrict__ C,
                                                     int M, int N, int ksplit) {
  const size_t mn = (size_t)M * N, i = (size_t)blockIdx.x * 256 + threadIdx.x;
  if (i >= mn) return;
  float v = 0.f;
  for (int z = 0; z < ksplit; ++z) v += ws[z * mn + i];
  if constexpr (RESIDUAL) v += to_float(R[i]);
  C[i] = from_float<OutT>(v);
}

// W: T weights, or e4m3 codes (WS = uint8_t) with S their per-row fp32 scales
// (unused for T weights). The block's tokens m0 .. m0 + 63 (TTMAX = 8) or m0 .. m0 + 7 (TTMAX = 1). Two
// kernels because registers are allocated for a kernel's largest branch: the
// 1-token-tile kernel (B <= 8: 88 registers against 174) keeps more weight loads
// in flight per SM -- 3.3-3.8 TB/s on the 8B shape's large-N matrices against
// 2.5-2.7 (benchmarks/NOTES.md). Same K split, so the same bits either way.
template <typename T, typename OutT, bool RESIDUAL, int TTMAX, typename WS = T>
__device__ __forceinline__ void gemm_rows(const T* __restrict__ A, const void* __restrict__ W, const void* __restrict__ S,
                                          const T* __restrict__ R, OutT* __restrict__ C, int M, int N, int K, float* __restrict__ red) {
  const int m0 = blockIdx.x * TTMAX * 8, n0 = blockIdx.y * GROWS_N, mt = M - m0;
  constexpr int PF = RowsSame<WS, T>::value ? 2 : 4;  // e4m3 rows: half the bytes per load, so twice the chunks in flight
  if constexpr (TTMAX == 1) {
    gemm_rows_tile<T, OutT, RESIDUAL, 1, 2, PF, WS>(A, W, S, R, C, M, N, K, m0, n0, red);
  } else {  // fewer token tiles when fewer tokens: the MMA work scales with the tokens present
    if (mt <= 8) gemm_rows_tile<T, OutT, RESIDUAL, 1, 2, PF, WS>(A, W, S, R, C, M, N, K, m0, n0, red);
    else if (mt <= 16) gemm_rows_tile<T, OutT, RESIDUAL, 2, 2, PF, WS>(A, W, S, R, C, M, N, K, m0, n0, red);
    else if (mt <= 32) gemm_rows_tile<T, OutT, RESIDUAL, 4, 2, PF, WS>(A, W, S, R, C, M, N, K, m0, n0, red);
    else gemm_rows_tile<T, OutT, RESIDUAL, 8, 2, PF, WS>(A, W, S, R, C, M, N, K, m0, n0, red);
  }
}

}  // namespace kiln
