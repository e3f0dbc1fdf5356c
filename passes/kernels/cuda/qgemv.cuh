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

#include <type_traits>

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
                                      const void* __restrict__ zv, OutT* __restrict__ y, int N,
                                      const OutT* __restrict__ r = nullptr) {  // r: a residual added to y (o / down projections)
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
    y[row0 + threadIdx.x] = from_float<OutT>(r ? v + to_float(r[row0 + threadIdx.x]) : v);
  }
}

// The 8 nibbles of a q4 code word as four pairs of 16-bit values of T, pair j = (nibble j, nibble
// j + 4), each biased: B + q with B = 128 (bf16) or 1024 (fp16), exact (the nibble lands in the
// low mantissa bits of B). Three shifts and four LOP3s for 8 weights.
template <typename T>
__device__ __forceinline__ void q4_pairs(uint32_t w, uint32_t (&p)[4]) {
  constexpr uint32_t kMagic = RowsSame<T, __nv_bfloat16>::value ? 0x43004300u : 0x64006400u;
#pragma unroll
  for (int j = 0; j < 4; ++j) p[j] = ((w >> (4 * j)) & 0x000F000Fu) | kMagic;
}
template <typename T> __host__ __device__ constexpr float q4_pair_bias() { return RowsSame<T, __nv_bfloat16>::value ? 128.f : 1024.f; }

// qgemv_mma: decode GEMV of q4 codes (groups of G = 32, 64 or 128) on the tensor cores, for 16-bit
// activations T. One block per 16 RT rows; warp w of its NW takes the w-th contiguous share of K, in
// rounds of U steps of 128 weights. Per step a lane reads, for rows g and g + 8 of each row tile (g =
// lane / 4), 4 code words = 32 weights (a group's G / 32 words adjacent: one 16-byte load for G = 128,
// four 4-byte loads for G = 32), turns them into biased 16-bit pairs (q4_pairs) and feeds them as the
// A operand of m16n8k16 MMAs (fp32 accumulation) whose B operand is x, all 8 columns alike: the dot
// product may take K in any order the codes and x agree on, so each lane builds its B pairs from one
// 16-byte load of x per code word (4 PRMTs). The group sums of x come from the same MMAs with A all
// ones. Per group and row, in fp32: acc += s D + (z - B s) sum(x)  (B: the pair bias). All of a
// round's loads (codes, and the round's scales and minima as one vector per row) are issued before
// its first MMA. Cost per lane and 8 weights: ~7 integer ops + 1/2 MMA, against the float path's ~32.
// Launch: grid ceil(N / (16 RT)), block NW * 32; K / 128 a multiple of NW U.
template <typename T, typename OutT, int K, int G, int NW, int RT, int U>
__device__ __forceinline__ void qgemv_mma(const T* __restrict__ x, const void* __restrict__ qv, const void* __restrict__ sv,
                                          const void* __restrict__ zv, OutT* __restrict__ y, int N,
                                          const OutT* __restrict__ r = nullptr) {  // r: a residual added to y
  constexpr int STEPS = K / 128, W = G / 32, GPS = 128 / G, NG = K / G, WPR = K / 8;  // W: words per lane and group
  constexpr int SV = U * GPS;  // scales per row and round: 2 SV bytes, in vectors of up to 16 bytes
  static_assert(sizeof(T) == 2 && K % 128 == 0 && (G == 32 || G == 64 || G == 128), "16-bit x, 128-weight steps");
  static_assert(STEPS % (NW * U) == 0 && (SV == 1 || SV % 2 == 0) && SV <= 32, "whole rounds per warp; scales in vectors");
  using SVec = typename std::conditional<SV >= 8, uint4, typename std::conditional<SV == 4, uint2,
               typename std::conditional<SV == 2, uint32_t, unsigned short>::type>::type>::type;
  constexpr int NSV = SV >= 8 ? SV / 8 : 1;  // vectors per row and round
  constexpr float kBias = q4_pair_bias<T>();
  constexpr uint32_t kOnes = RowsSame<T, __nv_bfloat16>::value ? 0x3F803F80u : 0x3C003C00u;  // (1, 1)
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, c = lane % 4;
  const uint32_t* __restrict__ q = static_cast<const uint32_t*>(qv);
  const __half* __restrict__ s = static_cast<const __half*>(sv);
  const __half* __restrict__ z = static_cast<const __half*>(zv);
  int rows[RT][2];
#pragma unroll
  for (int t = 0; t < RT; ++t) {
    rows[t][0] = min(blockIdx.x * 16 * RT + 16 * t + g, N - 1);  // tail rows recompute the last row
    rows[t][1] = min(blockIdx.x * 16 * RT + 16 * t + g + 8, N - 1);
  }
  float acc[RT][2] = {};
  constexpr int PER_WARP = STEPS / NW;
  struct Round {
    uint32_t wv[U][RT][2][4];
    uint4 xv[U][4];
    SVec sv[RT][2][NSV], zv[RT][2][NSV];
  };
  // a round's loads: codes, x, and one vector of scales and minima per row
  auto load = [&](int st0, Round& r) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int st = st0 + u;
#pragma unroll
      for (int t = 0; t < RT; ++t)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint32_t* rowp = q + (size_t)rows[t][h] * WPR + st * 16 + W * c;
          if constexpr (W == 4) {
            const uint4 v = __ldg(reinterpret_cast<const uint4*>(rowp));
            r.wv[u][t][h][0] = v.x; r.wv[u][t][h][1] = v.y; r.wv[u][t][h][2] = v.z; r.wv[u][t][h][3] = v.w;
          } else {
#pragma unroll
            for (int gi = 0; gi < GPS; ++gi)
#pragma unroll
              for (int i = 0; i < W; ++i) r.wv[u][t][h][gi * W + i] = __ldg(rowp + (G / 8) * gi + i);
          }
        }
