// kiln: prefill GEMM on Hopper's warpgroup tensor cores (wgmma, sm_90a only), device function.
//
//   C[M, N] = A[M, K] . B[N, K]^T  (+ R[M, N])       A, B, C, R row-major, 16-bit
//
// The same contract and launch as gemm.cuh's gemm_tn (a block is 128 rows of A x 256 of B,
// 256 threads), so the TIR side swaps one callee for the other when the artifact is built for
// sm_90 alone. Why: gemm_tn's WMMA (mma.sync from ldmatrix'd registers) peaks at ~180-220
// TFLOP/s on the H200; wgmma reads both operands straight from shared memory, asynchronously,
// in 64 x 256 x 16 steps per warpgroup.
//
// Layout: each stage holds the A tile [128][64] and the B tile [256][64], rows of 128 bytes,
// 16-byte chunks XOR-swizzled by (row % 8) -- the 128-byte swizzle wgmma's shared-memory
// descriptors describe (8-row atoms of 1024 bytes, 1024-byte aligned). Both operands K-major.
// All 256 threads fill stages with cp.async (zero-filled past M / N), WG_STAGES deep; the two
// warpgroups (warps 0-3, 4-7) each own 64 rows of A and all 256 columns: 128 fp32 accumulators
// per thread. A stage is refilled two steps after it was read, when every warpgroup has
// waited for the wgmma that read it (wait_group 1 each step, then the next step's barrier).
// K % 64 == 0. Dynamic shared memory: GEMM_WG_SMEM_BYTES (the 1 KB extra aligns the base).
// Built for anything but sm_90a (the fatbin's forward-compatible PTX, say), the same tile runs
// gemm.cuh's gemm_tn_tile instead: same result contract, same launch, slower.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace kiln {

constexpr int WG_BM = 128, WG_BN = 256, WG_BK = 64, WG_STAGES = 4;
constexpr int WG_A_BYTES = WG_BM * WG_BK * 2, WG_B_BYTES = WG_BN * WG_BK * 2, WG_STAGE_BYTES = WG_A_BYTES + WG_B_BYTES;
constexpr int GEMM_WG_SMEM_BYTES = WG_STAGES * WG_STAGE_BYTES + 1024;  // 193 KB

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define KILN_HAVE_WGMMA 1
#endif

// Shared-memory matrix descriptor of a K-major tile with the 128-byte swizzle: start address,
// leading offset (unused by this layout: 1), stride between 8-row atoms 1024 bytes, mode 1.
__device__ __forceinline__ uint64_t wg_desc(uint32_t saddr) {
  return (uint64_t)((saddr & 0x3FFFF) >> 4) | ((uint64_t)1 << 16) | ((uint64_t)(1024 >> 4) << 32) | ((uint64_t)1 << 62);
}

// 16-byte chunk c (of 8) of row r, swizzled, as a byte offset in a tile of 128-byte rows.
__device__ __forceinline__ uint32_t wg_offset(int r, int c) { return (uint32_t)(r * 128 + ((c ^ (r & 7)) << 4)); }

// One m64n256k16 wgmma (A and B from shared memory, K-major) into 128 fp32 accumulators per thread;
// TY: the PTX type of both operands (bf16 / f16), the instruction's only difference between them.
#define KILN_WG_D8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
#define KILN_WGMMA_256(TY) \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n" \
               "wgmma.mma_async.sync.aligned.m64n256k16.f32." TY "." TY " " \
               "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, " \
               "%128, %129, p, 1, 1, 0, 0;\n}\n" \
               : KILN_WG_D8(0), KILN_WG_D8(8), KILN_WG_D8(16), KILN_WG_D8(24), KILN_WG_D8(32), KILN_WG_D8(40), KILN_WG_D8(48), \
                 KILN_WG_D8(56), KILN_WG_D8(64), KILN_WG_D8(72), KILN_WG_D8(80), KILN_WG_D8(88), KILN_WG_D8(96), KILN_WG_D8(104), \
                 KILN_WG_D8(112), KILN_WG_D8(120) \
               : "l"(da), "l"(db), "r"(scale_d))

template <typename T>
__device__ __forceinline__ void wgmma_256(float (&d)[128], uint64_t da, uint64_t db, int scale_d) {
#ifdef KILN_HAVE_WGMMA
  if constexpr (RowsSame<T, __nv_bfloat16>::value) {
    KILN_WGMMA_256("bf16");
  } else {
    KILN_WGMMA_256("f16");
  }
#endif
}
#undef KILN_WGMMA_256

// One m64n256k32 wgmma over e4m3 operands (both K-major: fp8 wgmma has no transposed form), fp32 sums. The same
// 128 accumulators per thread, and the same 32 bytes along K per instruction as the 16-bit k16 form.
__device__ __forceinline__ void wgmma_256_e4m3(float (&d)[128], uint64_t da, uint64_t db, int scale_d) {
#ifdef KILN_HAVE_WGMMA
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n256k32.f32.e4m3.e4m3 "
               "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
               "%128, %129, p, 1, 1;\n}\n"
               : KILN_WG_D8(0), KILN_WG_D8(8), KILN_WG_D8(16), KILN_WG_D8(24), KILN_WG_D8(32), KILN_WG_D8(40), KILN_WG_D8(48),
                 KILN_WG_D8(56), KILN_WG_D8(64), KILN_WG_D8(72), KILN_WG_D8(80), KILN_WG_D8(88), KILN_WG_D8(96), KILN_WG_D8(104),
                 KILN_WG_D8(112), KILN_WG_D8(120)
               : "l"(da), "l"(db), "r"(scale_d));
#endif
}

#undef KILN_WG_D8

