// kiln: decode GEMV with fused prologue/epilogue, device functions.
//
//   y[n] = s * sum_k x'[k] * W[n, k]  (+ residual[n])
//
// x' and s by prologue MODE:
//   kPlain    x' = x,                         s = 1
//   kRmsNorm  x' = x * norm_w,                s = rsqrt(mean(x^2) + eps)
//             (RMSNorm folded in: the norm scale is one scalar per row of x,
//             so it moves out of the dot product)
//   kSiluMul  x' = silu(x[k]) * x[K + k]      (x is the [gate | up] vector)
// Each warp computes ROWS rows: 16-byte loads of W (4 chunks per lane in
// flight per row), x' formed on the fly in fp32 from x (L1/L2 hits), fp32
// accumulation, one warp reduction per row. SwiGLU stages x' once per block
// in dynamic shared memory (K values of T); the others need none.
// Launch (TIR side): grid ceil(N / (NW * ROWS)), block NW * 32.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace kiln {

enum GemvMode { kPlain = 0, kRmsNorm = 1, kSiluMul = 2 };

template <typename T, int MODE, int K, int NW, int ROWS, bool RESIDUAL>
__device__ __forceinline__ void gemv(const T* __restrict__ x, const T* __restrict__ norm_w, const T* __restrict__ W,
                                     const T* __restrict__ residual, T* __restrict__ y, T* __restrict__ xs, int N, float eps) {
  constexpr int VEC = 16 / sizeof(T);  // elements per 16-byte load
  static_assert(K % VEC == 0, "rows must be whole 16-byte chunks");
  constexpr int NCH = K / VEC;                 // 16-byte chunks per row
  constexpr int CHUNKS = (NCH + 31) / 32;      // per lane
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int row0 = (blockIdx.x * NW + warp) * ROWS;
  const T* wrow[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) wrow[r] = W + (size_t)min(row0 + r, N - 1) * K;  // tail rows recompute the last row

  // SwiGLU: x' = silu(gate) * up once per block, in shared memory (rounded to
  // T, as the unfused graph does). Plain and RMSNorm read x straight from L1/L2.
  if constexpr (MODE == kSiluMul) {
    for (int k = tid; k < K; k += NW * 32) {
      const float g = to_float(x[k]), u = to_float(x[K + k]);
      xs[k] = from_float<T>(g / (1.f + __expf(-g)) * u);
    }
    __syncthreads();
  }
  const uint4* xsrc = reinterpret_cast<const uint4*>(MODE == kSiluMul ? xs : x);
  const uint4* nsrc = reinterpret_cast<const uint4*>(norm_w);

  float acc[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) acc[r] = 0.f;
  float ss = 0.f;  // RMSNorm: sum of x^2, every warp computes it over the whole row
#pragma unroll 4
  for (int c = 0; c < CHUNKS; ++c) {
    const int col = c * 32 + lane;
    if (NCH % 32 != 0 && col >= NCH) break;  // ragged last chunk (no shuffles in this loop)
    uint4 wr[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) wr[r] = __ldg(reinterpret_cast<const uint4*>(wrow[r]) + col);
    const uint4 xr = MODE == kSiluMul ? xsrc[col] : __ldg(xsrc + col);
    const T* xe = reinterpret_cast<const T*>(&xr);
    float xf[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) xf[j] = to_float(xe[j]);
    if constexpr (MODE == kRmsNorm) {
      const uint4 nr = __ldg(nsrc + col);
      const T* ne = reinterpret_cast<const T*>(&nr);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        ss += xf[j] * xf[j];
        xf[j] *= to_float(ne[j]);
      }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const T* we = reinterpret_cast<const T*>(&wr[r]);
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[r] += xf[j] * to_float(we[j]);
    }
  }
  float scale = 1.f;
  if constexpr (MODE == kRmsNorm) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
    scale = rsqrtf(ss / K + eps);
  }
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    float v = acc[r];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    const int row = row0 + r;
    if (lane == 0 && row < N) {
      float out = v * scale;
      if constexpr (RESIDUAL) out += to_float(residual[row]);
      y[row] = from_float<T>(out);
    }
  }
}

}  // namespace kiln
