// kiln: decode GEMV over quantized weights (passes/quantize.py formats), device functions.
//
//   y[n] = sum_g s[n,g] * sum_{k in g} x[k] q[n,k]  (+ z[n,g] * sum_{k in g} x[k])
//
// q4 (BITS 4): 8 codes per uint32, nibble j = element 8u + j, w = s q + z.
// q8 (BITS 8): int8 codes, w = s q. Scales/minima fp16, one per G weights.
// fp8 (BITS kF8): e4m3 codes (kv_quant.cuh's decoder: the sm_89+ cvt), w = s e4m3(q),
// one fp32 scale per row (G = K).
// One block per ROWS rows, its NW warps splitting K (lane l of warp w takes
// the 16-byte units u = 32 w + l, + 32 NW, ... of every row) (32 q4 / 16 q8 weights; a warp reads 512 contiguous bytes
// per row and step, all ROWS loads issued first), x for its unit comes from
// L1 (shared by the ROWS rows, as is its sum for the minimum term).
// Measured on H100, Llama-3-8B shape, whole decode step (share of copy BW):
//   v1 (4-/8-byte units, 8 weights, ROWS 4): q4g128 31%, q8 45%
//   v2 (this, 16-byte units): ROWS 4: q4g128 37-38%, q8 56%; ROWS 8: 38-39% / 45%
//   dlight's GEMV on the dequantize expression: 39% / 69-70%  -> off by default
//   ncu of v2: 2 resident blocks/SM on N = 4096 (grid 256 x 4 warps): 12% warps
//   active, down_proj 1432 us vs dlight 852 us per step -> v3 splits K across
//   the block's warps (grid N / ROWS).
//   v3 (this), NW 4 x ROWS 4: q4g128 44.8-46.0% (277-286 tok/s) vs dlight 41.4%
//   (257) in the same call -> default for 4-bit codes; q8 67.7-69.3% vs dlight
//   67.9-71.3% -> 8-bit stays on dlight. NW 8 x ROWS 2: 40-43% / 66-67%.
//   (KILN_CUDA_QGEMV=1), correct (GPU = CPU to 7e-6 at fp32, both paths). Codes become floats without I2F (quarter rate on sm_90):
// the code is OR-ed / byte-permuted into the mantissa of 2^23 and 2^23 is
// subtracted (exact), so a weight costs an extract, an FADD and an FMA.
// Launch (TIR side): grid ceil(N / ROWS), block NW * 32.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace kiln {

constexpr int kF8 = 9;  // BITS value of e4m3 codes (8 bits, a float grid)

// sum_j x[j] * code_j over one 16-byte unit of codes (32 q4 / 16 q8 or e4m3 codes), before
// the group's scale (and q4's minimum term): shared by qgemv and qmoe.cuh's expert GEMVs.
template <int BITS>
__device__ __forceinline__ float qunit_dot(const uint4& w, const float* xf) {
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
  float dot = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (BITS == 4) {
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float c = __uint_as_float(((words[i] >> (4 * j)) & 0xFu) | 0x4B000000u) - 8388608.f;
        dot = fmaf(xf[8 * i + j], c, dot);
      }
    } else if constexpr (BITS == kF8) {
      float f[4];
      kv_decode4<kKvFp8>(words[i], f);
#pragma unroll
      for (int j = 0; j < 4; ++j) dot = fmaf(xf[4 * i + j], f[j], dot);
    } else {
      const uint32_t b = words[i] ^ 0x80808080u;  // int8 -> code + 128 (unsigned)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float c = __uint_as_float(__byte_perm(b, 0x4B000000u, 0x7540 + j)) - 8388736.f;  // 2^23 + 128
        dot = fmaf(xf[4 * i + j], c, dot);
      }
    }
  }
  return dot;
}