__device__ __forceinline__ void wg_fence() {
#ifdef KILN_HAVE_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wg_commit() {
#ifdef KILN_HAVE_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void wg_wait() {
#ifdef KILN_HAVE_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
__device__ __forceinline__ void fence_proxy_async() {
#ifdef KILN_HAVE_WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// The epilogue of a consumer warpgroup's 64 x 256 tile: warp rows r0 .. r0 + 15 of the block's (m0, n0) tile,
// d[4 j + e] = row r0 + g (+ 8 for e >= 2), column 8 j + 2 q + (e & 1). split: fp32 sums to ws[z][m][n];
// else C (+ R) in OutT. e4m3 (CODE 9): the row (output column) scales S multiply the sums first; e4m3 activations
// too (CODE 10): then also their per-token scales SA (row m of A).
template <typename T, typename OutT, bool RESIDUAL, int CODE, bool STAGED = false>
__device__ __forceinline__ void wg_store(float (&d)[128], int r0, int lane, const T* __restrict__ R, OutT* __restrict__ C,
                                         float* __restrict__ ws, int M, int N, int z, bool split, int m0, int n0,
                                         const void* __restrict__ S, const float* __restrict__ SA = nullptr,
                                         const float* __restrict__ SS = nullptr) {
  const int g = lane / 4, q = lane % 4;
  constexpr bool SCALED = CODE == 9 || CODE == 10;
  float sah[2] = {1.f, 1.f};  // the two rows' token scales, both loaded before any store (a load after a store waits for it)
  if constexpr (CODE == 10) {
#pragma unroll
    for (int h = 0; h < 2; ++h) sah[h] = m0 + r0 + g + h * 8 < M ? SA[m0 + r0 + g + h * 8] : 0.f;
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int m = m0 + r0 + g + h * 8;
    if (m >= M) continue;
    const float sa = sah[h];
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      const int n = n0 + j * 8 + 2 * q;
      float v0 = d[4 * j + 2 * h], v1 = d[4 * j + 2 * h + 1];
      if constexpr (SCALED) {  // the weight row's scale, then the token's; products rounded (__fmul_rn: never contracted
        // into the residual's add), so every kernel of this tile agrees bit for bit. STAGED: the tile's 256 scales in shared
        // memory SS (loaded from global memory one use at a time, each a full L2 round trip behind the last, they were
        // most of a B = 128 step's fp8 kernel: ncu); else from S (a pass loading all 64 into registers first spilled).
        const float* Sf = static_cast<const float*>(S);
        const float s0 = STAGED ? SS[j * 8 + 2 * q] : (n < N ? Sf[n] : 0.f), s1 = STAGED ? SS[j * 8 + 2 * q + 1] : (n + 1 < N ? Sf[n + 1] : 0.f);
        v0 = __fmul_rn(v0, s0);
        v1 = __fmul_rn(v1, s1);
        if constexpr (CODE == 10) v0 = __fmul_rn(v0, sa), v1 = __fmul_rn(v1, sa);
      }
      const bool pair_ok = n + 1 < N && (N & 1) == 0;  // vector stores need an even row length (n is even)
      if (split) {
        float* w = ws + ((size_t)z * M + m) * N + n;
        if (pair_ok) {
          *reinterpret_cast<float2*>(w) = make_float2(v0, v1);
        } else {
          if (n < N) w[0] = v0;
          if (n + 1 < N) w[1] = v1;
        }
        continue;
      }
      if constexpr (RESIDUAL) {
        if (n < N) v0 += to_float(R[(size_t)m * N + n]);
        if (n + 1 < N) v1 += to_float(R[(size_t)m * N + n + 1]);
      }
      if constexpr (sizeof(OutT) == 2) {
        if (pair_ok) {
          *reinterpret_cast<uint32_t*>(C + (size_t)m * N + n) = pack_pair<OutT>(v0, v1);
          continue;
        }
      }
      if (n < N) C[(size_t)m * N + n] = from_float<OutT>(v0);
      if (n + 1 < N) C[(size_t)m * N + n + 1] = from_float<OutT>(v1);
    }
  }
}

// Quantized weights into wgmma's B tile (gemm_wg_tile_wgmma). A 64-wide K
// step of one weight row: its scales (and minima) -- one group per step when G % 64 == 0, else one per
// 8-value chunk -- then its codes decoded into the T tile's row (swizzled), the values gemm_tn_q decodes.
__host__ __device__ constexpr int wg_nsc(int code, int g) { return (code == 4 || code == 8) ? (g % 64 == 0 ? 1 : 8) : 1; }

template <int CODE, int G>
__device__ __forceinline__ void wg_row_scales(const void* __restrict__ S, const void* __restrict__ Z, int n, int k0, int K,
                                              float (&scl)[wg_nsc(CODE, G)], float (&mnm)[wg_nsc(CODE, G)]) {
  if constexpr (CODE == 4 || CODE == 8) {
    const int ng = K / G;
#pragma unroll
    for (int i = 0; i < wg_nsc(CODE, G); ++i) {
      const size_t at = (size_t)n * ng + (k0 + i * 8) / G;
      scl[i] = __half2float(static_cast<const __half*>(S)[at]);
      mnm[i] = CODE == 4 ? __half2float(static_cast<const __half*>(Z)[at]) : 0.f;
    }
  }
}

// One 8-value chunk of codes (CODE 4: w[0]; int8 / e4m3: w[0], w[1]) decoded to T: code times scale (plus
// minimum), rounded once; e4m3 exact (its row scale multiplies the sums later).
template <typename T, int CODE>
__device__ __forceinline__ uint4 wg_decode_chunk(const uint32_t* w, float sc, float zz) {
  if constexpr (CODE == 4) {
    float v[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = fmaf(static_cast<float>((w[0] >> (4 * j)) & 0xFu), sc, zz);
    return make_uint4(pack_pair<T>(v[0], v[1]), pack_pair<T>(v[2], v[3]), pack_pair<T>(v[4], v[5]), pack_pair<T>(v[6], v[7]));
  } else if constexpr (CODE == 8) {
    float v[8];
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int j = 0; j < 4; ++j) v[4 * h + j] = static_cast<float>(static_cast<int8_t>((w[h] >> (8 * j)) & 0xFFu)) * sc;
    return make_uint4(pack_pair<T>(v[0], v[1]), pack_pair<T>(v[2], v[3]), pack_pair<T>(v[4], v[5]), pack_pair<T>(v[6], v[7]));
  } else {
    return make_uint4(e4m3x2_to_16x2<T>(w[0]), e4m3x2_to_16x2<T>(w[0] >> 16), e4m3x2_to_16x2<T>(w[1]), e4m3x2_to_16x2<T>(w[1] >> 16));
  }
}

// w: the row's codes for the step (32 bytes of 4-bit codes, 64 of int8 / e4m3), into row `row` of the T tile at dst.
template <typename T, int CODE, int G>
__device__ __forceinline__ void wg_decode_row(const uint32_t* __restrict__ w, const float* scl, const float* mnm, unsigned char* dst, int row) {
  constexpr int NSC = wg_nsc(CODE, G);
#pragma unroll
  for (int c = 0; c < 8; ++c) {  // 8 chunks of 8 values
    const float sc = CODE == 9 ? 0.f : scl[NSC == 1 ? 0 : c], zz = CODE == 4 ? mnm[NSC == 1 ? 0 : c] : 0.f;
    *reinterpret_cast<uint4*>(dst + wg_offset(row, c)) = wg_decode_chunk<T, CODE>(CODE == 4 ? w + c : w + 2 * c, sc, zz);
  }
}

// The block's tile: rows m0.. of A / C, columns n0.. of B / C, over K steps kbeg / 64 ..
// kbeg / 64 + steps - 1. split: write the fp32 sums to ws[z][m][n] (one of several K ranges,
// added in order later) instead of C (+ R) in OutT.
// CODE 0: B is T weights, staged by cp.async straight into the ring. CODE 4 / 8 / 9 (the
// quantized formats of gemm.cuh's gemm_tn_q: 4-bit codes with fp16 scale and minimum per group
// of G, int8 with an fp16 scale per group, e4m3 with one fp32 scale per row): the ring stages
// the codes (64 or 32 bytes per row and step), each thread decodes one of the 256 rows into a
// T tile (two of them: the wgmma of the previous step may still read the other), the same
// values gemm_tn_q decodes; e4m3's row scale multiplies the sums instead (exact codes in).
template <typename T, typename OutT, bool RESIDUAL, int CODE = 0, int G = 0>
__device__ __forceinline__ void gemm_wg_tile_wgmma(const T* __restrict__ A, const void* __restrict__ B, const T* __restrict__ R,
                                                   OutT* __restrict__ C, float* __restrict__ ws, int M, int N, int K, int kbeg, int steps,
                                                   int z, bool split, unsigned char* __restrict__ smem_raw, int m0, int n0,
                                                   const void* __restrict__ S = nullptr, const void* __restrict__ Z = nullptr) {
  constexpr bool Q = CODE != 0;
  constexpr int CB = CODE == 4 ? 32 : 64;  // code bytes per B row per K step (quantized)
  static_assert(!Q || G % 8 == 0, "a group holds whole 8-value chunks");
  const uint32_t sbase = (static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)) + 1023u) & ~1023u;
  unsigned char* gbase = smem_raw + (sbase - static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)));
  // float B: stage s = [A tile | B tile]. Quantized: stage s = [A tile | codes], then two T B tiles.
  constexpr int STAGE = Q ? WG_A_BYTES + WG_BN * 64 : WG_STAGE_BYTES;
  const int tid = threadIdx.x, wg = tid / 128, warp = (tid % 128) / 32, lane = tid % 32;
  const T* Bw = static_cast<const T*>(B);
  const uint8_t* Bq = static_cast<const uint8_t*>(B);
  const size_t qrow = CODE == 4 ? (size_t)K / 2 : (size_t)K;  // code bytes per weight row

  auto load_stage = [&](int stage, int k0) {
    unsigned char* as = gbase + stage * STAGE;
    unsigned char* bs = as + WG_A_BYTES;
#pragma unroll
    for (int i = 0; i < WG_BM * 8 / 256; ++i) {  // A: 128 rows x 8 chunks
      const int c = tid + i * 256, row = c / 8, j = c % 8, m = m0 + row;
      cp_async16(as + wg_offset(row, j), A + (size_t)min(m, M - 1) * K + k0 + j * 8, m < M);
    }
    if constexpr (Q) {  // codes: 256 rows x CB bytes, row-major
      const size_t kb = CODE == 4 ? k0 / 2 : k0;
#pragma unroll
      for (int i = 0; i < WG_BN * (CB / 16) / 256; ++i) {
        const int c = tid + i * 256, row = c / (CB / 16), part = c % (CB / 16), n = n0 + row;
        cp_async16(bs + row * 64 + part * 16, Bq + (size_t)min(n, N - 1) * qrow + kb + part * 16, n < N);
      }
    } else {
#pragma unroll
      for (int i = 0; i < WG_BN * 8 / 256; ++i) {  // B: 256 rows x 8 chunks
        const int c = tid + i * 256, row = c / 8, j = c % 8, n = n0 + row;
        cp_async16(bs + wg_offset(row, j), Bw + (size_t)min(n, N - 1) * K + k0 + j * 8, n < N);
      }
    }
  };
  // quantized: thread t decodes row t of step s's codes into the T tile `dst` (swizzled)
  auto decode_row = [&](int stage, int k0, unsigned char* dst) {
    const int row = tid;
    float scl[wg_nsc(CODE, G)], mnm[wg_nsc(CODE, G)];
    wg_row_scales<CODE, G>(S, Z, min(n0 + row, N - 1), k0, K, scl, mnm);
    wg_decode_row<T, CODE, G>(reinterpret_cast<const uint32_t*>(gbase + stage * STAGE + WG_A_BYTES + row * 64), scl, mnm, dst, row);
  };

  float d[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) d[i] = 0.f;

