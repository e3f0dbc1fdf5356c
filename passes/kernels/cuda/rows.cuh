// kiln: the row-wise neighbours of the projections for many rows (a prompt's [1, s, K] or
// decode_batch's [B, 1, K]), device functions. dlight's schedules for them ran at 1.0-1.5 TB/s
// on the H200 (8B shape, 2048-token prompt: 65 RMSNorms 1.95 ms, 32 SwiGLUs 3.9 ms, instrumented).
//
//   rmsnorm_rows  y[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w      one warp per row, fp32 math
//   silu_mul_rows y[r] = silu(h[r, :F]) * hu[r, F:]                8 outputs per thread (hu: h again)
//
// 16-byte loads and stores; K % 256 == 0 (a warp's pass is 32 lanes x 8 values), F % 8 == 0.
// Launch: rmsnorm_rows grid ceil(rows / 8), 256 threads; silu_mul_rows grid ceil(rows * F / 2048), 256.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace kiln {

template <typename T>
__device__ __forceinline__ uint4 pack8(const float* v) {
  uint4 out;
  T* e = reinterpret_cast<T*>(&out);
#pragma unroll
  for (int j = 0; j < 8; ++j) e[j] = from_float<T>(v[j]);
  return out;
}

template <typename T, int K>
__device__ __forceinline__ void rmsnorm_rows(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y, int rows, float eps) {
  static_assert(K % 256 == 0, "K: whole warp passes of 8 values per lane");
  constexpr int P = K / 256;  // passes per lane
  const int row = blockIdx.x * 8 + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= rows) return;
  const T* xr = x + (size_t)row * K;
  float v[P][8];
  float ss = 0.f;
#pragma unroll
  for (int p = 0; p < P; ++p) {
    load_vec<T, 8>(xr + (p * 32 + lane) * 8, v[p]);
#pragma unroll
    for (int j = 0; j < 8; ++j) ss += v[p][j] * v[p][j];
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
  const float inv = rsqrtf(ss / K + eps);
#pragma unroll
  for (int p = 0; p < P; ++p) {
    float g[8];
    load_vec<T, 8>(w + (p * 32 + lane) * 8, g);
#pragma unroll
    for (int j = 0; j < 8; ++j) v[p][j] = v[p][j] * inv * g[j];
    *reinterpret_cast<uint4*>(y + (size_t)row * K + (p * 32 + lane) * 8) = pack8<T>(v[p]);
  }
}

template <typename T>
__device__ __forceinline__ void silu_mul_rows(const T* __restrict__ h, const T* __restrict__ hu, T* __restrict__ y, int rows, int F) {
  const size_t i = ((size_t)blockIdx.x * 256 + threadIdx.x) * 8, n = (size_t)rows * F;
  if (i >= n) return;
  const size_t r = i / F, c = i % F;
  float g[8], u[8];
  load_vec<T, 8>(h + r * 2 * F + c, g);
  load_vec<T, 8>(hu + r * 2 * F + F + c, u);
#pragma unroll
  for (int j = 0; j < 8; ++j) g[j] = g[j] / (1.f + __expf(-g[j])) * u[j];
  *reinterpret_cast<uint4*>(y + i) = pack8<T>(g);
}

}  // namespace kiln