template <typename T, typename OutT, int BITS, int K, int G, int NW, int ROWS>
__device__ __forceinline__ void qgemv(const T* __restrict__ x, const void* __restrict__ qv, const void* __restrict__ sv,
                                      const void* __restrict__ zv, OutT* __restrict__ y, int N) {
  const __half* __restrict__ z = static_cast<const __half*>(zv);  // q4 only
  constexpr int UW = BITS == 4 ? 32 : 16;  // weights per 16-byte unit of codes
  const __half* __restrict__ s = static_cast<const __half*>(sv);
  static_assert(K % UW == 0 && G % UW == 0 && K % G == 0, "whole 16-byte units inside groups");
  constexpr int UNITS = K / UW, NG = K / G;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int row0 = blockIdx.x * ROWS;  // the block's NW warps split K of the same ROWS rows
  const uint4* q4 = reinterpret_cast<const uint4*>(qv);
  float acc[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) acc[r] = 0.f;
  for (int u = warp * 32 + lane; u < UNITS; u += NW * 32) {
    uint4 w[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) w[r] = __ldg(q4 + (size_t)min(row0 + r, N - 1) * UNITS + u);  // tail rows recompute the last row
    float xf[UW];
#pragma unroll
    for (int c = 0; c < UW / 8; ++c) load_vec<T, 8>(x + u * UW + c * 8, xf + c * 8);
    float xw = 0.f;
    if constexpr (BITS == 4) {
#pragma unroll
      for (int j = 0; j < UW; ++j) xw += xf[j];
    }
    const int g = u * UW / G;
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const size_t row = (size_t)min(row0 + r, N - 1);
      const float dot = qunit_dot<BITS>(w[r], xf);
      const float scale = BITS == kF8 ? __ldg(static_cast<const float*>(sv) + row) : __half2float(__ldg(s + row * NG + g));
      acc[r] = fmaf(scale, dot, acc[r]);
      if constexpr (BITS == 4) acc[r] = fmaf(__half2float(__ldg(z + row * NG + g)), xw, acc[r]);
    }
  }
  __shared__ float part[NW][ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    float v = acc[r];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0) part[warp][r] = v;
  }
  __syncthreads();
  if (threadIdx.x < ROWS && row0 + threadIdx.x < N) {
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < NW; ++w) v += part[w][threadIdx.x];
    y[row0 + threadIdx.x] = from_float<OutT>(v);
  }
}

// q4k (passes/quant/formats/q4k.py): 4-bit codes per 32 with a uint8 scale code sc and an int8
// minimum code mz per 32, fp16 super-block scales d (of sc) and m (of mz) per SB weights:
// w = (d sc) q + (m mz). qgemv's loop with the unit (32 codes) = the group; each unit's scale
// and minimum are two byte loads and two fp16 loads (the latter shared by SB / 32 units, in L1).
template <typename T, typename OutT, int K, int SB, int NW, int ROWS>
__device__ __forceinline__ void qgemv4k(const T* __restrict__ x, const void* __restrict__ qv, const uint8_t* __restrict__ sc,
                                        const int8_t* __restrict__ mz, const __half* __restrict__ d,
                                        const __half* __restrict__ m, OutT* __restrict__ y, int N) {
  static_assert(K % SB == 0 && SB % 32 == 0, "whole super-blocks of whole 32-weight units");
  constexpr int UNITS = K / 32, NSB = K / SB, PER = SB / 32;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int row0 = blockIdx.x * ROWS;
  const uint4* q4 = reinterpret_cast<const uint4*>(qv);
  float acc[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) acc[r] = 0.f;
  for (int u = warp * 32 + lane; u < UNITS; u += NW * 32) {
    uint4 w[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) w[r] = __ldg(q4 + (size_t)min(row0 + r, N - 1) * UNITS + u);
    float xf[32];
#pragma unroll
    for (int c = 0; c < 4; ++c) load_vec<T, 8>(x + u * 32 + c * 8, xf + c * 8);
    float xw = 0.f;
#pragma unroll
    for (int j = 0; j < 32; ++j) xw += xf[j];
    const int b = u / PER;
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const size_t row = (size_t)min(row0 + r, N - 1);
      const float dot = qunit_dot<4>(w[r], xf);
      const float scale = __half2float(__ldg(d + row * NSB + b)) * (float)__ldg(sc + row * UNITS + u);
      const float minimum = __half2float(__ldg(m + row * NSB + b)) * (float)__ldg(mz + row * UNITS + u);
      acc[r] = fmaf(scale, dot, fmaf(minimum, xw, acc[r]));
    }
  }
  __shared__ float part[NW][ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    float v = acc[r];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0) part[warp][r] = v;
  }
  __syncthreads();
  if (threadIdx.x < ROWS && row0 + threadIdx.x < N) {
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < NW; ++w) v += part[w][threadIdx.x];
    y[row0 + threadIdx.x] = from_float<OutT>(v);
  }
}

// q4k's scales and minima as q4g32's fp16 arrays (s = d sc, z = m mz per 32 weights), for the prompt
// GEMMs: the tensor-core kernels of 4-bit codes take them as they are. One thread per group;
// 2 x 2 bytes written per 32 weights (1/8 of the codes' bytes), once per prompt call.
template <int SB>
__device__ __forceinline__ void q4k_expand(const uint8_t* __restrict__ sc, const int8_t* __restrict__ mz,
                                           const __half* __restrict__ d, const __half* __restrict__ m, __half* __restrict__ s,
                                           __half* __restrict__ z, int groups_per_row, long total) {
  const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const long n = i / groups_per_row, b = n * (groups_per_row / (SB / 32)) + (i % groups_per_row) / (SB / 32);
  s[i] = __float2half_rn(__half2float(d[b]) * (float)sc[i]);
  z[i] = __float2half_rn(__half2float(m[b]) * (float)mz[i]);
}

}  // namespace kiln