#pragma unroll
  for (int s = 0; s < WG_STAGES - 2; ++s) {
    if (s < steps) load_stage(s, kbeg + s * WG_BK);
    cp_async_commit();
  }
  for (int s = 0; s < steps; ++s) {
    cp_async_wait<WG_STAGES - 3>();  // step s landed for this thread
    fence_proxy_async();             // ... visible to the tensor cores' (async) reads
    __syncthreads();                 // ... for every thread; and step s - 2's wgmmas are done in both warpgroups
    const int nxt = s + WG_STAGES - 2;
    if (nxt < steps) load_stage(nxt % WG_STAGES, kbeg + nxt * WG_BK);
    cp_async_commit();
    const uint32_t sa = sbase + (s % WG_STAGES) * STAGE + wg * (64 * 128);
    uint32_t sb = sbase + (s % WG_STAGES) * STAGE + WG_A_BYTES;
    if constexpr (Q) {  // decode into the T tile step s - 2 read (free: see the barrier above)
      const int tile = WG_STAGES * STAGE + (s & 1) * WG_B_BYTES;
      decode_row(s % WG_STAGES, kbeg + s * WG_BK, gbase + tile);
      fence_proxy_async();
      __syncthreads();
      sb = sbase + tile;
    }
    const uint64_t da = wg_desc(sa), db = wg_desc(sb);
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < WG_BK / 16; ++kk) wgmma_256<T>(d, da + 2 * kk, db + 2 * kk, 1);  // +32 bytes along K
    wg_commit();
    wg_wait<1>();
  }
  wg_wait<0>();
  cp_async_wait<0>();

  wg_store<T, OutT, RESIDUAL, CODE>(d, wg * 64 + warp * 16, lane, R, C, ws, M, N, z, split, m0, n0, S);
}


// ---- Warp-specialised variant on TMA (gemm_ws): one producer warp, two consumer warpgroups ----
// The same tile, operands, swizzle, epilogue and result (bit for bit) as gemm_wg_tile_wgmma for T weights
// (CODE 0), but the ring is filled by the Tensor Memory Accelerator: one thread of the producer warp (warp
// 8, after the two consumer warpgroups) issues two bulk tensor copies per K step (A 128 x 64, B 256 x 64,
// written with the same 128-byte swizzle wgmma reads; rows past M / N zero-filled), announced on the
// stage's `full` mbarrier by their byte count; the consumers wait on `full`, issue wgmma and, once the wgmma
// that read a stage has completed, arrive on its `empty` mbarrier (one lane per warp), which the producer
// waits on before refilling the stage. So WS_STAGES - 1 steps of loads are in flight while one is read.
// Why TMA: the same structure filled by cp.async from 1 / 2 / 4 producer warps ran at 0.3 / 0.45 / 0.55-0.8x
// gemm_wg (benchmarks/NOTES.md, session 20): a few warps cannot issue 3,072 16-byte copies per step.
// The tensor maps (the copy engine's descriptors of A and B) are built per block on the device
// (tensormap.replace on a zeroed 128-byte map in shared memory, then copied with a release fence into
// the block's 256 bytes of `tmaps`, global scratch of 256 bytes per block of the grid): TVM's launches
// cannot pass a host-made map. Launch: WS_THREADS threads, GEMM_WS_SMEM_BYTES of dynamic shared memory,
// __launch_bounds__(WS_THREADS, 1); K % 64 == 0, A / B 16-byte aligned.
constexpr int WS_STAGES = 4, WS_THREADS = 288;
constexpr int WS_SCALE_BYTES = 2 * WG_BN * 4;  // the weight rows' scales of a tile (CODE 9 / 10), two tiles in turn
// ring, its 1024-byte alignment, barriers, the maps' 128-byte alignment and two maps, scales
constexpr int GEMM_WS_SMEM_BYTES = WS_STAGES * WG_STAGE_BYTES + 1024 + 16 * WS_STAGES + 128 + 256 + WS_SCALE_BYTES;
constexpr int WS_TMAP_BYTES = 256;  // global scratch per block

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.release.cta.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_expect_bytes(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.release.cta.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
#ifdef KILN_HAVE_WGMMA
  uint32_t done;
  do {
    asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                 : "=r"(done) : "r"(bar), "r"(parity) : "memory");
  } while (!done);