#pragma unroll
      for (int i = 0; i < 4; ++i)  // the 8 x of word i
        r.xv[u][i] = __ldg(reinterpret_cast<const uint4*>(x + st * 128 + G * (i / W) + 8 * W * c + 8 * (i % W)));
    }
#pragma unroll
    for (int t = 0; t < RT; ++t)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int v = 0; v < NSV; ++v) {
          r.sv[t][h][v] = __ldg(reinterpret_cast<const SVec*>(s + (size_t)rows[t][h] * NG + st0 * GPS) + v);
          r.zv[t][h][v] = __ldg(reinterpret_cast<const SVec*>(z + (size_t)rows[t][h] * NG + st0 * GPS) + v);
        }
  };
  auto compute = [&](const Round& r) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int gi = 0; gi < GPS; ++gi) {
        uint32_t xb[W][4];  // B pairs of words gi W .. : (x_j, x_{j+4}), j = 0..3
#pragma unroll
        for (int i = 0; i < W; ++i) {
          const uint4 v = r.xv[u][gi * W + i];
          xb[i][0] = __byte_perm(v.x, v.z, 0x5410); xb[i][1] = __byte_perm(v.x, v.z, 0x7632);
          xb[i][2] = __byte_perm(v.y, v.w, 0x5410); xb[i][3] = __byte_perm(v.y, v.w, 0x7632);
        }
        float xs[4] = {0.f, 0.f, 0.f, 0.f};  // sum of the group's x (every element alike)
#pragma unroll
        for (int i = 0; i < W; ++i) {
          mma_16816<T>(xs, kOnes, kOnes, kOnes, kOnes, xb[i][0], xb[i][1]);
          mma_16816<T>(xs, kOnes, kOnes, kOnes, kOnes, xb[i][2], xb[i][3]);
        }
#pragma unroll
        for (int t = 0; t < RT; ++t) {
          float d[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
          for (int i = 0; i < W; ++i) {
            uint32_t pa[4], pb[4];
            q4_pairs<T>(r.wv[u][t][0][gi * W + i], pa);
            q4_pairs<T>(r.wv[u][t][1][gi * W + i], pb);
            mma_16816<T>(d, pa[0], pb[0], pa[1], pb[1], xb[i][0], xb[i][1]);
            mma_16816<T>(d, pa[2], pb[2], pa[3], pb[3], xb[i][2], xb[i][3]);
          }
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const float sc = __half2float(reinterpret_cast<const __half*>(r.sv[t][h])[u * GPS + gi]);
            const float mn = __half2float(reinterpret_cast<const __half*>(r.zv[t][h])[u * GPS + gi]);
            acc[t][h] = fmaf(sc, d[2 * h], fmaf(fmaf(-kBias, sc, mn), xs[0], acc[t][h]));
          }
        }
      }
    }
  };
  // (a register double buffer, the next round's loads issued before this round's MMAs, measured slower:
  // benchmarks/NOTES.md)
  for (int st0 = warp * PER_WARP; st0 < (warp + 1) * PER_WARP; st0 += U) {
    Round cur;
    load(st0, cur);
    compute(cur);
  }
  __shared__ float part[NW][16 * RT];
  if (c == 0) {
#pragma unroll
    for (int t = 0; t < RT; ++t) {
      part[warp][16 * t + g] = acc[t][0];
      part[warp][16 * t + g + 8] = acc[t][1];
    }
  }
  __syncthreads();
  if (threadIdx.x < 16 * RT) {
    const int row = blockIdx.x * 16 * RT + threadIdx.x;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < NW; ++w) v += part[w][threadIdx.x];
    if (row < N) y[row] = from_float<OutT>(r ? v + to_float(r[row]) : v);
  }
}

// q4k (passes/quant/formats/q4k.py): 4-bit codes per 32 with a uint8 scale code sc and an int8
// minimum code mz per 32, fp16 super-block scales d (of sc) and m (of mz) per SB weights:
// w = (d sc) q + (m mz). qgemv's loop with the unit (32 codes) = the group; each unit's scale
// and minimum are two byte loads and two fp16 loads (the latter shared by SB / 32 units, in L1).
template <typename T, typename OutT, int K, int SB, int NW, int ROWS>
__device__ __forceinline__ void qgemv4k(const T* __restrict__ x, const void* __restrict__ qv, const uint8_t* __restrict__ sc,
                                        const int8_t* __restrict__ mz, const __half* __restrict__ d,
                                        const __half* __restrict__ m, OutT* __restrict__ y, int N,
                                        const OutT* __restrict__ r = nullptr) {  // r: a residual added to y
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
    y[row0 + threadIdx.x] = from_float<OutT>(r ? v + to_float(r[row0 + threadIdx.x]) : v);
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
