// kiln: mixture-of-experts decode GEMVs over quantized expert stacks (passes/quant
// formats; BITS as qgemv.cuh: 4 = q4 with a minimum, 8 = q8, kF8 = e4m3 with one fp32
// scale per row), device functions. The same blocks as moe.cuh's float kernels (a
// block's warps split the reduction of ROWS rows in 16-byte units of codes, the expert
// ids read on the device), each unit decoded by qgemv.cuh's qunit_dot.
//
// A stack [E, N, K] is stored as rows R = e N + n of the format's arrays: codes
// q [R, K / UW units], scales s [R, K / G] (fp16; fp8: fp32, G = K), minima z [R, K / G].
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace kiln {

template <int BITS, int K, int G>
struct QRows {
  static constexpr int UW = BITS == 4 ? 32 : 16;  // weights per 16-byte unit
  static constexpr int UNITS = K / UW, NG = K / G;
  static_assert(K % UW == 0 && G % UW == 0 && K % G == 0, "whole 16-byte units inside groups");
  const uint4* q;
  const void* s;
  const __half* z;

  __device__ __forceinline__ uint4 unit(size_t row, int u) const { return __ldg(q + row * UNITS + u); }
  // scale * dot (+ minimum * sum of x) of unit u of `row`, xs = that sum (q4 only)
  __device__ __forceinline__ float term(size_t row, int u, const uint4& w, const float* xf, float xs) const {
    const int g = u * UW / G;
    const float dot = qunit_dot<BITS>(w, xf);
    if constexpr (BITS == kF8) return __ldg(static_cast<const float*>(s) + row) * dot;
    float v = __half2float(__ldg(static_cast<const __half*>(s) + row * NG + g)) * dot;
    if constexpr (BITS == 4) v = fmaf(__half2float(__ldg(z + row * NG + g)), xs, v);
    return v;
  }
};

template <typename T, int UW>
__device__ __forceinline__ float load_x_unit(const T* __restrict__ x, float* xf) {
  load_vec<T, 8>(x, xf);
#pragma unroll
  for (int c = 1; c < UW / 8; ++c) load_vec<T, 8>(x + c * 8, xf + c * 8);
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < UW; ++j) s += xf[j];
  return s;
}

// x [T, K] (16-bit), stack [E, 2F, K] -> y [T, KTOP, F] = silu(gate) * up. As expert_gate_up_silu.
template <typename T, int BITS, int K, int G, int KTOP, int NW, int ROWS>
__device__ __forceinline__ void qexpert_gate_up_silu(const T* __restrict__ x, const void* __restrict__ qv, const void* __restrict__ sv,
                                                     const void* __restrict__ zv, const int* __restrict__ ids, T* __restrict__ y,
                                                     int F, int n_exp) {
  using Q = QRows<BITS, K, G>;
  const Q w{static_cast<const uint4*>(qv), sv, static_cast<const __half*>(zv)};
  const int tj = blockIdx.y, t = tj / KTOP;
  const int e = min(max(ids[tj], 0), n_exp - 1);
  const int n0 = blockIdx.x * ROWS;
  size_t row[2 * ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    row[r] = (size_t)e * 2 * F + min(n0 + r, F - 1);
    row[ROWS + r] = row[r] + F;
  }
  float acc[2 * ROWS];
#pragma unroll
  for (int r = 0; r < 2 * ROWS; ++r) acc[r] = 0.f;
  for (int u = threadIdx.x; u < Q::UNITS; u += NW * 32) {
    uint4 c[2 * ROWS];
#pragma unroll
    for (int r = 0; r < 2 * ROWS; ++r) c[r] = w.unit(row[r], u);
    float xf[Q::UW];
    const float xs = load_x_unit<T, Q::UW>(x + (size_t)t * K + u * Q::UW, xf);
#pragma unroll
    for (int r = 0; r < 2 * ROWS; ++r) acc[r] += w.term(row[r], u, c[r], xf, xs);
  }
  store_silu_mul<T, NW, ROWS>(acc, y, tj, n0, F);
}

// a [T, KTOP, F], stack [E, D, F], ids, wts (, residual) -> y [T, D]. As expert_down.
template <typename T, int BITS, int F, int G, int KTOP, int NW, int ROWS, bool RESIDUAL>
__device__ __forceinline__ void qexpert_down(const T* __restrict__ a, const void* __restrict__ qv, const void* __restrict__ sv,
                                             const void* __restrict__ zv, const int* __restrict__ ids, const float* __restrict__ wts,
                                             const T* __restrict__ residual, T* __restrict__ y, int D, int n_exp) {
  using Q = QRows<BITS, F, G>;
  const Q w{static_cast<const uint4*>(qv), sv, static_cast<const __half*>(zv)};
  __shared__ int se[KTOP];
  __shared__ float sw[KTOP];
  const int t = blockIdx.y, d0 = blockIdx.x * ROWS;
  routing_to_shared<KTOP>(ids, wts, t, n_exp, se, sw);
  float acc[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) acc[r] = 0.f;
  for (int i = threadIdx.x; i < KTOP * Q::UNITS; i += NW * 32) {
    const int j = i / Q::UNITS, u = i - j * Q::UNITS;
    uint4 c[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) c[r] = w.unit((size_t)se[j] * D + min(d0 + r, D - 1), u);
    float xf[Q::UW];
    const float xs = load_x_unit<T, Q::UW>(a + ((size_t)t * KTOP + j) * F + u * Q::UW, xf);
    const float s = sw[j];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) acc[r] = fmaf(s, w.term((size_t)se[j] * D + min(d0 + r, D - 1), u, c[r], xf, xs), acc[r]);
  }
  store_rows<T, NW, ROWS, RESIDUAL>(acc, residual, y, t, d0, D);
}

}  // namespace kiln