#endif
}

// A row-major [rows, cols] matrix of elem_bytes-wide elements as a 2-D tensor map with a box of box_rows x
// box_cols (ELEMTYPE: the map's code -- 0 bytes, 6 f16, 10 bf16; SWIZZLE: 0 none, 3 the 128-byte swizzle),
// built in shared memory at smap (128 bytes, 128-aligned) and copied to gmap (global). The whole warp calls it;
// afterwards its lanes may use gmap in bulk tensor copies.
template <int ELEMTYPE, int SWIZZLE>
__device__ __forceinline__ void tmap_build(uint32_t smap, void* gmap, const void* base, int rows, int cols, int elem_bytes, int box_cols,
                                           int box_rows) {
#ifdef KILN_HAVE_WGMMA
  const int lane = threadIdx.x % 32;
  asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(smap + 4 * lane), "r"(0) : "memory");
  __syncwarp();
  if (lane == 0) {
    asm volatile("tensormap.replace.tile.global_address.shared::cta.b1024.b64 [%0], %1;\n" ::"r"(smap), "l"(base) : "memory");
    asm volatile("tensormap.replace.tile.rank.shared::cta.b1024.b32 [%0], 1;\n" ::"r"(smap) : "memory");  // rank - 1
    asm volatile("tensormap.replace.tile.box_dim.shared::cta.b1024.b32 [%0], 0, %1;\n" ::"r"(smap), "r"(box_cols) : "memory");
    asm volatile("tensormap.replace.tile.box_dim.shared::cta.b1024.b32 [%0], 1, %1;\n" ::"r"(smap), "r"(box_rows) : "memory");
    asm volatile("tensormap.replace.tile.global_dim.shared::cta.b1024.b32 [%0], 0, %1;\n" ::"r"(smap), "r"(cols) : "memory");
    asm volatile("tensormap.replace.tile.global_dim.shared::cta.b1024.b32 [%0], 1, %1;\n" ::"r"(smap), "r"(rows) : "memory");
    asm volatile("tensormap.replace.tile.global_stride.shared::cta.b1024.b64 [%0], 0, %1;\n" ::"r"(smap), "l"((uint64_t)cols * elem_bytes)
                 : "memory");
    asm volatile("tensormap.replace.tile.element_stride.shared::cta.b1024.b32 [%0], 0, 1;\n" ::"r"(smap) : "memory");
    asm volatile("tensormap.replace.tile.element_stride.shared::cta.b1024.b32 [%0], 1, 1;\n" ::"r"(smap) : "memory");
    if constexpr (ELEMTYPE != 0) asm volatile("tensormap.replace.tile.elemtype.shared::cta.b1024.b32 [%0], %1;\n" ::"r"(smap), "n"(ELEMTYPE) : "memory");
    if constexpr (SWIZZLE != 0) asm volatile("tensormap.replace.tile.swizzle_mode.shared::cta.b1024.b32 [%0], %1;\n" ::"r"(smap), "n"(SWIZZLE) : "memory");
  }
  __syncwarp();
  asm volatile("tensormap.cp_fenceproxy.global.shared::cta.tensormap::generic.release.cta.sync.aligned [%0], [%1], 128;\n" ::"l"(gmap),
               "r"(smap) : "memory");
  asm volatile("fence.proxy.tensormap::generic.acquire.cta [%0], 128;\n" ::"l"(gmap) : "memory");
#endif
}

// A 16-bit T operand with 64-wide (128-byte) rows in the 128-byte swizzle: wgmma's tiles.
template <typename T>
__device__ __forceinline__ void tmap_build_tile(uint32_t smap, void* gmap, const T* base, int rows, int cols, int box_rows) {
  tmap_build<RowsSame<T, __nv_bfloat16>::value ? 10 : 6, 3>(smap, gmap, base, rows, cols, 2, 64, box_rows);
}

// rows r0.. and columns k0.. of a tensor map's matrix -> shared memory at dst, bytes announced on bar
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const void* gmap, int k0, int r0, uint32_t bar) {
#ifdef KILN_HAVE_WGMMA
  asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
               "l"(gmap), "r"(k0), "r"(r0), "r"(bar)
               : "memory");
#endif
}

// Tiles first, first + stride, ... (< count) of a grid whose coordinates tile(i, m0, n0) gives, one after another
// through one ring (a persistent block: the producer fills the next tile's stages while the consumers store this
// one's results; the tensor maps are built once). K steps kbeg / 64 .. + steps - 1 of each.
// CODE 9: B holds e4m3 codes widened exactly to T (dequant_weight), S their fp32 row scales, applied to the sums.
// CODE 10: A and B are both e4m3 codes (bytes; rows of K bytes), SA A's per-row (token) scales, S B's per-row scales:
// a K step is 128 codes (the same 128-byte swizzled rows, so the same ring, boxes and byte counts), four k32 wgmmas.
template <typename T, typename OutT, bool RESIDUAL, typename TileOf, int CODE = 0>
__device__ __forceinline__ void gemm_ws_tiles_wgmma(const void* __restrict__ A, const void* __restrict__ B, const T* __restrict__ R,
                                                    OutT* __restrict__ C, float* __restrict__ ws, int M, int N, int K, int kbeg, int steps,
                                                    int z, bool split, unsigned char* __restrict__ smem_raw, TileOf tile, int first, int stride,
                                                    int count, unsigned char* __restrict__ tmaps, const float* __restrict__ S = nullptr,
                                                    const float* __restrict__ SA = nullptr) {
  constexpr bool F8 = CODE == 10;
  constexpr int BK = F8 ? 128 : WG_BK;  // elements per K step: 128 bytes of a row either way
  const uint32_t sraw = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)), sbase = (sraw + 1023u) & ~1023u;
  const uint32_t full = sbase + WS_STAGES * WG_STAGE_BYTES, empty = full + 8 * WS_STAGES, smaps = (empty + 8 * WS_STAGES + 127u) & ~127u;
  const int tid = threadIdx.x;
  if (tid == 0) {
#pragma unroll
    for (int s = 0; s < WS_STAGES; ++s) {
      mbar_init(full + 8 * s, 1);   // the producer's arrival with the step's byte count
      mbar_init(empty + 8 * s, 8);  // every consumer warp has seen its wgmma on the stage complete
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  if (tid >= 256) {  // producer warp
    const size_t blk = blockIdx.x + (size_t)gridDim.x * (blockIdx.y + (size_t)gridDim.y * blockIdx.z);
    unsigned char* gmaps = tmaps + blk * WS_TMAP_BYTES;
    if constexpr (F8) {  // bytes (the map's type 0, uint8), 128-byte boxes
      tmap_build<0, 3>(smaps, gmaps, A, M, K, 1, 128, WG_BM);
      tmap_build<0, 3>(smaps + 128, gmaps + 128, B, N, K, 1, 128, WG_BN);
    } else {
      tmap_build_tile<T>(smaps, gmaps, static_cast<const T*>(A), M, K, WG_BM);
      tmap_build_tile<T>(smaps + 128, gmaps + 128, static_cast<const T*>(B), N, K, WG_BN);
    }
    if (tid == 256) {
      int g = 0;  // steps issued by this block, over all its tiles: the ring position and phase
      for (int i = first; i < count; i += stride) {
        int m0, n0;
        tile(i, m0, n0);
        for (int s = 0; s < steps; ++s, ++g) {
          const int st = g % WS_STAGES;
          if (g >= WS_STAGES) mbar_wait(empty + 8 * st, ((g / WS_STAGES) - 1) & 1);
          const uint32_t as = sbase + st * WG_STAGE_BYTES, bar = full + 8 * st;
          const int k0 = kbeg + s * BK;
          mbar_expect_bytes(bar, WG_STAGE_BYTES);
          tma_load_2d(as, gmaps, k0, m0, bar);
          tma_load_2d(as + WG_A_BYTES, gmaps + 128, k0, n0, bar);
        }
      }
    }
    return;
  }
  const int cw = tid / 128, warp = (tid % 128) / 32, lane = tid % 32;
  constexpr bool SCALED = CODE == 9 || CODE == 10;
  float* sscale = reinterpret_cast<float*>(smem_raw + (smaps + 256 - sraw));  // WS_SCALE_BYTES after the two maps
  int g = 0, nt = 0;
  for (int i = first; i < count; i += stride, ++nt) {
    int m0, n0;
    tile(i, m0, n0);
    if constexpr (SCALED) {  // this tile's 256 weight-row scales into shared memory (buffer nt % 2: the other may still be read)
      sscale[(nt & 1) * WG_BN + tid] = n0 + tid < N ? S[n0 + tid] : 0.f;
    }
    float d[128];
#pragma unroll
    for (int j = 0; j < 128; ++j) d[j] = 0.f;
    for (int s = 0; s < steps; ++s, ++g) {
      const int st = g % WS_STAGES;
      mbar_wait(full + 8 * st, (g / WS_STAGES) & 1);
      const uint32_t sa = sbase + st * WG_STAGE_BYTES + cw * (64 * 128), sb = sbase + st * WG_STAGE_BYTES + WG_A_BYTES;
      const uint64_t da = wg_desc(sa), db = wg_desc(sb);
      wg_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {  // 32 bytes along K each (+2 in the descriptors' 16-byte units)
        if constexpr (F8) {
          wgmma_256_e4m3(d, da + 2 * kk, db + 2 * kk, 1);
        } else {
          wgmma_256<T>(d, da + 2 * kk, db + 2 * kk, 1);
        }
      }
      wg_commit();
      wg_wait<1>();  // the previous step's wgmma done: its stage may be refilled
      __syncwarp();
      if (s > 0 && lane == 0) mbar_arrive(empty + 8 * ((g - 1) % WS_STAGES));
    }
    wg_wait<0>();
    __syncwarp();
    if (lane == 0) mbar_arrive(empty + 8 * ((g - 1) % WS_STAGES));  // the tile's last stage
    if constexpr (SCALED) {
      asm volatile("bar.sync 1, 256;\n" ::: "memory");  // the consumers' scale stores are visible (the producer warp is not in it)
      wg_store<T, OutT, RESIDUAL, CODE, true>(d, cw * 64 + warp * 16, lane, R, C, ws, M, N, z, split, m0, n0, S, SA,
                                              sscale + (nt & 1) * WG_BN);
    } else {
      wg_store<T, OutT, RESIDUAL, CODE>(d, cw * 64 + warp * 16, lane, R, C, ws, M, N, z, split, m0, n0, S, SA);
    }
  }
}

// One weight of a format as the portable path reads it: T weights (CODE 0), or a code decoded with its
// scale (and minimum) -- 4-bit / int8 per group of G, e4m3 with its row scale.
template <typename T, int CODE, int G>
__device__ __forceinline__ float wg_weight(const void* __restrict__ Bv, const void* __restrict__ Sv, const void* __restrict__ Zv, int n, int k,
                                           int K) {
  const uint8_t* q = static_cast<const uint8_t*>(Bv);
  if constexpr (CODE == 0) {
    return to_float(static_cast<const T*>(Bv)[(size_t)n * K + k]);
  } else if constexpr (CODE == 4) {
    const size_t at = (size_t)n * (K / G) + k / G;
    const float c = static_cast<float>((q[(size_t)n * K / 2 + k / 2] >> (4 * (k % 2))) & 0xF);
    return fmaf(c, __half2float(static_cast<const __half*>(Sv)[at]), __half2float(static_cast<const __half*>(Zv)[at]));
  } else if constexpr (CODE == 8) {
    return static_cast<float>(static_cast<int8_t>(q[(size_t)n * K + k])) * __half2float(static_cast<const __half*>(Sv)[(size_t)n * (K / G) + k / G]);
  } else {
    return kv_decode<kKvFp8>(q[(size_t)n * K + k]) * static_cast<const float*>(Sv)[n];
  }
}

// Without sm_90a (the fatbin's forward-compatible PTX JIT-compiled for a later GPU): the same
// tile on CUDA cores, one output per thread at a time. Correct, slow; a GPU of another
// generation should get an artifact built for it.
template <typename T, typename OutT, bool RESIDUAL, int CODE, int G>
__device__ __forceinline__ void gemm_wg_tile_portable(const T* __restrict__ A, const void* __restrict__ B, const T* __restrict__ R,
                                                      OutT* __restrict__ C, float* __restrict__ ws, int M, int N, int K, int kbeg, int steps,
                                                      int z, bool split, int m0, int n0, const void* __restrict__ S, const void* __restrict__ Z) {
  for (int i = threadIdx.x; i < WG_BM * WG_BN; i += blockDim.x) {
    const int m = m0 + i / WG_BN, n = n0 + i % WG_BN;
    if (m >= M || n >= N) continue;
    float v = 0.f;
    for (int k = kbeg; k < kbeg + steps * WG_BK; ++k) v += to_float(A[(size_t)m * K + k]) * wg_weight<T, CODE, G>(B, S, Z, n, k, K);
    if (split) {
      ws[((size_t)z * M + m) * N + n] = v;
    } else {
      if constexpr (RESIDUAL) v += to_float(R[(size_t)m * N + n]);
      C[(size_t)m * N + n] = from_float<OutT>(v);
    }
  }
}

// The tile on wgmma where built as sm_90a, else the portable path; K steps kbeg / 64 .. + steps - 1 of any
// weight format (see gemm_wg_tile_wgmma).
template <typename T, typename OutT, bool RESIDUAL, int CODE = 0, int G = 8>
__device__ __forceinline__ void gemm_wg_tile(const T* __restrict__ A, const void* __restrict__ B, const T* __restrict__ R, OutT* __restrict__ C,
                                             float* __restrict__ ws, int M, int N, int K, int kbeg, int steps, int z, bool split,
                                             unsigned char* __restrict__ smem_raw, int m0, int n0, const void* __restrict__ S = nullptr,
                                             const void* __restrict__ Z = nullptr) {
#ifdef KILN_HAVE_WGMMA
  gemm_wg_tile_wgmma<T, OutT, RESIDUAL, CODE, G>(A, B, R, C, ws, M, N, K, kbeg, steps, z, split, smem_raw, m0, n0, S, Z);
#else
  gemm_wg_tile_portable<T, OutT, RESIDUAL, CODE, G>(A, B, R, C, ws, M, N, K, kbeg, steps, z, split, m0, n0, S, Z);
#endif
}

// Blocks in M-fastest order within groups of WG_GROUP_M row tiles: the blocks resident at
// once share a few weight tiles (each read from DRAM about once per group) and the group's
// activation rows stay in L2. Launch: grid (ceil(N / 256), ceil(M / 128)), 256 threads.
constexpr int WG_GROUP_M = 16;

// tile id of mt x nt tiles in that order -> its first row and column
__device__ __forceinline__ void wg_tile_of(int id, int mt, int nt, int& m0, int& n0) {
  const int per_group = WG_GROUP_M * nt;
  const int group = id / per_group, first = group * WG_GROUP_M, rows = min(WG_GROUP_M, mt - first);
  const int in = id % per_group;
  m0 = (first + in % rows) * WG_BM;
  n0 = (in / rows) * WG_BN;
}

__device__ __forceinline__ void wg_block_tile(int M, int& m0, int& n0) {
  wg_tile_of(blockIdx.y * gridDim.x + blockIdx.x, (M + WG_BM - 1) / WG_BM, gridDim.x, m0, n0);
}

template <typename T, bool RESIDUAL>
__device__ __forceinline__ void gemm_wg(const T* __restrict__ A, const T* __restrict__ B, const T* __restrict__ R, T* __restrict__ C,
                                        int M, int N, int K, unsigned char* __restrict__ smem_raw) {
  int m0, n0;
  wg_block_tile(M, m0, n0);
#ifdef KILN_HAVE_WGMMA
  gemm_wg_tile_wgmma<T, T, RESIDUAL>(A, B, R, C, nullptr, M, N, K, 0, K / WG_BK, 0, false, smem_raw, m0, n0);
#else
  gemm_tn_tile<T, RESIDUAL>(A, B, R, C, M, N, K, smem_raw, m0, n0);  // same tiles, WMMA
#endif
}

// decode_batch's projections for large B (the caller's gemm_rows_big range) on wgmma: the tokens
// on the 64-row side (B > 64 fills it), the weight's rows on the 256-wide side, K cut into
// ksplit ranges over grid.z as gemm_rows_big does (fp32 partials summed in order by
// gemm_rows_big_reduce). A token's result depends on K and ksplit alone, not on B. Launch:
// grid (ceil(N / 256), ceil(M / 128), ksplit), 256 threads, GEMM_WG_SMEM_BYTES;
// K % (64 * ksplit) == 0.
template <typename T, typename OutT, bool RESIDUAL>
__device__ __forceinline__ void gemm_rows_wg(const T* __restrict__ A, const T* __restrict__ W, const T* __restrict__ R,
                                             OutT* __restrict__ C, float* __restrict__ ws, int M, int N, int K, int ksplit,
                                             unsigned char* __restrict__ smem_raw) {
  const int steps = K / ksplit / WG_BK, z = blockIdx.z;
  gemm_wg_tile<T, OutT, RESIDUAL>(A, W, R, C, ws, M, N, K, z * steps * WG_BK, steps, z, ksplit > 1, smem_raw, blockIdx.y * WG_BM,
                                  blockIdx.x * WG_BN);
}

// Prompt GEMM over quantized weights (gemm.cuh gemm_tn_q's formats and arguments: codes Q,
// scales S, minima Z for 4-bit, G the group; e4m3: S one fp32 scale per row) on wgmma. Same
// launch as gemm_wg; without sm_90a, gemm_tn_q's tile (WMMA).
template <typename T, int CODE, int G>
__device__ __forceinline__ void gemm_wg_q(const T* __restrict__ A, const void* __restrict__ Qv, const void* __restrict__ Sv,
                                          const void* __restrict__ Zv, T* __restrict__ C, int M, int N, int K,
                                          unsigned char* __restrict__ smem_raw) {
  int m0, n0;
  wg_block_tile(M, m0, n0);
#ifdef KILN_HAVE_WGMMA
  gemm_wg_tile_wgmma<T, T, false, CODE, G>(A, Qv, nullptr, C, nullptr, M, N, K, 0, K / WG_BK, 0, false,
                                                                          smem_raw, m0, n0, Sv, Zv);
#else
  gemm_tn_q_tile<T, CODE, G>(A, Qv, Sv, Zv, C, M, N, K, smem_raw, m0, n0);  // same tiles, WMMA
#endif
}

// Split-K rows over quantized weights (gemm_rows_wg with codes): decode_batch over e4m3 weights above
// 64 rows (CODE 9, S fp32 row scales), and short prompts over any format (gemm_wg_q's arguments).
template <typename T, typename OutT, int CODE, int G>
__device__ __forceinline__ void gemm_rows_wg_q(const T* __restrict__ A, const void* __restrict__ W, const void* __restrict__ S,
                                               const void* __restrict__ Z, OutT* __restrict__ C, float* __restrict__ ws, int M, int N, int K,
                                               int ksplit, unsigned char* __restrict__ smem_raw) {
  const int steps = K / ksplit / WG_BK, z = blockIdx.z;
  gemm_wg_tile<T, OutT, false, CODE, G>(A, W, nullptr, C, ws, M, N, K, z * steps * WG_BK, steps, z, ksplit > 1, smem_raw, blockIdx.y * WG_BM,
                                        blockIdx.x * WG_BN, S, Z);
}

// One tile (m0, n0) on the warp-specialised kernel where built as sm_90a, else the portable path (any thread count).
template <typename T, typename OutT, bool RESIDUAL>
__device__ __forceinline__ void gemm_ws_tile(const T* __restrict__ A, const T* __restrict__ B, const T* __restrict__ R, OutT* __restrict__ C,
                                             float* __restrict__ ws, int M, int N, int K, int kbeg, int steps, int z, bool split,
                                             unsigned char* __restrict__ smem_raw, int m0, int n0, unsigned char* __restrict__ tmaps) {
#ifdef KILN_HAVE_WGMMA
  gemm_ws_tiles_wgmma<T, OutT, RESIDUAL>(A, B, R, C, ws, M, N, K, kbeg, steps, z, split, smem_raw,
                                         [=](int, int& m, int& n) { m = m0; n = n0; }, 0, 1, 1, tmaps);
#else
  gemm_wg_tile_portable<T, OutT, RESIDUAL, 0, 8>(A, B, R, C, ws, M, N, K, kbeg, steps, z, split, m0, n0, nullptr, nullptr);
#endif
}

// gemm_wg's result on persistent warp-specialised blocks: a 1-D grid of at most one block per SM (WS_THREADS threads,
// GEMM_WS_SMEM_BYTES; tmaps: WS_TMAP_BYTES of global scratch per block), block b taking tiles b, b + grid, ... of
// gemm_wg's grouped order, so the ring runs on from one tile into the next. A grid larger than the GPU's SM-id count
// (%nsmid: a 132-block grid on a 114-SM H100 PCIe) strides by that count instead, its extra blocks leaving at once:
// otherwise they would run as a second wave after the others finished (1.3-1.75x the time).
// CODE 9: B is dequant_weight's exact widening of e4m3 codes, S their fp32 row scales (gemm_wg_q's fp8 result).
// gemm_ws_persistent: the wgmma body of gemm_ws and gemm_ws_f8 (CODE 10: e4m3 A and B, K steps of 128 codes).
template <typename T, bool RESIDUAL, int CODE>
__device__ __forceinline__ void gemm_ws_persistent(const void* __restrict__ A, const void* __restrict__ B, const T* __restrict__ R,
                                                   T* __restrict__ C, int M, int N, int K, unsigned char* __restrict__ smem_raw,
                                                   unsigned char* __restrict__ tmaps, const float* __restrict__ S, const float* __restrict__ SA) {
#ifdef KILN_HAVE_WGMMA
  const int nt = (N + WG_BN - 1) / WG_BN, mt = (M + WG_BM - 1) / WG_BM;
  // a grid sized for 132 SMs on a GPU with fewer: the blocks past its SM-id count leave, the rest stride by it
  uint32_t nsm;
  asm("mov.u32 %0, %%nsmid;\n" : "=r"(nsm));
  const int stride = nsm >= 1 && nsm < gridDim.x ? (int)nsm : (int)gridDim.x;
  if ((int)blockIdx.x >= stride) return;
  const auto tile = [=](int i, int& m0, int& n0) { wg_tile_of(i, mt, nt, m0, n0); };
  gemm_ws_tiles_wgmma<T, T, RESIDUAL, decltype(tile), CODE>(A, B, R, C, nullptr, M, N, K, 0, K / (CODE == 10 ? 128 : WG_BK), 0, false, smem_raw,
                                                            tile, blockIdx.x, stride, mt * nt, tmaps, S, SA);
#endif
}

template <typename T, bool RESIDUAL, int CODE = 0>
__device__ __forceinline__ void gemm_ws(const T* __restrict__ A, const T* __restrict__ B, const T* __restrict__ R, T* __restrict__ C,
                                        int M, int N, int K, unsigned char* __restrict__ smem_raw, unsigned char* __restrict__ tmaps,
                                        const float* __restrict__ S = nullptr) {
#ifdef KILN_HAVE_WGMMA
  gemm_ws_persistent<T, RESIDUAL, CODE>(A, B, R, C, M, N, K, smem_raw, tmaps, S, nullptr);
#else
  const int nt = (N + WG_BN - 1) / WG_BN, mt = (M + WG_BM - 1) / WG_BM;
  for (int i = blockIdx.x; i < mt * nt; i += gridDim.x) {
    int m0, n0;
    wg_tile_of(i, mt, nt, m0, n0);
    for (int e = threadIdx.x; e < WG_BM * WG_BN; e += blockDim.x) {  // the portable path: one output at a time
      const int m = m0 + e / WG_BN, n = n0 + e % WG_BN;
      if (m >= M || n >= N) continue;
      float v = 0.f;
      for (int k = 0; k < K; ++k) v += to_float(A[(size_t)m * K + k]) * to_float(B[(size_t)n * K + k]);
      if constexpr (CODE == 9) v *= S[n];
      if constexpr (RESIDUAL) v += to_float(R[(size_t)m * N + n]);
      C[(size_t)m * N + n] = from_float<T>(v);
    }
  }
#endif
}

// A quantized weight [N, K] widened to T, as gemm_wg_q's tiles hold it (4-bit / int8 codes times their group's
// scale (plus minimum), rounded once; e4m3 codes exact, their row scale left to gemm_ws<..., 9>): long prompts run
// this once per call and then the bf16 GEMM, whose speed the in-tile decode does not reach (H200: gemm_wg_q
// 226-350 TF/s). One 8-value chunk per thread and turn; any grid of 1-D blocks.
template <typename T, int CODE, int G>
__device__ __forceinline__ void dequant_weight(const void* __restrict__ Qv, const void* __restrict__ Sv, const void* __restrict__ Zv,
                                               T* __restrict__ W, int N, int K) {
  const size_t chunks = (size_t)N * (K / 8);
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < chunks; i += (size_t)gridDim.x * blockDim.x) {
    const int n = (int)(i / (K / 8)), k0 = (int)(i % (K / 8)) * 8;
    float scl[1] = {0.f}, mnm[1] = {0.f};
    if constexpr (CODE == 4 || CODE == 8) {
      const size_t at = (size_t)n * (K / G) + k0 / G;
      scl[0] = __half2float(static_cast<const __half*>(Sv)[at]);
      mnm[0] = CODE == 4 ? __half2float(static_cast<const __half*>(Zv)[at]) : 0.f;
    }
    uint32_t w[2];
    if constexpr (CODE == 4) {
      w[0] = static_cast<const uint32_t*>(Qv)[i];
    } else {
      const uint2 v = static_cast<const uint2*>(Qv)[i];
      w[0] = v.x, w[1] = v.y;
    }
    *reinterpret_cast<uint4*>(W + i * 8) = wg_decode_chunk<T, CODE>(w, scl[0], mnm[0]);
  }
}

// gemm_rows_wg's contract and grid (split K over grid.z) on the warp-specialised tile.
template <typename T, typename OutT, bool RESIDUAL>
__device__ __forceinline__ void gemm_rows_ws(const T* __restrict__ A, const T* __restrict__ W, const T* __restrict__ R,
                                             OutT* __restrict__ C, float* __restrict__ ws, int M, int N, int K, int ksplit,
                                             unsigned char* __restrict__ smem_raw, unsigned char* __restrict__ tmaps) {
  const int steps = K / ksplit / WG_BK, z = blockIdx.z;
  gemm_ws_tile<T, OutT, RESIDUAL>(A, W, R, C, ws, M, N, K, z * steps * WG_BK, steps, z, ksplit > 1, smem_raw, blockIdx.y * WG_BM,
                                  blockIdx.x * WG_BN, tmaps);
}

// ---- e4m3 activations on fp8 tensor cores (fp8 weights: e4m3 codes [N, K] with one fp32 scale per row) ----
// Each token's activations are quantized on the fly to e4m3 with one fp32 scale per token (its largest magnitude
// maps to 448, e4m3's largest finite value; round to nearest, saturating), then the GEMM runs on fp8 wgmma (twice
// bf16's tensor-core rate, and no widening of the weight codes) and the epilogue multiplies each sum by the token's
// and the weight row's scales. Sums accumulate in the tensor cores' fp32 (Hopper's fp8 accumulation keeps fewer
// bits than a full fp32 add: the "fast accumulation" inference kernels use; benchmarks/NOTES.md measures the error).

// Row m of X [M, K] (16-bit T) -> Q [M, K] e4m3 codes and SA[m] = max |x| / 448 (0 for a zero row: its codes are 0).
// One block of QROWS_THREADS per row (grid M); K % 8 == 0 and K <= 8 * QROWS_THREADS * CPT: each thread holds its CPT
// chunks of 8 values in registers between the maximum and the conversion, so the row is read from memory once.
constexpr int QROWS_THREADS = 256;
template <typename T, int CPT>
__device__ __forceinline__ void quant_rows_e4m3(const T* __restrict__ X, uint8_t* __restrict__ Q, float* __restrict__ SA, int M, int K) {
  __shared__ float wmax[QROWS_THREADS / 32];
  const int m = blockIdx.x, tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  if (m >= M) return;
  const uint4* x = reinterpret_cast<const uint4*>(X + (size_t)m * K);
  const int chunks = K / 8;
  uint4 v[CPT];
  float amax = 0.f;
#pragma unroll
  for (int i = 0; i < CPT; ++i) {
    const int c = tid + i * QROWS_THREADS;
    v[i] = c < chunks ? x[c] : make_uint4(0, 0, 0, 0);
    const T* e = reinterpret_cast<const T*>(&v[i]);
#pragma unroll
    for (int j = 0; j < 8; ++j) amax = fmaxf(amax, fabsf(to_float(e[j])));
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  if (lane == 0) wmax[warp] = amax;
  __syncthreads();
  amax = 0.f;
#pragma unroll
  for (int w = 0; w < QROWS_THREADS / 32; ++w) amax = fmaxf(amax, wmax[w]);
  const float inv = amax > 0.f ? 448.f / amax : 0.f;
  if (tid == 0) SA[m] = amax / 448.f;
  uint2* q = reinterpret_cast<uint2*>(Q + (size_t)m * K);
#pragma unroll
  for (int i = 0; i < CPT; ++i) {
    const int c = tid + i * QROWS_THREADS;
    if (c >= chunks) break;
    const T* e = reinterpret_cast<const T*>(&v[i]);
    uint32_t w[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const __nv_fp8x2_storage_t lo = __nv_cvt_float2_to_fp8x2(make_float2(to_float(e[4 * h]) * inv, to_float(e[4 * h + 1]) * inv), __NV_SATFINITE, __NV_E4M3);
      const __nv_fp8x2_storage_t hi = __nv_cvt_float2_to_fp8x2(make_float2(to_float(e[4 * h + 2]) * inv, to_float(e[4 * h + 3]) * inv), __NV_SATFINITE, __NV_E4M3);
      w[h] = (uint32_t)lo | ((uint32_t)hi << 16);
    }
    q[c] = make_uint2(w[0], w[1]);
  }
}

// Without sm_90a (the fatbin's forward-compatible PTX on a later GPU): the tile (m0, n0) over K steps kbeg / 128 ..
// + steps - 1 on CUDA cores, one output per thread at a time; the same products and scales, fp32 sums in K order.
template <typename T, typename OutT, bool RESIDUAL>
__device__ __forceinline__ void gemm_f8_tile_portable(const uint8_t* __restrict__ Aq, const float* __restrict__ SA, const uint8_t* __restrict__ Bq,
                                                      const float* __restrict__ S, const T* __restrict__ R, OutT* __restrict__ C,
                                                      float* __restrict__ ws, int M, int N, int K, int kbeg, int steps, int z, bool split,
                                                      int m0, int n0) {
  for (int i = threadIdx.x; i < WG_BM * WG_BN; i += blockDim.x) {
    const int m = m0 + i / WG_BN, n = n0 + i % WG_BN;
    if (m >= M || n >= N) continue;
    float v = 0.f;
    for (int k = kbeg; k < kbeg + steps * 128; ++k) v += kv_decode<kKvFp8>(Aq[(size_t)m * K + k]) * kv_decode<kKvFp8>(Bq[(size_t)n * K + k]);
    v = __fmul_rn(__fmul_rn(v, S[n]), SA[m]);
    if (split) {
      ws[((size_t)z * M + m) * N + n] = v;
    } else {
      if constexpr (RESIDUAL) v += to_float(R[(size_t)m * N + n]);
      C[(size_t)m * N + n] = from_float<OutT>(v);
    }
  }
}

// C = (SA . S^T) * (Aq . Bq^T) (+ R): gemm_ws over e4m3 activations and weights. Same persistent launch as gemm_ws
// (WS_THREADS, GEMM_WS_SMEM_BYTES, WS_TMAP_BYTES per block); K % 128 == 0.
template <typename T, bool RESIDUAL>
__device__ __forceinline__ void gemm_ws_f8(const uint8_t* __restrict__ Aq, const float* __restrict__ SA, const uint8_t* __restrict__ Bq,
                                           const float* __restrict__ S, const T* __restrict__ R, T* __restrict__ C, int M, int N, int K,
                                           unsigned char* __restrict__ smem_raw, unsigned char* __restrict__ tmaps) {
#ifdef KILN_HAVE_WGMMA
  gemm_ws_persistent<T, RESIDUAL, 10>(Aq, Bq, R, C, M, N, K, smem_raw, tmaps, S, SA);
#else
  for (int i = blockIdx.x; i < ((M + WG_BM - 1) / WG_BM) * ((N + WG_BN - 1) / WG_BN); i += gridDim.x) {
    int m0, n0;
    wg_tile_of(i, (M + WG_BM - 1) / WG_BM, (N + WG_BN - 1) / WG_BN, m0, n0);
    gemm_f8_tile_portable<T, T, RESIDUAL>(Aq, SA, Bq, S, R, C, nullptr, M, N, K, 0, K / 128, 0, false, m0, n0);
  }
#endif
}

// gemm_rows_ws's contract and grid (K cut into ksplit ranges over grid.z, fp32 partials for gemm_rows_big_reduce)
// over e4m3 activations and weights; K % (128 * ksplit) == 0.
template <typename T, typename OutT, bool RESIDUAL>
__device__ __forceinline__ void gemm_rows_ws_f8(const uint8_t* __restrict__ Aq, const float* __restrict__ SA, const uint8_t* __restrict__ W,
                                                const float* __restrict__ S, const T* __restrict__ R, OutT* __restrict__ C,
                                                float* __restrict__ ws, int M, int N, int K, int ksplit, unsigned char* __restrict__ smem_raw,
                                                unsigned char* __restrict__ tmaps) {
  const int steps = K / ksplit / 128, z = blockIdx.z, m0 = blockIdx.y * WG_BM, n0 = blockIdx.x * WG_BN;
#ifdef KILN_HAVE_WGMMA
  const auto tile = [=](int, int& m, int& n) { m = m0; n = n0; };
  gemm_ws_tiles_wgmma<T, OutT, RESIDUAL, decltype(tile), 10>(Aq, W, R, C, ws, M, N, K, z * steps * 128, steps, z, ksplit > 1, smem_raw, tile, 0, 1,
                                                             1, tmaps, S, SA);
#else
  gemm_f8_tile_portable<T, OutT, RESIDUAL>(Aq, SA, W, S, R, C, ws, M, N, K, z * steps * 128, steps, z, ksplit > 1, m0, n0);
#endif
}

}  // namespace kiln
